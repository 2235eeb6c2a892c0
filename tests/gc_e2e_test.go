package tests

import (
	"bytes"
	"context"
	"crypto/rand"
	"encoding/json"
	"fmt"
	mrand "math/rand/v2"
	"os"
	"path/filepath"
	"slices"
	"strconv"
	"strings"
	"sync"
	"syscall"
	"testing"
	"time"

	"github.com/casnix/casnix/proto"
	"github.com/casnix/casnix/tests/nixtest"
)

// addRandomPaths adds n paths to s with nix-store --add, each a directory
// holding two files of random bytes (size in all): incompressible and shared
// with nothing, so what a path stores is its size. With twins, each path's
// files are also added a second time under another name (a different store
// path with the same chunks): twins[i] shares every chunk with paths[i].
func addRandomPaths(t *testing.T, s *nixtest.Store, prefix string, n, size int, twins bool) (paths, twinPaths []string) {
	t.Helper()
	dir := t.TempDir()
	var srcs, twinSrcs []string
	for i := 0; i < n; i++ {
		src := filepath.Join(dir, fmt.Sprintf("%s-%d", prefix, i))
		os.MkdirAll(src, 0o755)
		for j, sz := range []int{size / 3, size - size/3} {
			b := make([]byte, sz)
			rand.Read(b)
			if err := os.WriteFile(filepath.Join(src, fmt.Sprintf("f%d", j)), b, 0o644); err != nil {
				t.Fatal(err)
			}
		}
		srcs = append(srcs, src)
		if twins {
			twin := filepath.Join(dir, fmt.Sprintf("%s-twin-%d", prefix, i))
			if err := os.Rename(src, twin); err != nil {
				t.Fatal(err)
			}
			os.MkdirAll(src, 0o755)
			for j := 0; j < 2; j++ {
				b, _ := os.ReadFile(filepath.Join(twin, fmt.Sprintf("f%d", j)))
				os.WriteFile(filepath.Join(src, fmt.Sprintf("f%d", j)), b, 0o644)
			}
			twinSrcs = append(twinSrcs, twin)
		}
	}
	paths = strings.Fields(string(s.NixStore(t, append([]string{"--add"}, srcs...)...)))
	if twins {
		twinPaths = strings.Fields(string(s.NixStore(t, append([]string{"--add"}, twinSrcs...)...)))
	}
	if len(paths) != n || (twins && len(twinPaths) != n) {
		t.Fatalf("nix-store --add printed %d and %d paths for %d", len(paths), len(twinPaths), n)
	}
	return paths, twinPaths
}

// diskUsage is what du counts: allocated blocks of every file under dir.
func diskUsage(t *testing.T, dir string) int64 {
	t.Helper()
	var n int64
	filepath.WalkDir(dir, func(_ string, d os.DirEntry, err error) error {
		if err == nil && d.Type().IsRegular() {
			if fi, err := d.Info(); err == nil {
				n += fi.Sys().(*syscall.Stat_t).Blocks * 512
			}
		}
		return nil
	})
	return n
}

// addRoots makes each path a permanent root of cas (a symlink in
// DATA_DIR/gcroots, as `ln -s` would). The path need not be valid yet.
func addRoots(t *testing.T, cas *nixtest.Casnix, paths ...string) {
	t.Helper()
	dir := filepath.Join(cas.DataDir, "gcroots")
	os.MkdirAll(dir, 0o755)
	for _, p := range paths {
		if err := os.Symlink(p, filepath.Join(dir, filepath.Base(p))); err != nil {
			t.Fatal(err)
		}
	}
}

type gcOut struct {
	Paths          []string `json:"paths"`
	BytesFreed     int64    `json:"bytesFreed"`
	ExclusiveBytes int64    `json:"exclusiveBytes"`
}

func runGC(t *testing.T, cas *nixtest.Casnix, args ...string) gcOut {
	t.Helper()
	r := cas.Run(t, append([]string{"gc", "--json"}, args...)...)
	var out gcOut
	if err := json.Unmarshal(r.Stdout, &out); err != nil {
		t.Fatalf("gc --json: %v\n%s", err, r)
	}
	slices.Sort(out.Paths)
	return out
}

