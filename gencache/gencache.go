// Package gencache is a bounded in-memory cache that keeps what was used
// recently, at the cost of two map operations: entries go into a current
// map; when it holds its share of the budget it becomes the old map (the
// previous old one is dropped whole), and an entry found in the old map
// moves back into the current one. What is used within a generation
// survives; nothing needs a list or per-entry bookkeeping, which is all a
// cache in front of a few-microsecond index lookup can afford.
package gencache

import "sync"

// Cache maps K to V within a cost budget. It is safe for concurrent use.
type Cache[K comparable, V any] struct {
	mu       sync.Mutex
	cur, old map[K]V
	curCost  int
	max      int // per generation: half the budget
	cost     func(V) int
}

// New makes a cache that holds entries costing up to budget in all (cost
// gives an entry's; an entry costing more than a quarter of a generation,
// an eighth of the budget, is not kept, so that one cannot push out many
// small ones).
func New[K comparable, V any](budget int, cost func(V) int) *Cache[K, V] {
	return &Cache[K, V]{cur: map[K]V{}, max: budget / 2, cost: cost}
}

// Get returns k's value, if held.
func (c *Cache[K, V]) Get(k K) (V, bool) {
	c.mu.Lock()
	defer c.mu.Unlock()
	if v, ok := c.cur[k]; ok {
		return v, true
	}
	v, ok := c.old[k]
	if ok {
		delete(c.old, k)
		c.putLocked(k, v)
	}
	return v, ok
}

// Put sets k's value.
func (c *Cache[K, V]) Put(k K, v V) {
	c.mu.Lock()
	defer c.mu.Unlock()
	c.putLocked(k, v)
}

func (c *Cache[K, V]) putLocked(k K, v V) {
	n := c.cost(v)
	if n > c.max/4 {
		return
	}
	if old, ok := c.cur[k]; ok {
		c.curCost -= c.cost(old)
	} else if c.curCost+n > c.max {
		c.old, c.cur, c.curCost = c.cur, map[K]V{}, 0
	}
	c.cur[k] = v
	c.curCost += n
}

// Drop forgets k if drop, given the value held, says so.
func (c *Cache[K, V]) Drop(k K, drop func(V) bool) {
	c.mu.Lock()
	defer c.mu.Unlock()
	if v, ok := c.cur[k]; ok && drop(v) {
		delete(c.cur, k)
		c.curCost -= c.cost(v)
	}
	if v, ok := c.old[k]; ok && drop(v) {
		delete(c.old, k)
	}
}

// Clear forgets everything.
func (c *Cache[K, V]) Clear() {
	c.mu.Lock()
	defer c.mu.Unlock()
	c.cur, c.old, c.curCost = map[K]V{}, nil, 0
}

// Len is how many entries are held (both generations).
func (c *Cache[K, V]) Len() int {
	c.mu.Lock()
	defer c.mu.Unlock()
	return len(c.cur) + len(c.old)
}
