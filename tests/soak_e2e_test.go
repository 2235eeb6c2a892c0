package tests

import (
	"bufio"
	"bytes"
	"errors"
	"fmt"
	"io"
	"io/fs"
	"maps"
	"math/rand/v2"
	"net"
	"net/http"
	"os"
	"os/exec"
	"path/filepath"
	"regexp"
	"slices"
	"strconv"
	"strings"
	"sync"
	"sync/atomic"
	"testing"
	"time"

	"github.com/klauspost/compress/zstd"

	"github.com/casnix/casnix/proto"
	"github.com/casnix/casnix/tests/nixtest"
)

// Parameters of TestSoak.
const (
	soakClients   = 64               // concurrent client workers, each one real Nix (or casnix) command at a time
	soakDefault   = 90 * time.Second // the load's length without CASNIX_SOAK
	soakShared    = 4                // rooted closures the copy-in workers copy in, again and again
	soakEphemeral = 8                // workers that copy in a closure of their own, then delete it or leave it to GC
	soakCmd       = 4 * time.Minute  // timeout of one client command
	soakWarmUp    = 10 * time.Second // samples before max(this, a tenth of the run) are not judged

	// Flatness: the max of the last third of the samples may be at most mult × the max
	// of the first third + add. RSS under -race: the race runtime's shadow memory (about
	// 2× the heap it shadows) and the 51 MiB frame cache fill up during the first third,
	// which then holds the peak of 64 concurrent clients; 25% + 64 MiB covers the noise
	// of GC timing and of which clients happen to overlap, while a leak of a few KiB per
	// operation (thousands of operations a minute) crosses it within the 30-minute run.
	// (The daemon runs with --memory-limit 128MiB, which these figures assume; its default
	// grows with the machine's memory.)
	soakRSSMult, soakRSSAdd = 1.25, 64 << 20
	// RSS is judged that way from 10-minute runs on: a shorter run is all warm-up (the Go
	// heap grows to the steady state the collector keeps under GOMEMLIMIT, 128 MiB, and
	// the race runtime's shadow memory follows it), so it only has to stay under a
	// ceiling: 128 MiB of heap, ×3 for the shadow, and the runtime's own mappings.
	soakRSSJudged  = 10 * time.Minute
	soakRSSCeiling = 768 << 20
	// The live heap (what the last GC marked) is the direct measure of leaked Go
	// objects; the frame cache (51 MiB at most) fills within the first third, so 25% +
	// 32 MiB is noise and the rest a leak. It is judged in every run.
	soakHeapMult, soakHeapAdd = 1.25, 32 << 20
	// Goroutines and descriptors follow the open connections (64 clients at most, a few
	// goroutines and one socket each, plus HTTP and FUSE requests in flight), so a single
	// sample spikes with whatever overlaps at that instant (209 goroutines for one 2-s
	// sample of a 90-s CI run, 33 the next): they are judged by the median of each third,
	// which a leak raises and a spike does not. Both thirds see the full load, so 25% + 32
	// is noise, a leak per operation is not; the count after the load (below) is the
	// other half of the check.
	soakGoMult, soakGoAdd = 1.25, 32
	soakFDMult, soakFDAdd = 1.25, 32
	soakEndGoroutines     = 16 // once the clients are gone: at most this many more goroutines than before the load
	// … and descriptors: no more sockets or pipes than before (one per connection or
	// request: a leak), and at most this many more files (SQLite's reader pool and its
	// -wal/-shm, pack files kept open for reading: opened on demand, bounded by the pool
	// size and the number of packs).
	soakEndFiles            = 16
	soakEndSettle           = 30 * time.Second
	soakAbandonGrace        = 5 * time.Second // a path left for GC this long before a collection must be gone after it
	soakHTTPTimeout         = 2 * time.Minute
	soakMaxNARInMemory      = 64 << 20
	soakOpRead              = "read"
	soakOpPathInfo          = "nix path-info"
	soakOpReferences        = "nix-store -q --references"
	soakOpReferrers         = "nix-store -q --referrers"
	soakOpVerifyPath        = "nix-store --verify-path"
	soakOpDumpPath          = "nix store dump-path"
	soakOpNarFromPath       = "NarFromPath (proto.Client)"
	soakOpCopyInShared      = "copy in (shared closure)"
	soakOpReCopy            = "copy in again (fixture)"
	soakOpCopyInOwn         = "copy in (own closure)"
	soakOpDeleteOwn         = "nix-store --delete (own closure)"
	soakOpAbandonOwn        = "own closure left to GC"
	soakOpCopyOutLocal      = "copy out to local store"
	soakOpCopyOutFile       = "copy out to file://"
	soakOpHTTPCopy          = "nix copy --from http://"
	soakOpHTTPGet           = "GET narinfo + NAR"
	soakOpHTTPMissing       = "GET narinfo (invalid)"
	soakOpFUSEDump          = "FUSE nix-store --dump"
	soakOpFUSEFile          = "FUSE read vs source"
	soakOpGC                = "nix-store --gc"
	soakOpPrintDead         = "nix-store --gc --print-dead"
	soakOpBackup            = "casnix backup"
	soakOpBackupQuick       = "casnix backup --quick"
	soakRoleGC, soakRoleBak = 0, 1 // worker numbers of the two singleton roles
)

// soakOps lists the kinds of operations, for the summary and to check each one ran.
var soakOps = []string{
	soakOpPathInfo, soakOpReferences, soakOpReferrers, soakOpVerifyPath, soakOpDumpPath, soakOpNarFromPath,
	soakOpCopyInShared, soakOpReCopy, soakOpCopyInOwn, soakOpDeleteOwn, soakOpAbandonOwn,
	soakOpCopyOutLocal, soakOpCopyOutFile, soakOpHTTPCopy, soakOpHTTPGet, soakOpHTTPMissing,
	soakOpFUSEDump, soakOpFUSEFile, soakOpGC, soakOpPrintDead, soakOpBackup, soakOpBackupQuick,
}

// soakDuration is how long TestSoak loads the daemon: CASNIX_SOAK (a Go duration), or 90 s.
func soakDuration(t *testing.T) time.Duration {
	if s := os.Getenv("CASNIX_SOAK"); s != "" {
		d, err := time.ParseDuration(s)
		if err != nil || d <= 0 {
			t.Fatalf("CASNIX_SOAK=%q: want a Go duration such as 30m", s)
		}
		return d
	}
	return soakDefault
}

