package store

import (
	"bytes"
	"context"
	"crypto/rand"
	"database/sql"
	"errors"
	"fmt"
	"io"
	"os"
	"path/filepath"
	"slices"
	"strings"
	"sync"
	"testing"
	"time"

	"github.com/casnix/casnix/blobs"
	"github.com/casnix/casnix/db"
	"github.com/casnix/casnix/nar"
)

const (
	pathD = "33333333333333333333333333333333-d"
	pathE = "44444444444444444444444444444444-e"
)

func openSmallPacks(t testing.TB) *Store {
	t.Helper()
	st, err := Open(context.Background(), t.TempDir(), Options{Blobs: blobs.Options{PackSize: 4 << 20}})
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { st.Close() })
	return st
}

func gc(t testing.TB, st *Store, o GCOptions) *GCResult {
	t.Helper()
	res, err := st.GC(context.Background(), o)
	if err != nil {
		t.Fatal(err)
	}
	return res
}

func permRoot(t testing.TB, st *Store, name string) string {
	t.Helper()
	link, err := st.AddPermRoot(context.Background(), name, filepath.Join(st.GCRoots(), name))
	if err != nil {
		t.Fatal(err)
	}
	return link
}

func mustVerify(t testing.TB, st *Store) {
	t.Helper()
	rep, err := st.Verify(context.Background(), nil)
	if err != nil {
		t.Fatal(err)
	}
	if !rep.OK() {
		t.Fatalf("verify: chunks %v, paths %v", rep.Chunks, rep.Damaged)
	}
}

func packBytes(t testing.TB, st *Store) int64 {
	t.Helper()
	var n int64
	filepath.Walk(filepath.Join(st.Dir(), PackDir), func(p string, fi os.FileInfo, err error) error {
		if err == nil && !fi.IsDir() {
			n += fi.Size()
		}
		return nil
	})
	return n
}

