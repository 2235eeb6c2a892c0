package blobs

import (
	"fmt"
	"hash/crc32"

	"github.com/casnix/casnix/db"
)

// FrameWriter is a writer that can take a whole stored frame at once. It
// is an alias of an unnamed interface so that package nar names the same
// type without importing blobs.
//
// WriteFrame(raw, stored) writes raw, the decoded content of one stored
// frame, already checked against its chunks' digests; stored is that frame
// as its pack holds it: one complete standard zstd frame (magic number,
// content checksum, written by newEncoder or appendStoredFrame, so a window
// of at most the frame's raw size, 64 MiB at most by pack.MaxFrameBytes and in practice
// 4 MiB from ingest and 16 MiB from repack, under libzstd's default 128 MiB
// limit). A zstd writer may send stored in place of compressing raw; any
// other writer writes raw. It returns len(raw) on success. Neither slice
// may be kept after the call.
type FrameWriter = interface {
	Write(p []byte) (int, error)
	WriteFrame(raw, stored []byte) (int, error)
}

// WriteFramesTo streams the rest of the blob to w like WriteTo, but hands
// every stored frame whose whole content is the next bytes of the blob
// (consecutive chunks of this blob, in order, filling the frame from its
// first byte to its last) to w.WriteFrame with its stored bytes. A frame
// that also holds other bytes (the end of another file, chunks of other
// paths, a chunk this blob does not continue with) goes through w.Write
// chunk by chunk, as WriteTo does.
//
// Integrity: a frame handed over whole is decoded (through the frame
// cache, as every read is) and each of its chunks checked against its
// BLAKE3, so raw is exactly the blob's bytes and the NAR hash check of the
// caller (store.NarRender) covers it. The stored bytes are then read from
// the pack again and must have the CRC-32C of the bytes that were decoded;
// otherwise the read fails with ErrCorrupt, nothing is written, and no
// stored bytes go out that were not the ones checked. (A corruption that
// happened to keep the CRC-32C would still have to pass the frame's own
// XXH64 content checksum, which the client's zstd decoder checks, and the
// client's NarHash check.) This costs a decode per frame, as a plain read
// does, but no compression.
func (br *BlobReader) WriteFramesTo(w FrameWriter) (int64, error) {
	var total int64
	for br.pos < br.size {
		br.ReadAhead(br.pos)
		i := br.chunkAt(br.pos)
		if br.chunks[i].off == br.pos {
			n, ok, err := br.writeFrame(i, w)
			total += n
			br.pos += n
			if err != nil {
				return total, err
			}
			if ok {
				continue
			}
		}
		n, err := br.writeChunk(i, w)
		total += n
		if err != nil {
			return total, err
		}
	}
	return total, nil
}

// wholeFrame returns the frame whose content is exactly chunks i..j-1 of
// the blob, if chunk i starts such a frame (ok false otherwise).
func (br *BlobReader) wholeFrame(i int) (f db.Frame, j int, ok bool, err error) {
	loc, err := br.locate(i)
	if err != nil {
		return f, 0, false, err
	}
	if loc.Off != 0 || loc.Frame.RawLen > br.size-br.chunks[i].off {
		return f, 0, false, nil
	}
	var off int64
	for j = i; j < len(br.chunks) && off < loc.Frame.RawLen; j++ {
		lj, err := br.locate(j)
		if err != nil {
			return f, 0, false, err
		}
		if lj.Frame.ID != loc.Frame.ID || lj.Off != off {
			return f, 0, false, nil
		}
		off += lj.Len
	}
	return loc.Frame, j, off == loc.Frame.RawLen, nil
}

// writeFrame writes the frame starting at chunk i whole, if there is one:
// ok says whether it did (n bytes of the blob); ok false and no error
// means the caller writes chunk i the ordinary way.
func (br *BlobReader) writeFrame(i int, w FrameWriter) (n int64, ok bool, err error) {
	f, j, ok, err := br.wholeFrame(i)
	if err != nil || !ok {
		return 0, false, err
	}
	e, err := br.s.frame(f)
	if err != nil {
		if vanished(err) {
			return 0, false, nil // compacted away: chunkData looks it up again
		}
		return 0, false, err
	}
	defer br.s.cache.release(e)
	for k := i; k < j; k++ {
		c := br.chunks[k]
		if !e.check(c.loc.Off, c.loc.Len, c.digest) {
			return 0, false, fmt.Errorf("%w: chunk %s: the bytes the index points at (pack %d, frame at %d, offset %d) hash differently",
				ErrCorrupt, c.digest, f.Pack, f.Offset, c.loc.Off)
		}
	}
	if f.CLen >= f.RawLen {
		// Stored uncompressed (Options.Store, not repacked yet): sent as
		// it is, a client would download the whole NAR; the writer
		// compresses it as it does the bytes between frames.
		k, err := w.Write(e.data)
		return int64(k), true, err
	}
	stored, err := br.s.storedFrame(f, e.zsum)
	if err != nil {
		if vanished(err) || !e.zsum.ok {
			// The checked decoded bytes are still right, only not
			// available as stored.
			k, err := w.Write(e.data)
			return int64(k), true, err
		}
		return 0, false, err
	}
	defer putBuf(stored)
	k, err := w.WriteFrame(e.data, stored)
	if err == nil && k != len(e.data) {
		err = fmt.Errorf("frame writer took %d of %d bytes", k, len(e.data))
	}
	return int64(k), true, err
}

// errNoSum says a cache entry has no CRC of its compressed bytes.
var errNoSum = fmt.Errorf("frame decoded without a checksum of its stored bytes")

// storedFrame reads frame f's stored (compressed) bytes and checks them
// against z, the CRC-32C of the bytes its cache entry was decoded from. The
// caller gives the buffer back with putBuf.
func (s *Store) storedFrame(f db.Frame, z zsum) ([]byte, error) {
	if !z.ok {
		return nil, errNoSum
	}
	r, err := s.reader(f.Pack)
	if err != nil {
		return nil, err
	}
	comp := getBuf(int(f.CLen))[:f.CLen]
	if _, err := r.ReadAt(comp, f.DataOff); err != nil {
		putBuf(comp)
		return nil, fmt.Errorf("read pack %d offset %d: %w", f.Pack, f.DataOff, err)
	}
	if crc32.Checksum(comp, castagnoli) != z.crc {
		putBuf(comp)
		return nil, fmt.Errorf("%w: pack %d frame at %d: its stored bytes differ from the ones decoded and checked", ErrCorrupt, f.Pack, f.Offset)
	}
	return comp, nil
}
