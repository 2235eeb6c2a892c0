package tests

import (
	"fmt"
	"math/rand/v2"
	"os"
	"os/exec"
	"path/filepath"
	"slices"
	"testing"

	"github.com/casnix/casnix/tests/crashfs"
	"github.com/casnix/casnix/tests/nixtest"
)

// powerCutImports is how many `casnix import --nar` runs each TestPowerCutImport round
// makes, and powerCuts how many rounds (cut points) it tries.
const (
	powerCutImports = 6
	powerCuts       = 12
)

// TestPowerCutImport runs `casnix import --nar` of a few generated paths, one process
// after another, with the data dir on a crashfs mount, and cuts the power at the Nth
// fsync for N spread over a clean run's fsyncs. After each cut, on the backing dir (the
// state a crash leaves under the strictest POSIX durability): every import that exited 0
// before the cut is a valid path, `casnix verify` is clean, and casnix imports again with
// no manual step.
func TestPowerCutImport(t *testing.T) {
	if os.Geteuid() != 0 {
		nixtest.SkipOrFatal(t, "TestPowerCutImport needs root to mount FUSE")
	}
	if _, err := os.Stat("/dev/fuse"); err != nil {
		nixtest.SkipOrFatal(t, "TestPowerCutImport needs /dev/fuse: %v", err)
	}
	bin := nixtest.CasnixBinary(t)
	work := t.TempDir()
	rng := rand.New(rand.NewChaCha8([32]byte{'c', 'u', 't'}))
	type item struct{ narFile, path string }
	var items []item
	for i := range powerCutImports + 1 {
		name := fmt.Sprintf("%031dc-cut-%d", i, i)
		tree := filepath.Join(work, name)
		narFile := randomNARFile(t, rng, tree, 256<<10)
		items = append(items, item{narFile, "/nix/store/" + name})
	}
	last := items[powerCutImports] // imported after the cut, on the backing dir
	items = items[:powerCutImports]

	// run imports items on a fresh crashfs mount that cuts at the cutAt-th fsync (0: never,
	// then the power is cut after the last import) and returns the paths whose import
	// exited 0, the backing dir, and the fsyncs counted.
	run := func(round int, cutAt int64) ([]string, string, int64) {
		backing := filepath.Join(work, fmt.Sprintf("backing-%d", round))
		mnt := filepath.Join(work, fmt.Sprintf("mnt-%d", round))
		for _, d := range []string{backing, mnt} {
			if err := os.Mkdir(d, 0o755); err != nil {
				t.Fatal(err)
			}
		}
		cfs, err := crashfs.Mount(backing, mnt, crashfs.Options{Seed: int64(round), CutAtFsync: cutAt})
		if err != nil {
			t.Fatal(err)
		}
		t.Cleanup(func() { cfs.Unmount() })
		var ok []string
		for _, it := range items {
			cmd := exec.Command(bin, "--data-dir", mnt, "import", "--nar", it.narFile, "--path", it.path)
			out, err := cmd.CombinedOutput()
			if err != nil {
				if cutAt == 0 {
					t.Fatalf("import %s without a cut: %v\n%s", it.path, err, out)
				}
				break
			}
			ok = append(ok, it.path)
		}
		fsyncs := cfs.Stats().Fsyncs
		report, err := cfs.PowerCut()
		if err != nil {
			t.Fatal(err)
		}
		if err := cfs.Unmount(); err != nil {
			t.Fatal(err)
		}
		t.Logf("round %d (cut at fsync %d of %d): %d imports exited 0; cut %+v", round, cutAt, fsyncs, len(ok), report)
		return ok, backing, fsyncs
	}

	check := func(round int, ok []string, backing string) {
		got := casnixPaths(t, bin, backing)
		for _, p := range ok {
			if !slices.Contains(got, p) {
				t.Errorf("round %d: %s imported (exit 0) before the cut but not valid after it; valid: %q", round, p, got)
			}
		}
		for _, p := range got {
			runCasnix(t, bin, backing, "path-info", p)
		}
		if out, err := exec.Command(bin, "--data-dir", backing, "verify").CombinedOutput(); err != nil {
			t.Errorf("round %d: casnix verify after the cut: %v\n%s", round, err, out)
		}
		runCasnix(t, bin, backing, "import", "--nar", last.narFile, "--path", last.path)
		if got := casnixPaths(t, bin, backing); !slices.Contains(got, last.path) {
			t.Errorf("round %d: import after the cut did not make %s valid", round, last.path)
		}
	}

	ok, backing, total := run(0, 0)
	if len(ok) != len(items) {
		t.Fatalf("clean run imported %d of %d", len(ok), len(items))
	}
	check(0, ok, backing)
	if total < powerCuts {
		t.Fatalf("a clean run makes only %d fsyncs", total)
	}
	for i := 1; i <= powerCuts; i++ {
		cutAt := 1 + (total-1)*int64(i-1)/int64(powerCuts-1) // first and last fsync included
		ok, backing, _ := run(i, cutAt)
		check(i, ok, backing)
	}
}