// TestGCActions runs each action on one store: A (rooted) -> B, C dead,
// D dead -> C; E rooted by --keep only.
func TestGCActions(t *testing.T) {
	type want struct {
		paths []string
		valid []string
		err   error
	}
	tests := []struct {
		name string
		opts GCOptions
		want want
	}{
		{"return-live", GCOptions{Action: GCReturnLive}, want{paths: []string{pathA, pathB}, valid: []string{pathA, pathB, pathC, pathD, pathE}}},
		{"return-live-keep", GCOptions{Action: GCReturnLive, Keep: []string{pathE}}, want{paths: []string{pathA, pathB, pathE}, valid: []string{pathA, pathB, pathC, pathD, pathE}}},
		{"return-dead", GCOptions{Action: GCReturnDead}, want{paths: []string{pathC, pathD, pathE}, valid: []string{pathA, pathB, pathC, pathD, pathE}}},
		{"delete-dead", GCOptions{Action: GCDeleteDead}, want{paths: []string{pathC, pathD, pathE}, valid: []string{pathA, pathB}}},
		{"delete-dead-keep", GCOptions{Action: GCDeleteDead, Keep: []string{pathE}}, want{paths: []string{pathC, pathD}, valid: []string{pathA, pathB, pathE}}},
		{"specific", GCOptions{Action: GCDeleteSpecific, Paths: []string{pathD, pathC}}, want{paths: []string{pathC, pathD}, valid: []string{pathA, pathB, pathE}}},
		{"specific-referred", GCOptions{Action: GCDeleteSpecific, Paths: []string{pathC}}, want{err: ErrAlive, valid: []string{pathA, pathB, pathC, pathD, pathE}}},
		{"specific-live", GCOptions{Action: GCDeleteSpecific, Paths: []string{pathB}}, want{err: ErrAlive, valid: []string{pathA, pathB, pathC, pathD, pathE}}},
		{"specific-ignore-liveness", GCOptions{Action: GCDeleteSpecific, Paths: []string{pathA}, IgnoreLiveness: true}, want{paths: []string{pathA}, valid: []string{pathB, pathC, pathD, pathE}}},
		{"specific-ignore-liveness-referred", GCOptions{Action: GCDeleteSpecific, Paths: []string{pathB}, IgnoreLiveness: true}, want{err: ErrAlive, valid: []string{pathA, pathB, pathC, pathD, pathE}}},
		{"specific-invalid-ignored", GCOptions{Action: GCDeleteSpecific, Paths: []string{"55555555555555555555555555555555-x"}}, want{valid: []string{pathA, pathB, pathC, pathD, pathE}}},
	}
	for _, tc := range tests {
		t.Run(tc.name, func(t *testing.T) {
			st := openSmallPacks(t)
			for _, p := range []struct {
				name string
				refs []string
			}{{pathB, nil}, {pathA, []string{pathB, pathA}}, {pathC, nil}, {pathD, []string{pathC}}, {pathE, nil}} {
				if err := add(t, st, p.name, treeNAR(t, 300<<10), p.refs...); err != nil {
					t.Fatal(err)
				}
			}
			permRoot(t, st, pathA)
			before := map[string][]byte{}
			for _, p := range []string{pathA, pathB, pathC, pathD, pathE} {
				before[p] = render(t, st, p)
			}
			res, err := st.GC(context.Background(), tc.opts)
			if tc.want.err != nil {
				if !errors.Is(err, tc.want.err) {
					t.Fatalf("err = %v, want %v", err, tc.want.err)
				}
			} else if err != nil {
				t.Fatal(err)
			} else if !slices.Equal(res.Paths, tc.want.paths) {
				t.Fatalf("paths = %v, want %v", res.Paths, tc.want.paths)
			}
			all, err := st.All(context.Background())
			if err != nil {
				t.Fatal(err)
			}
			if !slices.Equal(all, tc.want.valid) {
				t.Fatalf("valid = %v, want %v", all, tc.want.valid)
			}
			for _, p := range all {
				if !bytes.Equal(render(t, st, p), before[p]) {
					t.Fatalf("%s renders differently after GC", p)
				}
			}
			for _, p := range []string{pathA, pathB, pathC, pathD, pathE} {
				if !slices.Contains(all, p) {
					if _, err := st.Info(context.Background(), p); !errors.Is(err, ErrNotValid) {
						t.Fatalf("Info(%s) after delete: %v", p, err)
					}
				}
			}
			mustVerify(t, st)
		})
	}
}

// TestGCReclaims: deleting most of the data gives the pack space back,
// and the index holds nothing the remaining paths do not use.
func TestGCReclaims(t *testing.T) {
	st := openSmallPacks(t)
	for _, p := range []string{pathA, pathB, pathC, pathD} {
		if err := add(t, st, p, treeNAR(t, 1<<20)); err != nil {
			t.Fatal(err)
		}
	}
	permRoot(t, st, pathA)
	want := render(t, st, pathA)
	before := packBytes(t, st)
	res := gc(t, st, GCOptions{Action: GCDeleteDead})
	after := packBytes(t, st)
	if res.BytesFreed <= 0 || after > before/2 {
		t.Fatalf("packs %d -> %d bytes, reported freed %d", before, after, res.BytesFreed)
	}
	if res.ExclusiveBytes < 3<<20 {
		t.Fatalf("exclusive bytes %d, want >= 3 MiB (three random 1 MiB paths)", res.ExclusiveBytes)
	}
	if !bytes.Equal(render(t, st, pathA), want) {
		t.Fatal("live path renders differently")
	}
	mustVerify(t, st)
	// A fresh store holding only A has the same index rows (nothing
	// orphaned), packs aside.
	fresh := openStore(t)
	if err := add(t, fresh, pathA, want); err != nil {
		t.Fatal(err)
	}
	got, exp := rowCounts(t, st), rowCounts(t, fresh)
	for _, tbl := range []string{"paths", "directories", "blobs", "chunks", "frames"} {
		if got[tbl] != exp[tbl] {
			t.Errorf("%s: %d rows after GC, %d in a store of the live paths", tbl, got[tbl], exp[tbl])
		}
	}
	// Ids are never reused: a new pack is numbered above every one before.
	maxBefore := maxPackID(t, st)
	if err := add(t, st, pathE, treeNAR(t, 5<<20)); err != nil {
		t.Fatal(err)
	}
	if maxPackID(t, st) <= maxBefore {
		t.Fatal("pack id reused")
	}
}

