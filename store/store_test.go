package store

import (
	"bytes"
	"context"
	"crypto/rand"
	"crypto/sha256"
	"database/sql"
	"encoding/binary"
	"errors"
	"os"
	"path/filepath"
	"slices"
	"strings"
	"sync"
	"testing"

	_ "modernc.org/sqlite"

	"github.com/casnix/casnix/nar"
)

const (
	pathA = "00000000000000000000000000000000-a"
	pathB = "11111111111111111111111111111111-b"
	pathC = "22222222222222222222222222222222-c"
)

func openStore(t testing.TB) *Store {
	t.Helper()
	st, err := Open(context.Background(), t.TempDir(), Options{})
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { st.Close() })
	return st
}

// tree writes a small tree with random content (so it does not dedup
// against other trees) and returns its NAR.
func treeNAR(t testing.TB, size int) []byte {
	t.Helper()
	root := filepath.Join(t.TempDir(), "t")
	os.MkdirAll(filepath.Join(root, "sub", "empty"), 0o755)
	big := make([]byte, size)
	rand.Read(big)
	os.WriteFile(filepath.Join(root, "big"), big, 0o644)
	os.WriteFile(filepath.Join(root, "sub", "x"), []byte("#!/bin/sh\n"), 0o755)
	os.WriteFile(filepath.Join(root, "empty"), nil, 0o644)
	os.Symlink("sub/x", filepath.Join(root, "link"))
	var buf bytes.Buffer
	if _, err := nar.DumpPath(&buf, root); err != nil {
		t.Fatal(err)
	}
	return buf.Bytes()
}

func add(t testing.TB, st *Store, name string, n []byte, refs ...string) error {
	t.Helper()
	b := st.NewBatch(context.Background())
	if _, err := b.Add(bytes.NewReader(n), PathInfo{Name: name, References: refs}); err != nil {
		b.Abort()
		return err
	}
	_, err := b.Commit()
	return err
}

func render(t testing.TB, st *Store, name string) []byte {
	t.Helper()
	var out bytes.Buffer
	if _, err := st.NarRender(context.Background(), name, &out); err != nil {
		t.Fatal(err)
	}
	return out.Bytes()
}

// rowCounts counts every table's rows straight from the SQLite file.
func rowCounts(t testing.TB, st *Store) map[string]int {
	t.Helper()
	d, err := sql.Open("sqlite", "file:"+filepath.Join(st.Dir(), DBFile)+"?mode=ro")
	if err != nil {
		t.Fatal(err)
	}
	defer d.Close()
	out := map[string]int{}
	for _, tbl := range []string{"paths", "refs", "sigs", "blobs", "chunks", "frames", "directories"} {
		var n int
		if err := d.QueryRow("SELECT COUNT(*) FROM " + tbl).Scan(&n); err != nil {
			t.Fatal(err)
		}
		out[tbl] = n
	}
	return out
}

func TestAddRenderVerify(t *testing.T) {
	st := openStore(t)
	a := treeNAR(t, 3<<20)
	if err := add(t, st, pathA, a); err != nil {
		t.Fatal(err)
	}
	if !bytes.Equal(render(t, st, pathA), a) {
		t.Fatal("render differs")
	}
	pi, err := st.Info(context.Background(), pathA)
	if err != nil {
		t.Fatal(err)
	}
	if pi.NarHash != sha256.Sum256(a) || pi.NarSize != int64(len(a)) {
		t.Fatal("path-info hash/size wrong")
	}
	rep, err := st.Verify(context.Background(), nil)
	if err != nil || !rep.OK() {
		t.Fatalf("verify: %v %+v", err, rep)
	}
}

