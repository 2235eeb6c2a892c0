// Package subst makes casnix a substituting store: it looks store paths
// up in upstream Nix binary caches (file://, http://, https://) in
// priority order, caches the narinfos it saw (and the misses) for a while,
// and fetches missing closures on demand, references first, with their
// signatures checked against trusted keys, as nix-daemon substitutes.
//
// Opening a Substituter contacts no upstream: each one's nix-cache-info is
// read on first use, and an upstream that fails it is skipped for a
// backoff period, so a cache that is down never keeps casnix from serving.
package subst

import (
	"context"
	"errors"
	"fmt"
	"io"
	"log/slog"
	"net/url"
	"slices"
	"strconv"
	"strings"
	"sync"
	"sync/atomic"
	"time"

	"github.com/casnix/casnix/binarycache"
	"github.com/casnix/casnix/sched"
	"github.com/casnix/casnix/store"
)

// Options tune a Substituter; zero values take the defaults.
type Options struct {
	StoreDir string           // the store directory upstreams must hold paths of
	Keys     store.PublicKeys // trusted public keys (Nix's trusted-public-keys)
	// PositiveTTL and NegativeTTL are how long a narinfo, or its absence,
	// is believed (Nix's narinfo-cache-positive-ttl, 30 days, and
	// narinfo-cache-negative-ttl, 1 hour).
	PositiveTTL, NegativeTTL time.Duration
	MaxCached                int           // narinfo cache entries (default 65536)
	Retries                  int           // extra attempts after a transient error (default 3; -1: none)
	RetryDelay               time.Duration // first retry's delay, doubling (default 250ms)
	// Timeout bounds an upstream that sends nothing: no answer, or a body
	// that stops flowing, for this long fails the attempt (default 1m).
	Timeout time.Duration
	// Backoff is how long an upstream whose nix-cache-info failed is
	// skipped before it is tried again (default 1m).
	Backoff time.Duration
	// InfoTimeout bounds the first request to an upstream, its
	// nix-cache-info (default 10s): one that accepts connections and
	// never answers holds lookups up only this long, once per backoff.
	InfoTimeout time.Duration
	Jobs        int // NARs fetched at once per substitution (default 4)
	// Now is the clock (tests).
	Now func() time.Time
	// Logger, when set, hears of upstreams being skipped and back.
	Logger *slog.Logger
	// OptIn are upstreams used only by daemon clients whose substituters
	// setting names them (nix-daemon's trusted-substituters); a URL also
	// among New's is not opt-in.
	OptIn []string
}

func (o *Options) defaults() {
	if o.PositiveTTL == 0 {
		o.PositiveTTL = 30 * 24 * time.Hour
	}
	if o.NegativeTTL == 0 {
		o.NegativeTTL = time.Hour
	}
	if o.MaxCached <= 0 {
		o.MaxCached = 1 << 16
	}
	if o.Retries == 0 {
		o.Retries = 3
	} else if o.Retries < 0 {
		o.Retries = 0
	}
	if o.RetryDelay == 0 {
		o.RetryDelay = 250 * time.Millisecond
	}
	if o.Timeout == 0 {
		o.Timeout = time.Minute
	}
	if o.Backoff == 0 {
		o.Backoff = time.Minute
	}
	if o.Jobs <= 0 {
		o.Jobs = 4
	}
	if o.InfoTimeout == 0 {
		o.InfoTimeout = DefaultInfoTimeout
	}
	if o.Now == nil {
		o.Now = time.Now
	}
}

// DefaultInfoTimeout is Options.InfoTimeout's default.
const DefaultInfoTimeout = 10 * time.Second

// DefaultPriority is an upstream's priority when neither its URL nor its
// nix-cache-info gives one (Nix's default).
const DefaultPriority = 50

// Upstream is one binary cache substituted from.
type Upstream struct {
	URL     string
	src     binarycache.Source
	urlPrio int // from ?priority=, or -1
	// trusted (?trusted=1) takes paths without checking signatures, as
	// Nix's trusted store setting does for a substituter.
	trusted bool
	// optIn: used only for clients that name it (Options.OptIn).
	optIn bool
	// client: added by a trusted client (Select), which only trusted
	// clients may use; opt-in too.
	client bool

	mu      sync.Mutex
	ready   bool      // nix-cache-info read and fine
	prio    int       // effective priority once ready
	downErr error     // why the last nix-cache-info read failed
	retryAt time.Time // when a failed upstream may be tried again

	stats counters
}

