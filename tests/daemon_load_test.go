package tests

import (
	"errors"
	"fmt"
	"io"
	"math/rand/v2"
	"net"
	"os"
	"path/filepath"
	"slices"
	"strconv"
	"strings"
	"sync"
	"sync/atomic"
	"testing"
	"time"

	"github.com/casnix/casnix/proto"
	"github.com/casnix/casnix/tests/nixtest"
)

// Parameters of TestServeLoad.
const (
	loadClients       = 64               // concurrent proto.Client connections doing reads
	loadSilent        = 12               // connections that never send a byte
	loadHalfHandshake = 4                // connections that send the first magic, then nothing
	loadSmallNAR      = 64 << 10         // NarFromPath is asked only for paths up to this NAR size
	loadAbortAfter    = 256 << 10        // the aborting client hangs up after this much of the big NAR
	loadHandshake     = 10 * time.Second // casnix serve --handshake-timeout
)

// loadDuration is how long TestServeLoad runs its clients: 60s, or CASNIX_LOAD_SECONDS.
func loadDuration(t *testing.T) time.Duration {
	if s := os.Getenv("CASNIX_LOAD_SECONDS"); s != "" {
		n, err := strconv.Atoi(s)
		if err != nil || n <= 0 {
			t.Fatalf("CASNIX_LOAD_SECONDS=%q", s)
		}
		return time.Duration(n) * time.Second
	}
	return 60 * time.Second
}

