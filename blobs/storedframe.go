package blobs

import (
	"encoding/binary"
	"time"

	"github.com/cespare/xxhash/v2"
	"golang.org/x/sys/unix"
)

// zstd's frame format (RFC 8878), as much of it as a frame of raw blocks
// needs.
const (
	zstdMagic       = 0xFD2FB528
	rawBlockMax     = 128 << 10 // Block_Maximum_Size
	fhdSingleSeg    = 1 << 5    // Single_Segment_flag: no window descriptor
	fhdChecksum     = 1 << 2    // Content_Checksum_flag
	fhdFCS4         = 2 << 6    // Frame_Content_Size_flag 2: a 4-byte size
	storedHeaderLen = 4 + 1 + 4 // magic, Frame_Header_Descriptor, content size
	storedFrameOver = storedHeaderLen + 4
)

// storedBlocks is how many raw blocks appendStoredFrame writes n bytes in:
// one (empty) for none.
func storedBlocks(n int) int { return max(1, (n+rawBlockMax-1)/rawBlockMax) }

// storedFrameMax bounds the length of appendStoredFrame's frame of n bytes.
func storedFrameMax(n int) int { return n + 3*storedBlocks(n) + storedFrameOver }

// appendStoredHeader appends the frame header of appendStoredFrame's frame
// of n bytes.
func appendStoredHeader(dst []byte, n int) []byte {
	dst = binary.LittleEndian.AppendUint32(dst, zstdMagic)
	dst = append(dst, fhdSingleSeg|fhdChecksum|fhdFCS4)
	return binary.LittleEndian.AppendUint32(dst, uint32(n))
}

// appendBlockHeader appends a Block_Header: Last_Block, Block_Type (0 raw,
// 1 RLE, 2 compressed), Block_Size.
func appendBlockHeader(dst []byte, size int, typ uint32, last bool) []byte {
	h := uint32(size)<<3 | typ<<1
	if last {
		h |= 1
	}
	return append(dst, byte(h), byte(h>>8), byte(h>>16))
}

// blockHeader reads the Block_Header at the start of b (3 bytes or more).
func blockHeader(b []byte) (size int, typ uint32, last bool) {
	h := uint32(b[0]) | uint32(b[1])<<8 | uint32(b[2])<<16
	return int(h >> 3), (h >> 1) & 3, h&1 == 1
}

// appendStoredFrame appends to dst a zstd frame holding src in raw
// (uncompressed) blocks, with its content size and checksum, as
// klauspost's encoder would with a level of its own that does not
// compress: the cheapest frame any zstd decoder (casnix's readers, a Nix
// client reading a stored frame sent as it is) reads, at the cost of a copy
// and an xxhash. Ingest writes these when it is told to store
// (Options.Store) and has room (roomToStore); the repacker compresses them
// later. src is one frame's chunks: at most pack.MaxFrameBytes, so its
// size fits the header's 4-byte field.
func appendStoredFrame(dst, src []byte) []byte {
	dst = appendStoredHeader(dst, len(src))
	rest := src
	for {
		b := rest
		if len(b) > rawBlockMax {
			b = b[:rawBlockMax]
		}
		rest = rest[len(b):]
		dst = appendBlockHeader(dst, len(b), 0, len(rest) == 0)
		dst = append(dst, b...)
		if len(rest) == 0 {
			break
		}
	}
	return binary.LittleEndian.AppendUint32(dst, uint32(xxhash.Sum64(src)))
}

// Store mode needs room: uncompressed data takes up to about three times
// the disk of level 1 until the repack has caught up, and a full disk
// fails writes. So new frames are stored only while the pack directory's
// file system has at least storeMinFree bytes and storeMinShare of itself
// free; below that they are compressed as with Store off. (A small disk —
// the 128 MiB file system of TestFullDisk — is never written uncompressed.)
// (Variables for tests.)
var (
	storeMinFree  float64 = 4 << 30
	storeMinShare         = 0.10
)

// storeCheckEvery is how long one look at the free space holds.
const storeCheckEvery = time.Second

// roomToStore reports whether a new frame may be stored uncompressed now.
func (s *Store) roomToStore() bool {
	now := time.Now().UnixNano()
	if last := s.roomAt.Load(); now-last < int64(storeCheckEvery) && last != 0 {
		return s.room.Load()
	}
	var fs unix.Statfs_t
	ok := false
	if err := unix.Statfs(s.dir, &fs); err == nil {
		free := float64(fs.Bavail) * float64(fs.Bsize)
		size := float64(fs.Blocks) * float64(fs.Bsize)
		ok = free >= storeMinFree && free >= storeMinShare*size
	}
	s.room.Store(ok)
	s.roomAt.Store(now)
	return ok
}
