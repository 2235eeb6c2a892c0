package blobs

import (
	"bytes"
	"encoding/binary"
	"math/rand/v2"
	"os"
	"path/filepath"
	"testing"

	"github.com/cespare/xxhash/v2"
	"github.com/klauspost/compress/zstd"

	"github.com/casnix/casnix/blobs/pack"
)

// rawFrameDecoder is a decoder set up as the store's (Open), the reference
// decodeRawFrame must agree with.
func rawFrameDecoder(t testing.TB) *zstd.Decoder {
	dec, err := zstd.NewReader(nil, zstd.WithDecoderConcurrency(1),
		zstd.WithDecoderMaxMemory(pack.MaxFrameBytes), zstd.IgnoreChecksum(false))
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(dec.Close)
	return dec
}

// rleFrame is a frame of the given blocks, each a raw block of its bytes or
// (rle > 0) an RLE block of rle copies of its one byte, with a window
// descriptor and no content size, and its checksum.
func rleFrame(blocks []struct {
	data []byte
	rle  int
}) []byte {
	f := binary.LittleEndian.AppendUint32(nil, zstdMagic)
	f = append(f, fhdChecksum, 0x58) // no Single_Segment: Window_Descriptor 8 MiB
	var content []byte
	for i, b := range blocks {
		size, typ := len(b.data), uint32(0)
		if b.rle > 0 {
			size, typ = b.rle, 1
			content = append(content, bytes.Repeat(b.data, b.rle)...)
		} else {
			content = append(content, b.data...)
		}
		h := uint32(size)<<3 | typ<<1
		if i == len(blocks)-1 {
			h |= 1
		}
		f = append(f, byte(h), byte(h>>8), byte(h>>16))
		f = append(f, b.data...)
	}
	return binary.LittleEndian.AppendUint32(f, uint32(xxhash.Sum64(content)))
}

func TestDecodeRawFrame(t *testing.T) {
	dec := rawFrameDecoder(t)
	rng := rand.New(rand.NewPCG(3, 4))
	random := func(n int) []byte {
		b := make([]byte, n)
		for i := range b {
			b[i] = byte(rng.Uint32())
		}
		return b
	}
	text := bytes.Repeat([]byte("the quick brown fox jumps over the lazy dog "), 30000)
	enc, err := zstd.NewWriter(nil, zstd.WithEncoderLevel(zstd.SpeedFastest), zstd.WithEncoderCRC(true))
	if err != nil {
		t.Fatal(err)
	}
	defer enc.Close()
	stored := appendStoredFrame(nil, random(3*rawBlockMax+5))
	flipped := bytes.Clone(stored)
	flipped[len(flipped)/2] ^= 1
	badSum := bytes.Clone(stored)
	badSum[len(badSum)-1] ^= 1
	wrongSize := bytes.Clone(stored)
	wrongSize[5]++ // Frame_Content_Size one more than the blocks hold
	rle := rleFrame([]struct {
		data []byte
		rle  int
	}{{[]byte("abc"), 0}, {[]byte{'z'}, 70000}, {[]byte("tail"), 0}})
	for _, tc := range []struct {
		name  string
		frame []byte
		max   int64
		fast  bool // decodeRawFrame decodes it (else it leaves it to the decoder)
	}{
		{"stored empty", appendStoredFrame(nil, nil), 0, true},
		{"stored one byte", appendStoredFrame(nil, []byte{7}), 1, true},
		{"stored one block", appendStoredFrame(nil, random(rawBlockMax)), rawBlockMax, true},
		{"stored blocks", stored, pack.MaxFrameBytes, true},
		{"raw and RLE blocks, window descriptor", rle, pack.MaxFrameBytes, true},
		{"compressed (text)", enc.EncodeAll(text, nil), pack.MaxFrameBytes, false},
		{"encoder's frame of random bytes", enc.EncodeAll(random(300<<10), nil), pack.MaxFrameBytes, true}, // incompressible: the encoder writes raw blocks
		{"over max", stored, 3 * rawBlockMax, false},
		{"content byte flipped", flipped, pack.MaxFrameBytes, false},
		{"checksum flipped", badSum, pack.MaxFrameBytes, false},
		{"content size wrong", wrongSize, pack.MaxFrameBytes, false},
		{"cut short", stored[:len(stored)-9], pack.MaxFrameBytes, false},
		{"trailing byte", append(bytes.Clone(stored), 0), pack.MaxFrameBytes, false},
		{"not zstd", []byte("not a zstd frame at all"), pack.MaxFrameBytes, false},
		{"empty input", nil, pack.MaxFrameBytes, false},
	} {
		t.Run(tc.name, func(t *testing.T) {
			got, ok := decodeRawFrame(tc.frame, []byte("keep"), tc.max)
			if ok != tc.fast {
				t.Fatalf("decodeRawFrame ok = %v, want %v", ok, tc.fast)
			}
			want, werr := dec.DecodeAll(tc.frame, nil)
			if !ok {
				if string(got) != "keep" {
					t.Fatalf("a frame left to the decoder changed dst: %q", got[:min(len(got), 16)])
				}
				return
			}
			if werr != nil || !bytes.Equal(got[4:], want) || string(got[:4]) != "keep" {
				t.Fatalf("decoded %d bytes, the decoder %d (err %v)", len(got)-4, len(want), werr)
			}
		})
	}
}