// TestGCRewritesPartlyDeadFrames: a frame whose chunks are mostly dead is
// recompressed with only its live chunks.
func TestGCRewritesPartlyDeadFrames(t *testing.T) {
	st := openSmallPacks(t)
	small := make([]byte, 20<<10)
	rand.Read(small)
	big := make([]byte, 600<<10)
	rand.Read(big)
	root := filepath.Join(t.TempDir(), "t")
	os.MkdirAll(root, 0o755)
	os.WriteFile(filepath.Join(root, "small"), small, 0o644)
	os.WriteFile(filepath.Join(root, "zbig"), big, 0o644)
	var buf bytes.Buffer
	if _, err := nar.DumpPath(&buf, root); err != nil {
		t.Fatal(err)
	}
	if err := add(t, st, pathA, buf.Bytes()); err != nil {
		t.Fatal(err)
	}
	if err := add(t, st, pathB, fileNAR(string(small))); err != nil {
		t.Fatal(err)
	}
	permRoot(t, st, pathB)
	want := render(t, st, pathB)
	res := gc(t, st, GCOptions{Action: GCDeleteDead})
	if res.Compact.FramesRewritten != 1 {
		t.Fatalf("compaction %+v, want one rewritten frame", res.Compact)
	}
	if !bytes.Equal(render(t, st, pathB), want) {
		t.Fatal("live path renders differently")
	}
	if n := packBytes(t, st); n > 64<<10 {
		t.Fatalf("packs hold %d bytes for a 20 KiB live file", n)
	}
	mustVerify(t, st)
}

func TestGCMaxFreed(t *testing.T) {
	st := openSmallPacks(t)
	// C refers to B refers to A: deleting A first would leave B dangling.
	names := []string{pathA, pathB, pathC, pathD}
	refs := [][]string{nil, {pathA}, {pathB}, nil}
	for i, n := range names {
		if err := add(t, st, n, treeNAR(t, 1<<20), refs[i]...); err != nil {
			t.Fatal(err)
		}
	}
	res := gc(t, st, GCOptions{Action: GCDeleteDead, MaxFreed: 1})
	if len(res.Paths) != 1 || (res.Paths[0] != pathC && res.Paths[0] != pathD) {
		t.Fatalf("max-freed 1 deleted %v, want one path nothing refers to", res.Paths)
	}
	res = gc(t, st, GCOptions{Action: GCDeleteDead, MaxFreed: 1 << 40})
	if len(res.Paths) != 3 {
		t.Fatalf("then deleted %v, want the other three", res.Paths)
	}
	mustVerify(t, st)
}

func TestTempRoots(t *testing.T) {
	st := openSmallPacks(t)
	ctx := context.Background()
	for _, p := range []string{pathA, pathB} {
		if err := add(t, st, p, treeNAR(t, 1000)); err != nil {
			t.Fatal(err)
		}
	}
	tr, err := st.NewTempRoots()
	if err != nil {
		t.Fatal(err)
	}
	if err := tr.Add(ctx, pathA); err != nil {
		t.Fatal(err)
	}
	// A file left by a dead owner (not locked) is removed by the collector.
	stale := filepath.Join(st.Dir(), TempRootsDir, "1-1")
	if err := os.WriteFile(stale, []byte(pathB+"\x00"), 0o644); err != nil {
		t.Fatal(err)
	}
	roots, err := st.Roots(ctx)
	if err != nil {
		t.Fatal(err)
	}
	found := false
	for k, v := range roots {
		found = found || (slices.Equal(v, []string{pathA}) && k != "")
	}
	if !found {
		t.Fatalf("Roots = %v, want the temp root of A", roots)
	}
	res := gc(t, st, GCOptions{Action: GCDeleteDead})
	if !slices.Equal(res.Paths, []string{pathB}) {
		t.Fatalf("deleted %v, want B only", res.Paths)
	}
	if _, err := os.Stat(stale); !os.IsNotExist(err) {
		t.Fatal("dead owner's temp roots survived")
	}
	if err := tr.Close(); err != nil {
		t.Fatal(err)
	}
	res = gc(t, st, GCOptions{Action: GCDeleteDead})
	if !slices.Equal(res.Paths, []string{pathA}) {
		t.Fatalf("after Close deleted %v, want A", res.Paths)
	}
}