// TestGCFreesSpace: on a real Nix fixture store plus random-content paths,
// deleting roots and running `casnix gc` deletes exactly what no root
// reaches, frees its bytes on disk, and leaves every live path
// byte-identical to the source's NAR.
func TestGCFreesSpace(t *testing.T) {
	nixtest.RequireHostNix(t)
	f := nixtest.PopulateFixture(t)
	const size = 3 << 19 // 1.5 MiB a path
	rnd, _ := addRandomPaths(t, f.Store, "gcdata", 8, size, false)
	want := f.PathInfos(t)
	cas := nixtest.NewCasnix(t)
	cas.ImportFromNixStore(t, f.Store)

	rootSet := append(slices.Clone(rnd[:4]), f.Path(t, "diamond-top"), f.Path(t, "self-ref"), f.Path(t, "chain4"))
	addRoots(t, cas, rootSet...)
	// --keep of a file adds a root for this run only.
	keepFile := filepath.Join(t.TempDir(), "keep")
	os.WriteFile(keepFile, []byte(rnd[4]+"\n"), 0o644)
	live := f.Closure(t, append(rootSet, rnd[4])...)
	var dead []string
	for _, p := range sortedKeys(want) {
		if !slices.Contains(live, p) {
			dead = append(dead, p)
		}
	}

	dry := runGC(t, cas, "--dry-run", "--keep", keepFile)
	if !slices.Equal(dry.Paths, dead) {
		t.Fatalf("dry run lists %d dead paths, want %d:\n%q\n%q", len(dry.Paths), len(dead), dry.Paths, dead)
	}
	if dry.ExclusiveBytes < 3*size {
		t.Fatalf("dry run estimates %d bytes, want at least %d", dry.ExclusiveBytes, 3*size)
	}
	// What the dead paths occupy: the store minus a store of the live
	// paths alone.
	fresh := nixtest.NewCasnix(t)
	fresh.ImportFromNixStore(t, f.Store, live...)
	before := diskUsage(t, cas.DataDir)
	expect := before - diskUsage(t, fresh.DataDir)
	res := runGC(t, cas, "--keep", keepFile)
	after := diskUsage(t, cas.DataDir)
	if !slices.Equal(res.Paths, dead) {
		t.Fatalf("gc deleted %q, want %q", res.Paths, dead)
	}
	freed := before - after
	t.Logf("du %d -> %d bytes: %d freed; gc reports %d freed, %d exclusive (dry run %d); a store of the live paths alone is %d bytes smaller",
		before, after, freed, res.BytesFreed, res.ExclusiveBytes, dry.ExclusiveBytes, expect)
	if freed < expect*9/10 || res.BytesFreed < expect*9/10 {
		t.Fatalf("freed %d bytes on disk (gc says %d), want about %d", freed, res.BytesFreed, expect)
	}
	if packs, freshPacks := diskUsage(t, filepath.Join(cas.DataDir, "packs")), diskUsage(t, filepath.Join(fresh.DataDir, "packs")); packs > freshPacks+freshPacks/20+64<<10 {
		t.Fatalf("packs hold %d bytes after gc, %d in a store of the live paths alone", packs, freshPacks)
	}
	mustDump(t, cas, live, want)
	for _, p := range dead {
		if _, r := cas.TryDump(p); r.OK() {
			t.Fatalf("deleted %s still dumps", p)
		}
	}
	cas.Run(t, "verify")

	// Nothing left to collect: a second run deletes nothing.
	if again := runGC(t, cas, "--keep", keepFile); len(again.Paths) != 0 {
		t.Fatalf("second gc deleted %q", again.Paths)
	}
	// A live path cannot be deleted by name; a dead one can.
	if r := cas.Try("gc", "--delete", rnd[0]); r.OK() || !strings.Contains(string(r.Stderr), "since it is still alive") {
		t.Fatalf("gc --delete of a rooted path:\n%s", r)
	}
	if res := runGC(t, cas, "--delete", rnd[4]); !slices.Equal(res.Paths, []string{rnd[4]}) {
		t.Fatalf("gc --delete %s deleted %q", rnd[4], res.Paths)
	}
	mustDump(t, cas, f.Closure(t, rootSet...), want)
	cas.Run(t, "verify")
}