// TestSoak runs one `casnix serve` built with -race (daemon socket, --http with /metrics,
// FUSE --mount) for CASNIX_SOAK (90 s by default; 30m for the real soak) under 64
// concurrent workers running real host Nix 2.8 (and casnix) commands, every answer checked
// against the source store:
//
//   - 20 readers: nix path-info --json, nix-store -q --references / --referrers,
//     nix-store --verify-path, nix store dump-path (NAR hash and size), and NarFromPath
//     over a fresh connection of casnix's own proto.Client (hash and size);
//   - 8 copy-in workers: nix copy --to unix://… of rooted closures new to casnix, and
//     of fixture paths it has (re-copies), then the path-info of the closure;
//   - 8 owners: each roots, copies in and checks a closure of its own (also over HTTP),
//     unroots it, and then deletes it with nix-store --delete (and sees it gone, also
//     from HTTP) or leaves it to the collector;
//   - 8 copy-out workers: nix copy --from unix://… to a local store or to file://, then
//     the copied path-info, or the narinfos and NAR files;
//
// Nix's unix:// store reads a path's files from the file system (LocalFSStore), at the
// store URL's real= directory: the NAR-reading commands (dump-path, verify-path, copies
// out) name the FUSE mount there, as a Local Overlay Store names its lower store, so
// they read through the daemon (metadata) and the mount (files) together. The daemon's
// own NarFromPath is what proto.Client asks for.
//
//   - 8 HTTP workers: nix copy --from http://…, GET narinfo + NAR (zstd, hashed), GET of
//     a narinfo that does not exist (404);
//   - 10 FUSE readers: nix-store --dump of a path under the mount (its NAR hash) and
//     single files, symlinks and directories compared with the source;
//   - 1 collector: nix-store --gc --print-dead (no rooted path in it) and nix-store --gc
//     through the daemon; every abandoned closure is gone after it, every rooted path
//     still valid;
//   - 1 backup worker: casnix backup (full or --quick) beside the daemon, the copy
//     holding every rooted path with its path-info.
//
// The daemon is sampled every few seconds: VmRSS, and go_goroutines and
// process_open_fds from /metrics. After a warm-up, the max of the last third of the
// samples must stay within a slack of the max of the first third (see the constants), and
// once the clients are gone goroutines and descriptors must come back to near their
// count before the load. The serve log must hold no data race, panic or error.
func TestSoak(t *testing.T) {
	dur := soakDuration(t)
	race := nixtest.CasnixRaceBinary(t)
	nixtest.RequireHostNix(t)
	plain := nixtest.NewCasnix(t) // imports the fixture: set-up, not under test, and 10× faster without -race
	cas := &nixtest.Casnix{Bin: race, DataDir: plain.DataDir}
	f := nixtest.PopulateFixture(t)
	want := f.PathInfos(t)
	fixture := slices.Sorted(maps.Keys(want))
	plain.ImportFromNixStore(t, f.Store, fixture...)
	exp := newSoakExpect(t, f, want)

	// Roots for every fixture path and every shared closure (before it exists: a root may
	// name an invalid path), written into the data dir's gcroots/ as an administrator would.
	rootDir := filepath.Join(cas.DataDir, "gcroots")
	for i, p := range fixture {
		soakSymlink(t, p, filepath.Join(rootDir, fmt.Sprintf("soak-fixture-%d", i)))
	}
	for i, c := range exp.shared {
		soakSymlink(t, c.top, filepath.Join(rootDir, fmt.Sprintf("soak-shared-%d", i)))
	}

	// casnix serve with the daemon socket, HTTP and the FUSE mount.
	dir := t.TempDir()
	socket := filepath.Join(dir, "casnix.sock")
	mnt := filepath.Join(dir, "mnt")
	t.Cleanup(func() { exec.Command("umount", "-l", mnt).Run() }) // after the daemon's stop, should it leave the mount
	addr := soakFreePort(t)
	d := cas.Serve(t, socket, "--memory-limit", "128MiB", "--http", addr, "--mount", mnt)
	base := "http://" + addr
	hc := &http.Client{Timeout: soakHTTPTimeout}
	soakWaitReady(t, d, hc, base, filepath.Join(mnt, filepath.Base(fixture[0])))
	s := &soak{
		t: t, f: f, exp: exp, cas: cas, d: d, url: d.URL(), realURL: d.URL() + "?real=" + mnt, socket: socket, http: base, hc: hc, mnt: mnt, rootDir: rootDir,
		st: &loadStats{}, abandoned: map[int]soakAbandoned{},
	}
	metricsClient := &http.Client{Timeout: 30 * time.Second, Transport: &http.Transport{DisableKeepAlives: true}}
	sample := func() (soakSample, error) { return soakTakeSample(d, metricsClient, base) }

	// One of each client kind first, so the baseline counts what a first request starts
	// once (the frame cache's decoders, go-fuse's readers, the HTTP server's).
	s.warmUp()
	if errs := s.st.errors(); len(errs) > 0 {
		t.Fatalf("warm-up: %s", strings.Join(errs, "\n"))
	}
	time.Sleep(2 * time.Second)
	before, err := sample()
	if err != nil {
		t.Fatal(err)
	}
	fdsBefore, err := d.OpenFDs()
	if err != nil {
		t.Fatal(err)
	}

	start := time.Now()
	s.dur, s.deadline = dur, start.Add(dur)
	interval := 2 * time.Second
	if dur > 5*time.Minute {
		interval = 5 * time.Second
	}
	s.interval = interval
	var samples []soakSample
	samplerDone := make(chan struct{})
	go func() {
		defer close(samplerDone)
		for next := start; time.Now().Before(s.deadline); next = next.Add(interval) {
			time.Sleep(time.Until(next))
			if d.Exited() {
				s.st.fail("casnix serve exited during the soak")
				return
			}
			sm, err := sample()
			if err != nil {
				s.st.fail("sample: %v", err)
				continue
			}
			sm.at = time.Since(start)
			samples = append(samples, sm)
		}
	}()

	var wg sync.WaitGroup
	for i := range soakClients {
		wg.Add(1)
		go func() {
			defer wg.Done()
			s.worker(i)
		}()
	}
	allDone := make(chan struct{})
	go func() { wg.Wait(); close(allDone) }()
	select {
	case <-allDone:
	case <-time.After(dur + 2*soakCmd + time.Minute):
		t.Fatalf("workers still busy %s after the end of the soak; the daemon:\n%s", time.Since(s.deadline).Round(time.Second), clipOutput([]byte(d.Output())))
	}
	<-samplerDone
	elapsed := time.Since(start)

	// The clients are gone: goroutines and descriptors come back.
	hc.CloseIdleConnections()
	var after soakSample
	var fdsAfter []string
	for settle := time.Now(); ; time.Sleep(500 * time.Millisecond) {
		if after, err = sample(); err != nil {
			t.Fatal(err)
		}
		if fdsAfter, err = d.OpenFDs(); err != nil {
			t.Fatal(err)
		}
		if after.goroutines <= before.goroutines+soakEndGoroutines && soakConns(fdsAfter) <= soakConns(fdsBefore) || time.Since(settle) > soakEndSettle {
			break
		}
	}

	// Summary.
	ops := s.st.ops.Load()
	t.Logf("soak: %s, %d clients, %d operations (%.1f/s), %d failures", elapsed.Round(time.Second), soakClients, ops, float64(ops)/elapsed.Seconds(), s.st.failures.Load())
	s.st.mu.Lock()
	for _, op := range soakOps {
		t.Logf("  %-34s %d", op, s.st.perOps[op])
	}
	s.st.mu.Unlock()
	s.stepMu.Lock()
	for _, role := range slices.Sorted(maps.Keys(s.steps)) {
		st := s.steps[role]
		t.Logf("  %-9s steps: %4d, mean %s, max %s", role, st.n, (st.total / time.Duration(st.n)).Round(time.Millisecond), st.max.Round(time.Millisecond))
	}
	s.stepMu.Unlock()
	s.judge(samples, before, after, dur)
	t.Logf("descriptors before the load: %d (%d sockets and pipes); after: %d (%d); new: %q", len(fdsBefore), soakConns(fdsBefore),
		len(fdsAfter), soakConns(fdsAfter), soakNew(fdsBefore, fdsAfter))
	if soakConns(fdsAfter) > soakConns(fdsBefore) {
		t.Errorf("%d sockets and pipes open after the clients left, %d before the load: leaked", soakConns(fdsAfter), soakConns(fdsBefore))
	}
	if files := (len(fdsAfter) - soakConns(fdsAfter)) - (len(fdsBefore) - soakConns(fdsBefore)); files > soakEndFiles {
		t.Errorf("%d more files open after the clients left than before the load (limit %d)", files, soakEndFiles)
	}

	for _, e := range s.st.errors() {
		t.Error(e)
	}
	if n := s.st.failures.Load(); n > 0 {
		t.Errorf("%d failures in all (the first %d above)", n, len(s.st.errors()))
	}
	for _, op := range soakOps {
		// A backup of the race binary takes about a minute on a loaded 2-core machine:
		// the CI run may see only one of the two kinds.
		if s.st.count(op) == 0 && op != soakOpBackup && op != soakOpBackupQuick {
			t.Errorf("no %q ran", op)
		}
	}
	if s.st.count(soakOpBackup)+s.st.count(soakOpBackupQuick) == 0 {
		t.Errorf("no casnix backup ran")
	}
	if d.Exited() {
		t.Fatalf("casnix serve exited during the soak: %v\n%s", d.Stop(0), clipOutput([]byte(d.Output())))
	}
	if err := d.Stop(60 * time.Second); err != nil {
		t.Errorf("casnix serve after SIGTERM: %v\n%s", err, clipOutput([]byte(d.Output())))
	}
	checkServeLog(t, d)
	if r := plain.Try("verify"); !r.OK() {
		t.Errorf("casnix verify after the soak:\n%s", r)
	}
}

