package tests

import (
	"bufio"
	"slices"
	"strings"
	"testing"

	"github.com/casnix/casnix/tests/nixtest"
)

// TestNixFixture checks the harness alone, without casnix: the fixture store is a valid
// Nix store holding what the other tests rely on.
func TestNixFixture(t *testing.T) {
	f := nixtest.PopulateFixture(t)
	infos := f.PathInfos(t)
	all := f.AllPaths(t)
	if len(infos) != len(all) || len(all) < 50 {
		t.Fatalf("path-info --json has %d paths, path-info --all %d; want the same, at least 50", len(infos), len(all))
	}
	info := func(name string) nixtest.PathInfo {
		t.Helper()
		p := f.Path(t, name)
		pi, ok := infos[p]
		if !ok {
			t.Fatalf("%s (%s) is not valid", name, p)
		}
		if !strings.HasPrefix(p, nixtest.StoreDir+"/") {
			t.Fatalf("%s: %s is not under %s", name, p, nixtest.StoreDir)
		}
		return pi
	}
	refs := func(name string, want ...string) {
		t.Helper()
		var wantPaths []string
		for _, w := range want {
			wantPaths = append(wantPaths, f.Path(t, w))
		}
		slices.Sort(wantPaths)
		if got := info(name).References; !slices.Equal(got, wantPaths) {
			t.Errorf("%s references %q, want %q", name, got, wantPaths)
		}
	}
	refs("chain4", "chain3")
	refs("chain3", "chain2")
	refs("chain2", "chain1")
	refs("chain1")
	refs("diamond-top", "diamond-left", "diamond-right")
	refs("diamond-left", "diamond-base")
	refs("diamond-right", "diamond-base")
	refs("self-ref", "self-ref")
	refs("multi.dev", "multi.out")
	refs("symlink", "file")
	refs("tree", "file")
	refs("uses-fod", "fod-rec", "fod-flat")
	if got := f.Closure(t, f.Path(t, "diamond-top")); len(got) != 4 {
		t.Errorf("closure of diamond-top: %q", got)
	}

	for name, drv := range f.Drvs {
		for out, p := range f.Outputs {
			if out != name && !strings.HasPrefix(out, name+".") {
				continue
			}
			if got := infos[p].Deriver; got != drv {
				t.Errorf("%s (%s): deriver %q, want %q", out, p, got, drv)
			}
		}
		if _, ok := infos[drv]; !ok {
			t.Errorf("%s: .drv %s not valid", name, drv)
		}
		if ca := infos[drv].CA; !strings.HasPrefix(ca, "text:sha256:") {
			t.Errorf("%s: ca %q, want text:sha256:…", drv, ca)
		}
	}
	for name, prefix := range map[string]string{
		"fod-flat":             "fixed:sha256:",
		"fod-flat-sha1":        "fixed:sha1:",
		"fod-rec":              "fixed:r:sha256:",
		"text":                 "text:sha256:",
		"text-ref":             "text:sha256:",
		"add-dir":              "fixed:r:sha256:",
		"add-file":             "fixed:r:sha256:",
		"add-symlink":          "fixed:r:sha256:",
		"add-fixed-sha256":     "fixed:sha256:",
		"add-fixed-sha1":       "fixed:sha1:",
		"add-fixed-exe":        "fixed:sha256:",
		"add-fixed-rec-sha512": "fixed:r:sha512:",
	} {
		if ca := info(name).CA; !strings.HasPrefix(ca, prefix) {
			t.Errorf("%s: ca %q, want %s…", name, ca, prefix)
		}
	}
	for _, p := range f.Signed {
		if len(infos[p].Signatures) == 0 {
			t.Errorf("%s: no signatures", p)
		}
	}
	if n := len(info("diamond-top").Signatures); n != 2 {
		t.Errorf("diamond-top: %d signatures, want 2", n)
	}
	if !info("file").Ultimate {
		t.Errorf("built path not ultimate")
	}

	// The tree holds every kind of node; the big file, single-file and symlink outputs
	// are what their names say.
	stats := narStats(t, f.Store, f.Path(t, "tree"))
	t.Logf("tree: %s", stats)
	if stats.Executables < 2 || stats.EmptyFiles < 2 || stats.EmptyDirs < 2 || stats.Symlinks < 4 || stats.MaxFile <= 1<<20 || stats.Regular < 300 {
		t.Errorf("tree lacks some kind of node: %s", stats)
	}
	for name, want := range map[string]string{"file": nixtest.TypeRegular, "symlink": nixtest.TypeSymlink, "empty-dir": nixtest.TypeDirectory, "exe": nixtest.TypeRegular} {
		root := narRoot(t, f.Store, f.Path(t, name))
		if root.Type != want {
			t.Errorf("%s: root node %s, want %s", name, root.Type, want)
		}
	}
	if !narRoot(t, f.Store, f.Path(t, "exe")).Executable {
		t.Errorf("exe: not executable")
	}
	if infos[f.Path(t, "big-file")].NarSize <= 1<<20 {
		t.Errorf("big-file too small")
	}

	// The store's db lists exactly what is on disk.
	listing := bufio.NewScanner(strings.NewReader(string(nixtest.Run(t, "ls", f.RealPath(nixtest.StoreDir)))))
	var onDisk []string
	for listing.Scan() {
		if name := listing.Text(); name != ".links" {
			onDisk = append(onDisk, nixtest.StoreDir+"/"+name)
		}
	}
	slices.Sort(onDisk)
	if !slices.Equal(onDisk, all) {
		t.Errorf("store directory lists %d entries, db %d valid paths", len(onDisk), len(all))
	}
}
