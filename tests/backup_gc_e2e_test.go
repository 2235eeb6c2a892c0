package tests

import (
	"bytes"
	"fmt"
	"math/rand/v2"
	"os"
	"os/exec"
	"path/filepath"
	"slices"
	"strings"
	"testing"

	"github.com/casnix/casnix/tests/nixtest"
)

// TestBackupBesideGC runs `casnix backup` in a loop beside `casnix gc --min-dead 0.01` for
// 20 rounds. Each round imports a rooted path and three unrooted ones into the same pack,
// so the collection deletes the three and compacts the pack (rewriting it and unlinking the
// old file) while backups snapshot and copy. Every backup must succeed, verify, and hold
// every rooted path imported so far.
func TestBackupBesideGC(t *testing.T) {
	bin := nixtest.CasnixBinary(t)
	work := t.TempDir()
	data := filepath.Join(work, "data")
	rng := rand.New(rand.NewChaCha8([32]byte{'b', 'k', 'g', 'c'}))
	importPath := func(name string) string {
		tree := filepath.Join(work, name)
		narFile := randomNARFile(t, rng, tree, 512<<10)
		p := "/nix/store/" + name
		runCasnix(t, bin, data, "import", "--nar", narFile, "--path", p)
		return p
	}
	var kept []string
	var backups, compacted int
	for round := range 20 {
		k := importPath(fmt.Sprintf("%031dk-keep-%d", round, round))
		if err := os.MkdirAll(filepath.Join(data, "gcroots"), 0o755); err != nil {
			t.Fatal(err)
		}
		if err := os.Symlink(k, filepath.Join(data, "gcroots", filepath.Base(k))); err != nil {
			t.Fatal(err)
		}
		kept = append(kept, k)
		for j := range 3 {
			importPath(fmt.Sprintf("%030d%dj-junk-%d", round, j, j))
		}
		gc := exec.Command(bin, "--data-dir", data, "gc", "--min-dead", "0.01", "--json")
		var gcOut, gcErr bytes.Buffer
		gc.Stdout, gc.Stderr = &gcOut, &gcErr
		if err := gc.Start(); err != nil {
			t.Fatal(err)
		}
		gcDone := make(chan error, 1)
		go func() { gcDone <- gc.Wait() }()
		for i, running := 0, true; running; i++ {
			select {
			case err := <-gcDone:
				if err != nil {
					t.Fatalf("round %d: casnix gc: %v\n%s", round, err, gcErr.String())
				}
				running = false
			default:
			}
			dst := filepath.Join(work, fmt.Sprintf("backup-%02d-%d", round, i))
			runCasnix(t, bin, data, "backup", "--quick", dst)
			backups++
			if got := casnixPaths(t, bin, dst); len(got) < len(kept) || !containsAll(got, kept) {
				t.Fatalf("round %d backup %d holds %q, want every kept path %q", round, i, got, kept)
			}
			if err := os.RemoveAll(dst); err != nil {
				t.Fatal(err)
			}
		}
		if strings.Contains(gcOut.String(), `"packsRemoved": 0,`) {
			continue
		}
		compacted++
	}
	if compacted == 0 {
		t.Fatal("no collection removed a pack: the backups never ran beside a compaction")
	}
	t.Logf("%d backups beside 20 collections, %d of which removed packs", backups, compacted)
	if got := casnixPaths(t, bin, data); !slices.Equal(got, kept) {
		t.Fatalf("data dir holds %q, want %q", got, kept)
	}
	runCasnix(t, bin, data, "verify")
}

func containsAll(have, want []string) bool {
	for _, w := range want {
		if !slices.Contains(have, w) {
			return false
		}
	}
	return true
}