// Stats are an upstream's counters since start.
type Stats struct {
	URL             string
	Priority        int // -1 until known
	Up              bool
	NarinfoHits     int64 // narinfos found (fetched, not cached)
	NarinfoMisses   int64 // narinfos the upstream does not have
	NarsFetched     int64
	NarBytes        int64 // uncompressed NAR bytes fetched
	Errors          int64 // failed requests (after which a retry or failover may follow)
	Requests        int64 // requests made (narinfos and NARs)
	LatencyTotal    time.Duration
	CacheInfoErrors int64
	DownError       string // why the upstream is skipped, while it is
}

type counters struct {
	hits, misses, nars, bytes, errors, requests, latency, infoErrors atomic.Int64
}

// Substituter substitutes from a list of upstreams into a store.
type Substituter struct {
	st   *store.Store
	opts Options
	// ups is the upstreams, indexed as Selections and the narinfo cache
	// index them: New's, then those trusted clients add (Select, addClient).
	// Only appended to (under upsMu, copy on write), so an index taken
	// from one snapshot stays valid in every later one.
	ups   atomic.Pointer[[]*Upstream]
	upsMu sync.Mutex

	base   context.Context // fetches outlive the request that started them
	cancel context.CancelFunc
	fetchs sync.WaitGroup // fetches in flight, which Close waits for

	cacheMu sync.Mutex
	cache   map[cacheKey]cacheEntry
	// verified memoizes the signature check of cached narinfos (by the
	// cache's own pointer, which nothing changes), guarded by cacheMu and
	// cleared when it reaches MaxCached entries.
	verified map[*binarycache.Info]bool

	flightMu sync.Mutex
	flight   map[string]*call

	// Narinfo requests in flight, so that many lookups of one path at once
	// (a lazy store's clients and its mount) make one request.
	nflightMu sync.Mutex
	nflight   map[cacheKey]*ncall

	// Spooled fetches (pullthrough.go), on once a PullThrough is open.
	spoolMu  sync.Mutex
	spooling bool
	spools   map[string]*spoolEntry
	holds    map[string]int
	// keeper, if set, keeps spooled downloads' files (PullThrough.Keep).
	keeper binarycache.NARKeeper
	// busy (PullThrough.HoldIngest) tells whether HTTP clients are being
	// served; held is the NAR bytes of pull ingests waiting for a pause.
	busy func() bool
	held atomic.Int64
}

type ncall struct {
	done chan struct{}
	in   *binarycache.Info
	err  error
}

type cacheKey struct {
	up   int
	hash string
}

type cacheEntry struct {
	in      *binarycache.Info  // nil: the upstream does not have it
	real    *store.Realisation // for a realisation's key (realisation.go)
	expires time.Time
}

type call struct {
	done chan struct{}
	err  error
	// idle: the fetch is idle work (a pull-through's, sched.WithIdle);
	// cancel stops it, and next is the ordinary fetch that took over from
	// it, whose result it hands its callers.
	idle   bool
	cancel context.CancelFunc
	next   *call
}

// New opens upstreams from their URLs, contacting none of them.
func New(st *store.Store, urls []string, opts Options) (*Substituter, error) {
	opts.defaults()
	if opts.StoreDir == "" && st != nil {
		opts.StoreDir = st.StoreDir
	}
	s := &Substituter{st: st, opts: opts, cache: map[cacheKey]cacheEntry{}, verified: map[*binarycache.Info]bool{}, flight: map[string]*call{}, nflight: map[cacheKey]*ncall{},
		spools: map[string]*spoolEntry{}, holds: map[string]int{}}
	s.base, s.cancel = context.WithCancel(context.Background())
	all := slices.Clone(urls)
	for _, raw := range opts.OptIn {
		if !slices.Contains(urls, raw) {
			all = append(all, raw)
		}
	}
	var ups []*Upstream
	for n, raw := range all {
		up, err := s.newUpstream(raw)
		if err != nil {
			return nil, err
		}
		up.optIn = n >= len(urls)
		ups = append(ups, up)
	}
	s.ups.Store(&ups)
	return s, nil
}

// newUpstream opens the upstream of a substituter URL, contacting nothing.
func (s *Substituter) newUpstream(raw string) (*Upstream, error) {
	u, err := url.Parse(raw)
	if err != nil {
		return nil, fmt.Errorf("substituter %q: %w", raw, err)
	}
	up := &Upstream{URL: raw, urlPrio: -1}
	q := u.Query()
	if p := q.Get("priority"); p != "" {
		n, err := strconv.Atoi(p)
		if err != nil || n < 0 {
			return nil, fmt.Errorf("substituter %q: priority %q is not a number", raw, p)
		}
		up.urlPrio = n
	}
	up.trusted = q.Get("trusted") == "1" || q.Get("trusted") == "true"
	src, err := binarycache.OpenSource(raw)
	if err != nil {
		return nil, fmt.Errorf("substituter: %w", err)
	}
	up.src = &timeoutSource{Source: src, timeout: s.opts.Timeout}
	return up, nil
}