// soakExpect is what the workers check answers against: the fixture store, as built.
type soakExpect struct {
	want      map[string]nixtest.PathInfo // every fixture path, and every path of shared and own closures
	fixture   []string                    // fixture paths, sorted
	nonDrv    []string                    // fixture paths that are not .drv (the nix command reads a .drv as its outputs)
	referrers map[string][]string         // of fixture paths
	files     map[string][]string         // fixture path → relative paths of every node below it ("" for itself)
	shared    []soakClosure
	own       []soakClosure // one per owner
	invalid   []string      // hash parts that name no path
}

// soakClosure is a closure built after the import, so casnix does not have it.
type soakClosure struct {
	top   string
	paths []string // sorted
}

// newSoakExpect builds the shared and own closures in the fixture store (after the
// import: casnix lacks them) and collects the expected answers. The new closures refer to
// no fixture path, so the fixture's referrers stay what they are.
func newSoakExpect(t *testing.T, f *nixtest.Fixture, want map[string]nixtest.PathInfo) *soakExpect {
	t.Helper()
	e := &soakExpect{want: maps.Clone(want), fixture: slices.Sorted(maps.Keys(want)), referrers: referrersOf(want), files: map[string][]string{}}
	for _, p := range e.fixture {
		if !strings.HasSuffix(p, ".drv") {
			e.nonDrv = append(e.nonDrv, p)
		}
		var rels []string
		root := f.RealPath(p)
		err := filepath.WalkDir(root, func(path string, _ fs.DirEntry, err error) error {
			if err != nil {
				return err
			}
			rel, _ := filepath.Rel(root, path)
			if rel == "." {
				rel = ""
			}
			rels = append(rels, rel)
			return nil
		})
		if err != nil {
			t.Fatal(err)
		}
		e.files[p] = rels
	}
	tops := f.BuildExpr(t, fmt.Sprintf(`builtins.genList (i: let
  mk = n: s: derivation {
    name = "soak-${toString i}-${n}";
    system = builtins.currentSystem;
    builder = busybox;
    args = [ "sh" "-euc" s ];
  };
  leaf = mk "leaf" "head -c $((150000 + ${toString i} * 7000)) /dev/urandom > $out";
  mid = mk "mid" "mkdir -p $out/d; seq 1 $((4000 + ${toString i})) > $out/d/seq; echo ${leaf} > $out/leaf";
in mk "top" "mkdir $out; ln -s ${mid}/d/seq $out/seq; echo ${mid} > $out/mid") %d`, soakShared+soakEphemeral))
	nameRE := regexp.MustCompile(`-soak-(\d+)-top$`)
	byIndex := make([]string, soakShared+soakEphemeral)
	for _, top := range tops {
		m := nameRE.FindStringSubmatch(top)
		if m == nil {
			t.Fatalf("unexpected build output %s", top)
		}
		i, _ := strconv.Atoi(m[1])
		byIndex[i] = top
	}
	for i, top := range byIndex {
		if top == "" {
			t.Fatalf("closure %d not built: %q", i, tops)
		}
		c := soakClosure{top: top, paths: f.Closure(t, top)}
		if len(c.paths) != 3 {
			t.Fatalf("closure of %s: %q, want 3 paths", top, c.paths)
		}
		for p, pi := range f.PathInfos(t, c.paths...) {
			e.want[p] = pi
		}
		if i < soakShared {
			e.shared = append(e.shared, c)
		} else {
			e.own = append(e.own, c)
		}
	}
	rng := rand.New(rand.NewPCG(3, 4))
	for range 16 {
		h := make([]byte, 32)
		for j := range h {
			h[j] = "0123456789abcdfghijklmnpqrsvwxyz"[rng.IntN(32)]
		}
		if _, ok := e.byHash(string(h)); !ok {
			e.invalid = append(e.invalid, string(h))
		}
	}
	t.Logf("soak: %d fixture paths, %d shared and %d own closures of 3 paths", len(e.fixture), len(e.shared), len(e.own))
	return e
}

func (e *soakExpect) byHash(h string) (string, bool) {
	for p := range e.want {
		if strings.HasPrefix(filepath.Base(p), h+"-") {
			return p, true
		}
	}
	return "", false
}

// closure is the closure of paths in want, sorted.
func (e *soakExpect) closure(paths ...string) []string {
	seen := map[string]bool{}
	var walk func(string)
	walk = func(p string) {
		if seen[p] {
			return
		}
		seen[p] = true
		for _, r := range e.want[p].References {
			walk(r)
		}
	}
	for _, p := range paths {
		walk(p)
	}
	return slices.Sorted(maps.Keys(seen))
}

// compareInfos checks infos (normalised path-info, e.g. of a copy) against want for
// exactly the paths of wantPaths; it returns the differences.
func (e *soakExpect) compareInfos(infos map[string]nixtest.PathInfo, wantPaths []string) []string {
	var diffs []string
	if got := slices.Sorted(maps.Keys(infos)); !slices.Equal(got, wantPaths) {
		diffs = append(diffs, fmt.Sprintf("paths %q, want %q", got, wantPaths))
	}
	for _, p := range wantPaths {
		if got, ok := infos[p]; ok {
			if d := nixtest.ComparePathInfo(got, e.want[p]); len(d) > 0 {
				diffs = append(diffs, p+": "+strings.Join(d, "; "))
			}
		}
	}
	return diffs
}

// soak is the state the workers share.
type soak struct {
	t        *testing.T
	f        *nixtest.Fixture
	exp      *soakExpect
	cas      *nixtest.Casnix
	d        *nixtest.Daemon
	url      string // unix://SOCKET
	realURL  string // unix://SOCKET?real=MOUNT, for commands that read files (see TestSoak)
	socket   string
	http     string // http://ADDR
	hc       *http.Client
	mnt      string
	rootDir  string
	st       *loadStats
	dur      time.Duration
	interval time.Duration // between samples
	deadline time.Time

	// gcMu: owners hold it shared for a whole cycle (root, copy, check, unroot, delete or
	// abandon), the collector exclusively: an owner's closure is then either rooted or
	// deleted or abandoned, never half-way, when a collection runs.
	gcMu         sync.RWMutex
	abandonMu    sync.Mutex
	abandoned    map[int]soakAbandoned // owner → its closure, left to the collector
	sharedCopied [soakShared]atomic.Bool

	stepMu sync.Mutex
	steps  map[string]*soakStepTime // role → its steps' durations
}

