// Package hashbehind feeds a hash on a goroutine of its own, a few buffers
// behind its writer, so that hashing a stream runs beside the work that
// produces or consumes it instead of in line with it.
package hashbehind

import (
	"hash"
	"sync"
)

// Hasher feeds a hash on a goroutine of its own, a few buffers behind the
// writer. SHA-256 runs at about 1 GB/s on one of this machine's cores: in
// line with a NAR's render (the SHA-256 check of what NarRender sends) or
// its ingest (the NAR hash of an upload), it was an eighth of the
// goroutine every byte passes through; behind, it runs on another core. What it hashes is a copy, so the caller may reuse what it
// wrote at once; it waits only while hashBehindBufs buffers are in flight,
// which bounds its memory per render. A NAR that fits one buffer (most
// paths) is hashed on the caller's goroutine by Sum, with no goroutine.
type Hasher struct {
	h    hash.Hash
	cur  []byte      // the buffer being filled (len: bytes in it)
	work chan []byte // filled buffers for the hashing goroutine; nil until the first
	free chan []byte // buffers the goroutine is done with
	done chan struct{}
	held int // buffers taken from hashBufs
}

const (
	hashBehindBuf  = 256 << 10
	hashBehindBufs = 4
)

var hashBufs = sync.Pool{New: func() any { return new([hashBehindBuf]byte) }}

// New returns a Hasher feeding h.
func New(h hash.Hash) *Hasher { return &Hasher{h: h} }

// Write copies p for the hash. It never fails.
func (hb *Hasher) Write(p []byte) (int, error) {
	written := len(p)
	for len(p) > 0 {
		if hb.cur == nil {
			hb.cur = hb.buffer()
		}
		n := copy(hb.cur[len(hb.cur):cap(hb.cur)], p)
		hb.cur = hb.cur[:len(hb.cur)+n]
		p = p[n:]
		if len(hb.cur) == cap(hb.cur) {
			hb.send()
		}
	}
	return written, nil
}

// buffer returns an empty buffer: a new one while fewer than hashBehindBufs
// are held, else the next one the goroutine is done with.
func (hb *Hasher) buffer() []byte {
	if hb.held < hashBehindBufs {
		select {
		case b := <-hb.free:
			return b[:0]
		default:
		}
		hb.held++
		return hashBufs.Get().(*[hashBehindBuf]byte)[:0]
	}
	return (<-hb.free)[:0]
}

func (hb *Hasher) send() {
	if hb.work == nil {
		hb.work = make(chan []byte, hashBehindBufs)
		hb.free = make(chan []byte, hashBehindBufs)
		hb.done = make(chan struct{})
		go func() {
			defer close(hb.done)
			for b := range hb.work {
				hb.h.Write(b)
				hb.free <- b
			}
		}()
	}
	hb.work <- hb.cur
	hb.cur = nil
}

// Sum hashes what is left, waits for the goroutine and appends the hash to
// b. The Hasher is done with after it (and after Close).
func (hb *Hasher) Sum(b []byte) []byte {
	hb.Close()
	return hb.h.Sum(b)
}

// Close stops the goroutine and gives the buffers back; what was written is
// all hashed (Sum then reads the hash). It may be called more than once.
func (hb *Hasher) Close() {
	if hb.work != nil {
		close(hb.work)
		<-hb.done
		hb.work = nil
	}
	if hb.cur != nil {
		hb.h.Write(hb.cur)
		hb.put(hb.cur)
		hb.cur = nil
		hb.held--
	}
	for ; hb.held > 0; hb.held-- {
		hb.put(<-hb.free) // every other buffer is back in free once the goroutine is done
	}
}

func (hb *Hasher) put(b []byte) {
	hashBufs.Put((*[hashBehindBuf]byte)(b[:hashBehindBuf]))
}