func TestReferencesAndClosure(t *testing.T) {
	st := openStore(t)
	ctx := context.Background()
	if err := add(t, st, pathB, treeNAR(t, 100), pathA); !errors.Is(err, ErrMissingRef) {
		t.Fatalf("reference to a missing path: %v", err)
	}
	if err := add(t, st, pathA, treeNAR(t, 100), pathA); err != nil { // self reference
		t.Fatal(err)
	}
	if err := add(t, st, pathB, treeNAR(t, 100), pathA); err != nil {
		t.Fatal(err)
	}
	// In one batch, C may refer to a path added earlier in the batch.
	b := st.NewBatch(ctx)
	const pathD = "33333333333333333333333333333333-d"
	if _, err := b.Add(bytes.NewReader(treeNAR(t, 10)), PathInfo{Name: pathD, References: []string{pathB}}); err != nil {
		t.Fatal(err)
	}
	if _, err := b.Add(bytes.NewReader(treeNAR(t, 10)), PathInfo{Name: pathC, References: []string{pathD, pathA}}); err != nil {
		t.Fatal(err)
	}
	if _, err := b.Commit(); err != nil {
		t.Fatal(err)
	}
	cl, err := st.Closure(ctx, []string{pathC})
	if err != nil {
		t.Fatal(err)
	}
	if strings.Join(cl, ",") != strings.Join([]string{pathA, pathB, pathC, pathD}, ",") {
		t.Fatalf("closure = %v", cl)
	}
	refs, _ := st.Referrers(ctx, pathA)
	if strings.Join(refs, ",") != strings.Join([]string{pathA, pathB, pathC}, ",") {
		t.Fatalf("referrers = %v", refs)
	}
	if got, _ := st.PathByHashPart(ctx, HashPart(pathB)); got != pathB {
		t.Fatalf("by hash part = %q", got)
	}
	if got, _ := st.PathByHashPart(ctx, "44444444444444444444444444444444"); got != "" {
		t.Fatalf("missing hash part = %q", got)
	}
}

// TestBadInputLeavesNothing: every rejected NAR leaves no row in any table
// and no valid path, and the store stays usable.
func TestBadInputLeavesNothing(t *testing.T) {
	good := treeNAR(t, 200<<10)
	wrongHash := sha256.Sum256([]byte("not it"))
	goodHash := sha256.Sum256(good)
	huge := append([]byte{}, good[:8+16]...) // magic token
	huge = append(huge, tokens("(", "type", "regular", "contents")...)
	huge = binary.LittleEndian.AppendUint64(huge, 1<<62)
	huge = append(huge, make([]byte, 4096)...)
	tests := []struct {
		name string
		nar  []byte
		info PathInfo
		want error
	}{
		{"truncated", good[:len(good)/2], PathInfo{Name: pathA}, nar.ErrInvalid},
		{"bad magic", append([]byte{1}, good[1:]...), PathInfo{Name: pathA}, nar.ErrInvalid},
		{"2^62 length", huge, PathInfo{Name: pathA}, nar.ErrInvalid},
		{"hash mismatch", good, PathInfo{Name: pathA, NarHash: wrongHash}, ErrHashMismatch},
		{"size mismatch", good, PathInfo{Name: pathA, NarSize: int64(len(good)) + 8}, ErrSizeMismatch},
		{"bad name", good, PathInfo{Name: "../etc"}, ErrBadPath},
		{"unknown reference", good, PathInfo{Name: pathA, References: []string{pathB}}, ErrMissingRef},
		{"ca of other content", good, PathInfo{Name: pathA, CA: "fixed:r:sha256:00xyyr3fi8l6hb839bv3f7yb86yjv7xi1cgh1xnhipym4asvb4aq"}, ErrCAMismatch},
		{"ca of other name", good, PathInfo{Name: pathA, CA: "fixed:r:sha256:" + NixBase32(goodHash[:])}, ErrCAMismatch},
		{"flat ca of a directory", good, PathInfo{Name: pathA, CA: "fixed:sha256:" + NixBase32(goodHash[:])}, ErrCAMismatch},
		{"flat ca of other file", fileNAR("hullo\n"), PathInfo{Name: "1p9q0bz6f22dyxh4lw8xs08p4201vyq4-f", CA: "fixed:sha256:00xyyr3fi8l6hb839bv3f7yb86yjv7xi1cgh1xnhipym4asvb4aq"}, ErrCAMismatch},
		{"unparseable ca", good, PathInfo{Name: pathA, CA: "fixed:nohash"}, nil},
	}
	for _, tc := range tests {
		t.Run(tc.name, func(t *testing.T) {
			st := openStore(t)
			b := st.NewBatch(context.Background())
			_, err := b.Add(bytes.NewReader(tc.nar), tc.info)
			if err == nil || (tc.want != nil && !errors.Is(err, tc.want)) {
				t.Fatalf("err = %v, want %v", err, tc.want)
			}
			if _, cerr := b.Commit(); cerr == nil {
				t.Fatal("a batch with a failed Add committed")
			}
			for tbl, n := range rowCounts(t, st) {
				if n != 0 {
					t.Errorf("table %s has %d rows after a rejected import", tbl, n)
				}
			}
			if ok, _ := st.IsValid(context.Background(), pathA); ok {
				t.Fatal("path became valid")
			}
			// The store still works, and the aborted bytes are trimmed
			// from the pack before it is appended to again.
			if err := add(t, st, pathA, good); err != nil {
				t.Fatal(err)
			}
			if !bytes.Equal(render(t, st, pathA), good) {
				t.Fatal("render after recovery differs")
			}
			if rep, err := st.Verify(context.Background(), nil); err != nil || !rep.OK() {
				t.Fatalf("verify: %v %+v", err, rep)
			}
		})
	}
}