// TestDecodeAllStoredFrames: the store decodes what ingest stored through
// the fast path and everything else through the decoder, with the same
// bytes either way.
func TestDecodeAllMatchesDecoder(t *testing.T) {
	s := &Store{dec: rawFrameDecoder(t)}
	data := bytes.Repeat([]byte("0123456789abcdef"), 100000)
	enc, err := zstd.NewWriter(nil, zstd.WithEncoderLevel(zstd.SpeedFastest))
	if err != nil {
		t.Fatal(err)
	}
	defer enc.Close()
	for _, frame := range [][]byte{appendStoredFrame(nil, data), enc.EncodeAll(data, nil)} {
		got, err := s.decodeAll(frame, make([]byte, 0, len(data)), int64(len(data)))
		if err != nil || !bytes.Equal(got, data) {
			t.Fatalf("decodeAll: %d bytes, err %v", len(got), err)
		}
	}
	if _, err := s.decodeAll([]byte("junk junk junk"), nil, 100); err == nil {
		t.Fatal("decodeAll of junk: no error")
	}
}

// FuzzDecodeRawFrame: whatever the bytes, decodeRawFrame never decodes
// something the zstd decoder would not, nor to other bytes, and stays
// within max.
func FuzzDecodeRawFrame(f *testing.F) {
	f.Add(appendStoredFrame(nil, []byte("hello, world")), int64(100))
	f.Add(appendStoredFrame(nil, bytes.Repeat([]byte{1, 2, 3}, 500)), int64(pack.MaxFrameBytes))
	f.Add(rleFrame([]struct {
		data []byte
		rle  int
	}{{[]byte("x"), 5}, {[]byte("yz"), 0}}), int64(10))
	f.Add([]byte{0x28, 0xb5, 0x2f, 0xfd, 0x00, 0x00, 0x01, 0x00, 0x00}, int64(10))
	dec := rawFrameDecoder(f)
	f.Fuzz(func(t *testing.T, frame []byte, max int64) {
		if max < 0 || max > pack.MaxFrameBytes {
			max = pack.MaxFrameBytes
		}
		got, ok := decodeRawFrame(frame, nil, max)
		if !ok {
			return
		}
		if int64(len(got)) > max {
			t.Fatalf("%d bytes decoded, max %d", len(got), max)
		}
		want, err := dec.DecodeAll(frame, nil)
		if err != nil || !bytes.Equal(got, want) {
			t.Fatalf("decodeRawFrame gave %d bytes, the decoder %d bytes and %v", len(got), len(want), err)
		}
	})
}

// openWritten writes data to path and opens it for the test's duration.
func openWritten(t *testing.T, path string, data []byte) *os.File {
	t.Helper()
	if err := os.WriteFile(path, data, 0o644); err != nil {
		t.Fatal(err)
	}
	return mustOpen(t, path)
}

