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
		// A flipped kind: FUSE showed a root of no type (TestFlippedBytesReadPaths, seed 8).
		{"root symlink's kind unknown", `UPDATE paths SET kind = 7 WHERE name = '` + linkRoot + `'`},
		{"root symlink turned file", `UPDATE paths SET kind = 2 WHERE name = '` + linkRoot + `'`},
		{"root symlink turned directory", `UPDATE paths SET kind = 1 WHERE name = '` + linkRoot + `'`},
		// A row's NAR hash alone: its root_sum no longer matches, so the
		// render is hashed (NarRender) and fails.
		{"root file's NAR hash", `UPDATE paths SET nar_hash = zeroblob(32) WHERE name = '` + fileRoot + `'`},
		{"root file's NAR hash and root_sum", `UPDATE paths SET nar_hash = zeroblob(32), root_sum = zeroblob(32) WHERE name = '` + fileRoot + `'`},
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
					t.Errorf("%s: root symlink -> %s %q, was %s %q, without an error", name, got.Kind, got.Target, want.Kind, want.Target)
				}
			}
			if failed == 0 {
				t.Error("no path failed to render: the damage did not reach a read")
			}
		})
	}
}

// TestVerifyNamesPathsOnDamagedDatabase: database damage that a scan trips
// over, or that stops the trace from damaged chunks to paths, must not
// stop verify from naming the damaged paths (promise I5). Before, a chunk
// row whose offset had turned into a blob (a flipped type byte in its
// record header, which integrity_check accepts) failed verify's frame scan,
// and a damaged directory failed the trace, and either way verify named no
// path at all.
func TestVerifyNamesPathsOnDamagedDatabase(t *testing.T) {
	bigChunk := `(SELECT digest FROM chunks ORDER BY len DESC LIMIT 1)`
	for _, tc := range []struct {
		name string
		sql  []string
		want []string
	}{
		{"chunk offset of the wrong type", []string{`UPDATE chunks SET off = X'00F85A' WHERE digest = ` + bigChunk}, []string{pathA}},
		{"frame row of the wrong type", []string{`UPDATE frames SET clen = 'x' WHERE id = (SELECT frame FROM chunks WHERE digest = ` + bigChunk + `)`}, []string{pathA}},
		{"damaged directory and missing frame", []string{
			`UPDATE directories SET data = data || X'00' WHERE digest = (SELECT digest FROM paths WHERE name = '` + pathC + `')`,
			`UPDATE chunks SET frame = 999999 WHERE digest = ` + bigChunk,
		}, []string{pathA, pathC}},
	} {
		t.Run(tc.name, func(t *testing.T) {
			ctx := context.Background()
			fx := newRepairFixture(t)
			raw := fx.raw(t)
			for _, q := range tc.sql {
				if res, err := raw.Exec(q); err != nil {
					t.Fatal(err)
				} else if n, _ := res.RowsAffected(); n != 1 {
					t.Fatalf("%s changed %d rows, want 1", q, n)
				}
			}
			raw.Close()
			st, err := Open(ctx, fx.dir, repairOptions())
			if err != nil {
				t.Fatal(err)
			}
			defer st.Close()
			rep, err := st.Verify(ctx, nil)
			if err != nil {
				t.Fatalf("verify: %v", err)
			}
			var got []string
			for _, d := range rep.Damaged {
				got = append(got, d.Name)
			}
			if !reflect.DeepEqual(got, tc.want) {
				t.Errorf("verify names %q, want %q (report %+v)", got, tc.want, rep)
			}
		})
	}
}

// TestRenderDirectoryCache: renders keep the directories they decoded
// (renderDirectory), and verify does not use them: a directory row damaged
// after a render still renders the path's NAR (the cached directory is the
// one its digest names, so it cannot be stale), while verify, which reads
// every directory from the index, names the path.
func TestRenderDirectoryCache(t *testing.T) {
	ctx := context.Background()
	fx := newRepairFixture(t)
	st, err := Open(ctx, fx.dir, repairOptions())
	if err != nil {
		t.Fatal(err)
	}
	defer st.Close()
	render := func() {
		t.Helper()
		var got bytes.Buffer
		if _, err := st.NarRender(ctx, pathC, &got); err != nil {
			t.Fatalf("render %s: %v", pathC, err)
		}
		if !bytes.Equal(got.Bytes(), fx.nars[pathC]) {
			t.Fatalf("%s renders other bytes", pathC)
		}
	}
	render()
	raw := fx.raw(t)
	res, err := raw.Exec(`UPDATE directories SET data = data || X'00' WHERE digest = (SELECT digest FROM paths WHERE name = '` + pathC + `')`)
	if err != nil {
		t.Fatal(err)
	}
	if n, _ := res.RowsAffected(); n != 1 {
		t.Fatalf("damage changed %d rows, want 1", n)
	}
	render()
	rep, err := st.Verify(ctx, nil)
	if err != nil {
		t.Fatalf("verify: %v", err)
	}
	var names []string
	for _, d := range rep.Damaged {
		names = append(names, d.Name)
	}
	if !reflect.DeepEqual(names, []string{pathC}) {
		t.Errorf("verify names %q, want %q", names, []string{pathC})
	}
}