// list is the upstreams now (a snapshot: see Substituter.ups).
func (s *Substituter) list() []*Upstream { return *s.ups.Load() }

// flightLen counts the fetches in flight (tests).
func (s *Substituter) flightLen() int {
	s.flightMu.Lock()
	defer s.flightMu.Unlock()
	return len(s.flight)
}

// Close stops the fetches in flight and waits for them to end, so the
// store can be closed after it.
func (s *Substituter) Close() {
	s.cancel()
	s.fetchs.Wait()
}

// Len is the number of upstreams, opt-in ones and those trusted clients
// added included.
func (s *Substituter) Len() int { return len(s.list()) }

// Configured reports whether the substituter was opened with upstreams
// (New's, opt-in ones included), as against only those trusted clients
// added since.
func (s *Substituter) Configured() bool {
	return slices.ContainsFunc(s.list(), func(up *Upstream) bool { return !up.client })
}

// Stats returns every upstream's counters, in the order given.
func (s *Substituter) Stats() []Stats {
	ups := s.list()
	out := make([]Stats, 0, len(ups))
	for _, up := range ups {
		up.mu.Lock()
		st := Stats{URL: up.URL, Priority: -1, Up: up.ready}
		if up.ready {
			st.Priority = up.prio
		} else if up.downErr != nil {
			st.DownError = up.downErr.Error()
		}
		up.mu.Unlock()
		c := &up.stats
		st.NarinfoHits, st.NarinfoMisses = c.hits.Load(), c.misses.Load()
		st.NarsFetched, st.NarBytes = c.nars.Load(), c.bytes.Load()
		st.Errors, st.Requests = c.errors.Load(), c.requests.Load()
		st.LatencyTotal = time.Duration(c.latency.Load())
		st.CacheInfoErrors = c.infoErrors.Load()
		out = append(out, st)
	}
	return out
}

// usable reads up's nix-cache-info if it was not read yet (or failed and
// its backoff ran out), and reports whether up can be asked.
func (s *Substituter) usable(ctx context.Context, up *Upstream) bool {
	up.mu.Lock()
	defer up.mu.Unlock()
	if up.ready {
		return true
	}
	if s.opts.Now().Before(up.retryAt) {
		return false
	}
	var ci *binarycache.CacheInfoFile
	err := func() error {
		for attempt := 0; ; attempt++ {
			var err error
			ci, err = s.readCacheInfo(ctx, up)
			// A cache that is down (refuses, or does not answer within
			// InfoTimeout) is skipped at once, and asked again after the
			// backoff; one that answered with a server error is asked again
			// now, as for any request (Nix retries nix-cache-info too): a
			// single 502 of a flaky cache must not hide it for a minute.
			var se *binarycache.StatusError
			if err == nil || !transient(err) || !errors.As(err, &se) || attempt >= s.opts.Retries || ctx.Err() != nil {
				return err
			}
			select {
			case <-time.After(s.opts.RetryDelay << attempt):
			case <-ctx.Done():
				return err
			}
		}
	}()
	if err == nil && ci.StoreDir != "" && ci.StoreDir != s.opts.StoreDir {
		err = fmt.Errorf("%s holds paths of the store directory %s, not %s", up.URL, ci.StoreDir, s.opts.StoreDir)
	}
	if err != nil {
		if ctx.Err() == nil {
			up.stats.infoErrors.Add(1)
			up.downErr = err
			up.retryAt = s.opts.Now().Add(s.opts.Backoff)
			if s.opts.Logger != nil {
				s.opts.Logger.Warn("substituter skipped", "url", up.URL, "for", s.opts.Backoff, "err", err)
			}
		}
		return false
	}
	up.prio = DefaultPriority
	if ci.Priority != 0 {
		up.prio = ci.Priority
	}
	if up.urlPrio >= 0 {
		up.prio = up.urlPrio
	}
	if up.downErr != nil && s.opts.Logger != nil {
		s.opts.Logger.Info("substituter back", "url", up.URL)
	}
	up.ready, up.downErr = true, nil
	return true
}

// readCacheInfo is one attempt at up's nix-cache-info, within InfoTimeout.
func (s *Substituter) readCacheInfo(ctx context.Context, up *Upstream) (*binarycache.CacheInfoFile, error) {
	ictx, cancel := context.WithTimeout(ctx, s.opts.InfoTimeout)
	defer cancel()
	ci, err := binarycache.ReadCacheInfo(ictx, up.src)
	if err != nil && ctx.Err() == nil && ictx.Err() != nil {
		return nil, fmt.Errorf("%s/nix-cache-info: no answer within %v", up.src, s.opts.InfoTimeout)
	}
	return ci, err
}

