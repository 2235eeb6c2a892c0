package tests

import (
	"bytes"
	"crypto/sha256"
	"encoding/json"
	"fmt"
	"math/rand/v2"
	"os"
	"os/exec"
	"path/filepath"
	"testing"

	"github.com/casnix/casnix/nar"
	"github.com/casnix/casnix/tests/crashfs"
	"github.com/casnix/casnix/tests/nixtest"
)

// TestPowerCutAfterExport runs `casnix export` into a cache dir on a crashfs mount that
// it creates (at the mount's root, and two levels down), cuts the power right after export
// exits 0, and checks on the backing dir that every exported path's narinfo and NAR file
// survived, the NAR of the narinfo's NarHash (I3 of TestTorture, made deterministic:
// each unsynced directory entry is lost with probability 1/2, so several crashfs seeds
// find an export that leaves one of them unsynced).
func TestPowerCutAfterExport(t *testing.T) {
	if os.Geteuid() != 0 {
		nixtest.SkipOrFatal(t, "TestPowerCutAfterExport needs root to mount FUSE")
	}
	if _, err := os.Stat("/dev/fuse"); err != nil {
		nixtest.SkipOrFatal(t, "TestPowerCutAfterExport needs /dev/fuse: %v", err)
	}
	bin := nixtest.CasnixBinary(t)
	work := t.TempDir()
	data := filepath.Join(work, "data") // outside crashfs: only the export is cut
	rng := rand.New(rand.NewChaCha8([32]byte{'e', 'x', 'p'}))
	var paths []string
	for i := range 3 {
		name := fmt.Sprintf("%031dx-exp-%d", i, i)
		tree := filepath.Join(work, name)
		narFile := randomNARFile(t, rng, tree, 64<<10)
		p := "/nix/store/" + name
		args := []string{"import", "--nar", narFile, "--path", p}
		if i > 0 {
			args = append(args, "--references", paths[i-1])
		}
		runCasnix(t, bin, data, args...)
		paths = append(paths, p)
	}
	hashes := map[string]string{}
	var infos []pathInfoJSONT
	if err := json.Unmarshal([]byte(runCasnix(t, bin, data, "path-info", "--all", "--json")), &infos); err != nil {
		t.Fatal(err)
	}
	for _, pi := range infos {
		h, err := nixtest.NormalizeSHA256(pi.NarHash)
		if err != nil {
			t.Fatal(err)
		}
		hashes[pi.Path] = h
	}
	if len(hashes) != len(paths) {
		t.Fatalf("data dir holds %d paths, want %d", len(hashes), len(paths))
	}

	for _, tc := range []struct{ name, cache string }{
		{"at the root", "cache"},
		{"two levels down", "a/b/cache"},
	} {
		t.Run(tc.name, func(t *testing.T) {
			for seed := range int64(8) {
				backing, mnt := filepath.Join(t.TempDir(), "backing"), filepath.Join(t.TempDir(), "mnt")
				for _, d := range []string{backing, mnt} {
					if err := os.Mkdir(d, 0o755); err != nil {
						t.Fatal(err)
					}
				}
				cfs, err := crashfs.Mount(backing, mnt, crashfs.Options{Seed: seed})
				if err != nil {
					t.Fatal(err)
				}
				cmd := exec.Command(bin, "--data-dir", data, "export", "--to", "file://"+filepath.Join(mnt, tc.cache), paths[len(paths)-1])
				out, err := cmd.CombinedOutput()
				if err != nil {
					cfs.Unmount()
					t.Fatalf("seed %d: casnix export: %v\n%s", seed, err, out)
				}
				if _, err := cfs.PowerCut(); err != nil {
					t.Fatal(err)
				}
				if err := cfs.Unmount(); err != nil {
					t.Fatal(err)
				}
				for _, p := range paths {
					if err := checkExported(filepath.Join(backing, tc.cache), p, hashes[p]); err != nil {
						t.Errorf("seed %d: power cut after export exited 0: %v", seed, err)
					}
				}
			}
		})
	}
}

