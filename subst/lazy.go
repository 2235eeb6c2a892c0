package subst

import (
	"context"
	"errors"
	"fmt"
	"sync"
	"time"

	"github.com/casnix/casnix/binarycache"
	"github.com/casnix/casnix/store"
)

// Lazy makes the store look as if it held every path an upstream has (a
// lazy lower store for Nix's Local Overlay Store, which never asks its
// lower store to substitute): Info answers for such a path from its
// narinfo, and Ensure fetches a path's closure when its bytes are first
// needed. Only narinfos acceptable to Substitute with the same checkSigs
// count, so a path answered for can be fetched.
//
// Fetched paths stay temp roots of this process for at least Grace (at
// most twice that), so a collection between the fetch and its reader's
// first open does not delete them; afterwards they are ordinary paths,
// kept only while something roots them, and fetched again if a collection
// deleted them and they are asked for again.
type Lazy struct {
	s         *Substituter
	checkSigs bool
	grace     time.Duration

	mu        sync.Mutex
	cur, prev *store.TempRoots
	closed    bool
	stop      chan struct{}
	done      chan struct{}
}

// DefaultGrace is how long a lazily fetched path is at least kept rooted.
const DefaultGrace = 10 * time.Minute

// Lazy starts a lazy view of the substituter; grace 0 is DefaultGrace.
// Close it before the substituter.
func (s *Substituter) Lazy(checkSigs bool, grace time.Duration) *Lazy {
	if grace <= 0 {
		grace = DefaultGrace
	}
	l := &Lazy{s: s, checkSigs: checkSigs, grace: grace, stop: make(chan struct{}), done: make(chan struct{})}
	go l.rotate()
	return l
}

// rotate drops the roots of the generation before the last every grace
// period: a root added at any time lives through at least one full period.
func (l *Lazy) rotate() {
	defer close(l.done)
	t := time.NewTicker(l.grace)
	defer t.Stop()
	for {
		select {
		case <-l.stop:
			return
		case <-t.C:
		}
		l.mu.Lock()
		old := l.prev
		l.prev, l.cur = l.cur, nil
		l.mu.Unlock()
		if old != nil {
			old.Close()
		}
	}
}

// Close drops the roots.
func (l *Lazy) Close() {
	close(l.stop)
	<-l.done
	l.mu.Lock()
	defer l.mu.Unlock()
	for _, r := range []*store.TempRoots{l.cur, l.prev} {
		if r != nil {
			r.Close()
		}
	}
	l.cur, l.prev, l.closed = nil, nil, true
}

// root adds name to the current generation. The lock is held across Add
// so a rotation cannot close the generation under it; Add waits only
// while a collection sweeps, which any fetch would wait for too.
func (l *Lazy) root(ctx context.Context, name string) error {
	l.mu.Lock()
	defer l.mu.Unlock()
	if l.closed {
		return errors.New("lazy store closed")
	}
	if l.cur == nil {
		r, err := l.s.st.NewTempRoots()
		if err != nil {
			return err
		}
		l.cur = r
	}
	return l.cur.Add(ctx, name)
}

// lookup is find with the lazy store's signature rule, where a narinfo
// without an acceptable signature is no narinfo at all (not an error): the
// path is simply not in the store.
func (l *Lazy) lookup(ctx context.Context, hash, name string) (*Found, error) {
	f, err := l.s.findHash(ctx, hash, name, l.checkSigs)
	if err != nil && onlyUntrusted(err) {
		return nil, nil
	}
	return f, err
}

// onlyUntrusted reports whether err (maybe joined) is made of
// UntrustedErrors only.
func onlyUntrusted(err error) bool {
	if j, ok := err.(interface{ Unwrap() []error }); ok {
		for _, e := range j.Unwrap() {
			if !onlyUntrusted(e) {
				return false
			}
		}
		return true
	}
	var ue *binarycache.UntrustedError
	return errors.As(err, &ue)
}

