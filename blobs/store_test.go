package blobs

import (
	"bytes"
	"context"
	"io"
	"math/rand"
	"os"
	"path/filepath"
	"slices"
	"testing"

	"github.com/casnix/casnix/db"
	"github.com/casnix/casnix/digest"
)

func openBlobs(t testing.TB, opts Options) (*Store, *db.DB) {
	t.Helper()
	dir := t.TempDir()
	d, err := db.Open(context.Background(), filepath.Join(dir, "test.db"))
	if err != nil {
		t.Fatal(err)
	}
	s, err := Open(filepath.Join(dir, "packs"), d, opts)
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { s.Close(); d.Close() })
	return s, d
}

// writeBlobs stores blobs in one Writer and commits.
func writeBlobs(t testing.TB, s *Store, d *db.DB, blobs ...[]byte) []digest.Digest {
	t.Helper()
	_, out := writeBlobsWith(t, s, d, blobs...)
	return out
}

// writeBlobsWith is writeBlobs that also returns the Writer, done with,
// for its counts.
func writeBlobsWith(t testing.TB, s *Store, d *db.DB, blobs ...[]byte) (*Writer, []digest.Digest) {
	t.Helper()
	ctx := context.Background()
	w := s.NewWriter(ctx)
	defer w.Done()
	var out []digest.Digest
	for _, b := range blobs {
		dg, err := w.WriteBlob(bytes.NewReader(b), int64(len(b)))
		if err != nil {
			t.Fatal(err)
		}
		if dg != digest.Sum(b) {
			t.Fatalf("blob digest %s, want BLAKE3 of the contents %s", dg, digest.Sum(b))
		}
		out = append(out, dg)
	}
	if err := w.Flush(); err != nil {
		t.Fatal(err)
	}
	if err := d.Write(ctx, func(tx *db.Tx) error { return w.Commit(ctx, tx) }); err != nil {
		t.Fatal(err)
	}
	w.Committed()
	return w, out
}

// repackAll rewrites blobs ds into packed frames of MaxChunk raw bytes
// with one Repacker.
func repackAll(t testing.TB, s *Store, ds []digest.Digest) {
	t.Helper()
	rp, err := s.NewRepacker(context.Background(), RepackOptions{FrameSize: MaxChunk})
	if err != nil {
		t.Fatal(err)
	}
	if err := rp.Add(ds); err != nil {
		t.Fatal(err)
	}
	if _, err := rp.Finish(); err != nil {
		t.Fatal(err)
	}
}

func TestWriteRead(t *testing.T) {
	// Small frames and packs so one test crosses frame and pack boundaries.
	s, d := openBlobs(t, Options{FrameSize: MaxChunk, PackSize: 1 << 20})
	r := rand.New(rand.NewSource(1))
	var blobs [][]byte
	for _, n := range []int{0, 1, 100, MinChunk, MaxChunk + 1, 3 << 20} {
		b := make([]byte, n)
		r.Read(b[:n/2]) // half random, half zeros: compressible
		blobs = append(blobs, b)
	}
	ds := writeBlobs(t, s, d, blobs...)
	ctx := context.Background()
	for i, dg := range ds {
		br, err := s.Open(ctx, dg)
		if err != nil {
			t.Fatal(err)
		}
		got, err := io.ReadAll(br)
		if err != nil || !bytes.Equal(got, blobs[i]) {
			t.Fatalf("blob %d: Read differs (%v)", i, err)
		}
		// Random access.
		for j := 0; j < 20 && len(blobs[i]) > 0; j++ {
			off := r.Intn(len(blobs[i]))
			n := r.Intn(len(blobs[i]) - off + 1)
			buf := make([]byte, n)
			k, err := br.ReadAt(buf, int64(off))
			if k != n || (err != nil && err != io.EOF) || !bytes.Equal(buf, blobs[i][off:off+n]) {
				t.Fatalf("blob %d ReadAt(%d, %d) = %d, %v", i, off, n, k, err)
			}
		}
	}
	packs, _ := filepath.Glob(filepath.Join(s.dir, "*", "*.pack"))
	if len(packs) < 2 {
		t.Fatalf("expected pack rotation, got %d packs", len(packs))
	}
	dam, err := s.Verify(ctx, nil)
	if err != nil || len(dam) != 0 {
		t.Fatalf("verify: %v %v", err, dam)
	}
}

