package blobs

import (
	"bytes"
	"context"
	"errors"
	"io"
	"math/rand/v2"
	"testing"

	"github.com/casnix/casnix/db"
	"github.com/casnix/casnix/tests/fliptest"

	"github.com/klauspost/compress/zstd"
)

// TestStoredFrame: a frame of raw blocks decodes to its contents with
// klauspost's decoder, checksum and content size checked, at every block
// boundary; a flipped byte of contents fails the checksum.
func TestStoredFrame(t *testing.T) {
	dec, err := zstd.NewReader(nil)
	if err != nil {
		t.Fatal(err)
	}
	defer dec.Close()
	rng := rand.New(rand.NewPCG(1, 2))
	for _, n := range []int{0, 1, 100, rawBlockMax - 1, rawBlockMax, rawBlockMax + 1, 3 * rawBlockMax, 4<<20 + 17} {
		src := make([]byte, n)
		for i := range src {
			src[i] = byte(rng.Uint32())
		}
		frame := appendStoredFrame([]byte("prefix"), src)[len("prefix"):]
		if len(frame) > storedFrameMax(n) || len(frame) < n+13 {
			t.Errorf("%d bytes: frame of %d bytes, storedFrameMax says %d", n, len(frame), storedFrameMax(n))
		}
		got, err := dec.DecodeAll(frame, nil)
		if err != nil || !bytes.Equal(got, src) {
			t.Fatalf("%d bytes: decoded %d bytes, err %v", n, len(got), err)
		}
		// Streaming decode too (the reader's path for a large frame).
		sd, err := zstd.NewReader(bytes.NewReader(frame))
		if err != nil {
			t.Fatal(err)
		}
		var buf bytes.Buffer
		if _, err := buf.ReadFrom(sd); err != nil || !bytes.Equal(buf.Bytes(), src) {
			t.Fatalf("%d bytes: stream decoded %d bytes, err %v", n, buf.Len(), err)
		}
		sd.Close()
		if n > 0 {
			bad := bytes.Clone(frame)
			bad[len(bad)-5] ^= 1 // the last content byte
			if _, err := dec.DecodeAll(bad, nil); err == nil {
				t.Errorf("%d bytes: a flipped content byte decoded without error", n)
			}
		}
	}
}

// frameRecorder is a FrameWriter that counts the stored frames it is given.
type frameRecorder struct {
	bytes.Buffer
	frames int
}

func (f *frameRecorder) WriteFrame(raw, stored []byte) (int, error) {
	f.frames++
	return f.Write(raw)
}

// TestStoreMode: with Options.Store, new frames hold their chunks
// uncompressed (pack bytes at least the raw bytes, every frame not packed)
// and read back whole; WriteFramesTo hands none of them over as stored (a
// client of the HTTP cache would download them uncompressed), but writes
// their bytes; the Repacker then compresses them (packed frames, fewer
// bytes than 0.4 of the raw ones for blobs of four letters), after which whole
// frames go out as stored again. With a bucket, Store is ignored.
func TestStoreMode(t *testing.T) {
	ctx := context.Background()
	defer func(f, sh float64) { storeMinFree, storeMinShare = f, sh }(storeMinFree, storeMinShare)
	storeMinFree, storeMinShare = 0, 0 // whatever the test machine's disk has
	s, d := openBlobs(t, Options{Store: true, FrameSize: MaxChunk})
	rng := rand.New(rand.NewPCG(3, 4))
	var blobs [][]byte
	var raw int64
	for _, n := range []int{1, 100, MinChunk, MaxChunk + 1, 2 << 20} {
		b := make([]byte, n)
		for i := range b {
			b[i] = 'a' + byte(rng.Uint32()%4) // random, 2 bits a byte
		}
		blobs = append(blobs, b)
		raw += int64(n)
	}
	ds := writeBlobs(t, s, d, blobs...)
	frames := func() (n int, clen, rawLen int64, packed int) {
		if err := d.EachFrame(ctx, func(f db.Frame, cs []db.ChunkInFrame) error {
			if len(cs) == 0 {
				return nil // left by the repack, its chunks moved
			}
			n++
			clen += f.CLen
			rawLen += f.RawLen
			if f.Packed {
				packed++
			}
			return nil
		}); err != nil {
			t.Fatal(err)
		}
		return
	}
	readAll := func(stage string) (whole int) {
		for i, dg := range ds {
			br, err := s.Open(ctx, dg)
			if err != nil {
				t.Fatal(err)
			}
			var fr frameRecorder
			if _, err := br.WriteFramesTo(&fr); err != nil || !bytes.Equal(fr.Bytes(), blobs[i]) {
				t.Fatalf("%s: blob %d: WriteFramesTo wrote %d bytes (%v)", stage, i, fr.Len(), err)
			}
			whole += fr.frames
		}
		return whole
	}
	n, clen, rawLen, packed := frames()
	if n == 0 || rawLen == 0 || clen < rawLen || packed != 0 {
		t.Fatalf("stored: %d frames, %d bytes stored for %d raw (blobs %d, deduplicated), %d packed: want uncompressed, none packed", n, clen, rawLen, raw, packed)
	}
	stored := rawLen
	if whole := readAll("stored"); whole != 0 {
		t.Errorf("stored: %d uncompressed frames handed over as stored", whole)
	}
	if dam, err := s.Verify(ctx, nil); err != nil || len(dam) != 0 {
		t.Fatalf("verify stored: %v %v", err, dam)
	}

	repackAll(t, s, ds)
	n, clen, rawLen, packed = frames()
	if packed != n || rawLen != stored || clen > rawLen*4/10 {
		t.Fatalf("repacked: %d of %d frames packed, %d bytes stored for %d raw: want all packed, compressed", packed, n, clen, rawLen)
	}
	if whole := readAll("repacked"); whole == 0 {
		t.Errorf("repacked: no whole frame handed over as stored")
	}
	if dam, err := s.Verify(ctx, nil); err != nil || len(dam) != 0 {
		t.Fatalf("verify repacked: %v %v", err, dam)
	}

	o := Options{Store: true, Remote: struct{ Remote }{}}
	o.defaults()
	if o.Store {
		t.Error("Store kept with a bucket")
	}
}

