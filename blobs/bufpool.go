package blobs

import (
	"math/bits"
	"sync"
	"sync/atomic"
)

// Frame buffers are recycled: each frame needs a raw and a compressed
// buffer of about FrameSize, and allocating them fresh made the garbage
// collector the busiest part of an import.
//
// They are pooled by size class, not in one pool: raw frames, compressed
// frames and a read's stored bytes differ in size, and one pool could hand
// a 60 KiB buffer to a caller needing 4 MiB, which dropped it and made (and
// zeroed) a new one. Between two powers of two there are eight classes, so
// a buffer is at most an eighth larger than asked for. (What cost the
// daemon 4% of its CPU substituting a closure was a buffer each Writer left
// behind, see Writer.addChunk; the classes alone measured no gain.)
var bufPools [64 * 8]sync.Pool

// bufsOut is how many buffers getBuf handed out that putBuf has not taken
// back into a pool: what tests hold Writers to (every buffer a Writer takes
// goes back), counted here because the pools themselves may drop anything
// (the race detector makes sync.Pool drop a quarter of what it is given).
var bufsOut atomic.Int64

// minBufClass is the smallest class size: smaller buffers are not worth a
// pool of their own.
const minBufClass = 4 << 10

// bufClass returns the pool index and the capacity of the class for a
// buffer of at least n bytes.
func bufClass(n int) (int, int) {
	if n <= minBufClass {
		n = minBufClass
	}
	p := bits.Len(uint(n - 1)) // 1<<p >= n > 1<<(p-1)
	step := 1 << (p - 4)       // an eighth of 1<<(p-1)
	k := (n + step - 1) / step // 9..16: the class is k steps
	return p*8 + k - 9, k * step
}

// getBuf returns an empty buffer with room for n bytes.
func getBuf(n int) []byte {
	i, size := bufClass(n)
	bufsOut.Add(1)
	if b, ok := bufPools[i].Get().(*[]byte); ok {
		return (*b)[:0]
	}
	return make([]byte, 0, size)
}

// putBuf gives b back for reuse. Only a buffer of a class's exact capacity
// goes back (one getBuf made that an append then grew is dropped), so every
// buffer in a class has its capacity.
func putBuf(b []byte) {
	if b == nil {
		return
	}
	i, size := bufClass(cap(b))
	if size != cap(b) {
		return
	}
	bufsOut.Add(-1)
	b = b[:0]
	bufPools[i].Put(&b)
}
