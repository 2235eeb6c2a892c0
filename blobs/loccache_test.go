package blobs

import (
	"bytes"
	"context"
	"errors"
	"io"
	"math/rand"
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