func TestIndirectRoots(t *testing.T) {
	st := openSmallPacks(t)
	ctx := context.Background()
	for _, p := range []string{pathA, pathB} {
		if err := add(t, st, p, treeNAR(t, 1000)); err != nil {
			t.Fatal(err)
		}
	}
	link := filepath.Join(t.TempDir(), "result")
	if _, err := st.AddPermRoot(ctx, pathA, link); err != nil {
		t.Fatal(err)
	}
	if target, _ := os.Readlink(link); target != st.Full(pathA) {
		t.Fatalf("link -> %q", target)
	}
	if _, err := st.AddPermRoot(ctx, "66666666666666666666666666666666-gone", link); !errors.Is(err, ErrNotValid) {
		t.Fatalf("root of an invalid path: %v", err)
	}
	roots, _ := st.Roots(ctx)
	if !slices.Equal(roots[link], []string{pathA}) {
		t.Fatalf("Roots = %v", roots)
	}
	res := gc(t, st, GCOptions{Action: GCDeleteDead})
	if !slices.Equal(res.Paths, []string{pathB}) {
		t.Fatalf("deleted %v, want B", res.Paths)
	}
	os.Remove(link)
	res = gc(t, st, GCOptions{Action: GCDeleteDead})
	if !slices.Equal(res.Paths, []string{pathA}) {
		t.Fatalf("after removing the link deleted %v, want A", res.Paths)
	}
	if ents, _ := os.ReadDir(filepath.Join(st.GCRoots(), AutoRootsDir)); len(ents) != 0 {
		t.Fatalf("dangling indirect root kept: %v", ents)
	}
	// A root link that is a regular file is refused.
	file := filepath.Join(t.TempDir(), "file")
	os.WriteFile(file, nil, 0o644)
	if err := add(t, st, pathC, treeNAR(t, 10)); err != nil {
		t.Fatal(err)
	}
	if _, err := st.AddPermRoot(ctx, pathC, file); err == nil {
		t.Fatal("replaced a regular file with a root")
	}
}

// TestReaderSurvivesCompaction: a blob reader opened before its pack is
// compacted away keeps reading the right bytes.
func TestReaderSurvivesCompaction(t *testing.T) {
	st := openSmallPacks(t)
	ctx := context.Background()
	content := make([]byte, 3<<20)
	rand.Read(content)
	if err := add(t, st, pathA, fileNAR(string(content))); err != nil {
		t.Fatal(err)
	}
	if err := add(t, st, pathB, treeNAR(t, 3<<20)); err != nil {
		t.Fatal(err)
	}
	permRoot(t, st, pathA)
	root, err := st.Root(ctx, pathA)
	if err != nil {
		t.Fatal(err)
	}
	br, err := st.OpenBlob(ctx, root.Digest)
	if err != nil {
		t.Fatal(err)
	}
	head := make([]byte, 100)
	if _, err := io.ReadFull(br, head); err != nil {
		t.Fatal(err)
	}
	res := gc(t, st, GCOptions{Action: GCDeleteDead})
	if res.Compact.PacksRemoved == 0 {
		t.Fatalf("nothing compacted: %+v", res.Compact)
	}
	// Drop decoded frames so the reads really go to the packs.
	st.blobs.DropCache()
	rest, err := io.ReadAll(br)
	if err != nil {
		t.Fatal(err)
	}
	if !bytes.Equal(append(head, rest...), content) {
		t.Fatal("content differs after compaction")
	}
}