// TestServeLoad runs `casnix serve` on the imported fixture store and, for a minute, keeps
// 64 proto.Client connections busy with mixed reads (QueryPathInfo of valid and invalid
// paths, IsValidPath, QueryValidPaths, QueryReferrers, QueryPathFromHashPart,
// QueryAllValidPaths, NarFromPath of small paths), checking every answer against the
// source store. Meanwhile one client after another hangs up in the middle of the
// NarFromPath of the biggest path, and a few connections never send anything (or only the
// first handshake word), which the daemon must close after its handshake timeout. None of
// them may disturb the others; the daemon's RSS, sampled every second, must stay flat (max
// of the last third ≤ 1.5 × max of the first third + 16 MiB), its open file descriptors
// must return to where they were, and it must still exit cleanly on SIGTERM.
func TestServeLoad(t *testing.T) {
	sf := newServedFixture(t)
	exp := newLoadExpect(t, sf)
	socket := filepath.Join(t.TempDir(), "casnix.sock")
	d := sf.Cas.Serve(t, socket, "--memory-limit", "128MiB", "--handshake-timeout", loadHandshake.String())
	// A first client: the daemon serves, and the baseline of its descriptors.
	if cl, err := proto.Dial(socket); err != nil {
		t.Fatalf("proto.Dial: %v", err)
	} else {
		cl.Close()
	}
	time.Sleep(200 * time.Millisecond)
	fds0, err := d.OpenFDs()
	if err != nil {
		t.Fatal(err)
	}

	dur := loadDuration(t)
	start := time.Now()
	deadline := start.Add(dur)
	st := &loadStats{}
	var clients sync.Map // *proto.Client → struct{}, for the watchdog
	var wg sync.WaitGroup

	// RSS every second.
	var rss []int64
	rssDone := make(chan struct{})
	go func() {
		defer close(rssDone)
		for time.Now().Before(deadline) {
			if v, err := d.RSS(); err == nil {
				rss = append(rss, v)
			} else {
				st.fail("RSS: %v", err)
			}
			time.Sleep(time.Second)
		}
	}()

	for i := range loadClients {
		wg.Add(1)
		go func() {
			defer wg.Done()
			rng := rand.New(rand.NewPCG(uint64(i), uint64(start.UnixNano())))
			var cl *proto.Client
			defer func() {
				if cl != nil {
					cl.Close()
				}
			}()
			for time.Now().Before(deadline) {
				if cl == nil {
					var err error
					if cl, err = proto.Dial(socket); err != nil {
						st.fail("client %d: dial: %v", i, err)
						time.Sleep(100 * time.Millisecond)
						continue
					}
					clients.Store(cl, struct{}{})
				}
				if err := exp.randomOp(cl, rng, st); err != nil {
					st.fail("client %d: %v", i, err)
					// The connection may be out of step now: start a new one.
					clients.Delete(cl)
					cl.Close()
					cl = nil
				}
			}
		}()
	}

	// One client after another hangs up in the middle of the big NAR.
	wg.Add(1)
	go func() {
		defer wg.Done()
		for time.Now().Before(deadline) {
			cl, err := proto.Dial(socket)
			if err != nil {
				st.fail("aborting client: dial: %v", err)
				time.Sleep(100 * time.Millisecond)
				continue
			}
			clients.Store(cl, struct{}{})
			n, err := cl.NarFromPath(exp.big, &limitWriter{n: loadAbortAfter})
			if !errors.Is(err, errHangUp) {
				st.fail("aborting client: NarFromPath of %s: %d bytes, %v; want it cut at %d bytes", exp.big, n, err, loadAbortAfter)
			}
			clients.Delete(cl)
			cl.Close()
			st.aborted.Add(1)
			time.Sleep(100 * time.Millisecond)
		}
	}()

	// Silent connections: the daemon closes them after its handshake timeout.
	for i := range loadSilent + loadHalfHandshake {
		wg.Add(1)
		go func() {
			defer wg.Done()
			for time.Now().Add(loadHandshake).Before(deadline) {
				c, err := net.Dial("unix", socket)
				if err != nil {
					st.fail("silent client: dial: %v", err)
					time.Sleep(time.Second)
					continue
				}
				if i >= loadSilent { // WORKER_MAGIC_1 only
					c.Write([]byte{0x63, 0x78, 0x69, 0x6e, 0, 0, 0, 0})
				}
				opened := time.Now()
				c.SetReadDeadline(opened.Add(loadHandshake + 30*time.Second))
				_, err = io.Copy(io.Discard, c) // the server's magic and version, then EOF
				held := time.Since(opened)
				c.Close()
				var ne net.Error
				switch {
				case errors.As(err, &ne) && ne.Timeout():
					st.fail("silent client: not closed by the daemon within %s", held.Round(time.Millisecond))
				case held < loadHandshake-time.Second:
					st.fail("silent client: closed after %s, before the handshake timeout %s (%v)", held.Round(time.Millisecond), loadHandshake, err)
				default:
					st.silentClosed.Add(1)
					st.maxSilentHeld.store(held)
				}
			}
		}()
	}

	// Watchdog: a stuck daemon must not hang the test.
	allDone := make(chan struct{})
	go func() { wg.Wait(); close(allDone) }()
	select {
	case <-allDone:
	case <-time.After(dur + loadHandshake + 60*time.Second):
		st.fail("clients still busy %s after the end of the run; closing their connections", time.Since(deadline).Round(time.Second))
		clients.Range(func(k, _ any) bool { k.(*proto.Client).Close(); return true })
		<-allDone
	}
	<-rssDone
	elapsed := time.Since(start)

	ops := st.ops.Load()
	t.Logf("%s: %d ops by %d clients (%.0f/s): %s; %d NarFromPath aborted after %d KiB; %d silent connections closed by the daemon (longest held %s)",
		elapsed.Round(time.Millisecond), ops, loadClients, float64(ops)/elapsed.Seconds(), st.perOp(),
		st.aborted.Load(), loadAbortAfter>>10, st.silentClosed.Load(), st.maxSilentHeld.load().Round(time.Millisecond))
	for _, e := range st.errors() {
		t.Error(e)
	}
	if n := st.failures.Load(); n > 0 {
		t.Errorf("%d failures in all (the first %d above)", n, len(st.errors()))
	}
	if d.Exited() {
		t.Fatalf("casnix serve exited during the load: %v\n%s", d.Stop(0), d.Output())
	}
	for _, op := range loadOps {
		if st.count(op) == 0 {
			t.Errorf("no %s answered", op)
		}
	}
	if st.aborted.Load() == 0 {
		t.Errorf("no NarFromPath was aborted")
	}
	if dur >= 2*loadHandshake && st.silentClosed.Load() < loadSilent+loadHalfHandshake {
		t.Errorf("only %d silent connections were closed by the daemon, want at least %d", st.silentClosed.Load(), loadSilent+loadHalfHandshake)
	}

	// RSS stays flat.
	checkFlatRSS(t, rss)

	// Every connection closed, the daemon's sockets go back to where they were (its other
	// descriptors, database and pack files, may stay open for later requests).
	var fds []string
	for wait := time.Now(); ; time.Sleep(100 * time.Millisecond) {
		if fds, err = d.OpenFDs(); err != nil {
			t.Fatal(err)
		}
		if countSockets(fds) <= countSockets(fds0) || time.Since(wait) > 15*time.Second {
			break
		}
	}
	t.Logf("daemon file descriptors: %d (%d sockets) before the load, %d (%d sockets) after", len(fds0), countSockets(fds0), len(fds), countSockets(fds))
	if countSockets(fds) > countSockets(fds0) {
		t.Errorf("daemon holds %d sockets after all clients left, %d before: leaked connections\nbefore: %q\nafter: %q", countSockets(fds), countSockets(fds0), fds0, fds)
	}

	// The daemon is still all there: the whole big NAR, then a clean stop.
	cl, err := proto.Dial(socket)
	if err != nil {
		t.Fatalf("after the load: %v", err)
	}
	w := nixtest.NewDigestWriter()
	if _, err := cl.NarFromPath(exp.big, w); err != nil {
		t.Errorf("after the load: NarFromPath %s: %v", exp.big, err)
	} else if got := w.Digest(); got.NixHash() != sf.Want[exp.big].NarHash || got.Size != sf.Want[exp.big].NarSize {
		t.Errorf("after the load: NarFromPath %s: %s, want %s (%d bytes)", exp.big, got, sf.Want[exp.big].NarHash, sf.Want[exp.big].NarSize)
	}
	cl.Close()
	if err := d.Stop(30 * time.Second); err != nil {
		t.Errorf("casnix serve after SIGTERM: %v\n%s", err, d.Output())
	}
	checkServeLog(t, d)
}

