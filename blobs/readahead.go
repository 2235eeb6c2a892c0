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
func (br *BlobReader) ReadAhead(off int64) {
	if off < 0 || off >= br.size || len(br.chunks) == 0 {
		return
	}
	end := min(off+readAheadBytes, br.size)
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