// mustOpen opens path for the test's duration.
func mustOpen(t *testing.T, path string) *os.File {
	t.Helper()
	f, err := os.Open(path)
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { f.Close() })
	return f
}

// TestReadStoredFrame: stored frames read into place from a pack file are
// their content; damage to a frame's layout, or a frame of another layout,
// leaves it to decodeAll, and so does damage to its content or checksum
// when the checksum is checked (verify). Unchecked, damaged content is read
// as stored: readers refuse it by its chunks' BLAKE3
// (TestReadsNeverReturnWrongBytes, TestStoredContentDamage).
func TestReadStoredFrame(t *testing.T) {
	rng := rand.New(rand.NewPCG(5, 6))
	path := filepath.Join(t.TempDir(), "pack")
	var file []byte
	type frame struct {
		off, clen int64
		content   []byte
	}
	var frames []frame
	for _, n := range []int{0, 1, rawBlockMax - 1, rawBlockMax, rawBlockMax + 1, 4<<20 + 17} {
		c := make([]byte, n)
		for i := range c {
			c[i] = byte(rng.Uint32())
		}
		off := int64(len(file) + 7)
		file = append(file, "record."...)
		file = appendStoredFrame(file, c)
		frames = append(frames, frame{off, int64(len(file)) - off, c})
	}
	f := openWritten(t, path, file)
	for _, fr := range frames {
		for _, sum := range []bool{false, true} {
			got, ok := readStoredFrame(f, fr.off, fr.clen, int64(len(fr.content)), make([]byte, 0, len(fr.content)), sum)
			if !ok || !bytes.Equal(got, fr.content) {
				t.Fatalf("%d bytes, sum %v: ok %v, %d bytes read", len(fr.content), sum, ok, len(got))
			}
			if _, ok := readStoredFrame(f, fr.off, fr.clen+1, int64(len(fr.content)), nil, sum); ok {
				t.Fatalf("%d bytes, sum %v: read with a length that is not a stored frame's", len(fr.content), sum)
			}
		}
	}
	last := frames[len(frames)-1]
	for _, tc := range []struct {
		name string
		at   int64 // offset in the frame of the byte flipped
		// sumOnly: only the content checksum tells; unchecked, the frame
		// reads as stored.
		sumOnly bool
	}{
		{"magic", 0, false},
		{"frame header", 4, false},
		{"content size", 5, false},
		{"first block header", 9, false},
		{"content", 9 + 3 + 1000, true},
		{"second block header", 9 + 3 + rawBlockMax, false},
		{"checksum", last.clen - 1, true},
	} {
		t.Run(tc.name, func(t *testing.T) {
			bad := bytes.Clone(file)
			bad[last.off+tc.at] ^= 0x10
			bf := openWritten(t, filepath.Join(t.TempDir(), "bad"), bad)
			if _, ok := readStoredFrame(bf, last.off, last.clen, int64(len(last.content)), nil, true); ok {
				t.Fatal("a damaged frame read as good with its checksum checked")
			}
			got, ok := readStoredFrame(bf, last.off, last.clen, int64(len(last.content)), nil, false)
			if ok != tc.sumOnly {
				t.Fatalf("unchecked: read %v, want %v", ok, tc.sumOnly)
			}
			if ok {
				// As stored: the content byte flipped (or, for the
				// checksum, not at all).
				want := bytes.Clone(last.content)
				if tc.name == "content" {
					want[1000] ^= 0x10
				}
				if !bytes.Equal(got, want) {
					t.Fatal("unchecked read is not the frame's content as stored")
				}
			}
		})
	}
	// Cut short: the file ends inside the frame.
	if err := os.Truncate(path, last.off+last.clen-2); err != nil {
		t.Fatal(err)
	}
	if _, ok := readStoredFrame(f, last.off, last.clen, int64(len(last.content)), nil, false); ok {
		t.Fatal("a frame cut short read as good")
	}
}
