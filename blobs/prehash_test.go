package blobs

import (
	"bytes"
	"context"
	"io"
	"math/rand/v2"
	"testing"

	"github.com/casnix/casnix/db"
	"github.com/casnix/casnix/tests/fliptest"
)

// TestPrehash: read-ahead's decoders hash the chunks of the frames they
// decode, so a sequential read finds them checked; a chunk whose pack
// record lists another digest is not marked, and the reader still hashes
// it against the index and returns the right bytes.
func TestPrehash(t *testing.T) {
	s, d := openBlobs(t, Options{FrameSize: MaxChunk, PackSize: 64 << 20})
	rng := rand.New(rand.NewPCG(5, 6))
	data := make([]byte, 6<<20)
	for i := range data {
		data[i] = byte(rng.Uint32() % 7) // compressible: several chunks per frame
	}
	dg := writeBlobs(t, s, d, data)[0]
	ctx := context.Background()
	read := func() []byte {
		t.Helper()
		s.DropCache()
		br, err := s.Open(ctx, dg)
		if err != nil {
			t.Fatal(err)
		}
		var out bytes.Buffer
		if _, err := io.Copy(&out, br); err != nil {
			t.Fatal(err)
		}
		return out.Bytes()
	}
	before := prehashedFrames.Load()
	if got := read(); !bytes.Equal(got, data) {
		t.Fatal("read back other bytes")
	}
	if prehashedFrames.Load() == before {
		t.Fatal("no frame was hashed by the background decoders")
	}

	// Damage the first chunk digest of every record (the CRC then fails:
	// the record is ignored) and read again: same bytes, checked by the
	// reader itself.
	var frames []db.Frame
	if err := d.EachFrame(ctx, func(f db.Frame, _ []db.ChunkInFrame) error {
		frames = append(frames, f)
		return nil
	}); err != nil {
		t.Fatal(err)
	}
	for _, f := range frames {
		// Inside the first entry's digest.
		if err := fliptest.XorByte(s.PackPath(f.Pack), f.Offset+16, 0xff); err != nil {
			t.Fatal(err)
		}
	}
	s.forgetReaders(frames[0].Pack)
	if got := read(); !bytes.Equal(got, data) {
		t.Fatal("read back other bytes after the records were damaged")
	}
}
