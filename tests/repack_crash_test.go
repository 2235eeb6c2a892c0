package tests

import (
	"crypto/sha256"
	"encoding/json"
	"fmt"
	"math/rand/v2"
	"os"
	"os/exec"
	"path/filepath"
	"regexp"
	"slices"
	"strconv"
	"testing"

	"github.com/casnix/casnix/tests/nixtest"
)

// repackKills is how many points TestRepackCrash kills a repack at.
const repackKills = 20

// repackTestFlags make a repack of a few MiB take many steps: 256 KiB
// frames, a commit every 512 KiB.
var repackTestFlags = []string{"--frame-bytes", "262144", "--test-round-bytes", "524288"}

// TestRepackCrash kills `casnix repack` (SIGKILL, from a test hook that counts its steps)
// at 20 points spread over its phases: frames written, packs synced, rounds committed,
// and old packs dropped by the compaction after it. After each kill the next start needs
// no manual step: `casnix verify` passes, every path is there and dumps the NAR it was
// imported from, and a second repack completes, after which a third finds nothing to do.
func TestRepackCrash(t *testing.T) {
	bin := nixtest.CasnixBinary(t)
	work := t.TempDir()
	rng := rand.New(rand.NewChaCha8([32]byte{'r', 'e', 'p', 'a', 'c', 'k'}))
	dir := filepath.Join(work, "data")
	nars := map[string][32]byte{}
	for i := range 12 {
		tree := filepath.Join(work, fmt.Sprintf("tree-%d", i))
		narFile := randomNARFile(t, rng, tree, 512<<10)
		p := fmt.Sprintf("/nix/store/%032d-pkg-%d", i, i%4)
		runCasnix(t, bin, dir, "--zstd-level", "1", "import", "--nar", narFile, "--path", p)
		b, err := os.ReadFile(narFile)
		if err != nil {
			t.Fatal(err)
		}
		nars[p] = sha256.Sum256(b)
	}
	paths := slices.Sorted(func(yield func(string) bool) {
		for p := range nars {
			if !yield(p) {
				return
			}
		}
	})

	// One repack with its steps logged.
	trace := copyDataDir(t, dir)
	names := repackSteps(t, bin, trace)
	kinds := map[string]int{}
	for _, n := range names {
		kinds[n]++
	}
	for _, k := range []string{"frame written", "packs synced", "round committed", "old pack dropped"} {
		if kinds[k] == 0 {
			t.Fatalf("repack logged no %q step: %v", k, kinds)
		}
	}
	if len(names) < repackKills {
		t.Fatalf("repack logged %d steps, want at least %d", len(names), repackKills)
	}
	checkRepacked(t, bin, trace, paths, nars)

	// 20 points spread evenly over all steps, the first and the last included.
	points := map[int]bool{}
	for i := range repackKills {
		points[1+i*(len(names)-1)/(repackKills-1)] = true
	}
	for _, n := range slices.Sorted(func(yield func(int) bool) {
		for n := range points {
			if !yield(n) {
				return
			}
		}
	}) {
		t.Run(fmt.Sprintf("step%03d-%s", n, names[n-1]), func(t *testing.T) {
			d := copyDataDir(t, dir)
			cmd := exec.Command(bin, append([]string{"--data-dir", d, "repack"}, repackTestFlags...)...)
			cmd.Env = append(os.Environ(), "CASNIX_TEST_REPACK_KILL_AT="+strconv.Itoa(n))
			out, err := cmd.CombinedOutput()
			if ee, ok := err.(*exec.ExitError); !ok || ee.ExitCode() != -1 {
				t.Fatalf("repack was not killed at step %d: %v\n%s", n, err, out)
			}
			// The next start, with no step in between.
			runCasnix(t, bin, d, "verify")
			checkRepackDumps(t, bin, d, paths, nars)
			runCasnix(t, bin, d, append([]string{"repack"}, repackTestFlags...)...)
			checkRepacked(t, bin, d, paths, nars)
		})
	}
}

// repackSteps runs a repack on dir with its steps logged and returns their names in order
// (step n is names[n-1], the n of CASNIX_TEST_REPACK_KILL_AT).
func repackSteps(t *testing.T, bin, dir string) []string {
	t.Helper()
	out := runCasnix(t, bin, dir, append([]string{"--log-level", "debug", "repack"}, repackTestFlags...)...)
	stepRE := regexp.MustCompile(`repack step.* n=(\d+) step="?([^"\n]*)"?`)
	var names []string
	for _, m := range stepRE.FindAllStringSubmatch(out, -1) {
		n, _ := strconv.Atoi(m[1])
		if n != len(names)+1 {
			t.Fatalf("step %d logged after %d steps:\n%s", n, len(names), out)
		}
		names = append(names, m[2])
	}
	return names
}

// checkRepacked checks a data dir after a completed repack: verify passes, the paths dump
// their NARs, and another repack finds nothing left to move or remove.
func checkRepacked(t *testing.T, bin, dir string, paths []string, nars map[string][32]byte) {
	t.Helper()
	runCasnix(t, bin, dir, "verify")
	checkRepackDumps(t, bin, dir, paths, nars)
	var res struct {
		ChunksMoved  int `json:"chunksMoved"`
		PacksRemoved int `json:"packsRemoved"`
	}
	out := runCasnix(t, bin, dir, "repack", "--json")
	if err := json.Unmarshal([]byte(out), &res); err != nil {
		t.Fatalf("repack --json: %v\n%s", err, out)
	}
	if res.ChunksMoved != 0 || res.PacksRemoved != 0 {
		t.Errorf("a repack after a completed one moved %d chunks and removed %d packs", res.ChunksMoved, res.PacksRemoved)
	}
}

// checkRepackDumps checks that dir holds exactly paths and each dumps the NAR it was imported from.
func checkRepackDumps(t *testing.T, bin, dir string, paths []string, nars map[string][32]byte) {
	t.Helper()
	if got := casnixPaths(t, bin, dir); !slices.Equal(got, paths) {
		t.Fatalf("data dir holds %q, want %q", got, paths)
	}
	for _, p := range paths {
		out, err := exec.Command(bin, "--data-dir", dir, "dump", p).Output()
		if err != nil {
			t.Fatalf("casnix dump %s: %v", p, err)
		}
		if sha256.Sum256(out) != nars[p] {
			t.Fatalf("%s dumps another NAR", p)
		}
	}
}