// TestPowerCutExportSameNAR exports a path, then another path with the same NAR (so the
// same content-addressed NAR file name) in a second run on a crashfs mount that cuts the
// power at each fsync of the second run: the first export, acknowledged, must keep its
// narinfo and a NAR file that matches it whatever the second run did before the cut.
// (binarycache's TestExportKeepsSameNARFile checks the mechanism deterministically.)
func TestPowerCutExportSameNAR(t *testing.T) {
	if os.Geteuid() != 0 {
		nixtest.SkipOrFatal(t, "TestPowerCutExportSameNAR needs root to mount FUSE")
	}
	if _, err := os.Stat("/dev/fuse"); err != nil {
		nixtest.SkipOrFatal(t, "TestPowerCutExportSameNAR needs /dev/fuse: %v", err)
	}
	bin := nixtest.CasnixBinary(t)
	work := t.TempDir()
	data := filepath.Join(work, "data") // outside crashfs: only the exports are cut
	tree := filepath.Join(work, "tree")
	writeRandomTree(t, rand.New(rand.NewChaCha8([32]byte{'s', 'a', 'm', 'e'})), tree, 256<<10)
	var buf bytes.Buffer
	if _, err := nar.DumpPath(&buf, tree); err != nil {
		t.Fatal(err)
	}
	narFile := tree + ".nar"
	if err := os.WriteFile(narFile, buf.Bytes(), 0o644); err != nil {
		t.Fatal(err)
	}
	first, second := "/nix/store/00000000000000000000000000000001-same-a", "/nix/store/00000000000000000000000000000002-same-b"
	for _, p := range []string{first, second} {
		runCasnix(t, bin, data, "import", "--nar", narFile, "--path", p)
	}
	sum := sha256.Sum256(buf.Bytes())
	narHash := "sha256:" + nixtest.NixBase32Encode(sum[:])

	// run exports first into a cache on a fresh backing dir (durable: outside crashfs),
	// then second into it through a crashfs mount cutting at the cutAt-th fsync (0:
	// never), and returns the backing dir and the fsyncs the second export made.
	const seeds = 12
	run := func(cutAt, seed int64) (string, int64) {
		backing, mnt := filepath.Join(t.TempDir(), "backing"), filepath.Join(t.TempDir(), "mnt")
		if err := os.Mkdir(mnt, 0o755); err != nil {
			t.Fatal(err)
		}
		runCasnix(t, bin, data, "export", "--to", "file://"+filepath.Join(backing, "cache"), first)
		cfs, err := crashfs.Mount(backing, mnt, crashfs.Options{Seed: seed, CutAtFsync: cutAt})
		if err != nil {
			t.Fatal(err)
		}
		out, err := exec.Command(bin, "--data-dir", data, "export", "--to", "file://"+filepath.Join(mnt, "cache"), second).CombinedOutput()
		if err != nil && cutAt == 0 {
			cfs.Unmount()
			t.Fatalf("export with no cut: %v\n%s", err, out)
		}
		n := cfs.Stats().Fsyncs
		if _, err := cfs.PowerCut(); err != nil {
			t.Fatal(err)
		}
		if err := cfs.Unmount(); err != nil {
			t.Fatal(err)
		}
		return backing, n
	}
	backing, n := run(0, 0)
	for _, p := range []string{first, second} {
		if err := checkExported(filepath.Join(backing, "cache"), p, narHash); err != nil {
			t.Fatalf("no cut: %v", err)
		}
	}
	lost := 0
	for cut := int64(1); cut <= n; cut++ {
		for seed := range int64(seeds) {
			backing, _ := run(cut, seed)
			if err := checkExported(filepath.Join(backing, "cache"), first, narHash); err != nil {
				lost++
				t.Errorf("cut at fsync %d of the second export's %d (seed %d): the first, acknowledged export: %v", cut, n, seed, err)
			}
		}
	}
	t.Logf("cuts at the %d fsyncs of the second export, %d seeds each: the first export lost %d times", n, seeds, lost)
}