// TestGCConcurrent: collections run while `casnix dump` reads live paths
// and `casnix import` adds rooted paths whose chunks are exactly those of
// the garbage being swept. Nothing rooted is lost, every dump during and
// after is right, and verify is clean.
func TestGCConcurrent(t *testing.T) {
	nixtest.RequireHostNix(t)
	src := nixtest.NewStore(t)
	garbage, twins := addRandomPaths(t, src, "garbage", 8, 1<<20, true)
	liveSet, _ := addRandomPaths(t, src, "live", 4, 1<<20, false)
	want := src.PathInfos(t)
	cas := nixtest.NewCasnix(t)
	cas.ImportFromNixStore(t, src, append(slices.Clone(garbage), liveSet...)...)
	addRoots(t, cas, liveSet...)
	addRoots(t, cas, twins...) // not valid yet: imported during the collections

	// A long-running reader too: casnix serve answering NarFromPath on one
	// connection holds its pack handles across the collections.
	socket := filepath.Join(t.TempDir(), "daemon.sock")
	daemon := cas.Serve(t, socket)

	ctx, cancel := context.WithCancel(context.Background())
	defer cancel()
	var wg sync.WaitGroup
	errs := make(chan string, 100)
	wg.Add(1)
	go func() { // daemon reader
		defer wg.Done()
		cl, err := proto.Dial(socket)
		if err != nil {
			errs <- fmt.Sprintf("dial casnix serve: %v", err)
			return
		}
		defer cl.Close()
		for i := 0; ctx.Err() == nil; i++ {
			p := liveSet[i%len(liveSet)]
			w := nixtest.NewDigestWriter()
			if _, err := cl.NarFromPath(p, w); err != nil || w.Digest().NixHash() != want[p].NarHash {
				errs <- fmt.Sprintf("NarFromPath %s during gc: %s, %v", p, w.Digest(), err)
				return
			}
		}
	}()
	wg.Add(1)
	go func() { // readers
		defer wg.Done()
		for i := 0; ctx.Err() == nil; i++ {
			p := liveSet[i%len(liveSet)]
			d, r := cas.TryDump(p)
			if !r.OK() || d.NixHash() != want[p].NarHash {
				errs <- fmt.Sprintf("dump %s during gc: %s\n%s", p, d, r)
				return
			}
		}
	}()
	importDone := make(chan struct{})
	wg.Add(1)
	go func() { // importer, one path at a time so imports interleave with collections
		defer wg.Done()
		defer close(importDone)
		for _, p := range twins {
			if r := cas.Cmd("import", "--from-nix-store", src.Root, p).Try(); !r.OK() {
				errs <- fmt.Sprintf("import during gc:\n%s", r)
				return
			}
		}
	}()
	runs := 0
	for {
		r := cas.Try("gc", "--min-dead", "0.01")
		if !r.OK() {
			t.Fatalf("gc during reads and imports:\n%s", r)
		}
		runs++
		select {
		case <-importDone:
		default:
			continue
		}
		break
	}
	cancel()
	wg.Wait()
	close(errs)
	for e := range errs {
		t.Error(e)
	}
	if t.Failed() {
		return
	}
	runGC(t, cas)
	t.Logf("%d collections ran beside the imports", runs)
	all := sortedKeys(cas.ValidPaths(t, sortedKeys(want)))
	wantLive := append(slices.Clone(liveSet), twins...)
	slices.Sort(wantLive)
	if !slices.Equal(all, wantLive) {
		t.Fatalf("valid after gc: %q\nwant %q", all, wantLive)
	}
	mustDump(t, cas, wantLive, want)
	cas.Run(t, "verify")
	// The daemon lets go of the packs the collections removed, so their
	// space is really free.
	deadline := time.Now().Add(10 * time.Second)
	for {
		fds, err := daemon.OpenFDs()
		if err != nil {
			t.Fatal(err)
		}
		held := slices.DeleteFunc(fds, func(f string) bool { return !strings.HasSuffix(f, ".pack (deleted)") })
		if len(held) == 0 {
			break
		}
		if time.Now().After(deadline) {
			t.Fatalf("casnix serve still holds removed packs 10 s after the last gc: %q", held)
		}
		time.Sleep(200 * time.Millisecond)
	}
}

// gcKills is how many times TestGCCrash kills a collection.
const gcKills = 20