// stepTook records how long one step of a role took, for the summary.
func (s *soak) stepTook(role string, d time.Duration) {
	s.stepMu.Lock()
	defer s.stepMu.Unlock()
	if s.steps == nil {
		s.steps = map[string]*soakStepTime{}
	}
	st := s.steps[role]
	if st == nil {
		st = &soakStepTime{}
		s.steps[role] = st
	}
	st.n++
	st.total += d
	st.max = max(st.max, d)
}

type soakStepTime struct {
	n          int
	total, max time.Duration
}

type soakAbandoned struct {
	paths []string
	at    time.Time
}

// nixEnv is the environment of worker i's Nix commands: the harness's nix.conf, a HOME
// and cache of its own (Nix keeps a SQLite cache of narinfos there).
func (s *soak) nixEnv(i int) []string {
	home := filepath.Join(s.t.TempDir(), fmt.Sprintf("home-%d", i))
	return append(nixtest.NixEnv(s.t), "HOME="+home, "XDG_CACHE_HOME="+filepath.Join(home, ".cache"))
}

// soakWorker is one client.
type soakWorker struct {
	*soak
	i   int
	rng *rand.Rand
	env []string
	n   int // operations done, for alternating kinds
}

func (w *soakWorker) cmd(args ...string) *nixtest.Cmd {
	return &nixtest.Cmd{Name: args[0], Args: args[1:], Env: w.env, Timeout: soakCmd}
}

// run runs a command and records a failure unless it exits 0.
func (w *soakWorker) run(op string, args ...string) (*nixtest.Result, bool) {
	r := w.cmd(args...).Try()
	if !r.OK() {
		w.st.fail("worker %d, %s:\n%s", w.i, op, r)
		return r, false
	}
	return r, true
}

func (w *soakWorker) fail(op, format string, args ...any) {
	w.st.fail("worker %d, %s: %s", w.i, op, fmt.Sprintf(format, args...))
}

func (s *soak) newWorker(i int) *soakWorker {
	return &soakWorker{soak: s, i: i, rng: rand.New(rand.NewPCG(uint64(i), uint64(time.Now().UnixNano()))), env: s.nixEnv(i)}
}

// warmUp runs one operation of every kind but GC and backup, before the baseline sample.
func (s *soak) warmUp() {
	w := s.newWorker(-1)
	w.read(soakOpPathInfo)
	w.read(soakOpDumpPath)
	w.read(soakOpNarFromPath)
	w.copyOut(false)
	w.httpGet()
	w.fuseDump()
	w.fuseFile()
}

// worker runs worker i's kind of operations until the deadline.
func (s *soak) worker(i int) {
	w := s.newWorker(i)
	var step func()
	var role string
	switch {
	case i == soakRoleGC:
		role, step = "collector", w.collect
	case i == soakRoleBak:
		role, step = "backup", w.backup
	case i < 2+soakEphemeral:
		role, step = "owner", func() { w.ownCycle(i - 2) }
	case i < 18:
		role, step = "copy-in", w.copyIn
	case i < 26:
		role, step = "copy-out", func() { w.copyOut(w.n%2 == 0) }
	case i < 34:
		role, step = "HTTP", w.httpOp
	case i < 44:
		role, step = "FUSE", w.fuseOp
	default:
		role, step = "reader", func() { w.read("") }
	}
	for time.Now().Before(s.deadline) {
		t0 := time.Now()
		step()
		s.stepTook(role, time.Since(t0))
		w.n++
	}
}

func (w *soakWorker) pick(paths []string) string { return paths[w.rng.IntN(len(paths))] }

// read does one read through the daemon (a random kind when op is "").
func (w *soakWorker) read(op string) {
	if op == "" {
		ops := []string{soakOpPathInfo, soakOpReferences, soakOpReferrers, soakOpVerifyPath, soakOpDumpPath, soakOpNarFromPath}
		op = ops[w.rng.IntN(len(ops))]
	}
	e := w.exp
	switch op {
	case soakOpPathInfo:
		var ps []string
		for range 1 + w.rng.IntN(4) {
			ps = append(ps, w.pick(e.nonDrv))
		}
		slices.Sort(ps)
		ps = slices.Compact(ps)
		r, ok := w.run(op, append([]string{"nix", "path-info", "--json", "--store", w.url}, ps...)...)
		if !ok {
			return
		}
		infos, err := nixtest.ParsePathInfoJSON(r.Stdout)
		if err != nil {
			w.fail(op, "%v\n%s", err, r)
			return
		}
		if d := e.compareInfos(infos, ps); len(d) > 0 {
			w.fail(op, "%s", strings.Join(d, "\n"))
			return
		}
	case soakOpReferences, soakOpReferrers:
		p := w.pick(e.fixture)
		flag, wantList := "--references", e.want[p].References
		if op == soakOpReferrers {
			flag, wantList = "--referrers", e.referrers[p]
		}
		r, ok := w.run(op, "nix-store", "--store", w.url, "-q", flag, p)
		if !ok {
			return
		}
		if got := nixtest.SortedLines(r.Stdout); !slices.Equal(got, wantList) && len(got)+len(wantList) > 0 {
			w.fail(op, "%s: %q, want %q", p, got, wantList)
			return
		}
	case soakOpVerifyPath:
		p := w.pick(e.fixture)
		r, ok := w.run(op, "nix-store", "--store", w.realURL, "--verify-path", p)
		if !ok {
			return
		}
		if len(bytes.TrimSpace(r.Stderr)) > 0 {
			w.fail(op, "%s: complained:\n%s", p, r.Stderr)
			return
		}
	case soakOpDumpPath:
		p := w.pick(e.nonDrv)
		dw := nixtest.NewDigestWriter()
		c := w.cmd("nix", "store", "dump-path", "--store", w.realURL, p)
		c.Stdout = dw
		if r := c.Try(); !r.OK() {
			w.fail(op, "%s", r)
			return
		}
		if d := e.checkNAR(p, dw.Digest()); d != "" {
			w.fail(op, "%s", d)
			return
		}
	case soakOpNarFromPath:
		p := w.pick(e.fixture)
		cl, err := proto.Dial(w.socket)
		if err != nil {
			w.fail(op, "dial: %v", err)
			return
		}
		dw := nixtest.NewDigestWriter()
		_, err = cl.NarFromPath(p, dw)
		cl.Close()
		if err != nil {
			w.fail(op, "%s: %v", p, err)
			return
		}
		if d := e.checkNAR(p, dw.Digest()); d != "" {
			w.fail(op, "%s", d)
			return
		}
	}
	w.st.done(op)
}

// daemonInfos is `nix path-info --json [--recursive] PATHS` through the daemon.
func (w *soakWorker) daemonInfos(op string, recursive bool, paths ...string) (map[string]nixtest.PathInfo, bool) {
	args := []string{"nix", "path-info", "--json", "--store", w.url}
	if recursive {
		args = append(args, "--recursive")
	}
	r, ok := w.run(op+": path-info", append(args, paths...)...)
	if !ok {
		return nil, false
	}
	infos, err := nixtest.ParsePathInfoJSON(r.Stdout)
	if err != nil {
		w.fail(op, "path-info: %v\n%s", err, r)
		return nil, false
	}
	return infos, true
}

