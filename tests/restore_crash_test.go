package tests

import (
	"fmt"
	"math/rand/v2"
	"os"
	"os/exec"
	"path/filepath"
	"regexp"
	"slices"
	"strconv"
	"strings"
	"testing"

	"github.com/casnix/casnix/tests/nixtest"
)

// restoreKills is how many points TestRestoreCrash kills a restore at.
const restoreKills = 20

// TestRestoreCrash kills `casnix restore --force` (SIGKILL, from a test hook that counts
// its steps) at 20 points spread over its phases: staging packs, verifying the staged
// copy, and every move of the swap after its journal is written. After each kill the next
// `casnix verify` (which opens the data dir, finishing or discarding the interrupted
// restore) passes and the data dir holds exactly the old paths (killed before the commit
// point) or exactly the restored ones (after it), never a mix or nothing; a second restore
// then completes. No manual step in between.
func TestRestoreCrash(t *testing.T) {
	bin := nixtest.CasnixBinary(t)
	work := t.TempDir()
	rng := rand.New(rand.NewChaCha8([32]byte{'r', 'e', 's', 't', 'o', 'r', 'e'}))
	// Two stores with different paths: the data dir's old contents and the backup's.
	makeStore := func(tag string, n int) (string, []string) {
		dir := filepath.Join(work, tag)
		var paths []string
		for i := range n {
			tree := filepath.Join(work, fmt.Sprintf("%s-tree-%d", tag, i))
			narFile := randomNARFile(t, rng, tree, 256<<10)
			p := fmt.Sprintf("/nix/store/%031d%d-%s-%d", i, len(tag), tag, i)
			runCasnix(t, bin, dir, "import", "--nar", narFile, "--path", p)
			paths = append(paths, p)
		}
		slices.Sort(paths)
		return dir, paths
	}
	oldDir, oldPaths := makeStore("old", 8)
	newDir, newPaths := makeStore("new", 12)
	backup := filepath.Join(work, "backup")
	runCasnix(t, bin, newDir, "backup", backup)
	restoreCrash(t, bin, oldDir, oldPaths, newPaths, backup, restoreKills)
}

// TestRestoreCrashFromBucket is TestRestoreCrash for `casnix restore s3://…` (a real S3
// server): the download stages what the copy did, and the same journaled swap follows, so
// every kill leaves the old or the restored paths and the next open finishes the job.
func TestRestoreCrashFromBucket(t *testing.T) {
	bin := nixtest.CasnixBinary(t)
	srv := nixtest.StartS3(t)
	srv.SetEnv(t) // for the casnix processes, which inherit it
	work := t.TempDir()
	rng := rand.New(rand.NewChaCha8([32]byte{'b', 'u', 'c', 'k', 'e', 't'}))
	makeStore := func(tag string, n int) (string, []string) {
		dir := filepath.Join(work, tag)
		var paths []string
		for i := range n {
			tree := filepath.Join(work, fmt.Sprintf("%s-tree-%d", tag, i))
			narFile := randomNARFile(t, rng, tree, 256<<10)
			p := fmt.Sprintf("/nix/store/%031d%d-%s-%d", i, len(tag), tag, i)
			runCasnix(t, bin, dir, "import", "--nar", narFile, "--path", p)
			paths = append(paths, p)
		}
		slices.Sort(paths)
		return dir, paths
	}
	oldDir, oldPaths := makeStore("old", 6)
	newDir, newPaths := makeStore("new", 8)
	url := srv.URL("crash")
	runCasnix(t, bin, newDir, "backup", url)
	restoreCrash(t, bin, oldDir, oldPaths, newPaths, url, 12)
}

