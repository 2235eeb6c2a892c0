package store

import (
	"bytes"
	"context"
	"crypto/rand"
	"os"
	"path/filepath"
	"reflect"
	"testing"

	"github.com/casnix/casnix/castore"
	"github.com/casnix/casnix/nar"
)

// TestReadsNeverReturnWrongBytes damages index rows that no checksum in
// SQLite covers (a chunk's place in its frame, the root node fields of a
// path row) and renders every path: each must render to its original NAR
// or fail, never to other bytes (promise I3), and a root symlink's lookup
// must not hand out another target. Before reads checked chunk
// digests and rendered NARs against their hashes, a chunk row pointing a
// byte off, or at another frame, and a flipped executable bit or symlink
// target in a path row, all rendered other bytes without an error.
func TestReadsNeverReturnWrongBytes(t *testing.T) {
	const (
		fileRoot = "33333333333333333333333333333333-file"
		linkRoot = "44444444444444444444444444444444-link"
	)
	big := make([]byte, 600<<10)
	rand.Read(big)
	single := func(t *testing.T, mk func(p string) error) []byte {
		p := filepath.Join(t.TempDir(), "x")
		if err := mk(p); err != nil {
			t.Fatal(err)
		}
		var b bytes.Buffer
		if _, err := nar.DumpPath(&b, p); err != nil {
			t.Fatal(err)
		}
		return b.Bytes()
	}
	for _, tc := range []struct {
		name string
		sql  string
	}{
		{"chunk a byte off in its frame", `UPDATE chunks SET off = off + 1 WHERE digest =
			(SELECT c.digest FROM chunks c JOIN frames f ON f.id = c.frame WHERE c.off + c.len < f.rawlen ORDER BY c.len DESC LIMIT 1)`},
		{"chunk in another frame", `UPDATE chunks SET frame =
			(SELECT f.id FROM frames f WHERE f.id != chunks.frame AND f.rawlen >= chunks.off + chunks.len ORDER BY f.id LIMIT 1)
			WHERE digest = (SELECT c.digest FROM chunks c WHERE EXISTS
				(SELECT 1 FROM frames f WHERE f.id != c.frame AND f.rawlen >= c.off + c.len) ORDER BY c.len LIMIT 1)`},
		{"root file's executable bit", `UPDATE paths SET executable = 1 - executable WHERE name = '` + fileRoot + `'`},
		{"root symlink's target", `UPDATE paths SET target = CAST('/nix/store/elsewhere' AS BLOB) WHERE name = '` + linkRoot + `'`},
	} {
		t.Run(tc.name, func(t *testing.T) {
			ctx := context.Background()
			fx := newRepairFixture(t)
			st, err := Open(ctx, fx.dir, repairOptions())
			if err != nil {
				t.Fatal(err)
			}
			fx.nars[fileRoot] = single(t, func(p string) error { return os.WriteFile(p, big, 0o644) })
			fx.nars[linkRoot] = single(t, func(p string) error { return os.Symlink("/nix/store/"+pathA, p) })
			for _, n := range []string{fileRoot, linkRoot} {
				if err := add(t, st, n, fx.nars[n]); err != nil {
					t.Fatal(err)
				}
			}
			roots := map[string]castore.Node{}
			for name := range fx.nars {
				if roots[name], err = st.Root(ctx, name); err != nil {
					t.Fatal(err)
				}
			}
			st.Close()
			raw := fx.raw(t)
			res, err := raw.Exec(tc.sql)
			if err != nil {
				t.Fatal(err)
			}
			if n, _ := res.RowsAffected(); n != 1 {
				t.Fatalf("damage changed %d rows, want 1", n)
			}
			raw.Close()
			st, err = Open(ctx, fx.dir, repairOptions())
			if err != nil {
				t.Fatal(err)
			}
			defer st.Close()
			failed := 0
			for name, want := range fx.nars {
				var got bytes.Buffer
				_, err := st.NarRender(ctx, name, &got)
				switch {
				case err != nil:
					failed++
				case !bytes.Equal(got.Bytes(), want):
					t.Errorf("%s renders %d bytes, not its NAR (%d bytes), without an error", name, got.Len(), len(want))
				}
			}
			// The root node alone, as a FUSE lookup takes it.
			for name, want := range roots {
				got, err := st.Root(ctx, name)
				if err == nil && !reflect.DeepEqual(got, want) && want.Kind == castore.KindSymlink {
					t.Errorf("%s: root symlink -> %q, was %q, without an error", name, got.Target, want.Target)
				}
			}
			if failed == 0 {
				t.Error("no path failed to render: the damage did not reach a read")
			}
		})
	}
}