// TestAbortTrimsTail: an uncommitted Writer's bytes are cut off before the
// pack is appended to again, and never become readable.
func TestAbortTrimsTail(t *testing.T) {
	s, d := openBlobs(t, Options{})
	ctx := context.Background()
	first := writeBlobs(t, s, d, bytes.Repeat([]byte("a"), 100<<10))
	packs, _ := filepath.Glob(filepath.Join(s.dir, "*", "*.pack"))
	st0, _ := os.Stat(packs[0])

	w := s.NewWriter(ctx)
	junk := make([]byte, 1<<20)
	rand.Read(junk)
	lost, err := w.WriteBlob(bytes.NewReader(junk), int64(len(junk)))
	if err != nil {
		t.Fatal(err)
	}
	if err := w.Flush(); err != nil {
		t.Fatal(err)
	}
	w.Done() // never committed
	st1, _ := os.Stat(packs[0])
	if st1.Size() <= st0.Size() {
		t.Fatal("abandoned writer wrote nothing?")
	}
	if _, err := s.Open(ctx, lost); err == nil {
		t.Fatal("uncommitted blob is readable")
	}
	writeBlobs(t, s, d, []byte("next"))
	st2, _ := os.Stat(packs[0])
	if st2.Size() >= st1.Size() {
		t.Fatalf("tail not trimmed: %d -> %d", st1.Size(), st2.Size())
	}
	br, err := s.Open(ctx, first[0])
	if err != nil {
		t.Fatal(err)
	}
	if got, _ := io.ReadAll(br); !bytes.Equal(got, bytes.Repeat([]byte("a"), 100<<10)) {
		t.Fatal("committed blob damaged")
	}
}

func TestFrameCacheBounded(t *testing.T) {
	c := newFrameCache(3 << 20)
	for i := int64(0); i < 10; i++ {
		e, fill := c.get(i)
		if !fill {
			t.Fatal("new id not filled")
		}
		e.data = make([]byte, 1<<20)
		c.done(e)
	}
	if c.size > 3<<20 || c.lru.Len() > 3 {
		t.Fatalf("cache holds %d bytes in %d entries", c.size, c.lru.Len())
	}
	if _, fill := c.get(9); fill {
		t.Fatal("most recent entry evicted")
	}
}

// TestNewPackDirSynced: the first pack in a new packs/NN/ syncs packs/ too,
// so a crash cannot lose the NN/ entry of a committed pack.
func TestNewPackDirSynced(t *testing.T) {
	var synced []string
	orig := syncDir
	syncDir = func(dir string) error {
		synced = append(synced, dir)
		return orig(dir)
	}
	t.Cleanup(func() { syncDir = orig })
	s, d := openBlobs(t, Options{})
	writeBlobs(t, s, d, []byte("hello"))
	packs, _ := filepath.Glob(filepath.Join(s.dir, "*", "*.pack"))
	if len(packs) != 1 {
		t.Fatalf("packs %v", packs)
	}
	for _, want := range []string{s.dir, filepath.Dir(packs[0])} {
		if !slices.Contains(synced, want) {
			t.Fatalf("synced %q, want %q among them", synced, want)
		}
	}
}

// TestNewPackTakenByReuser: a pack's row commits before its file exists, so
// a writer scanning for packs to reuse can open and lock a new pack before
// its creator does (CI: TestConcurrentCopies' "lock new pack 1: resource
// temporarily unavailable" refused a client's upload). The creator must
// take another pack, not fail the write.
func TestNewPackTakenByReuser(t *testing.T) {
	s, d := openBlobs(t, Options{})
	ctx := context.Background()
	var taken *packFile
	orig := afterPackCreate
	afterPackCreate = func(id int64) {
		if taken != nil {
			return
		}
		p, err := s.tryReuse(ctx, id)
		if err != nil || p == nil {
			t.Errorf("reuse of new pack %d: %v %v, want it taken", id, p, err)
			return
		}
		taken = p
	}
	t.Cleanup(func() { afterPackCreate = orig })
	dg := writeBlobs(t, s, d, []byte("hello"))[0]
	if taken == nil {
		t.Fatal("the hook took no pack")
	}
	defer taken.f.Close()
	if n, err := d.PackChunkCount(ctx, taken.id); err != nil || n != 0 {
		t.Fatalf("pack %d, which another writer holds, has %d chunks (%v), want 0", taken.id, n, err)
	}
	if got, err := readBlob(s, dg); err != nil || string(got) != "hello" {
		t.Fatalf("read %q, %v", got, err)
	}
	if dam, err := s.Verify(ctx, nil); err != nil || len(dam) != 0 {
		t.Fatalf("verify: %v %v", err, dam)
	}
}

