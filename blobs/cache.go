package blobs

import (
	"container/list"
	"sync"
)

// frameCache holds decoded frames, bounded by bytes, least recently used
// out first. An entry is inserted before it is decoded so concurrent readers
// (and read-ahead) of one frame share a single decode.
type frameCache struct {
	mu   sync.Mutex
	max  int64
	size int64
	lru  *list.List // of *frameEntry, front = most recent
	byID map[int64]*list.Element
}

type frameEntry struct {
	id    int64
	ready chan struct{}
	data  []byte
	err   error
	size  int64
}

func newFrameCache(max int64) *frameCache {
	return &frameCache{max: max, lru: list.New(), byID: map[int64]*list.Element{}}
}

// get returns the entry for frame id and whether the caller must fill it
// (then it calls done).
func (c *frameCache) get(id int64) (*frameEntry, bool) {
	c.mu.Lock()
	defer c.mu.Unlock()
	if el, ok := c.byID[id]; ok {
		c.lru.MoveToFront(el)
		return el.Value.(*frameEntry), false
	}
	e := &frameEntry{id: id, ready: make(chan struct{})}
	c.byID[id] = c.lru.PushFront(e)
	return e, true
}

// done publishes a filled entry and evicts old ones. Failed decodes are
// not kept, so a transient read error is retried next time.
func (c *frameCache) done(e *frameEntry) {
	close(e.ready)
	c.mu.Lock()
	defer c.mu.Unlock()
	el, ok := c.byID[e.id]
	if !ok || el.Value.(*frameEntry) != e {
		return
	}
	if e.err != nil {
		c.lru.Remove(el)
		delete(c.byID, e.id)
		return
	}
	e.size = int64(cap(e.data))
	c.size += e.size
	for c.size > c.max && c.lru.Len() > 1 {
		old := c.lru.Back()
		oe := old.Value.(*frameEntry)
		if oe == e {
			break
		}
		c.lru.Remove(old)
		delete(c.byID, oe.id)
		c.size -= oe.size
	}
}