// restoreCrash kills `casnix restore --force backup` into copies of oldDir at kills steps
// (every one from just before the journal on, the rest spread over staging and verifying)
// and checks each copy as TestRestoreCrash says.
func restoreCrash(t *testing.T, bin, oldDir string, oldPaths, newPaths []string, backup string, restoreKills int) {
	// One restore with its steps logged: how many there are and where the journal is.
	trace := copyDataDir(t, oldDir)
	names, journal := restoreSteps(t, bin, trace, backup)
	if len(names) < restoreKills {
		t.Fatalf("restore logged %d steps, want at least %d: %q", len(names), restoreKills, names)
	}
	if got := casnixPaths(t, bin, trace); !slices.Equal(got, newPaths) {
		t.Fatalf("traced restore holds %q", got)
	}
	// Every step from just before the journal on, the rest spread over staging and
	// verifying.
	points := map[int]bool{}
	for n := journal - 1; n <= len(names); n++ {
		points[n] = true
	}
	pre := restoreKills - len(points)
	for i := range pre {
		points[1+i*(journal-3)/max(pre-1, 1)] = true
	}
	kills := slices.Sorted(func(yield func(int) bool) {
		for n := range points {
			if !yield(n) {
				return
			}
		}
	})
	for _, n := range kills {
		t.Run(fmt.Sprintf("step%02d-%s", n, names[n-1]), func(t *testing.T) {
			dir := copyDataDir(t, oldDir)
			cmd := exec.Command(bin, "--data-dir", dir, "restore", "--force", backup)
			cmd.Env = append(os.Environ(), "CASNIX_TEST_RESTORE_KILL_AT="+strconv.Itoa(n))
			outb, err := cmd.CombinedOutput()
			if ee, ok := err.(*exec.ExitError); !ok || ee.ExitCode() != -1 {
				t.Fatalf("restore was not killed at step %d: %v\n%s", n, err, outb)
			}
			// The next start: verify opens the data dir (finishing or discarding the
			// interrupted restore) and checks every path.
			runCasnix(t, bin, dir, "verify")
			got := casnixPaths(t, bin, dir)
			switch {
			case n >= journal && !slices.Equal(got, newPaths):
				t.Fatalf("killed after the journal (step %d): holds %q, want the restored paths", n, got)
			case n < journal && !slices.Equal(got, oldPaths):
				t.Fatalf("killed before the journal (step %d): holds %q, want the old paths", n, got)
			}
			left, _ := filepath.Glob(filepath.Join(dir, ".restore-*"))
			if len(left) > 0 {
				t.Errorf("staging left after the next open: %v", left)
			}
			runCasnix(t, bin, dir, "restore", "--force", backup)
			if got := casnixPaths(t, bin, dir); !slices.Equal(got, newPaths) {
				t.Fatalf("second restore holds %q", got)
			}
		})
	}
}

// restoreSteps runs `casnix restore --force backup` on dir with its steps logged and
// returns their names in order (step n is names[n-1], the n of CASNIX_TEST_RESTORE_KILL_AT)
// and the number of the step that wrote the journal (the commit point).
func restoreSteps(t *testing.T, bin, dir, backup string) (names []string, journal int) {
	t.Helper()
	out := runCasnix(t, bin, dir, "--log-level", "debug", "restore", "--force", backup)
	stepRE := regexp.MustCompile(`restore step.* n=(\d+) step="?([^"\n]*)"?`)
	for _, m := range stepRE.FindAllStringSubmatch(out, -1) {
		n, _ := strconv.Atoi(m[1])
		if n != len(names)+1 {
			t.Fatalf("step %d logged after %d steps:\n%s", n, len(names), out)
		}
		names = append(names, m[2])
		if m[2] == "journal written" {
			journal = n
		}
	}
	if journal == 0 {
		t.Fatalf("restore logged %d steps and none wrote the journal:\n%s", len(names), out)
	}
	return names, journal
}

// runCasnix runs casnix on a data dir and returns its combined output, failing the test
// unless it exits 0.
func runCasnix(t *testing.T, bin, dir string, args ...string) string {
	t.Helper()
	cmd := exec.Command(bin, append([]string{"--data-dir", dir}, args...)...)
	out, err := cmd.CombinedOutput()
	if err != nil {
		t.Fatalf("casnix %q: %v\n%s", args, err, out)
	}
	return string(out)
}

// casnixPaths lists a data dir's valid paths, sorted.
func casnixPaths(t *testing.T, bin, dir string) []string {
	t.Helper()
	cmd := exec.Command(bin, "--data-dir", dir, "path-info", "--all")
	out, err := cmd.Output()
	if err != nil {
		t.Fatalf("casnix path-info --all: %v", err)
	}
	var paths []string
	for _, l := range nixtest.SortedLines(out) {
		p, _, _ := strings.Cut(l, "\t")
		paths = append(paths, p)
	}
	return paths
}

// copyDataDir copies a (closed) data dir to a new temporary directory.
func copyDataDir(t *testing.T, from string) string {
	t.Helper()
	to := filepath.Join(t.TempDir(), "data")
	if out, err := exec.Command("cp", "-a", from, to).CombinedOutput(); err != nil {
		t.Fatalf("cp -a %s: %v\n%s", from, err, out)
	}
	return to
}
