package blobs

import "sync"

// readAheadBytes is how far past the read position sequential readers
// keep frames decoding: a few frames, so that every core decodes while the
// reader consumes, and less than half the default frame cache, so decoded
// frames are not evicted before they are read.
const readAheadBytes = 16 << 20

// aheadState remembers how far read-ahead has been started, so a reader
// that asks on every call (FUSE does, per 128 KiB request) costs a compare
// until the window has to move, and each frame is handed to a decoder once.
type aheadState struct {
	mu  sync.Mutex
	end int64 // frames covering [.., end) have been started
}

// ReadAhead starts decoding, in the background, the frames holding the
// readAheadBytes after offset off that are not started yet. Sequential
// readers (Read, WriteTo, FUSE through ReadAt) call it as they go; a jump
// elsewhere restarts the window there.
func (br *BlobReader) ReadAhead(off int64) { br.readAhead(off, readAheadBytes) }

// Prefetch starts decoding, in the background, the frames holding the
// blob's first n bytes (readAheadBytes at most), for a caller that reads it
// from the start soon: a NAR render reaching past the file it writes into
// the next ones, so that a path of many small files keeps the decoders busy
// as a big file does. A later ReadAhead from the start continues after
// them, and a frame already started is not decoded again.
func (br *BlobReader) Prefetch(n int64) { br.readAhead(0, min(n, readAheadBytes)) }

// readAhead starts decoding the frames of [off, off+n) not started yet.
func (br *BlobReader) readAhead(off, n int64) {
	if off < 0 || off >= br.size || n <= 0 || len(br.chunks) == 0 {
		return
	}
	end := min(off+n, br.size)
	a := &br.ahead
	a.mu.Lock()
	from := a.end
	if from < off || from > off+2*readAheadBytes {
		// First call, or a seek: start the window here. (Concurrent
		// readers of one file, such as the kernel's parallel FUSE reads,
		// arrive a little out of order: that is no seek.)
		from = off
	}
	if end <= from {
		a.mu.Unlock()
		return
	}
	a.end = end
	a.mu.Unlock()
	last := int64(-1)
	for i := br.chunkAt(from); i < len(br.chunks) && br.chunks[i].off < end; i++ {
		loc, err := br.locate(i)
		if err != nil {
			return // the reader meets the error itself when it gets there
		}
		if loc.ID != last {
			br.s.prefetch(loc.Frame)
			last = loc.ID
		}
	}
}