// TestGCCrash kills `casnix gc` with SIGKILL at random moments (the
// garbage is imported again before each run, so every run has work:
// marking, sweeping, rewriting packs). After each kill, verify is clean and
// every live path dumps byte-identical; a last run completes the job.
func TestGCCrash(t *testing.T) {
	nixtest.RequireHostNix(t)
	src := nixtest.NewStore(t)
	liveSet, _ := addRandomPaths(t, src, "live", 6, 2<<20, false)
	garbage, _ := addRandomPaths(t, src, "garbage", 6, 2<<20, false)
	slices.Sort(liveSet)
	want := src.PathInfos(t)
	cas := nixtest.NewCasnix(t)
	cas.ImportFromNixStore(t, src, liveSet...)
	addRoots(t, cas, liveSet...)

	seed := uint64(time.Now().UnixNano())
	if s := os.Getenv("CASNIX_E2E_SEED"); s != "" {
		seed, _ = strconv.ParseUint(s, 10, 64)
	}
	t.Logf("seed %d (set CASNIX_E2E_SEED to repeat the kill delays)", seed)
	rng := mrand.New(mrand.NewPCG(seed, 0))

	// Calibrate: a complete run.
	cas.ImportFromNixStore(t, src, garbage...)
	start := time.Now()
	runGC(t, cas, "--min-dead", "0.01")
	full := time.Since(start)
	t.Logf("a complete gc takes %s", full.Round(time.Millisecond))

	finished := 0
	for kill := 0; kill < gcKills; kill++ {
		cas.ImportFromNixStore(t, src, garbage...)
		c := cas.Cmd("gc", "--min-dead", "0.01")
		var out bytes.Buffer
		c.Stdout, c.Stderr = &out, &out
		cmd := c.Exec(context.Background())
		if err := cmd.Start(); err != nil {
			t.Fatal(err)
		}
		start := time.Now()
		d := time.Duration(rng.Float64() * float64(full))
		if kill%3 == 2 {
			// Every third kill early: start-up, marking, the sweep.
			d /= 4
		}
		time.Sleep(d)
		syscall.Kill(-cmd.Process.Pid, syscall.SIGKILL)
		if err := cmd.Wait(); err == nil {
			// It finished first: later kills aim within the time a run
			// really takes now (the calibration run may have been slow).
			finished++
			full = min(full, time.Since(start)) * 9 / 10
		}
		// Where the kill landed: before the sweep committed (garbage still
		// valid), or after (then during or after compaction: pack files).
		packs, _ := filepath.Glob(filepath.Join(cas.DataDir, "packs", "*", "*.pack"))
		t.Logf("kill %d after %s: %d garbage paths still valid, %d pack files", kill, d.Round(time.Millisecond),
			len(cas.ValidPaths(t, garbage)), len(packs))
		if r := cas.Try("verify"); !r.OK() {
			t.Fatalf("kill %d after %s: verify:\n%s\ngc said:\n%s", kill, d, r, out.String())
		}
		mustDump(t, cas, liveSet, want)
	}
	t.Logf("%d of %d runs finished before their kill", finished, gcKills)
	if finished > gcKills/2 {
		t.Fatalf("%d of %d runs finished before the kill: the kills hit too little", finished, gcKills)
	}
	// A last run cleans up whatever the kills left, orphan packs included.
	runGC(t, cas, "--min-dead", "0.01")
	all := sortedKeys(cas.ValidPaths(t, sortedKeys(want)))
	if !slices.Equal(all, liveSet) {
		t.Fatalf("valid after the last gc: %q, want the live set", all)
	}
	mustDump(t, cas, liveSet, want)
	cas.Run(t, "verify")
	var liveNAR int64
	for _, p := range liveSet {
		liveNAR += want[p].NarSize
	}
	if packs := diskUsage(t, filepath.Join(cas.DataDir, "packs")); packs > liveNAR*11/10 {
		t.Fatalf("packs take %d bytes for %d bytes of live random content: space left behind", packs, liveNAR)
	}
}

// mustDump is checkDumps, stopping the test at the first damage.
func mustDump(t *testing.T, cas *nixtest.Casnix, paths []string, want map[string]nixtest.PathInfo) {
	t.Helper()
	checkDumps(t, cas, paths, want)
	if t.Failed() {
		t.FailNow()
	}
}
