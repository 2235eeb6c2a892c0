package tests

import (
	"bytes"
	"fmt"
	"maps"
	"math/rand/v2"
	"os"
	"path/filepath"
	"slices"
	"strings"
	"sync"
	"sync/atomic"
	"testing"
	"time"

	"github.com/casnix/casnix/nar"
	"github.com/casnix/casnix/tests/nixtest"
)

// Parameters of TestBackupUnderLoad.
const (
	backupImporters = 4       // concurrent `casnix import` processes, each with its own subset
	backupBigPaths  = 32      // extra paths of pseudo-random data the importers bring in
	backupBigBytes  = 4 << 20 // bytes per extra path (two files)
)

// TestBackupUnderLoad takes `casnix backup` of a data dir while `casnix serve` runs and 8
// clients work on it: 4 `casnix import` processes bringing in disjoint sets of paths one
// path at a time, 2 host Nix 2.8 clients listing every path through the daemon
// (`nix path-info --all`), and 2 `casnix dump` loops checking NARs against the source
// store. The backup is restored into a fresh data dir, which must verify clean; its paths
// must include everything valid before the backup began and nothing that was not valid
// when it ended, each dumping byte-identical to the source and with the source's
// path-info. Then the bad inputs: a truncated and a garbage backup are refused with a
// clear error and leave the target empty; a non-empty target is refused without --force.
func TestBackupUnderLoad(t *testing.T) {
	cas := nixtest.NewCasnix(t)
	client := nixtest.RequireNixClient(t, "bookworm")
	f := nixtest.PopulateFixture(t)

	// The importers' paths: big (so imports are still running while the backup copies),
	// without references (so the subsets stay disjoint).
	work := t.TempDir()
	rng := rand.New(rand.NewChaCha8([32]byte{'b', 'a', 'c', 'k', 'u', 'p'}))
	subsets := make([][]string, backupImporters)
	for i := range backupBigPaths {
		dir := filepath.Join(work, fmt.Sprintf("big-%02d", i))
		writeRandomTree(t, rng, dir, backupBigBytes)
		subsets[i%backupImporters] = append(subsets[i%backupImporters], f.Add(t, dir))
	}
	want := f.PathInfos(t)
	var big []string
	for _, s := range subsets {
		big = append(big, s...)
	}
	// The fixture itself is imported first: the readers read it, and it is all committed
	// before the backup begins.
	var base []string
	for p := range want {
		if !slices.Contains(big, p) {
			base = append(base, p)
		}
	}
	slices.Sort(base)
	cas.ImportFromNixStore(t, f.Store, base...)
	wantNAR := map[string]nixtest.Digest{}
	for _, p := range base {
		wantNAR[p] = f.Dump(t, p)
	}

	d := cas.Serve(t, filepath.Join(t.TempDir(), "casnix.sock"))
	listAll := func() []string {
		t.Helper()
		return nixtest.SortedLines(client.Run(t, "nix", "path-info", "--all", "--store", d.URL()).Stdout)
	}

	var (
		stop     atomic.Bool
		wg       sync.WaitGroup
		mu       sync.Mutex
		failures []string
		imported atomic.Int64
		reads    atomic.Int64
	)
	fail := func(format string, args ...any) {
		mu.Lock()
		defer mu.Unlock()
		failures = append(failures, fmt.Sprintf(format, args...))
	}
	for _, subset := range subsets {
		wg.Add(1)
		go func() {
			defer wg.Done()
			for _, p := range subset {
				c := cas.Cmd("import", "--from-nix-store", f.Root, p)
				c.Timeout = 5 * time.Minute
				if r := c.Try(); !r.OK() {
					fail("import %s:\n%s", p, r)
					return
				}
				imported.Add(1)
			}
		}()
	}
	for i := range 2 {
		wg.Add(2)
		go func() { // a Nix client listing through the daemon
			defer wg.Done()
			for !stop.Load() {
				r := client.Try("nix", "path-info", "--all", "--store", d.URL())
				if !r.OK() {
					fail("nix path-info --all through casnix serve:\n%s", r)
					return
				}
				reads.Add(1)
			}
		}()
		go func() { // casnix dump of the fixture's paths, against the source store
			defer wg.Done()
			for n := i; !stop.Load(); n++ {
				p := base[n%len(base)]
				got, r := cas.TryDump(p)
				if !r.OK() || got != wantNAR[p] {
					fail("casnix dump %s: %s, want %s\n%s", p, got, wantNAR[p], r)
					return
				}
				reads.Add(1)
			}
		}()
	}
	// Start the backup once the importers are under way.
	for deadline := time.Now().Add(2 * time.Minute); imported.Load() < backupImporters; {
		mu.Lock()
		failed := len(failures) > 0
		mu.Unlock()
		if time.Now().After(deadline) || failed {
			stop.Store(true)
			wg.Wait()
			t.Fatalf("importers did not get going: %v", failures)
		}
		time.Sleep(10 * time.Millisecond)
	}
	before := listAll()
	importedBefore := imported.Load()
	dest := filepath.Join(t.TempDir(), "backup")
	br := cas.Cmd("backup", dest)
	br.Timeout = 5 * time.Minute
	bres := br.Try()
	importedAfter := imported.Load()
	after := listAll()
	stop.Store(true)
	wg.Wait()
	if len(failures) > 0 {
		t.Fatalf("%d clients failed, first:\n%s", len(failures), failures[0])
	}
	if !bres.OK() {
		t.Fatalf("casnix backup:\n%s", bres)
	}
	t.Logf("%s", strings.TrimSpace(string(bres.Stdout)))
	t.Logf("imports done: %d when the backup began, %d when it ended, of %d; %d reads", importedBefore, importedAfter, len(big), reads.Load())
	if importedBefore == int64(len(big)) {
		t.Errorf("all imports had finished before the backup began: the backup ran without writers")
	}
	if !strings.Contains(string(bres.Stdout), "MB/s") {
		t.Errorf("casnix backup does not report its speed:\n%s", bres.Stdout)
	}

	// Restore elsewhere and check it.
	restored := &nixtest.Casnix{Bin: cas.Bin, DataDir: filepath.Join(t.TempDir(), "restored")}
	restored.Run(t, "restore", dest)
	restored.Run(t, "verify")
	got := slices.Sorted(maps.Keys(restored.ValidPaths(t, slices.Sorted(maps.Keys(want)))))
	for _, p := range before {
		if !slices.Contains(got, p) {
			t.Errorf("%s was valid before the backup began but is not in the restored data dir", p)
		}
	}
	for _, p := range got {
		if !slices.Contains(after, p) {
			t.Errorf("%s is in the restored data dir but was not valid when the backup ended", p)
		}
	}
	t.Logf("paths: %d valid before the backup, %d restored, %d valid after", len(before), len(got), len(after))
	infos := restored.PathInfos(t, got...)
	for _, p := range got {
		if diffs := nixtest.ComparePathInfo(infos[p], want[p]); len(diffs) > 0 {
			t.Errorf("%s: restored path-info differs from the source: %s", p, strings.Join(diffs, "; "))
		}
		if r, s := restored.Dump(t, p), cas.Dump(t, p); r != s {
			t.Errorf("%s: restored NAR %s, source NAR %s", p, r, s)
		}
	}

	// A non-empty target is refused without --force, and replaced with it.
	if r := restored.Try("restore", dest); r.OK() || !strings.Contains(string(r.Stderr), "not empty") {
		t.Errorf("restore into a non-empty data dir without --force:\n%s", r)
	}
	restored.Run(t, "restore", "--force", "--quick", dest)
	restored.Run(t, "verify")

	// Bad backups: refused, target left empty.
	truncated := filepath.Join(t.TempDir(), "truncated")
	nixtest.Run(t, "cp", "-a", dest, truncated)
	packs, err := filepath.Glob(filepath.Join(truncated, "packs", "*", "*.pack"))
	if err != nil || len(packs) == 0 {
		t.Fatalf("no packs in the backup: %v", err)
	}
	st, err := os.Stat(packs[len(packs)-1])
	if err != nil {
		t.Fatal(err)
	}
	if err := os.Truncate(packs[len(packs)-1], st.Size()/2); err != nil {
		t.Fatal(err)
	}
	garbage := filepath.Join(t.TempDir(), "garbage")
	if err := os.MkdirAll(filepath.Join(garbage, "packs"), 0o755); err != nil {
		t.Fatal(err)
	}
	noise := make([]byte, 1<<16)
	for i := range noise {
		noise[i] = byte(rng.Uint32())
	}
	if err := os.WriteFile(filepath.Join(garbage, "casnix.db"), noise, 0o644); err != nil {
		t.Fatal(err)
	}
	for _, tc := range []struct{ name, src, msg string }{
		{"truncated pack", truncated, "truncated"},
		{"garbage database", garbage, "not a database"},
		{"no backup at all", filepath.Join(t.TempDir(), "nothing"), "not a casnix data dir"},
	} {
		target := &nixtest.Casnix{Bin: cas.Bin, DataDir: t.TempDir()}
		r := target.Try("restore", tc.src)
		if r.OK() || !strings.Contains(string(r.Stderr), tc.msg) {
			t.Errorf("restore of a %s: want a failure naming %q:\n%s", tc.name, tc.msg, r)
		}
		if left, _ := os.ReadDir(target.DataDir); len(left) > 0 {
			t.Errorf("restore of a %s left %d entries in the target, e.g. %s", tc.name, len(left), left[0].Name())
		}
	}
}