// Info is the path-info of name as a lazy store reports it: the store's
// if it holds the path, else the narinfo of an upstream that has it
// (registration time 0, as Nix's binary cache stores report it). Neither:
// store.ErrNotValid.
func (l *Lazy) Info(ctx context.Context, name string) (*store.PathInfo, error) {
	pi, err := l.s.st.Info(ctx, name)
	if !errors.Is(err, store.ErrNotValid) {
		return pi, err
	}
	f, err := l.lookup(ctx, store.HashPart(name), name)
	if err != nil {
		return nil, err
	}
	if f == nil {
		return nil, fmt.Errorf("%w: %s/%s", store.ErrNotValid, l.s.opts.StoreDir, name)
	}
	return upstreamInfo(f), nil
}

func upstreamInfo(f *Found) *store.PathInfo {
	pi := f.Info.PathInfo()
	pi.Registered = time.Unix(0, 0)
	return &pi
}

// Valid reports which of names the store holds or an upstream has.
func (l *Lazy) Valid(ctx context.Context, names []string) (map[string]bool, error) {
	res := map[string]bool{}
	var missing []string
	for _, n := range names {
		ok, err := l.s.st.IsValid(ctx, n)
		if err != nil {
			return nil, err
		}
		if ok {
			res[n] = true
		} else {
			missing = append(missing, n)
		}
	}
	if len(missing) == 0 {
		return res, nil
	}
	// As QueryMany, 16 lookups at once; unlike it, a lookup that failed is
	// an error: a path is not reported missing because an upstream was
	// briefly unreachable.
	var mu sync.Mutex
	var errs []error
	work := make(chan string)
	var wg sync.WaitGroup
	for range min(16, len(missing)) {
		wg.Go(func() {
			for n := range work {
				f, err := l.lookup(ctx, store.HashPart(n), n)
				mu.Lock()
				if err != nil {
					errs = append(errs, err)
				} else if f != nil {
					res[n] = true
				}
				mu.Unlock()
			}
		})
	}
	for _, n := range missing {
		work <- n
	}
	close(work)
	wg.Wait()
	if err := errors.Join(errs...); err != nil {
		return nil, err
	}
	return res, nil
}

// ByHashPart is the basename of the path whose hash part is hash, from the
// store or an upstream; "" if neither has it.
func (l *Lazy) ByHashPart(ctx context.Context, hash string) (string, error) {
	name, err := l.s.st.PathByHashPart(ctx, hash)
	if err != nil || name != "" {
		return name, err
	}
	f, err := l.lookup(ctx, hash, "")
	if err != nil || f == nil {
		return "", err
	}
	if err := store.ValidateName(f.Info.Name); err != nil {
		return "", nil
	}
	return f.Info.Name, nil
}

// Ensure makes name valid, fetching its closure (references first) when
// the store lacks it. Paths it fetches, and name, are rooted first (see
// Lazy). No upstream having name is ErrNoSubstitute.
func (l *Lazy) Ensure(ctx context.Context, name string) error {
	if ok, err := l.s.st.IsValid(ctx, name); err != nil || ok {
		return err
	}
	p, err := l.s.Resolve(ctx, []string{name}, l.checkSigs)
	if err != nil {
		return err
	}
	// A missing reference wraps binarycache.ErrDependency, not
	// ErrNoSubstitute: only name itself being nowhere is "no such path".
	if err, ok := p.Missing[name]; ok && errors.Is(err, ErrNoSubstitute) {
		return err
	}
	if err := l.root(ctx, name); err != nil {
		return fmt.Errorf("temp root %s: %w", name, err)
	}
	for n := range p.Fetch {
		if err := l.root(ctx, n); err != nil {
			return fmt.Errorf("temp root %s: %w", n, err)
		}
	}
	_, err = l.s.Fetch(ctx, p)
	return err
}