// fileNAR is the NAR of a regular file.
func fileNAR(contents string) []byte {
	b := tokens("nix-archive-1", "(", "type", "regular", "contents")
	b = append(b, tokens(contents)...)
	return append(b, tokens(")")...)
}

// TestContentAddressed adds paths whose content addresses Nix 2.8 made
// (see TestCAPath) and checks they are accepted as they are.
func TestContentAddressed(t *testing.T) {
	st := openStore(t)
	for _, c := range []struct{ name, ca, contents string }{
		{"1p9q0bz6f22dyxh4lw8xs08p4201vyq4-f", "fixed:sha256:00xyyr3fi8l6hb839bv3f7yb86yjv7xi1cgh1xnhipym4asvb4aq", "hello\n"},
		{"pbqmppvgnnyqxagz7bnmwfdfvr3h43f2-f", "fixed:sha1:iwjz551fyw0cxcjgf4l6c879zabd6wpm", "hello\n"},
		{"vqpn17r03lqabwk0wksgpbgy620zwfd4-t", "text:sha256:" + NixBase32(sha256Of("hello")), "hello"},
	} {
		b := st.NewBatch(context.Background())
		if _, err := b.Add(bytes.NewReader(fileNAR(c.contents)), PathInfo{Name: c.name, CA: c.ca}); err != nil {
			t.Fatalf("%s: %v", c.name, err)
		}
		if _, err := b.Commit(); err != nil {
			t.Fatal(err)
		}
		pi, err := st.Info(context.Background(), c.name)
		if err != nil || pi.CA != c.ca {
			t.Fatalf("%s: info %+v %v", c.name, pi, err)
		}
	}
}

func sha256Of(s string) []byte { h := sha256.Sum256([]byte(s)); return h[:] }

func tokens(ts ...string) []byte {
	var b []byte
	for _, s := range ts {
		b = binary.LittleEndian.AppendUint64(b, uint64(len(s)))
		b = append(b, s...)
		b = append(b, make([]byte, (8-len(s)%8)%8)...)
	}
	return b
}

func TestDedup(t *testing.T) {
	st := openStore(t)
	n := treeNAR(t, 2<<20)
	if err := add(t, st, pathA, n); err != nil {
		t.Fatal(err)
	}
	before := rowCounts(t, st)
	// Same contents under another name: no new chunk, blob or directory.
	if err := add(t, st, pathB, n); err != nil {
		t.Fatal(err)
	}
	after := rowCounts(t, st)
	for _, tbl := range []string{"chunks", "blobs", "directories", "frames"} {
		if after[tbl] != before[tbl] {
			t.Errorf("%s: %d rows, had %d", tbl, after[tbl], before[tbl])
		}
	}
	if !bytes.Equal(render(t, st, pathB), n) {
		t.Fatal("render differs")
	}
}

