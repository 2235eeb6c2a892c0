package blobs

import (
	"container/list"
	"sync"
	"sync/atomic"

	"github.com/casnix/casnix/digest"
)

// frameCache holds decoded frames, bounded by bytes, least recently used
// out first. An entry is inserted before it is decoded so concurrent readers
// (and read-ahead) of one frame share a single decode.
//
// Entries are reference counted: the cache holds one reference while the
// entry is listed, and every get hands out one more, given back with
// release. The buffer of the last reference dropped goes back to
// frameBufs, so a sequential read of a big file decodes into the same few
// buffers instead of allocating (and zeroing) a new one per frame. Memory is
// bounded by max plus the frames readers hold at the moment.
type frameCache struct {
	mu   sync.Mutex
	max  int64
	size int64
	lru  *list.List // of *frameEntry, front = most recent
	byID map[int64]*list.Element
	// aheadBytes is the raw size of listed read-ahead entries no reader
	// has got yet (decoded or not). Read-ahead stops starting new decodes
	// while it is above half the cache: past that, many readers' windows
	// evict each other's frames before they are read, and every such
	// decode is garbage the heap has to absorb.
	aheadBytes int64
}

type frameEntry struct {
	id    int64
	ready chan struct{}
	data  []byte
	zsum  zsum // of the compressed bytes data was decoded from
	err   error
	size  int64
	refs  int  // guarded by frameCache.mu
	ahead bool // decoded by read-ahead and not read yet (guarded by mu)
	// aheadLen is what this entry adds to frameCache.aheadBytes while
	// ahead is set (guarded by mu).
	aheadLen int64
	// claimed is set by whoever decodes the entry: its creator, or for
	// read-ahead's entries, the first of a background decoder and a
	// reader that needs it.
	claimed atomic.Bool
	// checked lists the chunks of data already hashed against their
	// digests, so each is hashed once per decode, not once per read.
	checkMu sync.Mutex
	checked map[chunkSpan]digest.Digest
}

// chunkSpan is where a chunk lies in its decoded frame.
type chunkSpan struct{ off, len int64 }

// check reports whether data[off:off+n] hashes to d, hashing it only the
// first time this entry is asked about that span and digest.
func (e *frameEntry) check(off, n int64, d digest.Digest) bool {
	sp := chunkSpan{off, n}
	e.checkMu.Lock()
	got, ok := e.checked[sp]
	e.checkMu.Unlock()
	if ok {
		return got == d
	}
	if digest.Sum(e.data[off:off+n]) != d {
		return false
	}
	e.checkMu.Lock()
	if e.checked == nil {
		e.checked = map[chunkSpan]digest.Digest{}
	}
	e.checked[sp] = d
	e.checkMu.Unlock()
	return true
}

// markChecked records that data[off:off+n] hashes to d (hashed by whoever
// decoded the entry).
func (e *frameEntry) markChecked(off, n int64, d digest.Digest) {
	e.checkMu.Lock()
	if e.checked == nil {
		e.checked = map[chunkSpan]digest.Digest{}
	}
	e.checked[chunkSpan{off, n}] = d
	e.checkMu.Unlock()
}

// claim reports whether the caller won the right to decode e.
func (e *frameEntry) claim() bool { return e.claimed.CompareAndSwap(false, true) }

func newFrameCache(max int64) *frameCache {
	return &frameCache{max: max, lru: list.New(), byID: map[int64]*list.Element{}}
}

// get returns the entry for frame id, holding a reference for the caller,
// and whether the caller must fill it (then it calls done). The caller
// calls release when it no longer uses the entry's data.
func (c *frameCache) get(id int64) (*frameEntry, bool) {
	return c.getFor(id, false)
}

// getFor is get; ahead says the caller is read-ahead. Eviction spares
// read-ahead's entries until a reader gets them: a sequential reader's
// frames just behind it are more recently used than the ones just ahead,
// yet it needs the latter, not the former.
func (c *frameCache) getFor(id int64, ahead bool) (*frameEntry, bool) {
	c.mu.Lock()
	defer c.mu.Unlock()
	if el, ok := c.byID[id]; ok {
		e := el.Value.(*frameEntry)
		e.refs++
		if !ahead {
			c.lru.MoveToFront(el)
			c.unahead(e)
		}
		return e, false
	}
	e := &frameEntry{id: id, ready: make(chan struct{}), refs: 2, ahead: ahead} // the cache's and the caller's
	if !ahead {
		e.claimed.Store(true) // a reader fills what it creates itself
	}
	c.byID[id] = c.lru.PushFront(e)
	return e, true
}

// getAhead is getFor for read-ahead of a frame of rawLen bytes; ok is
// false (and nothing is listed) when read-ahead already has half the cache
// and the frame is not listed yet.
func (c *frameCache) getAhead(id, rawLen int64) (e *frameEntry, fill, ok bool) {
	c.mu.Lock()
	_, listed := c.byID[id]
	if !listed && c.aheadBytes+rawLen > c.max/2 {
		c.mu.Unlock()
		return nil, false, false
	}
	c.mu.Unlock()
	e, fill = c.getFor(id, true)
	if fill {
		c.mu.Lock()
		if e.ahead && e.aheadLen == 0 {
			e.aheadLen = rawLen
			c.aheadBytes += rawLen
		}
		c.mu.Unlock()
	}
	return e, fill, true
}

