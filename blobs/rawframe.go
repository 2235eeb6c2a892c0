package blobs

import (
	"bytes"
	"encoding/binary"
	"os"
	"slices"

	"github.com/cespare/xxhash/v2"
	"golang.org/x/sys/unix"

	"github.com/casnix/casnix/blobs/pack"
)

// decodeAll decodes the zstd frame src, of at most max content bytes,
// into dst[:0]: a frame of raw and RLE blocks only (what store mode writes:
// appendStoredFrame) by copying its blocks out, anything else by the zstd
// decoder. klauspost's decoder copies every raw block into its window and
// out again: in a CPU profile of NarFromPath over stored frames
// (bench/narfrom.sh) that copy was 2.57 of 12.7 CPU seconds, more than
// hashing the NAR.
func (s *Store) decodeAll(src, dst []byte, max int64) ([]byte, error) {
	if out, ok := decodeRawFrame(src, dst[:0], max); ok {
		return out, nil
	}
	return s.dec.DecodeAll(src, dst[:0])
}

// decodeRawFrame appends the content of the zstd frame src to dst, if src
// is exactly one frame (RFC 8878) without a dictionary whose blocks are all
// raw or RLE, whose content is at most max bytes, and whose content size and
// checksum (where it has them) match. Anything else (a compressed block, a
// malformed or damaged frame) reports false, leaving it to the real decoder
// to decode or to say what is wrong with it. The blocks' headers are read
// first, so a frame with a compressed block costs no copy.
func decodeRawFrame(src, dst []byte, max int64) ([]byte, bool) {
	if len(src) < 6 || binary.LittleEndian.Uint32(src) != zstdMagic {
		return dst, false
	}
	fhd := src[4]
	p := 5
	if fhd&(1<<3) != 0 || fhd&3 != 0 {
		return dst, false // reserved bit, or a dictionary ID
	}
	single := fhd&fhdSingleSeg != 0
	blockMax := rawBlockMax // Block_Maximum_Size: min(Window_Size, 128 KiB)
	if !single {
		wd := src[p]
		p++
		base := int64(1) << (10 + wd>>3)
		window := base + base/8*int64(wd&7)
		if window > pack.MaxFrameBytes { // more than the store's decoder allows
			return dst, false
		}
		blockMax = int(min(int64(blockMax), window))
	}
	fcsLen := [4]int{0, 2, 4, 8}[fhd>>6]
	if fhd>>6 == 0 && single {
		fcsLen = 1
	}
	if len(src) < p+fcsLen {
		return dst, false
	}
	fcs := uint64(1<<63 - 1) // none
	switch fcsLen {
	case 1:
		fcs = uint64(src[p])
	case 2:
		fcs = uint64(binary.LittleEndian.Uint16(src[p:])) + 256
	case 4:
		fcs = uint64(binary.LittleEndian.Uint32(src[p:]))
	case 8:
		fcs = binary.LittleEndian.Uint64(src[p:])
	}
	if fcsLen > 0 && fcs > uint64(max) {
		return dst, false
	}
	p += fcsLen
	body := p
	// The blocks' headers: all raw or RLE, within src and max.
	var n int64
	for {
		if len(src) < p+3 {
			return dst, false
		}
		size, typ, last := blockHeader(src[p:])
		p += 3
		if size > blockMax {
			return dst, false
		}
		switch typ {
		case 0: // Raw_Block
			p += size
		case 1: // RLE_Block
			p++
		default: // a compressed block (or a reserved type)
			return dst, false
		}
		if n += int64(size); p > len(src) || n > max {
			return dst, false
		}
		if last {
			break
		}
	}
	if fcsLen > 0 && uint64(n) != fcs {
		return dst, false
	}
	end := p
	if fhd&fhdChecksum != 0 {
		end += 4
	}
	if end != len(src) {
		return dst, false // cut short, or more after the frame: the decoder's to read
	}
	start := len(dst)
	dst = slices.Grow(dst, int(n))
	for p = body; ; {
		size, typ, last := blockHeader(src[p:])
		p += 3
		if typ == 0 {
			dst = append(dst, src[p:p+size]...)
			p += size
		} else {
			o := len(dst)
			dst = dst[:o+size]
			for i := range dst[o:] {
				dst[o+i] = src[p]
			}
			p++
		}
		if last {
			break
		}
	}
	if fhd&fhdChecksum != 0 && binary.LittleEndian.Uint32(src[p:]) != uint32(xxhash.Sum64(dst[start:])) {
		return dst[:start], false
	}
	return dst, true
}

// preadvMax is how many buffers one preadv takes (Linux's IOV_MAX).
const preadvMax = 1024

// readStoredFrame reads the frame of rawLen content bytes at off in the
// pack file f, if it is laid out as appendStoredFrame writes one (its
// length, clen, says so), straight into dst[:0]: one preadv puts each raw
// block's bytes where they belong in dst and the headers between them
// aside, which are then checked to be exactly appendStoredFrame's. So a
// stored frame costs the kernel's copy out of the page cache, not a copy
// of the stored bytes and another out of them. false: not such a frame (or
// a short read, or damage to its layout), for decodeAll to read, decode or
// report.
//
// The frame's XXH64 content checksum is checked only with sum (casnix
// verify). Every other reader checks each chunk it takes from the frame
// against its BLAKE3 before any of its bytes leave the store (a read, a
// NAR render, compaction, repack: frameEntry.check, digest.Sum), and a
// frame's content is its chunks, so a damaged content byte is reported
// there, as ErrCorrupt, and never returned; the xxhash over the whole frame
// on top was 7.5% of NarFromPath's CPU over stored frames (a perf profile
// of bench/daemon.sh's 1 GiB NAR).
func readStoredFrame(f *os.File, off, clen, rawLen int64, dst []byte, sum bool) ([]byte, bool) {
	n := int(rawLen)
	if rawLen < 0 || rawLen > pack.MaxFrameBytes || clen != int64(storedFrameMax(n)) {
		return dst, false
	}
	blocks := storedBlocks(n)
	if 2*blocks+2 > preadvMax {
		return dst, false
	}
	// want: the headers appendStoredFrame writes, checksum aside; heads:
	// where the read puts the frame's.
	want := appendStoredHeader(make([]byte, 0, storedHeaderLen+3*blocks), n)
	for b := range blocks {
		want = appendBlockHeader(want, min(n, (b+1)*rawBlockMax)-b*rawBlockMax, 0, b == blocks-1)
	}
	heads := make([]byte, len(want)+4)
	dst = slices.Grow(dst[:0], n)[:n]
	iovs := make([][]byte, 0, 2*blocks+2)
	iovs = append(iovs, heads[:storedHeaderLen])
	for b := range blocks {
		h := storedHeaderLen + 3*b
		iovs = append(iovs, heads[h:h+3], dst[b*rawBlockMax:min(n, (b+1)*rawBlockMax)])
	}
	iovs = append(iovs, heads[len(want):])
	rc, err := f.SyscallConn()
	if err != nil {
		return dst[:0], false
	}
	var got int
	var rerr error
	if err := rc.Read(func(fd uintptr) bool {
		got, rerr = unix.Preadv(int(fd), iovs, off)
		return true
	}); err != nil || rerr != nil || int64(got) != clen {
		return dst[:0], false
	}
	if !bytes.Equal(heads[:len(want)], want) {
		return dst[:0], false
	}
	if sum && binary.LittleEndian.Uint32(heads[len(want):]) != uint32(xxhash.Sum64(dst)) {
		return dst[:0], false
	}
	return dst, true
}
