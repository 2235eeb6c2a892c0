package subst

import (
	"context"
	"errors"
	"fmt"
	"path/filepath"
	"sync"
	"sync/atomic"
	"time"

	"github.com/casnix/casnix/binarycache"
	"github.com/casnix/casnix/loglimit"
	"github.com/casnix/casnix/sched"
	"github.com/casnix/casnix/store"
)

// Spooled fetches. With a PullThrough open, every NAR the substituter
// fetches goes through a binarycache.Spool (a file in DATA_DIR/tmp) that
// the ingest follows and that HTTP clients asking for the NAR join, so one
// upstream download serves them all. The table of spools is keyed by
// store path name; an entry stays while the download runs and, once it
// succeeded, while some fetch still means to ingest it (a hold), so that
// a NAR an HTTP client had streamed before its references were valid (the
// ingest waits for them) is ingested from the spool, not fetched again.
// An entry goes once its path is ingested (then the store serves it), its
// download failed (the next attempt starts a new one), or nothing holds it.

// spoolEntry is a spool in the table, with the reference the table holds.
type spoolEntry struct {
	sp *binarycache.Spool
	up *Upstream
}

// hold marks names as to be ingested by a fetch in progress.
func (s *Substituter) hold(names ...string) {
	s.spoolMu.Lock()
	defer s.spoolMu.Unlock()
	for _, n := range names {
		s.holds[n]++
	}
}

// unhold drops what hold added; a finished spool nothing holds any more
// leaves the table.
func (s *Substituter) unhold(names ...string) {
	s.spoolMu.Lock()
	defer s.spoolMu.Unlock()
	for _, n := range names {
		if s.holds[n]--; s.holds[n] > 0 {
			continue
		}
		delete(s.holds, n)
		if e, ok := s.spools[n]; ok {
			if done, _ := e.sp.State(); done {
				s.dropLocked(n)
			}
		}
	}
}

// dropLocked removes name's spool from the table; s.spoolMu is held.
// Readers of it keep reading.
func (s *Substituter) dropLocked(name string) {
	if e, ok := s.spools[name]; ok {
		delete(s.spools, name)
		e.sp.Release()
	}
}

// dropSpool removes name's spool from the table once its path is valid.
func (s *Substituter) dropSpool(name string, sp *binarycache.Spool) {
	s.spoolMu.Lock()
	defer s.spoolMu.Unlock()
	if e, ok := s.spools[name]; ok && e.sp == sp {
		s.dropLocked(name)
	}
}

// rawKept reports whether a spool of in's download keeps the file for raw
// readers: the compressions the HTTP cache passes on verbatim.
func rawKept(in *binarycache.Info) bool { return in.Compression == "zstd" || in.Compression == "xz" }

// spoolMode is what kind of reader openSpool opens.
type spoolMode int

const (
	ingestReader  spoolMode = iota // the NAR (or a lazy spool's file), for the ingest, which checks it
	checkedReader                  // the NAR, checked as read back, for a client
	rawReader                      // the downloaded file (if kept, else as checkedReader), for a client
)