func TestConcurrentBatches(t *testing.T) {
	st := openStore(t)
	shared := treeNAR(t, 1<<20)
	var wg sync.WaitGroup
	errs := make(chan error, 8)
	names := []string{
		"0aaaaaaaaaaaaaaaaaaaaaaaaaaaaaaa-x", "1aaaaaaaaaaaaaaaaaaaaaaaaaaaaaaa-x",
		"2aaaaaaaaaaaaaaaaaaaaaaaaaaaaaaa-x", "3aaaaaaaaaaaaaaaaaaaaaaaaaaaaaaa-x",
		"4aaaaaaaaaaaaaaaaaaaaaaaaaaaaaaa-x", "5aaaaaaaaaaaaaaaaaaaaaaaaaaaaaaa-x",
		"6aaaaaaaaaaaaaaaaaaaaaaaaaaaaaaa-x", "7aaaaaaaaaaaaaaaaaaaaaaaaaaaaaaa-x",
	}
	for i, name := range names {
		wg.Add(1)
		go func() {
			defer wg.Done()
			// Half add the same contents (racing on the same chunks), half
			// add the same path (racing on the same row).
			n := shared
			if i%2 == 1 {
				name = names[0]
			}
			errs <- add(t, st, name, n)
		}()
	}
	wg.Wait()
	close(errs)
	for err := range errs {
		if err != nil {
			t.Fatal(err)
		}
	}
	all, _ := st.All(context.Background())
	if len(all) != 4 {
		t.Fatalf("paths = %v", all)
	}
	for _, n := range all {
		if !bytes.Equal(render(t, st, n), shared) {
			t.Fatalf("%s renders differently", n)
		}
	}
	if rep, err := st.Verify(context.Background(), nil); err != nil || !rep.OK() {
		t.Fatalf("verify: %v %+v", err, rep)
	}
}

func TestVerifyNamesDamagedPath(t *testing.T) {
	st := openStore(t)
	if err := add(t, st, pathA, treeNAR(t, 4<<20)); err != nil {
		t.Fatal(err)
	}
	if err := add(t, st, pathB, treeNAR(t, 10)); err != nil {
		t.Fatal(err)
	}
	st.Close()
	// Flip bytes in the middle of the first pack (inside pathA's big file).
	packs, _ := filepath.Glob(filepath.Join(st.Dir(), PackDir, "*", "*.pack"))
	if len(packs) == 0 {
		t.Fatal("no packs")
	}
	f, err := os.OpenFile(packs[0], os.O_RDWR, 0)
	if err != nil {
		t.Fatal(err)
	}
	fi, _ := f.Stat()
	buf := make([]byte, 64)
	f.ReadAt(buf, fi.Size()/2)
	for i := range buf {
		buf[i] ^= 0xff
	}
	f.WriteAt(buf, fi.Size()/2)
	f.Close()

	st2, err := Open(context.Background(), st.Dir(), Options{})
	if err != nil {
		t.Fatal(err)
	}
	defer st2.Close()
	rep, err := st2.Verify(context.Background(), nil)
	if err != nil {
		t.Fatal(err)
	}
	if rep.OK() || len(rep.Chunks) == 0 {
		t.Fatalf("damage not found: %+v", rep)
	}
	if len(rep.Damaged) != 1 || rep.Damaged[0].Name != pathA {
		t.Fatalf("damaged paths = %+v, want just %s", rep.Damaged, pathA)
	}
}

func TestSplit(t *testing.T) {
	tests := []struct {
		in, base, sub string
		ok            bool
	}{
		{"/nix/store/" + pathA, pathA, "", true},
		{"/nix/store/" + pathA + "/bin/sh", pathA, "bin/sh", true},
		{pathA, pathA, "", true},
		{"/nix/store/../etc/passwd", "", "", false},
		{"/etc/passwd", "", "", false},
		{"/nix/store/short-x", "", "", false},
		{"/nix/store/00000000000000000000000000000000-bad/name", pathA[:33] + "bad", "name", true},
	}
	for _, tc := range tests {
		base, sub, err := Split(DefaultStoreDir, tc.in)
		if (err == nil) != tc.ok || base != tc.base || sub != tc.sub {
			t.Errorf("Split(%q) = %q, %q, %v", tc.in, base, sub, err)
		}
	}
}