// ordered returns the upstreams to ask (with their indexes), lowest
// priority number first, ties in the order given. An upstream whose URL
// gives its priority is placed by it without being contacted: callers
// check it is usable (reading its nix-cache-info if need be) only when a
// lookup gets to it, so a lookup that an earlier upstream answers never
// waits for a later one that is slow to answer or down. An upstream whose
// priority only its nix-cache-info tells is read now, and left out if it
// is not usable. Upstreams ctx's Selection does not mark are left out.
func (s *Substituter) ordered(ctx context.Context) []int {
	var idx []int
	ups := s.list()
	prio := make([]int, len(ups))
	for i, up := range ups {
		if !s.allowed(ctx, i) {
			continue
		}
		if up.urlPrio >= 0 {
			prio[i] = up.urlPrio
		} else if s.usable(ctx, up) {
			up.mu.Lock()
			prio[i] = up.prio
			up.mu.Unlock()
		} else {
			continue
		}
		idx = append(idx, i)
	}
	slices.SortStableFunc(idx, func(a, b int) int { return prio[a] - prio[b] })
	return idx
}

// downNote describes the upstreams skipped as down just now, for an error
// saying no upstream has a path: it may be on one of them (of those ctx's
// selection lets it use).
func (s *Substituter) downNote(ctx context.Context) string {
	var down []string
	now := s.opts.Now()
	for i, up := range s.list() {
		if !s.allowed(ctx, i) {
			continue
		}
		up.mu.Lock()
		if !up.ready && up.downErr != nil && now.Before(up.retryAt) {
			down = append(down, up.downErr.Error())
		}
		up.mu.Unlock()
	}
	if len(down) == 0 {
		return ""
	}
	return " (skipped as down: " + strings.Join(down, "; ") + ")"
}

// retry runs f until it succeeds, fails for good or runs out of attempts,
// counting requests and errors against up.
func (s *Substituter) retry(ctx context.Context, up *Upstream, f func() error) error {
	var err error
	for attempt := 0; ; attempt++ {
		t0 := time.Now()
		err = f()
		up.stats.requests.Add(1)
		up.stats.latency.Add(int64(time.Since(t0)))
		if err != nil && !errors.Is(err, binarycache.ErrNotFound) {
			up.stats.errors.Add(1)
		}
		if err == nil || !transient(err) || attempt >= s.opts.Retries || ctx.Err() != nil {
			return err
		}
		select {
		case <-time.After(s.opts.RetryDelay << attempt):
		case <-ctx.Done():
			return err
		}
	}
}

func transient(err error) bool {
	var te *binarycache.TransientError
	return errors.As(err, &te)
}

// narinfo returns upstream i's narinfo of the path with the given hash
// part, nil if it has none; from the cache while it is fresh. Transient
// errors (after retries) are returned and not cached.
func (s *Substituter) narinfo(ctx context.Context, i int, hash string) (*binarycache.Info, error) {
	k := cacheKey{i, hash}
	now := s.opts.Now()
	if e, ok := s.cached(k, now); ok {
		return e.in, nil
	}
	s.nflightMu.Lock()
	for {
		c, ok := s.nflight[k]
		if !ok {
			break
		}
		s.nflightMu.Unlock()
		select {
		case <-c.done:
		case <-ctx.Done():
			return nil, ctx.Err()
		}
		// The request that was in flight ended because its own caller gave
		// up: ask again for this one.
		if errors.Is(c.err, context.Canceled) || errors.Is(c.err, context.DeadlineExceeded) {
			s.nflightMu.Lock()
			continue
		}
		return c.in, c.err
	}
	c := &ncall{done: make(chan struct{})}
	s.nflight[k] = c
	s.nflightMu.Unlock()
	c.in, c.err = s.fetchNarinfo(ctx, k, now)
	s.nflightMu.Lock()
	delete(s.nflight, k)
	s.nflightMu.Unlock()
	close(c.done)
	return c.in, c.err
}

// cached is k's cache entry, if there is one still fresh at now.
func (s *Substituter) cached(k cacheKey, now time.Time) (cacheEntry, bool) {
	s.cacheMu.Lock()
	e, ok := s.cache[k]
	s.cacheMu.Unlock()
	return e, ok && now.Before(e.expires)
}

