package tests

import (
	"crypto/rand"
	"io"
	"os"
	"path/filepath"
	"testing"
	"time"

	"github.com/casnix/casnix/tests/nixtest"
)

// usrDir is the large real tree of TestUsrRoundTrip: $CASNIX_E2E_USR_DIR, default /usr.
func usrDir() string {
	if d := os.Getenv("CASNIX_E2E_USR_DIR"); d != "" {
		return d
	}
	return "/usr"
}

// randomStorePath is /nix/store/<32 random nixbase32 characters>-name.
func randomStorePath(t testing.TB, name string) string {
	t.Helper()
	var b [20]byte
	if _, err := rand.Read(b[:]); err != nil {
		t.Fatal(err)
	}
	return nixtest.StoreDir + "/" + nixtest.NixBase32Encode(b[:]) + "-" + name
}

// dumpToFile runs c, which writes a NAR to stdout, into a new file at path, and returns
// the NAR's digest and node counts, parsed as it streams.
func dumpToFile(t testing.TB, c *nixtest.Cmd, path string) (nixtest.Digest, nixtest.NARStats) {
	t.Helper()
	out, err := os.Create(path)
	if err != nil {
		t.Fatal(err)
	}
	defer out.Close()
	d, stats := digestAndStats(t, c, out)
	if err := out.Close(); err != nil {
		t.Fatal(err)
	}
	return d, stats
}

// digestAndStats runs c, which writes a NAR to stdout, and returns its digest and node
// counts, copying it to also when that is not nil.
func digestAndStats(t testing.TB, c *nixtest.Cmd, also io.Writer) (nixtest.Digest, nixtest.NARStats) {
	t.Helper()
	dw := nixtest.NewDigestWriter()
	var stats nixtest.NARStats
	cc := *c
	cc.Timeout = 30 * time.Minute
	if also != nil {
		cc.Stdout = io.MultiWriter(also, dw)
	} else {
		cc.Stdout = dw
	}
	walkCmd(t, &cc, func(e nixtest.NAREntry) error {
		stats.Add(e)
		return nil
	})
	return dw.Digest(), stats
}

// roundTrip imports the NAR in file as a store path with `casnix import --nar` and checks
// that casnix's path-info and `casnix dump` give back the same bytes.
func roundTrip(t *testing.T, cas *nixtest.Casnix, file, storePath string, want nixtest.Digest, wantStats nixtest.NARStats) {
	t.Helper()
	start := time.Now()
	c := cas.Cmd("import", "--nar", file, "--path", storePath)
	c.Timeout = 30 * time.Minute
	r := c.Run(t)
	t.Logf("casnix import --nar of %d bytes: %s (%s)", want.Size, time.Since(start).Round(time.Millisecond), summaryLine(r))

	pi, ok := cas.PathInfos(t, storePath)[storePath]
	if !ok {
		t.Fatalf("%s not in casnix path-info after import", storePath)
	}
	if pi.NarHash != want.NixHash() || pi.NarSize != want.Size {
		t.Errorf("casnix path-info %s: narHash %s narSize %d, want %s", storePath, pi.NarHash, pi.NarSize, want)
	}
	if len(pi.References) != 0 || pi.Deriver != "" || pi.CA != "" || len(pi.Signatures) != 0 {
		t.Errorf("casnix path-info %s: unexpected metadata %+v", storePath, pi)
	}

	start = time.Now()
	got, gotStats := digestAndStats(t, cas.Cmd("dump", storePath), nil)
	t.Logf("casnix dump: %s", time.Since(start).Round(time.Millisecond))
	if got != want {
		t.Errorf("casnix dump %s: %s, imported %s", storePath, got, want)
	}
	if gotStats != wantStats {
		t.Errorf("casnix dump %s holds %s, imported %s", storePath, gotStats, wantStats)
	}
}