// openSpool returns a reader of in's NAR from the spool downloading or
// holding it, starting a download from up if there is none (or only a
// failed one, or one of another NAR hash). For a client (an HTTP request,
// not the ingest) the reader is a checked or a raw one, and it returns nil when
// the store holds the path: asked under the table's lock, which the ingest
// takes to drop the spool only after its commit, so no download starts
// for a path just ingested.
func (s *Substituter) openSpool(ctx context.Context, in *binarycache.Info, up *Upstream, mode spoolMode) (*binarycache.SpoolReader, error) {
	client := mode != ingestReader
	open := func(sp *binarycache.Spool, ctx context.Context) *binarycache.SpoolReader {
		switch mode {
		case rawReader:
			// A spool that keeps no file (an upstream of another
			// compression) is read as the NAR.
			if sp.HasRaw() {
				return sp.NewRawReader(ctx)
			}
			return sp.NewCheckedReader(ctx)
		case checkedReader:
			return sp.NewCheckedReader(ctx)
		}
		if sp.Lazy() {
			// The ingest decodes and checks the file itself (on its own
			// thread: idle for a pull), so nothing else decodes it.
			return sp.NewRawReader(ctx)
		}
		return sp.NewReader(ctx)
	}
	s.spoolMu.Lock()
	defer s.spoolMu.Unlock()
	if e, ok := s.spools[in.Name]; ok {
		_, err := e.sp.State()
		if err == nil && e.sp.Info.NarHash == in.NarHash && e.sp.Info.NarSize == in.NarSize {
			if rd := open(e.sp, ctx); rd != nil {
				return rd, nil
			}
		}
		s.dropLocked(in.Name)
	}
	if client {
		if ok, err := s.st.IsValid(ctx, in.Name); err != nil || ok {
			return nil, err
		}
	}
	if s.base.Err() != nil {
		return nil, s.base.Err()
	}
	sp, err := binarycache.NewSpool(filepath.Join(s.st.Dir(), "tmp"), in)
	if err != nil {
		return nil, err
	}
	if s.keeper != nil {
		sp.Keep(s.keeper.KeepNAR(in))
	}
	if rawKept(in) {
		// HTTP clients get the upstream's file as it arrives, not the
		// NAR decoded and compressed again (binarycache.Server.pulledExt).
		// (After Keep: the NAR cache's file is the spool's then.)
		if err := sp.EnableRaw(); err != nil {
			sp.Release()
			return nil, err
		}
	}
	sp.Retain() // the table's
	s.spools[in.Name] = &spoolEntry{sp: sp, up: up}
	rd := open(sp, ctx)
	s.fetchs.Add(1)
	go func() {
		defer s.fetchs.Done()
		t0 := time.Now()
		err := sp.Fetch(s.base, up.src)
		up.stats.requests.Add(1)
		up.stats.latency.Add(int64(time.Since(t0)))
		s.spoolMu.Lock()
		defer s.spoolMu.Unlock()
		if err != nil && !errors.Is(err, binarycache.ErrNotFound) {
			up.stats.errors.Add(1)
		}
		if e, ok := s.spools[in.Name]; ok && e.sp == sp && (err != nil || s.holds[in.Name] == 0) {
			s.dropLocked(in.Name)
		}
	}()
	return rd, nil
}

// fetchSpooled is fetchFrom through a spool: the ingest follows the
// download (its own, or one an HTTP client started), and a transient
// failure is retried with a new download.
func (s *Substituter) fetchSpooled(ctx context.Context, in *binarycache.Info, up *Upstream) error {
	var err error
	for attempt := 0; ; attempt++ {
		var rd *binarycache.SpoolReader
		if rd, err = s.openSpool(ctx, in, up, ingestReader); err == nil {
			// The download runs (openSpool started it); the ingest may wait.
			release := s.holdIngest(ctx, in)
			if rd.Raw() {
				err = binarycache.IngestFile(store.WithSubstituted(ctx), s.st, rd, in)
			} else {
				err = binarycache.IngestFrom(store.WithSubstituted(ctx), s.st, rd, in)
			}
			release()
			rd.Close()
			if err == nil {
				if rd.Raw() {
					rd.Spool().NARChecked() // the file's copy may be kept now
				}
				s.dropSpool(in.Name, rd.Spool())
				return nil
			}
			// The NAR parser reports a download that broke off as a truncated
			// NAR; the spool's own error says whether it is worth retrying.
			if done, ferr := rd.Spool().State(); done && ferr != nil && transient(ferr) && !transient(err) {
				err = fmt.Errorf("%w (%v)", ferr, err)
			}
		}
		if !transient(err) || attempt >= s.opts.Retries || ctx.Err() != nil {
			return err
		}
		select {
		case <-time.After(s.opts.RetryDelay << attempt):
		case <-ctx.Done():
			return err
		}
	}
}