// fetchFile reads the file rel of upstream k.up with read, retrying
// transient errors. A file the upstream does not have counts as its miss
// and is cached as absent under k (found false, no error); other errors
// are returned, named by the upstream, and not cached. The caller caches
// what it read.
func (s *Substituter) fetchFile(ctx context.Context, k cacheKey, rel string, now time.Time, read func(io.Reader) error) (found bool, err error) {
	up := s.list()[k.up]
	err = s.retry(ctx, up, func() error {
		rc, err := up.src.Open(ctx, rel)
		if err != nil {
			return err
		}
		defer rc.Close()
		return read(rc)
	})
	switch {
	case errors.Is(err, binarycache.ErrNotFound):
		up.stats.misses.Add(1)
		s.put(k, cacheEntry{expires: now.Add(s.opts.NegativeTTL)})
		return false, nil
	case err != nil:
		return false, fmt.Errorf("%s: %w", up.URL, err)
	}
	return true, nil
}

// fetchNarinfo asks the upstream for a narinfo and caches the answer.
func (s *Substituter) fetchNarinfo(ctx context.Context, k cacheKey, now time.Time) (*binarycache.Info, error) {
	i, hash := k.up, k.hash
	up := s.list()[i]
	var in *binarycache.Info
	found, err := s.fetchFile(ctx, k, hash+".narinfo", now, func(r io.Reader) error {
		var err error
		in, err = binarycache.ParseNarinfo(r, s.opts.StoreDir)
		return err
	})
	if !found {
		return nil, err
	}
	if store.HashPart(in.Name) != hash {
		return nil, fmt.Errorf("%s: %w: %s.narinfo describes %s/%s", up.URL, binarycache.ErrBadNarinfo, hash, s.opts.StoreDir, in.Name)
	}
	up.stats.hits.Add(1)
	s.put(k, cacheEntry{in: in, expires: now.Add(s.opts.PositiveTTL)})
	return in, nil
}

// put caches e, first making room: expired entries go, and if none had,
// arbitrary ones (the map's order), so the cache stays bounded.
func (s *Substituter) put(k cacheKey, e cacheEntry) {
	s.cacheMu.Lock()
	defer s.cacheMu.Unlock()
	if _, ok := s.cache[k]; !ok && len(s.cache) >= s.opts.MaxCached {
		now := s.opts.Now()
		for ck, ce := range s.cache {
			if !now.Before(ce.expires) {
				delete(s.cache, ck)
			}
		}
		for ck := range s.cache {
			if len(s.cache) < s.opts.MaxCached {
				break
			}
			delete(s.cache, ck)
		}
	}
	s.cache[k] = e
}

// Found is a path an upstream can substitute.
type Found struct {
	Info     *binarycache.Info
	Upstream *Upstream
}

// ErrNoSubstitute means no upstream has the path (or none that may be
// used: see the error's text).
var ErrNoSubstitute = errors.New("no substituter has it")

// Query looks name (a store path basename) up across the upstreams in
// priority order and returns the first narinfo found, signature or not,
// as Nix's querySubstitutablePathInfos does. It returns nil, nil when no
// upstream has it; an error only when some upstream could not answer and
// none had it.
func (s *Substituter) Query(ctx context.Context, name string) (*Found, error) {
	return s.find(ctx, name, false)
}

// QueryMany is Query of many paths, 16 lookups at once: it returns the
// paths some upstream has. Paths whose lookups failed are left out, as
// Nix's querySubstitutablePathInfos leaves them out; only the context
// ending is an error.
func (s *Substituter) QueryMany(ctx context.Context, names []string) (map[string]*Found, error) {
	return s.findMany(ctx, names, false)
}

// findMany is find of many paths, 16 at once.
func (s *Substituter) findMany(ctx context.Context, names []string, checkSigs bool) (map[string]*Found, error) {
	res := make(map[string]*Found)
	var mu sync.Mutex
	work := make(chan string)
	var wg sync.WaitGroup
	for range min(16, len(names)) {
		wg.Go(func() {
			for n := range work {
				if f, _ := s.find(ctx, n, checkSigs); f != nil {
					mu.Lock()
					res[n] = f
					mu.Unlock()
				}
			}
		})
	}
	for _, n := range names {
		if ctx.Err() != nil {
			break
		}
		work <- n
	}
	close(work)
	wg.Wait()
	return res, ctx.Err()
}

// find is Query that, with checkSigs, passes over narinfos without a
// valid signature by a trusted key (unless content-addressed), as Nix's
// substitution goal tries the next substituter.
func (s *Substituter) find(ctx context.Context, name string, checkSigs bool) (*Found, error) {
	return s.findHash(ctx, store.HashPart(name), name, checkSigs)
}