// TestGCConcurrentWithImports: batches that root what they add (as the
// daemon does with temp roots) lose nothing to collections running beside
// them, and verify stays clean.
func TestGCConcurrentWithImports(t *testing.T) {
	st := openSmallPacks(t)
	ctx := context.Background()
	tr, err := st.NewTempRoots()
	if err != nil {
		t.Fatal(err)
	}
	defer tr.Close()
	shared := treeNAR(t, 200<<10) // dedups across the dead and the new paths
	var wg sync.WaitGroup
	stop := make(chan struct{})
	wg.Add(1)
	go func() {
		defer wg.Done()
		for {
			select {
			case <-stop:
				return
			default:
			}
			if _, err := st.GC(ctx, GCOptions{Action: GCDeleteDead, MinDead: 0.01}); err != nil {
				t.Error(err)
				return
			}
		}
	}()
	var kept []string
	want := map[string][]byte{}
	for i := 0; i < 30; i++ {
		name := fmt.Sprintf("%032d-p", i)
		if err := tr.Add(ctx, name); err != nil {
			t.Fatal(err)
		}
		n := shared
		if i%3 == 0 {
			n = treeNAR(t, 100<<10)
		}
		if err := add(t, st, name, n); err != nil {
			t.Fatal(err)
		}
		// Garbage for the collector, sharing content with rooted paths.
		if err := add(t, st, fmt.Sprintf("%031dz-g", i), shared); err != nil {
			t.Fatal(err)
		}
		kept = append(kept, name)
		want[name] = n
	}
	close(stop)
	wg.Wait()
	for _, n := range kept {
		if !bytes.Equal(render(t, st, n), want[n]) {
			t.Fatalf("%s lost or changed", n)
		}
	}
	mustVerify(t, st)
}

func maxPackID(t testing.TB, st *Store) int64 {
	t.Helper()
	d, err := sql.Open("sqlite", "file:"+filepath.Join(st.Dir(), DBFile)+"?mode=ro")
	if err != nil {
		t.Fatal(err)
	}
	defer d.Close()
	var n int64
	if err := d.QueryRow("SELECT MAX(MAX(id), (SELECT top FROM id_floor WHERE tbl = 'packs')) FROM packs").Scan(&n); err != nil {
		t.Fatal(err)
	}
	return n
}

// TestOtherProcessLetsGoOfCompactedPacks: a second Store on the same data
// directory (as a daemon next to `casnix gc` is) keeps reading right after
// a collection moved its data, and closes its handles on removed packs so
// their space is freed.
func TestOtherProcessLetsGoOfCompactedPacks(t *testing.T) {
	dir := t.TempDir()
	open := func() *Store {
		st, err := Open(context.Background(), dir, Options{Blobs: blobs.Options{PackSize: 4 << 20}})
		if err != nil {
			t.Fatal(err)
		}
		t.Cleanup(func() { st.Close() })
		return st
	}
	// An importer that has exited (a daemon's own free packs are not
	// compacted while it holds them).
	importer := open()
	nA, nB := treeNAR(t, 1<<20), treeNAR(t, 2<<20)
	if err := add(t, importer, pathA, nA); err != nil {
		t.Fatal(err)
	}
	if err := add(t, importer, pathB, nB); err != nil {
		t.Fatal(err)
	}
	importer.Close()
	daemon, collector := open(), open()
	permRoot(t, daemon, pathA)
	if !bytes.Equal(render(t, daemon, pathA), nA) {
		t.Fatal("render before gc")
	}
	res := gc(t, collector, GCOptions{Action: GCDeleteDead})
	if res.Compact.PacksRemoved == 0 {
		t.Fatalf("nothing compacted: %+v", res.Compact)
	}
	daemon.blobs.DropCache()
	if !bytes.Equal(render(t, daemon, pathA), nA) {
		t.Fatal("render after another process compacted")
	}
	deleted := func() []string {
		var out []string
		ents, _ := os.ReadDir("/proc/self/fd")
		for _, e := range ents {
			if l, err := os.Readlink(filepath.Join("/proc/self/fd", e.Name())); err == nil && strings.HasSuffix(l, ".pack (deleted)") {
				out = append(out, l)
			}
		}
		return out
	}
	deadline := time.Now().Add(10 * time.Second)
	for len(deleted()) > 0 {
		if time.Now().After(deadline) {
			t.Fatalf("still open after 10 s: %v", deleted())
		}
		time.Sleep(100 * time.Millisecond)
	}
	mustVerify(t, daemon)
}