// randomNARFile writes a random tree of n bytes at dir (writeRandomTree) and its NAR
// at dir+".nar", and returns the NAR file's path: the input of `casnix import --nar`.
func randomNARFile(t *testing.T, rng *rand.Rand, dir string, n int) string {
	t.Helper()
	writeRandomTree(t, rng, dir, n)
	var buf bytes.Buffer
	if _, err := nar.DumpPath(&buf, dir); err != nil {
		t.Fatal(err)
	}
	narFile := dir + ".nar"
	if err := os.WriteFile(narFile, buf.Bytes(), 0o644); err != nil {
		t.Fatal(err)
	}
	return narFile
}

// writeRandomTree writes dir with two files holding n bytes together: half random, half
// a compressible rendering of random numbers (so compression has work to do).
func writeRandomTree(t *testing.T, rng *rand.Rand, dir string, n int) {
	t.Helper()
	if err := os.MkdirAll(dir, 0o755); err != nil {
		t.Fatal(err)
	}
	raw := make([]byte, n/2)
	for i := range raw {
		raw[i] = byte(rng.Uint32())
	}
	var text strings.Builder
	for text.Len() < n/2 {
		fmt.Fprintf(&text, "%016d\n", rng.Uint64()%1e12)
	}
	if err := os.WriteFile(filepath.Join(dir, "random.bin"), raw, 0o644); err != nil {
		t.Fatal(err)
	}
	if err := os.WriteFile(filepath.Join(dir, "numbers.txt"), []byte(text.String()), 0o644); err != nil {
		t.Fatal(err)
	}
}