// findHash is find by hash part; name, unless empty, is the basename the
// narinfo must describe.
func (s *Substituter) findHash(ctx context.Context, hash, name string, checkSigs bool) (*Found, error) {
	var found *Found
	err := s.firstUpstream(ctx, func(i int, up *Upstream) (bool, error) {
		in, err := s.narinfo(ctx, i, hash)
		if err != nil || in == nil {
			return false, err
		}
		if name != "" && in.Name != name {
			return false, fmt.Errorf("%s: %w: %s.narinfo describes %s/%s", up.URL, binarycache.ErrBadNarinfo, hash, s.opts.StoreDir, in.Name)
		}
		if checkSigs && !up.trusted && !s.sigOKFor(ctx, in) {
			return false, fmt.Errorf("%s: %w", up.URL, &binarycache.UntrustedError{Sigs: len(in.Sigs), Keys: s.keyCount(ctx)})
		}
		found = &Found{Info: in, Upstream: up}
		return true, nil
	})
	return found, err
}

// firstUpstream calls try with each upstream ctx's Selection lets it use,
// in priority order, each made usable first (its nix-cache-info read),
// until try reports it is done. It returns nil once try is done, or when
// no upstream had anything and none failed; the context's error if it
// ended; else the errors try returned (each upstream's reason), joined.
func (s *Substituter) firstUpstream(ctx context.Context, try func(i int, up *Upstream) (done bool, err error)) error {
	var errs []error
	idx := s.ordered(ctx)
	ups := s.list() // after ordered's: it holds every index ordered gave
	for _, i := range idx {
		if !s.usable(ctx, ups[i]) {
			continue
		}
		done, err := try(i, ups[i])
		if err != nil {
			errs = append(errs, err)
			continue
		}
		if done {
			return nil
		}
	}
	if ctx.Err() != nil {
		return ctx.Err()
	}
	return errors.Join(errs...)
}

// sigOK reports whether in is signed by a trusted key or has a content
// address that makes its path. A pull looks each path up several times
// (its narinfo, its NAR, its closure's fetch), and an ed25519 check each
// time was a good part of the pull's CPU: the answer is kept per cached
// narinfo.
func (s *Substituter) sigOK(in *binarycache.Info) bool {
	s.cacheMu.Lock()
	ok, seen := s.verified[in]
	s.cacheMu.Unlock()
	if seen {
		return ok
	}
	pi := in.PathInfo()
	ok = s.opts.Keys.Verify(s.opts.StoreDir, &pi) > 0 || binarycache.CAVerified(s.opts.StoreDir, in)
	s.cacheMu.Lock()
	if len(s.verified) >= max(s.opts.MaxCached, 1) {
		clear(s.verified)
	}
	s.verified[in] = ok
	s.cacheMu.Unlock()
	return ok
}

// Plan is what substituting a set of paths takes.
type Plan struct {
	Present []string          // valid already
	Fetch   map[string]*Found // to substitute, by name
	Missing map[string]error  // neither valid nor substitutable, with why
}

// Sizes sums the compressed sizes (NarSize when not given) of what the
// plan fetches, and their NAR sizes.
func (p *Plan) Sizes() (download, narSize int64) {
	for _, f := range p.Fetch {
		if f.Info.FileSize != 0 {
			download += f.Info.FileSize
		} else {
			download += f.Info.NarSize
		}
		narSize += f.Info.NarSize
	}
	return download, narSize
}