// copyIn copies a shared closure, or a fixture path casnix has (a re-copy), into the
// daemon and checks the closure's path-info there.
func (w *soakWorker) copyIn() {
	op, top, paths := soakOpReCopy, w.pick(w.exp.nonDrv), []string(nil)
	shared := -1
	if w.n%2 == 0 {
		shared = w.rng.IntN(len(w.exp.shared))
		op, top, paths = soakOpCopyInShared, w.exp.shared[shared].top, w.exp.shared[shared].paths
	} else {
		paths = w.exp.closure(top)
	}
	if _, ok := w.run(op, "nix", "copy", "--no-check-sigs", "--from", "local?root="+w.f.Root, "--to", w.url, top); !ok {
		return
	}
	if shared >= 0 {
		w.sharedCopied[shared].Store(true)
	}
	infos, ok := w.daemonInfos(op, true, top)
	if !ok {
		return
	}
	if d := w.exp.compareInfos(infos, paths); len(d) > 0 {
		w.fail(op, "after copying %s: %s", top, strings.Join(d, "\n"))
		return
	}
	w.st.done(op)
}

// ownCycle: owner k roots its closure, copies it in, checks it through the daemon and
// HTTP, unroots it, and then deletes it (checking it is gone, also from HTTP) or leaves
// it to the collector.
func (w *soakWorker) ownCycle(k int) {
	w.gcMu.RLock()
	defer w.gcMu.RUnlock()
	c := w.exp.own[k]
	w.abandonMu.Lock()
	delete(w.abandoned, k)
	w.abandonMu.Unlock()
	root := filepath.Join(w.rootDir, fmt.Sprintf("soak-own-%d", k))
	if err := os.Symlink(c.top, root); err != nil {
		w.fail(soakOpCopyInOwn, "root: %v", err)
		return
	}
	ok := w.ownCopy(c)
	if err := os.Remove(root); err != nil {
		w.fail(soakOpCopyInOwn, "unroot: %v", err)
		return
	}
	if !ok {
		return
	}
	if (w.n+k)%2 == 1 {
		w.abandonMu.Lock()
		w.abandoned[k] = soakAbandoned{paths: c.paths, at: time.Now()}
		w.abandonMu.Unlock()
		w.st.done(soakOpAbandonOwn)
		return
	}
	op := soakOpDeleteOwn
	if _, ok := w.run(op, append([]string{"nix-store", "--store", w.url, "--delete"}, c.paths...)...); !ok {
		return
	}
	if invalid, ok := w.invalidOf(op, c.paths); !ok {
		return
	} else if !slices.Equal(invalid, c.paths) {
		w.fail(op, "after nix-store --delete, invalid: %q, want all of %q", invalid, c.paths)
		return
	}
	if code, _, err := w.get(w.narinfoURL(c.top)); err != nil || code != http.StatusNotFound {
		w.fail(op, "narinfo of deleted %s: status %d, %v; want 404", c.top, code, err)
		return
	}
	w.st.done(op)
}

func (w *soakWorker) ownCopy(c soakClosure) bool {
	op := soakOpCopyInOwn
	if _, ok := w.run(op, "nix", "copy", "--no-check-sigs", "--from", "local?root="+w.f.Root, "--to", w.url, c.top); !ok {
		return false
	}
	infos, ok := w.daemonInfos(op, true, c.top)
	if !ok {
		return false
	}
	if d := w.exp.compareInfos(infos, c.paths); len(d) > 0 {
		w.fail(op, "after copying %s: %s", c.top, strings.Join(d, "\n"))
		return false
	}
	if !w.checkHTTP(op, c.top) {
		return false
	}
	w.st.done(op)
	return true
}

// invalidOf returns which of paths the daemon says are invalid (nix-store
// --check-validity --print-invalid), sorted.
func (w *soakWorker) invalidOf(op string, paths []string) ([]string, bool) {
	r, ok := w.run(op+": check-validity", append([]string{"nix-store", "--store", w.url, "--check-validity", "--print-invalid"}, paths...)...)
	if !ok {
		return nil, false
	}
	return nixtest.SortedLines(r.Stdout), true
}

// copyOut copies a fixture path's closure (or a shared closure once it is in) out of the
// daemon, to a local store or to a file:// cache, and checks what arrived.
func (w *soakWorker) copyOut(toFile bool) {
	top := w.pick(w.exp.nonDrv)
	if j := w.rng.IntN(len(w.exp.shared) * 4); j < len(w.exp.shared) && w.sharedCopied[j].Load() {
		top = w.exp.shared[j].top
	}
	if toFile {
		w.copyToFile(soakOpCopyOutFile, w.realURL, top)
	} else {
		w.copyToLocal(soakOpCopyOutLocal, w.realURL, top)
	}
}

// copyToLocal runs nix copy --from FROM --to a fresh local store, and compares the
// path-info of everything there with the closure of top.
func (w *soakWorker) copyToLocal(op, from, top string) {
	dir, err := os.MkdirTemp(w.t.TempDir(), "local-")
	if err != nil {
		w.fail(op, "%v", err)
		return
	}
	defer os.RemoveAll(dir)
	to := "local?root=" + dir
	if _, ok := w.run(op, "nix", "copy", "--no-check-sigs", "--from", from, "--to", to, top); !ok {
		return
	}
	r, ok := w.run(op+": path-info", "nix", "path-info", "--json", "--all", "--store", to)
	if !ok {
		return
	}
	infos, err := nixtest.ParsePathInfoJSON(r.Stdout)
	if err != nil {
		w.fail(op, "path-info: %v\n%s", err, r)
		return
	}
	if d := w.exp.compareInfos(infos, w.exp.closure(top)); len(d) > 0 {
		w.fail(op, "copy of %s from %s: %s", top, from, strings.Join(d, "\n"))
		return
	}
	w.st.done(op)
}

// copyToFile runs nix copy --from FROM --to an uncompressed file:// cache, and checks
// its narinfos against the closure of top and each NAR file against its NarHash.
func (w *soakWorker) copyToFile(op, from, top string) {
	dir, err := os.MkdirTemp(w.t.TempDir(), "cache-")
	if err != nil {
		w.fail(op, "%v", err)
		return
	}
	defer os.RemoveAll(dir)
	if _, ok := w.run(op, "nix", "copy", "--no-check-sigs", "--from", from, "--to", "file://"+dir+"?compression=none", top); !ok {
		return
	}
	names, err := filepath.Glob(filepath.Join(dir, "*.narinfo"))
	if err != nil {
		w.fail(op, "%v", err)
		return
	}
	var got []string
	for _, name := range names {
		b, err := os.ReadFile(name)
		if err != nil {
			w.fail(op, "%v", err)
			return
		}
		ni, err := parseSoakNarinfo(b)
		if err != nil {
			w.fail(op, "%s: %v", name, err)
			return
		}
		got = append(got, ni.storePath)
		if d := w.exp.checkNarinfo(ni); d != "" {
			w.fail(op, "%s: %s", name, d)
			return
		}
		f, err := os.Open(filepath.Join(dir, ni.url))
		if err != nil {
			w.fail(op, "NAR of %s: %v", ni.storePath, err)
			return
		}
		dw := nixtest.NewDigestWriter()
		_, err = io.Copy(dw, f)
		f.Close()
		if err != nil {
			w.fail(op, "NAR of %s: %v", ni.storePath, err)
			return
		}
		if d := w.exp.checkNAR(ni.storePath, dw.Digest()); d != "" {
			w.fail(op, "%s", d)
			return
		}
	}
	slices.Sort(got)
	if wantPaths := w.exp.closure(top); !slices.Equal(got, wantPaths) {
		w.fail(op, "copy of %s: narinfos for %q, want %q", top, got, wantPaths)
		return
	}
	w.st.done(op)
}