// TestPowerCutRestore runs `casnix restore --force` into a data dir on crashfs and cuts
// the power at each of its fsyncs in turn, and right after it exited 0, two seeds each:
// the next open must find the old paths or the restored ones, whole and verified, and
// the restored ones if restore exited 0. Found by TestTorture: moving the staged copy in
// renames entries between the staging dir and the data dir, and such a rename is durable
// only once both directories are synced; the data dir (where the restored entries land)
// must be synced before the staging dir, or a cut between the two can drop the staged
// entries with their new names not durable yet.
func TestPowerCutRestore(t *testing.T) {
	if os.Geteuid() != 0 {
		nixtest.SkipOrFatal(t, "TestPowerCutRestore needs root to mount FUSE")
	}
	if _, err := os.Stat("/dev/fuse"); err != nil {
		nixtest.SkipOrFatal(t, "TestPowerCutRestore needs /dev/fuse: %v", err)
	}
	bin := nixtest.CasnixBinary(t)
	work := t.TempDir()
	rng := rand.New(rand.NewChaCha8([32]byte{'r', 'c', 'u', 't'}))
	// importTo imports n new paths into dir and returns them.
	next := 0
	importTo := func(dir string, n int) []string {
		var paths []string
		for range n {
			next++
			name := fmt.Sprintf("%031dr-rcut-%d", next, next)
			tree := filepath.Join(work, name)
			narFile := randomNARFile(t, rng, tree, 32<<10)
			runCasnix(t, bin, dir, "import", "--nar", narFile, "--path", "/nix/store/"+name)
			paths = append(paths, "/nix/store/"+name)
		}
		return paths
	}
	src := filepath.Join(work, "src")
	newPaths := importTo(src, 3)
	slices.Sort(newPaths)
	backup := filepath.Join(work, "backup")
	runCasnix(t, bin, src, "backup", backup)
	old := filepath.Join(work, "old")
	oldPaths := importTo(old, 2)
	slices.Sort(oldPaths)

	round := 0
	// run restores into a copy of old on crashfs cut at the cutAt-th fsync (0: after
	// restore exits) and checks the state the cut left; it returns the fsyncs counted.
	run := func(cutAt, seed int64) int64 {
		round++
		backing := filepath.Join(work, fmt.Sprintf("backing-%d", round))
		mnt := filepath.Join(work, fmt.Sprintf("mnt-%d", round))
		if err := os.MkdirAll(backing, 0o755); err != nil {
			t.Fatal(err)
		}
		if err := os.Rename(copyDataDir(t, old), filepath.Join(backing, "data")); err != nil {
			t.Fatal(err)
		}
		if err := os.Mkdir(mnt, 0o755); err != nil {
			t.Fatal(err)
		}
		cfs, err := crashfs.Mount(backing, mnt, crashfs.Options{Seed: seed, CutAtFsync: cutAt})
		if err != nil {
			t.Fatal(err)
		}
		t.Cleanup(func() { cfs.Unmount() })
		out, rerr := exec.Command(bin, "--data-dir", filepath.Join(mnt, "data"), "restore", "--force", backup).CombinedOutput()
		if rerr != nil && cutAt == 0 {
			t.Fatalf("restore with no cut: %v\n%s", rerr, out)
		}
		fsyncs := cfs.Stats().Fsyncs
		if _, err := cfs.PowerCut(); err != nil {
			t.Fatal(err)
		}
		if err := cfs.Unmount(); err != nil {
			t.Fatal(err)
		}
		data := filepath.Join(backing, "data")
		if out, err := exec.Command(bin, "--data-dir", data, "verify").CombinedOutput(); err != nil {
			t.Errorf("cut at fsync %d (seed %d): verify: %v\n%s", cutAt, seed, err, out)
			return fsyncs
		}
		got := casnixPaths(t, bin, data)
		switch {
		case rerr == nil && !slices.Equal(got, newPaths):
			t.Errorf("cut at fsync %d (seed %d), after restore exited 0: the data dir holds %q, want %q", cutAt, seed, got, newPaths)
		case !slices.Equal(got, newPaths) && !slices.Equal(got, oldPaths):
			t.Errorf("cut at fsync %d (seed %d): the data dir holds %q, want the old %q or the restored %q", cutAt, seed, got, oldPaths, newPaths)
		}
		return fsyncs
	}
	total := run(0, 0)
	for _, seed := range []int64{1, 2, 3, 4} {
		run(0, seed)
	}
	for n := range total {
		for _, seed := range []int64{1, 2} {
			run(n+1, seed)
		}
	}
	t.Logf("restore made %d fsyncs; %d cuts checked", total, round)
}