// Resolve walks the closures of names through the store and the
// upstreams' narinfos, breadth first, a level's lookups in parallel.
// A path that an accepted substitute refers to and that cannot be had
// makes its referrers missing too.
func (s *Substituter) Resolve(ctx context.Context, names []string, checkSigs bool) (*Plan, error) {
	p := &Plan{Fetch: map[string]*Found{}, Missing: map[string]error{}}
	seen := map[string]bool{}
	level := slices.Clone(names)
	for len(level) > 0 {
		type answer struct {
			valid bool
			f     *Found
			err   error
		}
		var todo []string
		for _, n := range level {
			if !seen[n] {
				seen[n] = true
				todo = append(todo, n)
			}
		}
		answers := make([]answer, len(todo))
		work := make(chan int)
		var wg sync.WaitGroup
		for range min(16, len(todo)) {
			wg.Go(func() {
				for i := range work {
					a := &answers[i]
					if a.valid, a.err = s.st.IsValid(ctx, todo[i]); a.err != nil || a.valid {
						continue
					}
					a.f, a.err = s.find(ctx, todo[i], checkSigs)
				}
			})
		}
		for i := range todo {
			work <- i
		}
		close(work)
		wg.Wait()
		if ctx.Err() != nil {
			return nil, ctx.Err()
		}
		level = nil
		for i, n := range todo {
			a := answers[i]
			switch {
			case a.valid:
				p.Present = append(p.Present, n)
			case a.err != nil:
				p.Missing[n] = fmt.Errorf("%s/%s: %w", s.opts.StoreDir, n, a.err)
			case a.f == nil:
				p.Missing[n] = fmt.Errorf("%s/%s: %w%s", s.opts.StoreDir, n, ErrNoSubstitute, s.downNote(ctx))
			default:
				p.Fetch[n] = a.f
				for _, r := range a.f.Info.References {
					if r != n {
						level = append(level, r)
					}
				}
			}
		}
	}
	for changed := true; changed; {
		changed = false
		for n, f := range p.Fetch {
			for _, r := range f.Info.References {
				if err, bad := p.Missing[r]; bad && r != n {
					p.Missing[n] = fmt.Errorf("%s/%s: %w: %v", s.opts.StoreDir, n, binarycache.ErrDependency, err)
					delete(p.Fetch, n)
					changed = true
					break
				}
			}
		}
	}
	slices.Sort(p.Present)
	return p, nil
}

// Substitute makes the closures of names valid, fetching what the store
// lacks; with checkSigs, only paths signed by a trusted key (or whose
// content address makes their store path) are taken. It returns the
// names substituted; the error lists every path that could not be had.
func (s *Substituter) Substitute(ctx context.Context, names []string, checkSigs bool) ([]string, error) {
	p, err := s.Resolve(ctx, names, checkSigs)
	if err != nil {
		return nil, err
	}
	return s.Fetch(ctx, p)
}

// Fetch substitutes what p says to fetch, references first, Jobs at once.
func (s *Substituter) Fetch(ctx context.Context, p *Plan) ([]string, error) {
	var errs []error
	for _, n := range sortedKeys(p.Missing) {
		errs = append(errs, p.Missing[n])
	}
	todo := sortedKeys(p.Fetch)
	if s.spoolingOn() {
		// What this fetch will ingest: a spool an HTTP client started for
		// one of them is kept for it.
		s.hold(todo...)
		defer s.unhold(todo...)
	}
	results, runErr := binarycache.RunDAG(ctx, todo, func(n string) []string { return p.Fetch[n].Info.References },
		s.opts.Jobs, true, func(ctx context.Context, n string) error { return s.fetchOnce(ctx, p.Fetch[n]) })
	var done []string
	for _, n := range todo {
		err, ok := results[n]
		switch {
		case ok && err == nil:
			done = append(done, n)
		case ok && errors.Is(err, binarycache.ErrDependency):
			errs = append(errs, fmt.Errorf("%s/%s: %w", s.opts.StoreDir, n, err))
		case ok:
			errs = append(errs, err)
		}
	}
	if runErr != nil {
		errs = append(errs, runErr)
	}
	return done, errors.Join(errs...)
}

func sortedKeys[V any](m map[string]V) []string {
	ks := make([]string, 0, len(m))
	for k := range m {
		ks = append(ks, k)
	}
	slices.Sort(ks)
	return ks
}

// fetchOnce substitutes one path; concurrent calls for the same path share
// one fetch, which runs on the Substituter's context so that a caller
// giving up does not fail the others. A fetch for an idle caller (the
// pull-through's, sched.WithIdle) is idle work; an ordinary caller (a
// daemon substitution, a lazy read) does not wait for one, which a busy
// machine may starve: it starts an ordinary fetch that the idle one's
// callers then wait for too, and stops the idle one (the download, in a
// spool, is not repeated).
func (s *Substituter) fetchOnce(ctx context.Context, f *Found) error {
	name := f.Info.Name
	idle := sched.IsIdle(ctx)
	s.flightMu.Lock()
	c, ok := s.flight[name]
	if !ok || c.idle && !idle {
		nc := &call{done: make(chan struct{}), idle: idle}
		// The fetch's failover keeps to the upstreams its first caller
		// may use (a client's substituters setting).
		fctx := WithSelection(s.base, selectionOf(ctx))
		if idle {
			fctx = sched.WithIdle(fctx)
		}
		fctx, nc.cancel = context.WithCancel(fctx)
		if ok {
			c.next = nc
			c.cancel()
		}
		c = nc
		s.flight[name] = nc
		s.fetchs.Add(1)
		go func() {
			defer s.fetchs.Done()
			err := s.fetch(fctx, f)
			nc.cancel()
			s.flightMu.Lock()
			if s.flight[name] == nc {
				delete(s.flight, name)
			}
			next := nc.next
			s.flightMu.Unlock()
			if next != nil {
				<-next.done
				err = next.err
			}
			nc.err = err
			close(nc.done)
		}()
	}
	s.flightMu.Unlock()
	select {
	case <-c.done:
		return c.err
	case <-ctx.Done():
		return ctx.Err()
	}
}

