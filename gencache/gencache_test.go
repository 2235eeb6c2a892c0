package gencache

import (
	"fmt"
	"sync"
	"testing"
)

func TestCache(t *testing.T) {
	one := func(int) int { return 1 }
	tests := []struct {
		name string
		run  func(t *testing.T)
	}{
		{"put and get", func(t *testing.T) {
			c := New[string](8, one)
			c.Put("a", 1)
			if v, ok := c.Get("a"); !ok || v != 1 {
				t.Errorf("Get(a) = %v, %v", v, ok)
			}
			if _, ok := c.Get("b"); ok {
				t.Error("Get(b) found a value never put")
			}
			c.Put("a", 2)
			if v, _ := c.Get("a"); v != 2 || c.Len() != 1 {
				t.Errorf("after replacing a: %v, %d entries", v, c.Len())
			}
		}},
		{"bounded, keeps what is used", func(t *testing.T) {
			// A generation holds 4 (half of 8): after 4 more puts the first
			// four are the old generation; "k0", used meanwhile, moves
			// back, and the rest go with the next turn.
			c := New[string](8, one)
			for i := range 4 {
				c.Put(fmt.Sprint("k", i), i)
			}
			for i := 4; i < 7; i++ {
				c.Put(fmt.Sprint("k", i), i)
			}
			if _, ok := c.Get("k0"); !ok {
				t.Fatal("k0 dropped after one turn")
			}
			for i := 7; i < 12; i++ {
				c.Put(fmt.Sprint("k", i), i)
			}
			if n := c.Len(); n > 8 {
				t.Errorf("%d entries held, budget 8", n)
			}
			if _, ok := c.Get("k1"); ok {
				t.Error("k1, not used for two turns, still held")
			}
			if _, ok := c.Get("k11"); !ok {
				t.Error("the newest entry is not held")
			}
		}},
		{"costly entries are not kept", func(t *testing.T) {
			c := New[string](1600, func(v int) int { return v })
			c.Put("small", 200)
			c.Put("big", 201) // more than a quarter of a generation (800)
			if _, ok := c.Get("big"); ok {
				t.Error("an entry over a quarter of a generation was kept")
			}
			if _, ok := c.Get("small"); !ok {
				t.Error("small entry lost")
			}
		}},
		{"drop only what the predicate names", func(t *testing.T) {
			c := New[string](8, one)
			c.Put("a", 1)
			c.Drop("a", func(v int) bool { return v == 2 })
			if _, ok := c.Get("a"); !ok {
				t.Error("Drop removed a value its predicate kept")
			}
			c.Drop("a", func(v int) bool { return v == 1 })
			if _, ok := c.Get("a"); ok {
				t.Error("Drop left a value its predicate named")
			}
		}},
		{"clear", func(t *testing.T) {
			c := New[string](8, one)
			c.Put("a", 1)
			c.Clear()
			if _, ok := c.Get("a"); ok || c.Len() != 0 {
				t.Error("Clear left entries")
			}
		}},
	}
	for _, tc := range tests {
		t.Run(tc.name, tc.run)
	}
}

// TestConcurrent: readers and writers at once (run with -race).
func TestConcurrent(t *testing.T) {
	c := New[int](64, func(int) int { return 1 })
	var wg sync.WaitGroup
	for g := range 4 {
		wg.Add(1)
		go func() {
			defer wg.Done()
			for i := range 1000 {
				k := (g*1000 + i) % 100
				c.Put(k, k)
				if v, ok := c.Get(k); ok && v != k {
					t.Errorf("Get(%d) = %d", k, v)
				}
			}
		}()
	}
	wg.Wait()
	if c.Len() > 64 {
		t.Errorf("%d entries, budget 64", c.Len())
	}
}