// TestCompactionRefusesDamagedFrame: a frame compaction would copy as it
// is (mostly live) but whose data is damaged stops the compaction with
// ErrCorrupt: the damage is not copied into a new pack under a clean
// record header, and the old pack stays for `casnix verify` to name.
func TestCompactionRefusesDamagedFrame(t *testing.T) {
	ctx := context.Background()
	st := openSmallPacks(t)
	if err := add(t, st, pathA, treeNAR(t, 1<<20)); err != nil {
		t.Fatal(err)
	}
	if err := add(t, st, pathB, treeNAR(t, 1<<20)); err != nil {
		t.Fatal(err)
	}
	permRoot(t, st, pathA)
	// A's first frame (A was added first, so it leads the first pack).
	ends, err := st.db.PackEnds(ctx)
	if err != nil {
		t.Fatal(err)
	}
	first := int64(-1)
	for id := range ends {
		if first < 0 || id < first {
			first = id
		}
	}
	var fr db.Frame
	err = st.db.PackFrames(ctx, first, func(f db.Frame, _ []db.ChunkInFrame) error {
		if fr.CLen == 0 {
			fr = f
		}
		return nil
	})
	if err != nil || fr.CLen == 0 {
		t.Fatalf("first frame of pack %d: %+v %v", first, fr, err)
	}
	f, err := os.OpenFile(st.blobs.PackPath(first), os.O_RDWR, 0)
	if err != nil {
		t.Fatal(err)
	}
	b := []byte{0}
	at := fr.DataOff + fr.CLen/2
	f.ReadAt(b, at)
	b[0] ^= 0x5a
	if _, err := f.WriteAt(b, at); err != nil {
		t.Fatal(err)
	}
	f.Close()
	st.blobs.DropCache()
	_, err = st.GC(ctx, GCOptions{Action: GCDeleteDead, MinDead: 0.01})
	if !errors.Is(err, blobs.ErrCorrupt) {
		t.Fatalf("GC over a damaged frame: %v, want ErrCorrupt", err)
	}
	if _, err := os.Stat(st.blobs.PackPath(first)); err != nil {
		t.Errorf("the damaged pack is gone: %v", err)
	}
	rep, err := st.Verify(ctx, nil)
	if err != nil {
		t.Fatal(err)
	}
	if len(rep.Damaged) == 0 || rep.Damaged[0].Name != pathA {
		t.Errorf("verify after the refused compaction: damaged %v, want %s", rep.Damaged, pathA)
	}
}

// nixDB writes a Nix database with Nix's ValidPaths and Refs tables: valid
// lists its paths (full), refs maps a referrer to its references.
func nixDB(t *testing.T, valid []string, refs map[string][]string) string {
	t.Helper()
	path := filepath.Join(t.TempDir(), "db.sqlite")
	d, err := sql.Open("sqlite", "file:"+path)
	if err != nil {
		t.Fatal(err)
	}
	defer d.Close()
	stmts := []string{
		`PRAGMA journal_mode=WAL`,
		`CREATE TABLE ValidPaths (id integer primary key autoincrement not null, path text unique not null,
			hash text not null, registrationTime integer not null, deriver text, narSize integer,
			ultimate integer, sigs text, ca text)`,
		`CREATE TABLE Refs (referrer integer not null, reference integer not null, primary key (referrer, reference))`,
	}
	for _, s := range stmts {
		if _, err := d.Exec(s); err != nil {
			t.Fatal(err)
		}
	}
	for _, p := range valid {
		if _, err := d.Exec(`INSERT INTO ValidPaths (path, hash, registrationTime) VALUES (?, 'sha256:0', 1)`, p); err != nil {
			t.Fatal(err)
		}
	}
	for from, tos := range refs {
		for _, to := range tos {
			if _, err := d.Exec(`INSERT INTO Refs SELECT a.id, b.id FROM ValidPaths a, ValidPaths b WHERE a.path = ? AND b.path = ?`, from, to); err != nil {
				t.Fatal(err)
			}
		}
	}
	return path
}