// fetch substitutes f's path from its upstream and, when that fails, from
// the next upstreams (in priority order) whose narinfo describes the same
// path: the same NAR hash, size, references and content address, so the
// signatures already checked hold for it too, as Nix's substitution goal
// tries the next substituter.
func (s *Substituter) fetch(ctx context.Context, f *Found) error {
	in, up := f.Info, f.Upstream
	if ok, err := s.st.IsValid(ctx, in.Name); err != nil || ok {
		return err
	}
	err := s.fetchFrom(ctx, in, up)
	if err == nil || ctx.Err() != nil {
		return err
	}
	errs := []error{err}
	idx := s.ordered(ctx)
	ups := s.list() // after ordered's: it holds every index ordered gave
	for _, i := range idx {
		alt := ups[i]
		if alt == up || !s.usable(ctx, alt) {
			continue
		}
		ain, aerr := s.narinfo(ctx, i, store.HashPart(in.Name))
		if aerr != nil || ain == nil || ain.Name != in.Name || ain.NarHash != in.NarHash || ain.NarSize != in.NarSize ||
			ain.CA != in.CA || !slices.Equal(ain.References, in.References) {
			continue
		}
		same := *ain
		same.Sigs = slices.Compact(slices.Sorted(slices.Values(append(slices.Clone(in.Sigs), ain.Sigs...))))
		err := s.fetchFrom(ctx, &same, alt)
		if err == nil || ctx.Err() != nil {
			return err
		}
		errs = append(errs, err)
	}
	return errors.Join(errs...)
}

func (s *Substituter) spoolingOn() bool {
	s.spoolMu.Lock()
	defer s.spoolMu.Unlock()
	return s.spooling
}

// testHookFetch, if set, is called with each attempt's context and path.
var testHookFetch func(ctx context.Context, name string)

func (s *Substituter) fetchFrom(ctx context.Context, in *binarycache.Info, up *Upstream) error {
	if h := testHookFetch; h != nil {
		h(ctx, in.Name)
	}
	var err error
	if s.spoolingOn() {
		err = s.fetchSpooled(ctx, in, up)
	} else {
		err = s.retry(ctx, up, func() error { return binarycache.FetchNAR(store.WithSubstituted(ctx), s.st, up.src, in) })
	}
	if err != nil {
		return fmt.Errorf("substituting %s/%s from %s: %w", s.opts.StoreDir, in.Name, up.URL, err)
	}
	up.stats.nars.Add(1)
	up.stats.bytes.Add(in.NarSize)
	return nil
}

// timeoutSource fails an attempt whose upstream sends nothing for the
// timeout: no response, or a body that stopped flowing. Such a stall is
// transient (retried, then the next upstream).
type timeoutSource struct {
	binarycache.Source
	timeout time.Duration
}

func (t *timeoutSource) Open(ctx context.Context, rel string) (io.ReadCloser, error) {
	ctx, cancel := context.WithCancel(ctx)
	var fired atomic.Bool
	timer := time.AfterFunc(t.timeout, func() { fired.Store(true); cancel() })
	rc, err := t.Source.Open(ctx, rel)
	if err != nil {
		timer.Stop()
		cancel()
		if fired.Load() {
			return nil, &binarycache.TransientError{Err: fmt.Errorf("%s/%s: no answer in %v: %w", t.Source, rel, t.timeout, err)}
		}
		return nil, err
	}
	return &stallBody{rc: rc, timer: timer, timeout: t.timeout, fired: &fired, cancel: cancel, what: fmt.Sprintf("%s/%s", t.Source, rel)}, nil
}

type stallBody struct {
	rc      io.ReadCloser
	timer   *time.Timer
	timeout time.Duration
	fired   *atomic.Bool
	cancel  context.CancelFunc
	what    string
}

func (b *stallBody) Read(p []byte) (int, error) {
	n, err := b.rc.Read(p)
	if n > 0 {
		b.timer.Reset(b.timeout)
	}
	if err != nil && err != io.EOF && b.fired.Load() {
		err = &binarycache.TransientError{Err: fmt.Errorf("%s: stalled for %v: %w", b.what, b.timeout, err)}
	}
	return n, err
}

func (b *stallBody) Close() error {
	b.timer.Stop()
	b.cancel()
	return b.rc.Close()
}
