package blobs

import (
	"bytes"
	"context"
	"errors"
	"io"
	"io/fs"
	"math/rand"
	"os"
	"path/filepath"
	"sync"
	"testing"

	"github.com/casnix/casnix/db"
	"github.com/casnix/casnix/digest"
)

// readAllBlobs opens ds with OpenMany and reads each whole, checking it
// against want.
func readAllBlobs(t *testing.T, s *Store, ds []digest.Digest, want [][]byte) {
	t.Helper()
	rs, errs, err := s.OpenMany(context.Background(), ds)
	if err != nil {
		t.Fatal(err)
	}
	for i, r := range rs {
		if errs[i] != nil {
			t.Fatalf("blob %d: %v", i, errs[i])
		}
		var buf bytes.Buffer
		if _, err := io.Copy(&buf, r); err != nil {
			t.Fatalf("blob %d: %v", i, err)
		}
		if !bytes.Equal(buf.Bytes(), want[i]) {
			t.Fatalf("blob %d: read other bytes", i)
		}
	}
}

// TestLocCache: blobs read again (one of one chunk, one of many) cost no
// index lookup; a location that went stale in the cache (the chunk moved;
// its old place holds other bytes, or is gone) fails no read, returns no
// other bytes, and is replaced by the index's.
func TestLocCache(t *testing.T) {
	s, d := openBlobs(t, Options{FrameSize: MaxChunk})
	r := rand.New(rand.NewSource(7))
	want := [][]byte{make([]byte, 1000), make([]byte, 1000), make([]byte, 5*MaxChunk)}
	for _, b := range want {
		r.Read(b)
	}
	ds := writeBlobs(t, s, d, want...)

	readAllBlobs(t, s, ds, want)
	before := indexLookups.Load()
	readAllBlobs(t, s, ds, want)
	if n := indexLookups.Load() - before; n != 0 {
		t.Errorf("read again: %d index lookups, want 0", n)
	}
	// Under NoCache (verify's renders) every row comes from the index.
	before = indexLookups.Load()
	rs, errs, err := s.OpenMany(NoCache(context.Background()), ds)
	if err != nil || errs[2] != nil {
		t.Fatal(err, errs)
	}
	if _, err := io.Copy(io.Discard, rs[2]); err != nil {
		t.Fatal(err)
	}
	if n := indexLookups.Load() - before; n < 2 {
		t.Errorf("read under NoCache: %d index lookups, want the blobs' and the chunks'", n)
	}

	locOf := func(dg digest.Digest) *db.ChunkLoc {
		t.Helper()
		l := s.locs.loc(dg)
		if l == nil {
			t.Fatalf("no cached location for %s", dg)
		}
		return l
	}
	good := locOf(ds[0])
	tests := []struct {
		name string
		// stale is what the cache says about blob 0's chunk.
		stale func() *db.ChunkLoc
	}{
		// Blob 1 is as long, in the same frame: the bytes there are another
		// chunk's (as after a repair wrote blob 0's chunk elsewhere and the
		// old place was reused by nothing but other bytes).
		{"other bytes", func() *db.ChunkLoc { return locOf(ds[1]) }},
		// A frame in a pack no longer on disk (compacted away by another
		// process).
		{"pack gone", func() *db.ChunkLoc {
			l := *good
			l.Frame.ID, l.Frame.Pack = 1<<40, 1<<40
			return &l
		}},
	}
	for _, tc := range tests {
		t.Run(tc.name, func(t *testing.T) {
			stale := tc.stale()
			s.locs.putLoc(ds[0], stale)
			readAllBlobs(t, s, ds, want)
			if l := s.locs.loc(ds[0]); l == nil || *l != *good {
				t.Errorf("cached location after the read: %+v, want the index's %+v", l, good)
			}
		})
	}

	// Damage no cache explains: the index's own location holds other
	// bytes. The read fails, as without the cache.
	s.locs.putLoc(ds[0], locOf(ds[1]))
	if err := d.Write(context.Background(), func(tx *db.Tx) error {
		l := locOf(ds[1])
		return tx.MoveChunk(context.Background(), ds[0], l.Frame.ID, l.Off)
	}); err != nil {
		t.Fatal(err)
	}
	br, err := s.Open(context.Background(), ds[0])
	if err != nil {
		t.Fatal(err)
	}
	if _, err := io.ReadAll(br); !errors.Is(err, ErrCorrupt) {
		t.Fatalf("chunk whose index row points at other bytes: %v, want ErrCorrupt", err)
	}
}

// TestLocCacheAcrossProcesses: another process (a second Store on the same
// data dir, as `casnix repack` and `casnix gc` beside a daemon) moves every
// chunk and removes the old packs; the first store's cached locations then
// name packs that are gone, and its reads still return every blob (looking
// the chunks up again), and next time from the cache again.
func TestLocCacheAcrossProcesses(t *testing.T) {
	ctx := context.Background()
	dir := t.TempDir()
	open := func() (*Store, func()) {
		d, err := db.Open(ctx, filepath.Join(dir, "test.db"))
		if err != nil {
			t.Fatal(err)
		}
		s, err := Open(filepath.Join(dir, "packs"), d, Options{FrameSize: MaxChunk, Store: true})
		if err != nil {
			t.Fatal(err)
		}
		var once sync.Once
		done := func() { once.Do(func() { s.Close(); d.Close() }) }
		t.Cleanup(done)
		return s, done
	}
	// The blobs come from a writer that has gone (an import), so that
	// their packs are free to compact.
	s0, close0 := open()
	r := rand.New(rand.NewSource(9))
	var want [][]byte
	for _, n := range []int{3000, 70000, 4 * MaxChunk} {
		b := make([]byte, n)
		r.Read(b)
		want = append(want, b)
	}
	ds := writeBlobs(t, s0, s0.db, want...)
	close0()
	s1, _ := open()
	s2, _ := open()
	readAllBlobs(t, s1, ds, want)
	before, err := s1.db.PackUsage(ctx)
	if err != nil {
		t.Fatal(err)
	}

	repackAll(t, s2, ds)
	if _, err := s2.Compact(ctx, 0); err != nil {
		t.Fatal(err)
	}
	for _, p := range before {
		if _, err := os.Stat(s1.PackPath(p.ID)); !errors.Is(err, fs.ErrNotExist) {
			t.Fatalf("pack %d still on disk after the other store's repack and compaction: %v", p.ID, err)
		}
	}

	// What the first store holds of the old packs goes: decoded frames and
	// (as its sweeper would) the handles of removed files.
	s1.dropFrames()
	s1.readerSweep.Store(0)
	s1.dropDeadReaders()
	n := indexLookups.Load()
	readAllBlobs(t, s1, ds, want)
	if indexLookups.Load() == n {
		t.Fatal("no chunk looked up again: the cached locations were not the stale ones")
	}
	n = indexLookups.Load()
	s1.dropFrames()
	readAllBlobs(t, s1, ds, want)
	if d := indexLookups.Load() - n; d != 0 {
		t.Errorf("read after the relocations: %d index lookups, want 0 (the cache holds the new places)", d)
	}
}
