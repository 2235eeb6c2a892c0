package blobs

import "errors"

// View is a range of a blob as slices of the decoded frames in the frame
// cache, handed out without copying (FUSE writes them to the kernel with
// one writev). The frames stay allocated to the view until Release.
type View struct {
	s       *Store
	slices  [][]byte
	entries []*frameEntry
	n       int
}

// View returns the up to n bytes at off (fewer at the end of the blob) as
// a View. The caller must not modify the bytes and must call Release once
// done with them.
func (br *BlobReader) View(off int64, n int) (*View, error) {
	if off < 0 {
		return nil, errors.New("negative offset")
	}
	v := &View{s: br.s}
	end := min(off+int64(n), br.size)
	for off < end {
		i := br.chunkAt(off)
		data, e, err := br.chunkData(i)
		if err != nil {
			v.Release()
			return nil, err
		}
		data = data[off-br.chunks[i].off:]
		data = data[:min(int64(len(data)), end-off)]
		v.add(data, e)
		off += int64(len(data))
	}
	return v, nil
}

// add appends data, a slice of e's frame; a slice that continues the last
// one in the same frame (consecutive chunks of one file usually do) is
// merged into it, so a read is a few slices, not one per chunk.
func (v *View) add(data []byte, e *frameEntry) {
	v.n += len(data)
	if k := len(v.slices) - 1; k >= 0 && v.entries[k] == e && len(data) > 0 {
		last := v.slices[k]
		if cap(last) > len(last) && &last[:len(last)+1][len(last)] == &data[0] {
			v.slices[k] = last[:len(last)+len(data)]
			v.s.cache.release(e) // the view holds this frame already
			return
		}
	}
	v.slices = append(v.slices, data)
	v.entries = append(v.entries, e)
}

// Slices are the view's bytes, in order.
func (v *View) Slices() [][]byte { return v.slices }

// Len is the number of bytes in the view.
func (v *View) Len() int { return v.n }

// CopyTo copies the view's bytes to p (up to len(p)) and returns how many.
func (v *View) CopyTo(p []byte) int {
	k := 0
	for _, s := range v.slices {
		k += copy(p[k:], s)
	}
	return k
}

// Release hands the frames back to the cache; the view's bytes must not be
// used afterwards. Releasing twice is harmless.
func (v *View) Release() {
	for _, e := range v.entries {
		v.s.cache.release(e)
	}
	v.slices, v.entries = nil, nil
}