// TestGCUpperDB: with --upper-db, the lower paths an overlay's upper
// database registers or refers to (and their closures) are kept; the rest
// is deleted; a database that cannot be read fails the collection before
// anything is deleted.
func TestGCUpperDB(t *testing.T) {
	ctx := context.Background()
	st := openStore(t)
	for _, n := range []struct {
		name string
		refs []string
	}{{pathA, nil}, {pathB, []string{pathA}}, {pathC, nil}, {pathD, nil}, {pathE, nil}} {
		if err := add(t, st, n.name, treeNAR(t, 64<<10), n.refs...); err != nil {
			t.Fatal(err)
		}
	}
	full := func(n string) string { return st.Full(n) }
	upperPath := full("99999999999999999999999999999999-app")
	// The overlay built app on B (registering B's row, as Nix does) and
	// holds D as valid; a second overlay refers to C only through Refs.
	up1 := nixDB(t, []string{upperPath, full(pathB), full(pathD)}, map[string][]string{upperPath: {full(pathB)}})
	up2 := nixDB(t, []string{upperPath, full(pathC)}, map[string][]string{upperPath: {full(pathC)}})

	if _, err := st.GC(ctx, GCOptions{Action: GCDeleteDead, UpperDBs: []string{up1, filepath.Join(t.TempDir(), "missing.sqlite")}}); err == nil {
		t.Fatal("GC with an unreadable upper database succeeded")
	}
	if names, _ := st.All(ctx); len(names) != 5 {
		t.Fatalf("a failed GC deleted paths: %q left", names)
	}
	before, _ := st.Deletions()
	res := gc(t, st, GCOptions{Action: GCDeleteDead, UpperDBs: []string{up1, up2}})
	if !slices.Equal(res.Paths, []string{pathE}) {
		t.Errorf("deleted %q, want only E", res.Paths)
	}
	names, _ := st.All(ctx)
	if !slices.Equal(names, []string{pathA, pathB, pathC, pathD}) {
		t.Errorf("left %q, want A (B's reference), B, C, D", names)
	}
	if after, _ := st.Deletions(); after != before+1 {
		t.Errorf("deletions counter %d -> %d, want one more", before, after)
	}
	mustVerify(t, st)
}

// TestUnreadableRootsAreSkipped: a root whose link cannot be read (a client
// registered a path through a regular file, ENOTDIR) is skipped, as Nix's
// findRoots does, instead of failing every later collection.
func TestUnreadableRootsAreSkipped(t *testing.T) {
	st := openSmallPacks(t)
	ctx := context.Background()
	for _, p := range []string{pathA, pathB} {
		if err := add(t, st, p, treeNAR(t, 1000)); err != nil {
			t.Fatal(err)
		}
	}
	permRoot(t, st, pathA)
	file := filepath.Join(t.TempDir(), "file")
	if err := os.WriteFile(file, nil, 0o644); err != nil {
		t.Fatal(err)
	}
	for _, link := range []string{file + "/x", "/etc/passwd/x"} {
		if err := st.AddIndirectRoot(link); err != nil {
			t.Fatalf("AddIndirectRoot(%q): %v", link, err)
		}
	}
	if _, err := st.Roots(ctx); err != nil {
		t.Fatalf("Roots: %v", err)
	}
	res := gc(t, st, GCOptions{Action: GCDeleteDead})
	if !slices.Equal(res.Paths, []string{pathB}) {
		t.Fatalf("deleted %v, want B", res.Paths)
	}
}