// TestVerifyChecksDatabase: damage that re-rendering alone does not see, or
// sees without naming the cause, is reported: rows whose references do not
// resolve (written with foreign keys off, as a flipped byte would), and a
// damaged pack header.
func TestVerifyChecksDatabase(t *testing.T) {
	for _, tc := range []struct {
		name     string
		damage   func(t *testing.T, st *Store, raw *sql.DB)
		wantPath string // the damaged path verify must name ("" none)
		wantDB   bool   // a database-level problem must be reported
		wantPack bool
	}{
		{"chunk row gone", func(t *testing.T, st *Store, raw *sql.DB) {
			mustExec(t, raw, "DELETE FROM chunks WHERE digest IN (SELECT digest FROM chunks ORDER BY len DESC LIMIT 1)")
		}, pathA, true, false},
		{"frame row gone", func(t *testing.T, st *Store, raw *sql.DB) {
			mustExec(t, raw, "DELETE FROM frames WHERE id = (SELECT frame FROM chunks ORDER BY len DESC LIMIT 1)")
		}, pathA, true, false},
		{"reference dangles", func(t *testing.T, st *Store, raw *sql.DB) {
			mustExec(t, raw, "UPDATE refs SET reference = 999 WHERE referrer = (SELECT id FROM paths WHERE name = ?)", pathB)
		}, pathB, true, false},
		{"root directory gone", func(t *testing.T, st *Store, raw *sql.DB) {
			mustExec(t, raw, "DELETE FROM directories WHERE digest = (SELECT digest FROM paths WHERE name = ?)", pathA)
		}, pathA, false, false},
		{"a name Nix cannot parse (added before names were checked as Nix 2.34 does)", func(t *testing.T, st *Store, raw *sql.DB) {
			mustExec(t, raw, "UPDATE paths SET name = ? WHERE name = ?", pathB[:33]+"..", pathB)
		}, pathB[:33] + "..", false, false},
		{"pack header", func(t *testing.T, st *Store, raw *sql.DB) {
			packs, _ := filepath.Glob(filepath.Join(st.Dir(), PackDir, "*", "*.pack"))
			f, err := os.OpenFile(packs[0], os.O_RDWR, 0)
			if err != nil {
				t.Fatal(err)
			}
			defer f.Close()
			f.WriteAt([]byte{1}, 13) // a reserved byte: no reader looks at it
		}, "", false, true},
	} {
		t.Run(tc.name, func(t *testing.T) {
			st := openStore(t)
			if err := add(t, st, pathA, treeNAR(t, 200<<10)); err != nil {
				t.Fatal(err)
			}
			if err := add(t, st, pathB, treeNAR(t, 10), pathA); err != nil {
				t.Fatal(err)
			}
			st.Close()
			raw, err := sql.Open("sqlite", "file:"+filepath.Join(st.Dir(), DBFile)+"?_pragma=foreign_keys(0)")
			if err != nil {
				t.Fatal(err)
			}
			tc.damage(t, st, raw)
			raw.Close()
			st2, err := Open(context.Background(), st.Dir(), Options{})
			if err != nil {
				t.Fatal(err)
			}
			defer st2.Close()
			rep, err := st2.Verify(context.Background(), nil)
			if err != nil {
				t.Fatal(err)
			}
			if rep.OK() {
				t.Fatal("verify found nothing")
			}
			var named []string
			for _, d := range rep.Damaged {
				named = append(named, d.Name)
			}
			if tc.wantPath != "" && !slices.Contains(named, tc.wantPath) {
				t.Fatalf("damaged paths %v, want %s among them (report %+v)", named, tc.wantPath, rep)
			}
			if tc.wantPath == "" && len(named) > 0 {
				t.Fatalf("damaged paths %v, want none", named)
			}
			if tc.wantDB != (len(rep.DB) > 0) || tc.wantPack != (len(rep.Packs) > 0) {
				t.Fatalf("database problems %q, pack problems %v", rep.DB, rep.Packs)
			}
			// The database check alone (VerifyStore without contents)
			// sees what the rows show.
			db, err := st2.CheckDatabase(context.Background())
			if err != nil {
				t.Fatal(err)
			}
			if tc.wantDB && db.OK() {
				t.Fatalf("CheckDatabase found nothing; Verify found %q", rep.DB)
			}
		})
	}
}

func mustExec(t *testing.T, d *sql.DB, q string, args ...any) {
	t.Helper()
	res, err := d.Exec(q, args...)
	if err != nil {
		t.Fatal(err)
	}
	if n, _ := res.RowsAffected(); n == 0 {
		t.Fatalf("%s changed nothing", q)
	}
}