func (e *soakExpect) checkNAR(p string, got nixtest.Digest) string {
	if got.NixHash() != e.want[p].NarHash || got.Size != e.want[p].NarSize {
		return fmt.Sprintf("NAR of %s: %s, want %s (%d bytes)", p, got, e.want[p].NarHash, e.want[p].NarSize)
	}
	return ""
}

// soakNarinfo holds the narinfo fields the soak checks.
type soakNarinfo struct {
	storePath, url, compression, narHash, deriver string
	narSize                                       int64
	references                                    []string // full store paths, sorted
}

func parseSoakNarinfo(b []byte) (*soakNarinfo, error) {
	ni := &soakNarinfo{references: []string{}}
	sc := bufio.NewScanner(bytes.NewReader(b))
	for sc.Scan() {
		k, v, ok := strings.Cut(sc.Text(), ": ")
		if !ok {
			return nil, fmt.Errorf("line %q", sc.Text())
		}
		switch k {
		case "StorePath":
			ni.storePath = v
		case "URL":
			ni.url = v
		case "Compression":
			ni.compression = v
		case "NarHash":
			ni.narHash = v
		case "NarSize":
			n, err := strconv.ParseInt(v, 10, 64)
			if err != nil {
				return nil, fmt.Errorf("NarSize %q", v)
			}
			ni.narSize = n
		case "References":
			for _, r := range strings.Fields(v) {
				ni.references = append(ni.references, nixtest.StoreDir+"/"+r)
			}
		case "Deriver":
			if v != "unknown-deriver" {
				ni.deriver = nixtest.StoreDir + "/" + v
			}
		}
	}
	slices.Sort(ni.references)
	if ni.storePath == "" || ni.url == "" || ni.narHash == "" {
		return nil, fmt.Errorf("incomplete narinfo:\n%s", b)
	}
	return ni, sc.Err()
}

// checkNarinfo compares a narinfo with the path-info of its path.
func (e *soakExpect) checkNarinfo(ni *soakNarinfo) string {
	want, ok := e.want[ni.storePath]
	if !ok {
		return fmt.Sprintf("narinfo of unexpected path %s", ni.storePath)
	}
	h, err := nixtest.NormalizeSHA256(ni.narHash)
	var diffs []string
	if err != nil || h != want.NarHash {
		diffs = append(diffs, fmt.Sprintf("NarHash %s (%v), want %s", ni.narHash, err, want.NarHash))
	}
	if ni.narSize != want.NarSize {
		diffs = append(diffs, fmt.Sprintf("NarSize %d, want %d", ni.narSize, want.NarSize))
	}
	if !slices.Equal(ni.references, want.References) {
		diffs = append(diffs, fmt.Sprintf("References %q, want %q", ni.references, want.References))
	}
	if ni.deriver != want.Deriver {
		diffs = append(diffs, fmt.Sprintf("Deriver %q, want %q", ni.deriver, want.Deriver))
	}
	if len(diffs) > 0 {
		return ni.storePath + ": " + strings.Join(diffs, "; ")
	}
	return ""
}

func (s *soak) narinfoURL(p string) string {
	return s.http + "/" + strings.SplitN(filepath.Base(p), "-", 2)[0] + ".narinfo"
}

// get fetches url with the shared client (keep-alive), at most soakMaxNARInMemory bytes.
func (s *soak) get(url string) (int, []byte, error) {
	resp, err := s.hc.Get(url)
	if err != nil {
		return 0, nil, err
	}
	defer resp.Body.Close()
	b, err := io.ReadAll(io.LimitReader(resp.Body, soakMaxNARInMemory))
	return resp.StatusCode, b, err
}

// checkHTTP fetches the narinfo of p and its NAR from casnix's HTTP cache and checks
// them.
func (w *soakWorker) checkHTTP(op, p string) bool {
	code, b, err := w.get(w.narinfoURL(p))
	if err != nil || code != http.StatusOK {
		w.fail(op, "GET narinfo of %s: status %d, %v", p, code, err)
		return false
	}
	ni, err := parseSoakNarinfo(b)
	if err != nil {
		w.fail(op, "narinfo of %s: %v", p, err)
		return false
	}
	if ni.storePath != p {
		w.fail(op, "narinfo of %s is for %s", p, ni.storePath)
		return false
	}
	if d := w.exp.checkNarinfo(ni); d != "" {
		w.fail(op, "%s", d)
		return false
	}
	code, b, err = w.get(w.http + "/" + ni.url)
	if err != nil || code != http.StatusOK {
		w.fail(op, "GET %s (NAR of %s): status %d, %v", ni.url, p, code, err)
		return false
	}
	var nar io.Reader = bytes.NewReader(b)
	if ni.compression == "zstd" {
		dec, err := zstd.NewReader(nar, zstd.WithDecoderConcurrency(1))
		if err != nil {
			w.fail(op, "%v", err)
			return false
		}
		defer dec.Close()
		nar = dec
	} else if ni.compression != "none" {
		w.fail(op, "narinfo of %s: compression %q", p, ni.compression)
		return false
	}
	dw := nixtest.NewDigestWriter()
	if _, err := io.Copy(dw, nar); err != nil {
		w.fail(op, "NAR of %s: %v", p, err)
		return false
	}
	if d := w.exp.checkNAR(p, dw.Digest()); d != "" {
		w.fail(op, "over HTTP: %s", d)
		return false
	}
	return true
}

// httpOp: nix copy --from the HTTP cache, or narinfo + NAR fetched and checked here, or
// the narinfo of a path that does not exist.
func (w *soakWorker) httpOp() {
	switch w.n % 4 {
	case 0:
		w.copyToLocal(soakOpHTTPCopy, w.http, w.pick(w.exp.nonDrv))
	case 1, 2:
		w.httpGet()
	case 3:
		op := soakOpHTTPMissing
		h := w.pick(w.exp.invalid)
		if code, _, err := w.get(w.http + "/" + h + ".narinfo"); err != nil || code != http.StatusNotFound {
			w.fail(op, "GET %s.narinfo: status %d, %v; want 404", h, code, err)
			return
		}
		w.st.done(op)
	}
}

func (w *soakWorker) httpGet() {
	if w.checkHTTP(soakOpHTTPGet, w.pick(w.exp.fixture)) {
		w.st.done(soakOpHTTPGet)
	}
}

func (w *soakWorker) fuseOp() {
	if w.n%3 == 0 {
		w.fuseDump()
	} else {
		w.fuseFile()
	}
}

// fuseDump: nix-store --dump of a path under the mount has the path's NAR hash.
func (w *soakWorker) fuseDump() {
	op := soakOpFUSEDump
	p := w.pick(w.exp.fixture)
	dw := nixtest.NewDigestWriter()
	c := w.cmd("nix-store", "--dump", filepath.Join(w.mnt, filepath.Base(p)))
	c.Stdout = dw
	if r := c.Try(); !r.OK() {
		w.fail(op, "%s", r)
		return
	}
	if d := w.exp.checkNAR(p, dw.Digest()); d != "" {
		w.fail(op, "under the mount: %s", d)
		return
	}
	w.st.done(op)
}

// fuseFile compares one node under the mount with the source store's: type, executable
// bit, and contents, target or entry names.
func (w *soakWorker) fuseFile() {
	op := soakOpFUSEFile
	p := w.pick(w.exp.fixture)
	rel := w.pick(w.exp.files[p])
	src := filepath.Join(w.f.RealPath(p), rel)
	got := filepath.Join(w.mnt, filepath.Base(p), rel)
	if d := compareNode(src, got); d != "" {
		w.fail(op, "%s: %s", got, d)
		return
	}
	w.st.done(op)
}