// TestAddIndirectRootPath: an indirect root's link must be absolute and is
// canonicalised, as Nix's daemon does (absPath) before addIndirectRoot.
func TestAddIndirectRootPath(t *testing.T) {
	st := openStore(t)
	auto := filepath.Join(st.GCRoots(), AutoRootsDir)
	for _, tc := range []struct {
		link, want string
		ok         bool
	}{
		{"relative/link", "", false},
		{"", "", false},
		{"/tmp/x\x00y", "", false},
		{"/tmp/a/../b//c/.", "/tmp/b/c", true},
		{"/tmp/result", "/tmp/result", true},
	} {
		err := st.AddIndirectRoot(tc.link)
		if (err == nil) != tc.ok {
			t.Fatalf("AddIndirectRoot(%q) = %v, want ok=%v", tc.link, err, tc.ok)
		}
		if !tc.ok {
			continue
		}
		found := false
		ents, _ := os.ReadDir(auto)
		for _, e := range ents {
			if target, _ := os.Readlink(filepath.Join(auto, e.Name())); target == tc.want {
				found = true
			}
		}
		if !found {
			t.Fatalf("AddIndirectRoot(%q): no auto root pointing at %q", tc.link, tc.want)
		}
	}
}

// TestGCListingDoesNotBlockWriters: listing live or dead paths reads a
// snapshot and takes no lock, so it neither waits for an import in
// progress nor holds one off; its answer is that of the snapshot.
func TestGCListingDoesNotBlockWriters(t *testing.T) {
	st := openSmallPacks(t)
	for _, p := range []string{pathA, pathB} {
		if err := add(t, st, p, treeNAR(t, 1000)); err != nil {
			t.Fatal(err)
		}
	}
	permRoot(t, st, pathA)
	// An import in progress holds the GC lock shared until it commits.
	b := st.NewBatch(context.Background())
	if _, err := b.Add(bytes.NewReader(treeNAR(t, 1000)), PathInfo{Name: pathC}); err != nil {
		t.Fatal(err)
	}
	// A collection sweeping in another process holds it exclusively; a
	// listing must not wait for either.
	for _, action := range []GCAction{GCReturnDead, GCReturnLive} {
		ctx, cancel := context.WithTimeout(context.Background(), 2*time.Second)
		res, err := st.GC(ctx, GCOptions{Action: action})
		cancel()
		if err != nil {
			t.Fatalf("%v during an import: %v", action, err)
		}
		want := map[GCAction][]string{GCReturnDead: {pathB}, GCReturnLive: {pathA}}[action]
		if !slices.Equal(res.Paths, want) {
			t.Fatalf("%v = %v, want %v", action, res.Paths, want)
		}
	}
	if _, err := b.Commit(); err != nil {
		t.Fatal(err)
	}
	unlock, err := st.ExclusiveGCLock(context.Background())
	if err != nil {
		t.Fatal(err)
	}
	defer unlock()
	ctx, cancel := context.WithTimeout(context.Background(), 2*time.Second)
	defer cancel()
	res, err := st.GC(ctx, GCOptions{Action: GCReturnDead})
	if err != nil {
		t.Fatalf("return-dead during a sweep: %v", err)
	}
	if !slices.Equal(res.Paths, []string{pathB, pathC}) {
		t.Fatalf("dead = %v, want B, C", res.Paths)
	}
}

// TestVerifyStopsWhenCancelled: a verification started for a client that
// hangs up stops promptly.
func TestVerifyStopsWhenCancelled(t *testing.T) {
	st := openSmallPacks(t)
	for _, p := range []string{pathA, pathB, pathC} {
		if err := add(t, st, p, treeNAR(t, 1<<20)); err != nil {
			t.Fatal(err)
		}
	}
	ctx, cancel := context.WithCancel(context.Background())
	_, err := st.Verify(ctx, func(stage string, done, total int64) {
		if stage == "chunks" {
			cancel()
		}
	})
	if !errors.Is(err, context.Canceled) {
		t.Fatalf("Verify after cancel: %v", err)
	}
}