// countSockets counts the sockets among file descriptor targets (Daemon.OpenFDs).
func countSockets(fds []string) int {
	n := 0
	for _, f := range fds {
		if strings.HasPrefix(f, "socket:") {
			n++
		}
	}
	return n
}

// checkFlatRSS requires the max of the last third of the samples to be at most 1.5 × the
// max of the first third + 16 MiB.
func checkFlatRSS(t *testing.T, rss []int64) {
	t.Helper()
	if len(rss) < 6 {
		t.Errorf("only %d RSS samples", len(rss))
		return
	}
	third := len(rss) / 3
	first, last := slices.Max(rss[:third]), slices.Max(rss[len(rss)-third:])
	limit := first*3/2 + 16<<20
	var mib []string
	for _, v := range rss {
		mib = append(mib, fmt.Sprintf("%.1f", float64(v)/(1<<20)))
	}
	t.Logf("daemon RSS (MiB, every second): %s", strings.Join(mib, " "))
	t.Logf("daemon RSS: max %.1f MiB in the first third, %.1f MiB in the last (limit %.1f MiB)", float64(first)/(1<<20), float64(last)/(1<<20), float64(limit)/(1<<20))
	if last > limit {
		t.Errorf("daemon RSS grows: max %.1f MiB in the last third, %.1f MiB in the first; limit 1.5 × first + 16 MiB = %.1f MiB",
			float64(last)/(1<<20), float64(first)/(1<<20), float64(limit)/(1<<20))
	}
}

// loadExpect holds the expected answers, computed from the source store.
type loadExpect struct {
	want      map[string]nixtest.PathInfo
	valid     []string
	invalid   []string
	referrers map[string][]string
	small     []string                  // paths whose NAR is at most loadSmallNAR
	nars      map[string]nixtest.Digest // NAR of each small path, from nix-store --dump
	big       string                    // the path with the biggest NAR
	// allValidMayGrow: paths are being added meanwhile, so QueryAllValidPaths need only
	// include every path of valid.
	allValidMayGrow bool
}

func newLoadExpect(t *testing.T, sf *servedFixture) *loadExpect {
	t.Helper()
	e := &loadExpect{want: sf.Want, valid: sf.All, referrers: referrersOf(sf.Want), nars: map[string]nixtest.Digest{}}
	for _, p := range sf.All {
		if sf.Want[p].NarSize <= loadSmallNAR {
			e.small = append(e.small, p)
			e.nars[p] = sf.Dump(t, p)
		}
		if e.big == "" || sf.Want[p].NarSize > sf.Want[e.big].NarSize {
			e.big = p
		}
	}
	rng := rand.New(rand.NewPCG(1, 2))
	for i := range 32 {
		h := make([]byte, 32)
		for j := range h {
			h[j] = "0123456789abcdfghijklmnpqrsvwxyz"[rng.IntN(32)]
		}
		e.invalid = append(e.invalid, fmt.Sprintf("%s/%s-invalid-%d", nixtest.StoreDir, h, i))
	}
	t.Logf("load: %d valid paths (%d with NARs up to %d KiB), %d invalid; big NAR %s (%d bytes)",
		len(e.valid), len(e.small), loadSmallNAR>>10, len(e.invalid), e.big, sf.Want[e.big].NarSize)
	if len(e.small) < 20 || sf.Want[e.big].NarSize < 4*loadAbortAfter {
		t.Fatalf("fixture too small for the load test")
	}
	return e
}