// compareNode compares the node at got with the one at want.
func compareNode(want, got string) string {
	wi, err := os.Lstat(want)
	if err != nil {
		return err.Error()
	}
	gi, err := os.Lstat(got)
	if err != nil {
		return err.Error()
	}
	if wi.Mode().Type() != gi.Mode().Type() {
		return fmt.Sprintf("type %v, want %v", gi.Mode().Type(), wi.Mode().Type())
	}
	switch {
	case wi.Mode().IsRegular():
		if wx, gx := wi.Mode()&0o100 != 0, gi.Mode()&0o100 != 0; wx != gx {
			return fmt.Sprintf("executable %v, want %v", gx, wx)
		}
		wb, err := os.ReadFile(want)
		if err != nil {
			return err.Error()
		}
		gb, err := os.ReadFile(got)
		if err != nil {
			return err.Error()
		}
		if !bytes.Equal(wb, gb) {
			return fmt.Sprintf("contents differ (%d bytes, want %d)", len(gb), len(wb))
		}
	case wi.Mode()&fs.ModeSymlink != 0:
		wt, err1 := os.Readlink(want)
		gt, err2 := os.Readlink(got)
		if err := errors.Join(err1, err2); err != nil {
			return err.Error()
		}
		if wt != gt {
			return fmt.Sprintf("target %q, want %q", gt, wt)
		}
	case wi.IsDir():
		names := func(dir string) ([]string, error) {
			ents, err := os.ReadDir(dir)
			var out []string
			for _, e := range ents {
				out = append(out, e.Name())
			}
			return out, err
		}
		wn, err1 := names(want)
		gn, err2 := names(got)
		if err := errors.Join(err1, err2); err != nil {
			return err.Error()
		}
		if !slices.Equal(wn, gn) {
			return fmt.Sprintf("entries %q, want %q", gn, wn)
		}
	}
	return ""
}

// collect is the collector's loop step: wait, then with no owner mid-cycle, list the dead
// paths (no rooted path among them, every abandoned one is), collect, and check that
// every abandoned closure is gone and every rooted path is still valid.
func (w *soakWorker) collect() {
	every := max(10*time.Second, w.dur/20)
	if w.n == 0 {
		every = 5 * time.Second
	}
	time.Sleep(min(every, max(time.Until(w.deadline)-2*time.Second, 0)))
	w.gcMu.Lock()
	defer w.gcMu.Unlock()
	w.abandonMu.Lock()
	abandoned := maps.Clone(w.abandoned)
	w.abandonMu.Unlock()
	rooted := slices.Clone(w.exp.fixture)
	for j, c := range w.exp.shared {
		if w.sharedCopied[j].Load() {
			rooted = append(rooted, c.paths...)
		}
	}
	slices.Sort(rooted)
	gcStart := time.Now()

	if w.n%2 == 0 {
		op := soakOpPrintDead
		r, ok := w.run(op, "nix-store", "--store", w.url, "--gc", "--print-dead")
		if !ok {
			return
		}
		dead := nixtest.SortedLines(r.Stdout)
		for _, p := range rooted {
			if _, found := slices.BinarySearch(dead, p); found {
				w.fail(op, "rooted path %s listed as dead", p)
				return
			}
		}
		for k, a := range abandoned {
			for _, p := range a.paths {
				if _, found := slices.BinarySearch(dead, p); !found && gcStart.Sub(a.at) > soakAbandonGrace {
					w.fail(op, "%s, left to GC by owner %d %s before, not listed as dead", p, k, gcStart.Sub(a.at).Round(time.Millisecond))
					return
				}
			}
		}
		w.st.done(op)
	}

	op := soakOpGC
	r, ok := w.run(op, "nix-store", "--store", w.url, "--gc")
	if !ok {
		return
	}
	if out := string(r.Stdout) + string(r.Stderr); !strings.Contains(out, "store paths deleted") {
		w.fail(op, "no summary printed:\n%s", r)
		return
	}
	var gone []string
	for k, a := range abandoned {
		if gcStart.Sub(a.at) > soakAbandonGrace {
			gone = append(gone, a.paths...)
			w.abandonMu.Lock()
			delete(w.abandoned, k)
			w.abandonMu.Unlock()
		}
	}
	slices.Sort(gone)
	invalid, ok := w.invalidOf(op, slices.Concat(rooted, gone))
	if !ok {
		return
	}
	if !slices.Equal(invalid, gone) {
		w.fail(op, "after nix-store --gc, invalid: %q; want exactly the abandoned %q", invalid, gone)
		return
	}
	w.st.done(op)
}

// backup is the backup worker's loop step: casnix backup (the -race binary) beside the
// daemon, full or --quick, then the copy must hold every path rooted before it began.
func (w *soakWorker) backup() {
	time.Sleep(min(3*time.Second, max(time.Until(w.deadline), 0)))
	if !time.Now().Before(w.deadline) {
		return
	}
	rooted := slices.Clone(w.exp.fixture)
	for j, c := range w.exp.shared {
		if w.sharedCopied[j].Load() {
			rooted = append(rooted, c.paths...)
		}
	}
	slices.Sort(rooted)
	op, args := soakOpBackup, []string{"backup"}
	if w.n%2 == 0 {
		op, args = soakOpBackupQuick, []string{"backup", "--quick"}
	}
	dir, err := os.MkdirTemp(w.t.TempDir(), "backup-")
	if err != nil {
		w.fail(op, "%v", err)
		return
	}
	defer os.RemoveAll(dir)
	dest := filepath.Join(dir, "b")
	c := w.cas.Cmd(append(args, dest)...)
	c.Timeout = 15 * time.Minute
	r := c.Try()
	if !r.OK() {
		w.fail(op, "%s", r)
		return
	}
	if strings.Contains(string(r.Stderr), "DATA RACE") {
		w.fail(op, "data race:\n%s", r)
		return
	}
	copyCas := &nixtest.Casnix{Bin: w.cas.Bin, DataDir: dest}
	pc := copyCas.Cmd(append([]string{"path-info", "--json"}, rooted...)...)
	pc.Timeout = soakCmd
	pr := pc.Try()
	if !pr.OK() {
		w.fail(op, "path-info in the backup:\n%s", pr)
		return
	}
	infos, err := nixtest.ParsePathInfoJSON(pr.Stdout)
	if err != nil {
		w.fail(op, "path-info in the backup: %v", err)
		return
	}
	if d := w.exp.compareInfos(infos, rooted); len(d) > 0 {
		w.fail(op, "backup: %s", strings.Join(d, "\n"))
		return
	}
	w.st.done(op)
}

// soakSample is one look at the daemon.
type soakSample struct {
	at              time.Duration // since the load began
	rss             int64         // VmRSS, bytes
	anon, file      int64         // RssAnon and RssFile, bytes
	goroutines, fds int64         // go_goroutines and process_open_fds of /metrics
	heapLive        int64         // go_gc_heap_live_bytes of /metrics
}