// TestUsrRoundTrip: a large real tree (/usr) goes NAR → casnix import --nar → casnix dump
// and comes back byte-identical. A small hand-made tree makes sure every kind of node is
// covered whatever /usr holds.
func TestUsrRoundTrip(t *testing.T) {
	nixtest.RequireHostNix(t)
	cas := nixtest.NewCasnix(t)

	t.Run("AllNodeKinds", func(t *testing.T) {
		dir := filepath.Join(t.TempDir(), "kinds")
		writeTree(t, dir)
		nar := filepath.Join(t.TempDir(), "kinds.nar")
		d, stats := dumpToFile(t, &nixtest.Cmd{Name: "nix-store", Args: []string{"--dump", dir}, Env: nixtest.NixEnv(t)}, nar)
		t.Logf("tree: %s", stats)
		if stats.Executables == 0 || stats.Symlinks == 0 || stats.EmptyFiles == 0 || stats.EmptyDirs == 0 || stats.MaxFile <= 1<<20 {
			t.Fatalf("the hand-made tree lacks a kind of node: %s", stats)
		}
		roundTrip(t, cas, nar, randomStorePath(t, "kinds"), d, stats)
	})

	t.Run("Usr", func(t *testing.T) {
		src := usrDir()
		nar := filepath.Join(t.TempDir(), "usr.nar")
		start := time.Now()
		d, stats := dumpToFile(t, &nixtest.Cmd{Name: "nix-store", Args: []string{"--dump", src}, Env: nixtest.NixEnv(t)}, nar)
		t.Logf("nix-store --dump %s: %s in %s", src, d, time.Since(start).Round(time.Millisecond))
		t.Logf("%s: %s", src, stats)
		if stats.Executables == 0 || stats.Symlinks == 0 || stats.EmptyFiles == 0 || stats.EmptyDirs == 0 {
			t.Errorf("%s lacks a kind of node: %s", src, stats)
		}
		roundTrip(t, cas, nar, randomStorePath(t, "usr"), d, stats)
	})
}

// writeTree makes a directory holding every kind of NAR node: executable, plain, empty and
// big files, relative, absolute and dangling symlinks, empty and nested directories.
func writeTree(t testing.TB, dir string) {
	t.Helper()
	big := make([]byte, 3<<20)
	if _, err := rand.Read(big[:1<<20]); err != nil {
		t.Fatal(err)
	}
	copy(big[2<<20:], big[:1<<20]) // a repeated MiB, for chunk deduplication
	files := map[string]struct {
		content string
		mode    os.FileMode
	}{
		"bin/tool":                {"#!/bin/sh\necho tool\n", 0o755},
		"bin/empty-exe":           {"", 0o755},
		"empty":                   {"", 0o644},
		"share/doc/readme":        {"read me\n", 0o644},
		"share/big":               {string(big), 0o644},
		"deep/a/b/c/d/e/f/g/leaf": {"leaf", 0o444},
		"names/with space":        {"space\n", 0o644},
		"names/uml\u00e4ut":       {"utf-8\n", 0o644},
		"names/.hidden":           {"hidden\n", 0o644},
	}
	for name, f := range files {
		p := filepath.Join(dir, name)
		if err := os.MkdirAll(filepath.Dir(p), 0o755); err != nil {
			t.Fatal(err)
		}
		if err := os.WriteFile(p, []byte(f.content), f.mode); err != nil {
			t.Fatal(err)
		}
	}
	for _, d := range []string{"empty-dir", "nested-empty/inner", "share/empty"} {
		if err := os.MkdirAll(filepath.Join(dir, d), 0o755); err != nil {
			t.Fatal(err)
		}
	}
	for link, target := range map[string]string{
		"bin/tool-link": "tool",
		"abs-link":      "/nix/store/00000000000000000000000000000000-x",
		"dangling":      "does/not/exist",
		"up":            "../..",
		"dir-link":      "share/doc",
	} {
		if err := os.Symlink(target, filepath.Join(dir, link)); err != nil {
			t.Fatal(err)
		}
	}
}