// PullThrough is the pull-through side of the HTTP binary cache
// (binarycache.Puller): a narinfo request for a path the store lacks is
// answered from the upstream's narinfo at once, while the path's closure
// is fetched in the background (rooted as Lazy roots what it fetches),
// and the NAR is streamed from that fetch's spool until the store holds
// it. Opening one makes every fetch of the substituter spooled.
type PullThrough struct {
	l *Lazy

	// running are the paths whose background fetch runs, so that many
	// requests for one path start one (guarded by the substituter's
	// spoolMu, as closed is).
	running map[string]bool
	closed  bool
	// reals are realisations answered from upstreams, by output path, to
	// be registered once their fetch makes that path valid (realisation.go;
	// guarded by spoolMu, at most maxPendingReals).
	reals map[string][]*store.Realisation

	// slots bounds the closures fetched at once: a client asks for the
	// narinfo of every path of what it copies, and a fetch each (Jobs
	// NARs at once apiece) had every path downloading and ingesting at
	// the same time, the CPU shared by all of them and the clients'
	// requests waiting behind them.
	slots chan struct{}

	// prefetchq holds the narinfos answered whose NARs are downloaded
	// ahead of their requests (prefetcher); done ends the prefetchers.
	prefetchq    chan *Found
	prefetchOnce sync.Once
	done         chan struct{}
	// lastPull and lastNAR are when a narinfo (Pull) and a NAR (OpenNAR)
	// were last asked for, in Unix nanoseconds: the prefetchers wait while
	// narinfos are being asked for (prefetchGate).
	lastPull, lastNAR atomic.Int64
}

// prefetchJobs is how many NARs a PullThrough downloads ahead of their
// requests at once, and prefetchQueue how many answered narinfos wait for
// that (beyond it a NAR's download starts with its request, as before).
const (
	prefetchJobs  = 4
	prefetchQueue = 4096
)

// prefetchQuiet is how long no narinfo may have been asked for before a
// prefetch starts, unless a NAR was asked for since the last narinfo (a
// variable for tests).
var prefetchQuiet = 20 * time.Millisecond

// prefetch queues the download of f's NAR. Nix asks for the narinfos of
// everything it copies first, then for the NARs a few at a time, so a
// download started by each NAR's request (an upstream round trip, and for
// a small file the whole file before its checked end is released) came
// before every NAR's first byte: measured one after another on a cold
// casnix, a median 3.7 ms against a static server's 1.6 ms, 2.0 ms with
// this. Downloaded at once, the NAR request finds the file there. The closure's background
// fetch would download every NAR anyway (it joins these spools), so this
// costs the upstream nothing more; it only comes earlier, on ordinary
// threads, at most prefetchJobs at a time.
func (p *PullThrough) prefetch(f *Found) {
	p.prefetchOnce.Do(func() {
		for range prefetchJobs {
			go p.prefetcher()
		}
	})
	select {
	case p.prefetchq <- f:
	default: // the request starts the download
	}
}

// prefetcher downloads queued NARs one after another until Close.
func (p *PullThrough) prefetcher() {
	s := p.l.s
	for {
		select {
		case f := <-p.prefetchq:
			if !p.waitQuiet() {
				return
			}
			rd, err := s.openSpool(s.base, f.Info, f.Upstream, rawReader)
			if err != nil || rd == nil {
				continue // the store holds it, or the request's own download will say why not
			}
			rd.Spool().WaitDone(s.base)
			rd.Close()
		case <-p.done:
			return
		case <-s.base.Done():
			return
		}
	}
}

// prefetchGate reports how long a prefetch should still wait at now,
// given when a narinfo and a NAR were last asked for (Unix nanoseconds):
// 0 to start it. Nix asks for the narinfos of everything it copies or
// builds first (the closure, level by level: each answer names the next
// paths to ask for), then for the NARs. Prefetches started by the first
// answers took the CPU from the answers still to come: on two cores,
// `nix path-info -r` of the 544 paths of bench/subst.sh's corpus took
// 1.2-2.6 s through an empty casnix against 0.35-0.5 s straight from the
// upstream, and 0.55-0.58 s with this gate (Nix 2.34; Nix 2.8 alike). The
// downloads then run while the client fetches NARs, which it does a few at
// a time, as they did before.
func prefetchGate(lastPull, lastNAR, now int64) time.Duration {
	since := time.Duration(now - lastPull)
	if lastNAR > lastPull || since >= prefetchQuiet {
		return 0
	}
	return prefetchQuiet - since
}