// The ops of the load, for counting.
const (
	loadOpPathInfo        = "QueryPathInfo(valid)"
	loadOpPathInfoInvalid = "QueryPathInfo(invalid)"
	loadOpIsValid         = "IsValidPath"
	loadOpValidPaths      = "QueryValidPaths"
	loadOpReferrers       = "QueryReferrers"
	loadOpHashPart        = "QueryPathFromHashPart"
	loadOpAllValid        = "QueryAllValidPaths"
	loadOpNar             = "NarFromPath"
)

var loadOps = []string{loadOpPathInfo, loadOpPathInfoInvalid, loadOpIsValid, loadOpValidPaths, loadOpReferrers, loadOpHashPart, loadOpAllValid, loadOpNar}

// randomOp does one random read on cl and checks the answer. Errors mean the connection
// may be out of step; wrong answers are recorded in st and are not errors.
func (e *loadExpect) randomOp(cl *proto.Client, rng *rand.Rand, st *loadStats) error {
	pickValid := func() string { return e.valid[rng.IntN(len(e.valid))] }
	pickInvalid := func() string { return e.invalid[rng.IntN(len(e.invalid))] }
	n := rng.IntN(100)
	var op string
	var err error
	switch {
	case n < 25:
		op = loadOpPathInfo
		p := pickValid()
		var pi *proto.PathInfo
		if pi, err = cl.QueryPathInfo(p); err == nil {
			if d := e.checkPathInfo(p, pi); d != "" {
				st.fail("QueryPathInfo %s: %s", p, d)
			}
		}
	case n < 35:
		op = loadOpPathInfoInvalid
		p := pickInvalid()
		var pi *proto.PathInfo
		if pi, err = cl.QueryPathInfo(p); err == nil && pi != nil {
			st.fail("QueryPathInfo %s (invalid): %+v", p, pi)
		}
	case n < 50:
		op = loadOpIsValid
		p, want := pickValid(), true
		if rng.IntN(2) == 0 {
			p, want = pickInvalid(), false
		}
		var ok bool
		if ok, err = cl.IsValidPath(p); err == nil && ok != want {
			st.fail("IsValidPath %s = %v, want %v", p, ok, want)
		}
	case n < 63:
		op = loadOpValidPaths
		var ask, want []string
		for range 1 + rng.IntN(8) {
			if rng.IntN(3) == 0 {
				ask = append(ask, pickInvalid())
			} else {
				p := pickValid()
				ask = append(ask, p)
				want = append(want, p)
			}
		}
		slices.Sort(want)
		want = slices.Compact(want)
		var got []string
		if got, err = cl.QueryValidPaths(ask); err == nil {
			slices.Sort(got)
			if !slices.Equal(got, want) {
				st.fail("QueryValidPaths %q = %q, want %q", ask, got, want)
			}
		}
	case n < 76:
		op = loadOpReferrers
		p := pickValid()
		var got []string
		if got, err = cl.QueryReferrers(p); err == nil {
			slices.Sort(got)
			if want := e.referrers[p]; !slices.Equal(got, want) && len(got)+len(want) > 0 {
				st.fail("QueryReferrers %s = %q, want %q", p, got, want)
			}
		}
	case n < 80:
		op = loadOpHashPart
		p := pickValid()
		if rng.IntN(4) == 0 {
			p = pickInvalid()
		}
		hash := strings.SplitN(strings.TrimPrefix(p, nixtest.StoreDir+"/"), "-", 2)[0]
		want := p
		if _, ok := e.want[p]; !ok {
			want = ""
		}
		var got string
		if got, err = cl.QueryPathFromHashPart(hash); err == nil && got != want {
			st.fail("QueryPathFromHashPart %s = %q, want %q", hash, got, want)
		}
	case n < 81:
		op = loadOpAllValid
		var got []string
		if got, err = cl.QueryAllValidPaths(); err == nil {
			slices.Sort(got)
			if e.allValidMayGrow {
				for _, p := range e.valid {
					if _, ok := slices.BinarySearch(got, p); !ok {
						st.fail("QueryAllValidPaths: %s missing", p)
						break
					}
				}
			} else if !slices.Equal(got, e.valid) {
				st.fail("QueryAllValidPaths: %d paths, want %d", len(got), len(e.valid))
			}
		}
	default:
		op = loadOpNar
		p := e.small[rng.IntN(len(e.small))]
		w := nixtest.NewDigestWriter()
		if _, err = cl.NarFromPath(p, w); err == nil && w.Digest() != e.nars[p] {
			st.fail("NarFromPath %s: %s, want %s", p, w.Digest(), e.nars[p])
		}
	}
	if err != nil {
		return fmt.Errorf("%s: %w", op, err)
	}
	st.done(op)
	return nil
}