// TestCompactBesideNewPack: a compaction running while a writer creates a
// pack (its row committed, its file not made yet, or made but not locked)
// leaves that pack alone; it dropped the row as an abandoned allocation, and
// the writer's commit then failed on the frame's foreign key (CI:
// store.TestGCConcurrentWithImports, "insert frame: FOREIGN KEY constraint
// failed").
func TestCompactBesideNewPack(t *testing.T) {
	for _, at := range []string{"row", "file"} {
		t.Run(at, func(t *testing.T) {
			s, d := openBlobs(t, Options{})
			ctx := context.Background()
			var stats []CompactStats
			compact := func(id int64) {
				st, err := s.Compact(ctx, 0.01)
				if err != nil {
					t.Errorf("compact beside new pack %d: %v", id, err)
				}
				stats = append(stats, st)
			}
			origRow, origCreate := afterPackRow, afterPackCreate
			t.Cleanup(func() { afterPackRow, afterPackCreate = origRow, origCreate })
			if at == "row" {
				afterPackRow = compact
			} else {
				afterPackCreate = compact
			}
			dg := writeBlobs(t, s, d, []byte("hello"))[0]
			afterPackRow, afterPackCreate = origRow, origCreate
			if len(stats) == 0 || stats[0].Skipped == 0 {
				t.Fatalf("compactions %+v, want the new pack skipped", stats)
			}
			if got, err := readBlob(s, dg); err != nil || string(got) != "hello" {
				t.Fatalf("read %q, %v", got, err)
			}
			if dam, err := s.Verify(ctx, nil); err != nil || len(dam) != 0 {
				t.Fatalf("verify: %v %v", err, dam)
			}
		})
	}
}

// TestCompactKeepsPacksInUse checks that the packs a compaction takes from this
// process's free list are written to again afterwards. Compact closes them so they can
// be compacted too; when only the first writer after it looked for a pack to reuse,
// every collection followed by concurrent writers left packs behind that nothing wrote
// to again: a daemon under GC and concurrent uploads made a new pack per writer per
// collection, and kept a descriptor open on each (TestClientDisconnects: 25 to 94 fds
// over 3000 trials).
func TestCompactKeepsPacksInUse(t *testing.T) {
	const writers, rounds = 3, 6
	s, d := openBlobs(t, Options{})
	ctx := context.Background()
	r := rand.New(rand.NewSource(1))
	for round := range rounds {
		// writers Writers at once, each holding its pack until all have written.
		ws := make([]*Writer, writers)
		for i := range ws {
			ws[i] = s.NewWriter(ctx)
			b := make([]byte, 4<<10)
			r.Read(b)
			if _, err := ws[i].WriteBlob(bytes.NewReader(b), int64(len(b))); err != nil {
				t.Fatal(err)
			}
			if err := ws[i].Flush(); err != nil {
				t.Fatal(err)
			}
		}
		for _, w := range ws {
			if err := d.Write(ctx, func(tx *db.Tx) error { return w.Commit(ctx, tx) }); err != nil {
				t.Fatal(err)
			}
			w.Done()
		}
		// Nothing is dead, so nothing is rewritten: the compaction only takes the
		// free packs and hands them back.
		if _, err := s.Compact(ctx, 0.5); err != nil {
			t.Fatal(err)
		}
		ids, err := d.Packs(ctx)
		if err != nil {
			t.Fatal(err)
		}
		if len(ids) > writers {
			t.Fatalf("round %d: %d packs for %d concurrent writers: packs a compaction closed were not written to again", round, len(ids), writers)
		}
	}
}