// unahead marks e as got by a reader (c.mu held).
func (c *frameCache) unahead(e *frameEntry) {
	e.ahead = false
	c.aheadBytes -= e.aheadLen
	e.aheadLen = 0
}

// release gives back a reference from get; the last one recycles the
// buffer.
func (c *frameCache) release(e *frameEntry) {
	c.mu.Lock()
	e.refs--
	free := e.refs == 0
	c.mu.Unlock()
	if free {
		putFrameBuf(e.data)
	}
}

// done publishes a filled entry and evicts old ones. Failed decodes are
// not kept, so a transient read error is retried next time.
func (c *frameCache) done(e *frameEntry) {
	close(e.ready)
	var freed []*frameEntry
	c.mu.Lock()
	el, ok := c.byID[e.id]
	if !ok || el.Value.(*frameEntry) != e {
		c.mu.Unlock()
		return // evicted while it was being filled
	}
	if e.err != nil {
		c.unlist(el, e, &freed)
		c.mu.Unlock()
		return
	}
	e.size = int64(cap(e.data))
	c.size += e.size
	// Least recently used first, read-ahead's unread entries only when
	// nothing else is left, never the entry just filled.
	for _, ahead := range []bool{false, true} {
		for el := c.lru.Back(); el != nil && c.size > c.max; {
			prev := el.Prev()
			if oe := el.Value.(*frameEntry); oe != e && oe.ahead == ahead {
				c.unlist(el, oe, &freed)
			}
			el = prev
		}
	}
	c.mu.Unlock()
	for _, oe := range freed {
		putFrameBuf(oe.data)
	}
}

// unlist drops the cache's reference to an entry (c.mu held); entries no
// reader holds any more are appended to freed, to be recycled after the
// lock is released.
func (c *frameCache) unlist(el *list.Element, e *frameEntry, freed *[]*frameEntry) {
	c.lru.Remove(el)
	delete(c.byID, e.id)
	c.size -= e.size
	c.aheadBytes -= e.aheadLen
	e.aheadLen = 0
	e.refs--
	if e.refs == 0 {
		*freed = append(*freed, e)
	}
}

// Decoded-frame buffers are recycled through a free list of their own, not
// a sync.Pool: a pool is emptied by every other garbage collection, and
// under serve's memory limit the collector runs every few frames, so each
// decode allocated (and the kernel zeroed) a fresh frame of up to 16 MiB:
// a fifth of NarFromPath's CPU over a repacked store (bench/narfrom.sh).
// The list keeps at most frameBufKeep bytes; a buffer is reused for a frame
// it fits without wasting more than a quarter of itself. Capacities are
// rounded up to frameBufStep so frames of nearby sizes share buffers.
const (
	frameBufStep = 256 << 10
	frameBufKeep = 48 << 20
)

var frameBufs struct {
	mu    sync.Mutex
	free  [][]byte
	bytes int64
}

// getFrameBuf returns an empty buffer with room for n bytes.
func getFrameBuf(n int64) []byte {
	if n < frameBufStep {
		return make([]byte, 0, n)
	}
	frameBufs.mu.Lock()
	best := -1
	for i, b := range frameBufs.free {
		c := int64(cap(b))
		if c >= n && c-c/4 <= n && (best < 0 || c < int64(cap(frameBufs.free[best]))) {
			best = i
		}
	}
	if best >= 0 {
		b := frameBufs.free[best]
		last := len(frameBufs.free) - 1
		frameBufs.free[best] = frameBufs.free[last]
		frameBufs.free[last] = nil
		frameBufs.free = frameBufs.free[:last]
		frameBufs.bytes -= int64(cap(b))
		frameBufs.mu.Unlock()
		return b[:0]
	}
	frameBufs.mu.Unlock()
	return make([]byte, 0, (n+frameBufStep-1)/frameBufStep*frameBufStep)
}

// putFrameBuf hands a buffer from getFrameBuf back; nobody may use it
// afterwards. When the list is full, the oldest buffers make room (a
// store's current frame sizes are the likeliest to come again).
func putFrameBuf(b []byte) {
	c := int64(cap(b))
	if c < frameBufStep || c%frameBufStep != 0 || c > frameBufKeep {
		return
	}
	frameBufs.mu.Lock()
	defer frameBufs.mu.Unlock()
	for frameBufs.bytes+c > frameBufKeep && len(frameBufs.free) > 0 {
		frameBufs.bytes -= int64(cap(frameBufs.free[0]))
		frameBufs.free[0] = nil
		frameBufs.free = frameBufs.free[1:]
	}
	frameBufs.free = append(frameBufs.free, b[:0])
	frameBufs.bytes += c
}