// checkPathInfo compares a QueryPathInfo answer with the source store's path-info.
func (e *loadExpect) checkPathInfo(p string, pi *proto.PathInfo) string {
	if pi == nil {
		return "not valid"
	}
	w := e.want[p]
	h, err := nixtest.NormalizeSHA256(pi.NarHash)
	if err != nil {
		return err.Error()
	}
	refs := slices.Sorted(slices.Values(pi.References))
	sigs := slices.Sorted(slices.Values(pi.Sigs))
	if refs == nil {
		refs = []string{}
	}
	got := nixtest.PathInfo{
		Path: p, NarHash: h, NarSize: int64(pi.NarSize), References: refs, Deriver: pi.Deriver,
		CA: pi.CA, Signatures: sigs,
	}
	if len(got.Signatures) == 0 {
		got.Signatures = nil
	}
	if d := nixtest.ComparePathInfo(got, w); len(d) > 0 {
		return strings.Join(d, "; ")
	}
	return ""
}

// loadStats counts what the load did; safe for concurrent use.
type loadStats struct {
	ops           atomic.Int64
	failures      atomic.Int64
	aborted       atomic.Int64
	silentClosed  atomic.Int64
	maxSilentHeld maxDuration

	mu     sync.Mutex
	perOps map[string]int64
	errs   []string
}

func (s *loadStats) done(op string) {
	s.ops.Add(1)
	s.mu.Lock()
	if s.perOps == nil {
		s.perOps = map[string]int64{}
	}
	s.perOps[op]++
	s.mu.Unlock()
}

func (s *loadStats) count(op string) int64 {
	s.mu.Lock()
	defer s.mu.Unlock()
	return s.perOps[op]
}

func (s *loadStats) perOp() string {
	s.mu.Lock()
	defer s.mu.Unlock()
	var parts []string
	for _, op := range loadOps {
		parts = append(parts, fmt.Sprintf("%s %d", op, s.perOps[op]))
	}
	return strings.Join(parts, ", ")
}

// fail records a failure; the first 20 messages are kept.
func (s *loadStats) fail(format string, args ...any) {
	s.failures.Add(1)
	s.mu.Lock()
	defer s.mu.Unlock()
	if len(s.errs) < 20 {
		s.errs = append(s.errs, fmt.Sprintf(format, args...))
	}
}

func (s *loadStats) errors() []string {
	s.mu.Lock()
	defer s.mu.Unlock()
	return slices.Clone(s.errs)
}

// maxDuration keeps the largest duration stored.
type maxDuration struct{ v atomic.Int64 }

func (m *maxDuration) store(d time.Duration) {
	for {
		old := m.v.Load()
		if int64(d) <= old || m.v.CompareAndSwap(old, int64(d)) {
			return
		}
	}
}

func (m *maxDuration) load() time.Duration { return time.Duration(m.v.Load()) }

// errHangUp is what limitWriter returns once its limit is reached.
var errHangUp = errors.New("client hangs up")

// limitWriter accepts n bytes, then fails with errHangUp.
type limitWriter struct{ n int }

func (w *limitWriter) Write(p []byte) (int, error) {
	if len(p) > w.n {
		k := w.n
		w.n = 0
		return k, errHangUp
	}
	w.n -= len(p)
	return len(p), nil
}