// waitQuiet waits until prefetchGate lets a prefetch start; false if the
// pull-through or the substituter closed meanwhile.
func (p *PullThrough) waitQuiet() bool {
	s := p.l.s
	for {
		d := prefetchGate(p.lastPull.Load(), p.lastNAR.Load(), time.Now().UnixNano())
		if d == 0 {
			return true
		}
		t := time.NewTimer(d)
		select {
		case <-t.C:
		case <-p.done:
			t.Stop()
			return false
		case <-s.base.Done():
			t.Stop()
			return false
		}
	}
}

// HoldIngest has the pull's ingest wait while busy reports clients being
// served (binarycache.Server.Busy), up to maxHeldBytes of NARs waiting
// and maxHold each:
// the downloads go on (clients take the upstream's files from them), and
// the decoding, chunking and compressing wait for a pause instead of
// taking the client's CPU, memory bandwidth and disk. Beyond the bound,
// or with no busy set, it runs at once (at idle priority).
func (p *PullThrough) HoldIngest(busy func() bool) {
	s := p.l.s
	s.spoolMu.Lock()
	s.busy = busy
	s.spoolMu.Unlock()
}

// maxHeldBytes bounds the NAR bytes whose pull ingest waits for clients
// to pause (HoldIngest): their downloads sit in DATA_DIR/tmp meanwhile.
const maxHeldBytes = 2 << 30

// holdIngest waits, for an idle ingest of in, while the HTTP server is
// busy and the bound allows; it returns a func that lets the bytes go.
func (s *Substituter) holdIngest(ctx context.Context, in *binarycache.Info) func() {
	s.spoolMu.Lock()
	busy := s.busy
	s.spoolMu.Unlock()
	if busy == nil || !sched.IsIdle(ctx) {
		return func() {}
	}
	n := in.NarSize
	if s.held.Add(n) > maxHeldBytes {
		return func() { s.held.Add(-n) }
	}
	// Bounded in time too: clients that keep the server busy must not
	// keep every pulled path from being stored.
	for deadline := time.Now().Add(maxHold); busy() && ctx.Err() == nil && time.Now().Before(deadline); {
		select {
		case <-time.After(100 * time.Millisecond):
		case <-ctx.Done():
		}
	}
	return func() { s.held.Add(-n) }
}

// maxHold bounds how long one pull's ingest waits for clients to pause
// (a variable for tests).
var maxHold = time.Minute

// pullSlots is how many closures a PullThrough fetches at once.
const pullSlots = 1

// PullThrough opens the pull-through view; checkSigs is the substitution
// signature rule. Close it before the substituter.
func (s *Substituter) PullThrough(checkSigs bool) *PullThrough {
	s.spoolMu.Lock()
	s.spooling = true
	s.spoolMu.Unlock()
	return &PullThrough{l: s.Lazy(checkSigs, 0), running: map[string]bool{}, reals: map[string][]*store.Realisation{}, slots: make(chan struct{}, pullSlots),
		prefetchq: make(chan *Found, prefetchQueue), done: make(chan struct{})}
}

// Keep has the files of every spooled download offered to k (the HTTP
// server's NAR cache), so a pulled NAR is served from the upstream's own
// compressed file once checked, instead of rendered and compressed again.
func (p *PullThrough) Keep(k binarycache.NARKeeper) {
	s := p.l.s
	s.spoolMu.Lock()
	s.keeper = k
	s.spoolMu.Unlock()
}