// TestStoreModeNoRoom: with less free space than Store needs, new frames
// are compressed as with Store off.
func TestStoreModeNoRoom(t *testing.T) {
	ctx := context.Background()
	defer func(f float64) { storeMinFree = f }(storeMinFree)
	storeMinFree = 1 << 62
	s, d := openBlobs(t, Options{Store: true, FrameSize: MaxChunk})
	b := bytes.Repeat([]byte("compressible "), 100000)
	writeBlobs(t, s, d, b)
	var clen, raw int64
	if err := d.EachFrame(ctx, func(f db.Frame, _ []db.ChunkInFrame) error {
		clen += f.CLen
		raw += f.RawLen
		return nil
	}); err != nil {
		t.Fatal(err)
	}
	if raw == 0 || clen*10 > raw {
		t.Fatalf("%d bytes stored for %d raw: want compressed without room to store", clen, raw)
	}
}

// TestStoredContentDamage: a content byte flipped in a stored frame (whose
// content checksum reads do not check: readStoredFrame) is refused by the
// BLAKE3 of the chunk it is in, on every read path, and never returned;
// the bytes before the damaged chunk still read, and verify names the
// damage (it checks the frame's checksum too).
func TestStoredContentDamage(t *testing.T) {
	ctx := context.Background()
	defer func(f, sh float64) { storeMinFree, storeMinShare = f, sh }(storeMinFree, storeMinShare)
	storeMinFree, storeMinShare = 0, 0
	s, d := openBlobs(t, Options{Store: true})
	blob := make([]byte, 1<<20)
	rng := rand.New(rand.NewPCG(7, 8))
	for i := range blob {
		blob[i] = byte(rng.Uint32())
	}
	dg := writeBlobs(t, s, d, blob)[0]
	var frame db.Frame
	if err := d.EachFrame(ctx, func(f db.Frame, cs []db.ChunkInFrame) error {
		if len(cs) > 0 && frame.CLen == 0 {
			frame = f
		}
		return nil
	}); err != nil {
		t.Fatal(err)
	}
	if frame.CLen < frame.RawLen || frame.RawLen < 200<<10 {
		t.Fatalf("frame of %d bytes stored in %d: want a stored frame of more than one block", frame.RawLen, frame.CLen)
	}
	// Byte 150 KiB of the frame's content: in its second raw block, past
	// its first chunk (at least MinChunk long).
	const at = 150 << 10
	if err := fliptest.XorByte(s.PackPath(frame.Pack), frame.DataOff+storedHeaderLen+3*2+at, 0x40); err != nil {
		t.Fatal(err)
	}
	// A fresh store: nothing decoded before the damage in its frame cache.
	s2, err := Open(s.dir, d, Options{Store: true})
	if err != nil {
		t.Fatal(err)
	}
	defer s2.Close()
	if got, ok := readStoredFrame(mustOpen(t, s2.PackPath(frame.Pack)), frame.DataOff, frame.CLen, frame.RawLen, nil, false); !ok || got[at] == blob[at] {
		t.Fatalf("unchecked read: ok %v; want the damaged frame read as stored", ok)
	}
	for _, tc := range []struct {
		name string
		read func(br *BlobReader) ([]byte, error)
	}{
		{"Read", func(br *BlobReader) ([]byte, error) { return io.ReadAll(br) }},
		{"WriteFramesTo", func(br *BlobReader) ([]byte, error) {
			var fr frameRecorder
			_, err := br.WriteFramesTo(&fr)
			return fr.Bytes(), err
		}},
	} {
		br, err := s2.Open(ctx, dg)
		if err != nil {
			t.Fatal(err)
		}
		got, err := tc.read(br)
		if !errors.Is(err, ErrCorrupt) {
			t.Errorf("%s: %v, want ErrCorrupt", tc.name, err)
		}
		if len(got) > at || !bytes.Equal(got, blob[:len(got)]) {
			t.Errorf("%s: returned %d bytes, not all of them the blob's, or past the damage at %d", tc.name, len(got), at)
		}
	}
	damage, err := s2.Verify(ctx, nil)
	if err != nil || len(damage) == 0 {
		t.Fatalf("verify: %v, %d damaged chunks; want the frame's", err, len(damage))
	}
}
