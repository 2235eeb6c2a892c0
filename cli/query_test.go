package cli

import (
	"bytes"
	"os"
	"path/filepath"
	"slices"
	"strings"
	"testing"

	narpkg "github.com/casnix/casnix/nar"
	"github.com/casnix/casnix/store"
)

// TestReadCommandsOpenReadOnly: dump, cat, ls and path-info open the data
// dir read-only (store.Options.ReadOnly). What shows it from outside: a
// writer's open deletes casnix.db-wal and -shm when it closes, the
// read-only open keeps them, so after the first read command the data dir's
// entries stay the same however many more run.
func TestReadCommandsOpenReadOnly(t *testing.T) {
	dir := t.TempDir()
	st, err := store.Open(t.Context(), dir, store.Options{})
	if err != nil {
		t.Fatal(err)
	}
	const a = "00000000000000000000000000000000-a"
	tree := filepath.Join(t.TempDir(), "t")
	os.MkdirAll(filepath.Join(tree, "share"), 0o755)
	os.WriteFile(filepath.Join(tree, "share", "README"), []byte("hello\n"), 0o644)
	var nar bytes.Buffer
	if _, err := narpkg.DumpPath(&nar, tree); err != nil {
		t.Fatal(err)
	}
	want := slices.Clone(nar.Bytes())
	b := st.NewBatch(t.Context())
	if _, err := b.Add(&nar, store.PathInfo{Name: a}); err != nil {
		t.Fatal(err)
	}
	if _, err := b.Commit(); err != nil {
		t.Fatal(err)
	}
	st.Close()
	entries := func() []string {
		ents, err := os.ReadDir(dir)
		if err != nil {
			t.Fatal(err)
		}
		var out []string
		for _, e := range ents {
			out = append(out, e.Name())
		}
		return out
	}
	if slices.Contains(entries(), store.DBFile+"-wal") {
		t.Fatal("the writer left its WAL")
	}
	p := "/nix/store/" + a
	var first []string
	for _, tc := range []struct {
		name string
		cmd  interface{ Run(*Globals) error }
		want string
	}{
		{"dump", &DumpCmd{Path: p}, string(want)},
		{"cat", &CatCmd{Path: p + "/share/README"}, "hello\n"},
		{"ls", &LsCmd{Path: p + "/share"}, "README"},
		{"path-info", &PathInfoCmd{Paths: []string{p}}, p + "\t"},
	} {
		var out, errOut bytes.Buffer
		g := &Globals{DataDir: dir, StoreDir: "/nix/store", Ctx: t.Context(), Stdout: &out, Stderr: &errOut}
		if err := tc.cmd.Run(g); err != nil {
			t.Fatalf("%s: %v\n%s", tc.name, err, errOut.String())
		}
		if !strings.Contains(out.String(), tc.want) {
			t.Errorf("%s: output %q lacks %q", tc.name, out.String(), tc.want)
		}
		got := entries()
		if !slices.Contains(got, store.DBFile+"-wal") {
			t.Errorf("%s closed the database as a writer (its WAL is gone): %q", tc.name, got)
		}
		if first == nil {
			first = got
		} else if !slices.Equal(first, got) {
			t.Errorf("%s changed the data dir's entries: %q -> %q", tc.name, first, got)
		}
	}
}

// TestDirBytesLeavesOutNARCache: the bytes on disk stats and repack report
// are the store's, not the default NAR cache's copies in the data dir.
func TestDirBytesLeavesOutNARCache(t *testing.T) {
	dir := t.TempDir()
	if err := os.WriteFile(filepath.Join(dir, "pack"), make([]byte, 64<<10), 0o644); err != nil {
		t.Fatal(err)
	}
	before, err := dirBytes(dir)
	if err != nil {
		t.Fatal(err)
	}
	os.MkdirAll(filepath.Join(dir, httpCacheDir), 0o755)
	if err := os.WriteFile(filepath.Join(dir, httpCacheDir, "x.nar.zst"), make([]byte, 256<<10), 0o644); err != nil {
		t.Fatal(err)
	}
	if after, err := dirBytes(dir); err != nil || after != before || before < 64<<10 {
		t.Fatalf("dirBytes %d before the NAR cache file, %d after (%v)", before, after, err)
	}
}