// Close drops the roots of what was fetched; pulls still running fail
// quietly (their roots are gone), and no new one starts.
func (p *PullThrough) Close() {
	s := p.l.s
	s.spoolMu.Lock()
	if !p.closed {
		close(p.done)
	}
	p.closed = true
	s.spoolMu.Unlock()
	p.l.Close()
}

var pullWarnings loglimit.Limiter

// find is the acceptable upstream narinfo of the path with hash part hash;
// binarycache.ErrNotFound (wrapped) if there is none.
func (p *PullThrough) find(ctx context.Context, hash string) (*Found, error) {
	f, err := p.l.lookup(ctx, hash, "")
	if err != nil {
		return nil, err
	}
	if f == nil || store.ValidateName(f.Info.Name) != nil {
		return nil, fmt.Errorf("%s: %w", hash, binarycache.ErrNotFound)
	}
	return f, nil
}

// Pull is binarycache.Puller's: the upstream narinfo of the path, its
// closure being fetched (Ensure, in the background on the substituter's
// context: a client hanging up does not stop it) and held for ingest
// until that fetch ends. Lookups are cached and single-flight, so unknown
// hashes cost at most one request per upstream per hash and negative TTL.
func (p *PullThrough) Pull(ctx context.Context, hash string) (*binarycache.Info, error) {
	p.lastPull.Store(time.Now().UnixNano())
	f, err := p.find(ctx, hash)
	if err != nil {
		return nil, err
	}
	p.start(f.Info.Name)
	p.prefetch(f)
	return f.Info, nil
}

// start fetches name's closure in the background unless that runs.
func (p *PullThrough) start(name string) {
	s := p.l.s
	s.spoolMu.Lock()
	if p.running[name] || p.closed || s.base.Err() != nil {
		s.spoolMu.Unlock()
		return
	}
	p.running[name] = true
	s.holds[name]++
	s.fetchs.Add(1)
	s.spoolMu.Unlock()
	go func() {
		defer s.fetchs.Done()
		var err error
		select {
		case p.slots <- struct{}{}:
			s.spoolMu.Lock()
			closed := p.closed
			s.spoolMu.Unlock()
			if !closed {
				// Idle work: the client streams the NARs from the spools and
				// waits for none of this, so storing them must not take CPU
				// from it (or anyone); see fetchOnce and store.Batch.
				err = p.l.Ensure(sched.WithIdle(s.base), name)
			}
			<-p.slots
		case <-s.base.Done():
			err = s.base.Err()
		}
		s.unhold(name)
		s.spoolMu.Lock()
		delete(p.running, name)
		quiet := p.closed || s.base.Err() != nil
		reals := p.reals[name]
		if err == nil {
			delete(p.reals, name)
		}
		s.spoolMu.Unlock()
		if err == nil {
			p.registerRealisations(reals)
		}
		if err != nil && !quiet && s.opts.Logger != nil {
			// Clients retry at will: one line per interval, not per request.
			pullWarnings.Warn(s.opts.Logger, "pull-through fetch failed", "path", s.opts.StoreDir+"/"+name, "err", err)
		}
	}()
}

// OpenNAR is binarycache.Puller's: a reader of the NAR (or of the
// upstream's file, if it is in the compression raw names) from the spool of
// its fetch (joined, or started now if the closure's fetch has not got to
// it yet: its references come first); nil once the store holds it.
func (p *PullThrough) OpenNAR(ctx context.Context, hash, narHash, raw string) (*binarycache.SpoolReader, error) {
	f, err := p.find(ctx, hash)
	if err != nil {
		return nil, err
	}
	if store.NixBase32(f.Info.NarHash[:]) != narHash {
		return nil, fmt.Errorf("%s: NAR sha256:%s: %w", hash, narHash, binarycache.ErrNotFound)
	}
	p.lastNAR.Store(time.Now().UnixNano())
	p.start(f.Info.Name)
	mode := checkedReader
	if raw != "" && raw == f.Info.Compression {
		mode = rawReader
	}
	return p.l.s.openSpool(ctx, f.Info, f.Upstream, mode)
}