func soakTakeSample(d *nixtest.Daemon, hc *http.Client, base string) (soakSample, error) {
	var s soakSample
	rss, err := d.RSS()
	if err != nil {
		return s, err
	}
	s.rss = rss
	if s.anon, err = d.RssAnon(); err != nil {
		return s, err
	}
	if s.file, err = d.RssFile(); err != nil {
		return s, err
	}
	resp, err := hc.Get(base + "/metrics")
	if err != nil {
		return s, fmt.Errorf("GET /metrics: %w", err)
	}
	defer resp.Body.Close()
	body, err := io.ReadAll(io.LimitReader(resp.Body, 1<<20))
	if err != nil || resp.StatusCode != http.StatusOK {
		return s, fmt.Errorf("GET /metrics: %s, %v", resp.Status, err)
	}
	found := 0
	for _, line := range strings.Split(string(body), "\n") {
		name, v, ok := strings.Cut(line, " ")
		if !ok || strings.HasPrefix(line, "#") {
			continue
		}
		n, err := strconv.ParseInt(v, 10, 64)
		switch name {
		case "go_goroutines":
			s.goroutines, found = n, found+1
		case "process_open_fds":
			s.fds, found = n, found+1
		case "go_gc_heap_live_bytes":
			s.heapLive, found = n, found+1
		default:
			continue
		}
		if err != nil {
			return s, fmt.Errorf("/metrics: %q", line)
		}
	}
	if found != 3 {
		return s, fmt.Errorf("/metrics lacks go_goroutines, process_open_fds or go_gc_heap_live_bytes:\n%s", body)
	}
	return s, nil
}

// judge logs the samples and checks that RSS, goroutines and descriptors stay flat and
// come back once the load is over.
func (s *soak) judge(samples []soakSample, before, after soakSample, dur time.Duration) {
	t := s.t
	warm := max(soakWarmUp, dur/10)
	var judged []soakSample
	for _, sm := range samples {
		if sm.at >= warm {
			judged = append(judged, sm)
		}
	}
	if len(samples) < 2 {
		t.Errorf("only %d samples", len(samples))
		return
	}
	var line []string
	for _, sm := range samples {
		line = append(line, fmt.Sprintf("%.0f(%.0f+%.0f)/%.0f/%d/%d", float64(sm.rss)/(1<<20), float64(sm.anon)/(1<<20), float64(sm.file)/(1<<20),
			float64(sm.heapLive)/(1<<20), sm.goroutines, sm.fds))
	}
	t.Logf("samples (VmRSS(RssAnon+RssFile) MiB/live heap MiB/goroutines/fds, every %s): %s", s.interval, strings.Join(line, " "))
	if len(judged) < 6 {
		t.Errorf("only %d samples after the %s warm-up", len(judged), warm)
		return
	}
	third := len(judged) / 3
	first, last := judged[:third], judged[len(judged)-third:]
	type gauge struct {
		name      string
		get       func(soakSample) int64
		mult      float64
		add       int64
		unit      float64
		endSlack  int64 // after the load, at most this above before; -1: not checked
		unitLabel string
		median    bool // judge the thirds by their medians, not their maxima
	}
	for _, g := range []gauge{
		{"VmRSS", func(x soakSample) int64 { return x.rss }, soakRSSMult, soakRSSAdd, 1 << 20, -1, " MiB", false},
		{"RssAnon", func(x soakSample) int64 { return x.anon }, soakRSSMult, soakRSSAdd, 1 << 20, -1, " MiB", false},
		{"live heap", func(x soakSample) int64 { return x.heapLive }, soakHeapMult, soakHeapAdd, 1 << 20, -1, " MiB", false},
		{"goroutines", func(x soakSample) int64 { return x.goroutines }, soakGoMult, soakGoAdd, 1, soakEndGoroutines, "", true},
		{"open fds", func(x soakSample) int64 { return x.fds }, soakFDMult, soakFDAdd, 1, -1, "", true},
	} {
		maxOf := func(xs []soakSample) int64 {
			m := int64(0)
			for _, x := range xs {
				m = max(m, g.get(x))
			}
			return m
		}
		stat, statName := maxOf, "max"
		if g.median {
			stat, statName = func(xs []soakSample) int64 {
				v := make([]int64, len(xs))
				for i, x := range xs {
					v[i] = g.get(x)
				}
				slices.Sort(v)
				return v[len(v)/2]
			}, "median"
		}
		f, l := stat(first), stat(last)
		limit := int64(float64(f)*g.mult) + g.add
		u := func(v int64) string { return strconv.FormatFloat(float64(v)/g.unit, 'f', -1, 64) + g.unitLabel }
		if g.unit != 1 {
			u = func(v int64) string { return fmt.Sprintf("%.1f%s", float64(v)/g.unit, g.unitLabel) }
		}
		t.Logf("%s: %s before the load, %s %s in the first third, %s %s in the last (limit %s = %.2f × first + %s; max of all %s), %s after",
			g.name, u(g.get(before)), statName, u(f), statName, u(l), u(limit), g.mult, u(g.add), u(maxOf(judged)), u(g.get(after)))
		if short := dur < soakRSSJudged && g.unit != 1 && g.name != "live heap"; short {
			if l > soakRSSCeiling {
				t.Errorf("%s: max %s in the last third of the soak, above the ceiling %s of a short run", g.name, u(l), u(soakRSSCeiling))
			}
		} else if l > limit {
			t.Errorf("%s grows: %s %s in the last third of the soak, %s in the first; limit %s", g.name, statName, u(l), u(f), u(limit))
		}
		if g.endSlack >= 0 && g.get(after) > g.get(before)+g.endSlack {
			t.Errorf("%s: %s after the clients left, %s before the load: leaked (slack %d)", g.name, u(g.get(after)), u(g.get(before)), g.endSlack)
		}
	}
}

// soakConns counts sockets and pipes among descriptor targets (Daemon.OpenFDs).
func soakConns(fds []string) int {
	n := 0
	for _, f := range fds {
		if strings.HasPrefix(f, "socket:") || strings.HasPrefix(f, "pipe:") {
			n++
		}
	}
	return n
}

// soakNew lists the targets in after that are not in before (both sorted), with repeats.
func soakNew(before, after []string) []string {
	var out []string
	i := 0
	for _, a := range after {
		for i < len(before) && before[i] < a {
			i++
		}
		if i < len(before) && before[i] == a {
			i++
			continue
		}
		out = append(out, a)
	}
	return out
}

// soakSymlink makes link a symlink to target.
func soakSymlink(t *testing.T, target, link string) {
	t.Helper()
	if err := os.MkdirAll(filepath.Dir(link), 0o755); err != nil {
		t.Fatal(err)
	}
	if err := os.Symlink(target, link); err != nil {
		t.Fatal(err)
	}
}

// soakFreePort returns a loopback address with a port free a moment ago.
func soakFreePort(t *testing.T) string {
	t.Helper()
	ln, err := net.Listen("tcp", "127.0.0.1:0")
	if err != nil {
		t.Fatal(err)
	}
	defer ln.Close()
	return ln.Addr().String()
}

// soakWaitReady waits until casnix serve answers HTTP and its mount shows probe.
func soakWaitReady(t *testing.T, d *nixtest.Daemon, hc *http.Client, base, probe string) {
	t.Helper()
	deadline := time.Now().Add(60 * time.Second)
	for {
		var err error
		resp, herr := hc.Get(base + "/nix-cache-info")
		if herr == nil {
			resp.Body.Close()
			if resp.StatusCode != http.StatusOK {
				herr = fmt.Errorf("status %s", resp.Status)
			}
		}
		_, serr := os.Lstat(probe)
		if err = errors.Join(herr, serr); err == nil {
			return
		}
		if d.Exited() || time.Now().After(deadline) {
			t.Fatalf("casnix serve not ready (HTTP and mount): %v\n%s", err, d.Output())
		}
		time.Sleep(100 * time.Millisecond)
	}
}
