package hashbehind

import (
	"crypto/sha256"
	"math/rand/v2"
	"runtime"
	"slices"
	"testing"
	"time"
)

// TestHasher: whatever the pattern of writes, the hash is the one of the
// bytes written, although the writer overwrites its buffer after every
// write, and no goroutine is left behind.
func TestHasher(t *testing.T) {
	for _, c := range []struct {
		name   string
		writes []int
	}{
		{"nothing", nil},
		{"one byte", []int{1}},
		{"less than a buffer", []int{1000, 5000}},
		{"exactly one buffer", []int{hashBehindBuf}},
		{"one buffer and a byte", []int{hashBehindBuf, 1}},
		{"a big write", []int{10*hashBehindBuf + 7}},
		{"many buffers' worth in frame-size writes", []int{4 << 20, 4 << 20, 1 << 20, 3}},
		{"small writes across buffers", slices.Repeat([]int{4093}, 3000)},
	} {
		t.Run(c.name, func(t *testing.T) {
			before := runtime.NumGoroutine()
			rng := rand.New(rand.NewPCG(1, uint64(len(c.writes))))
			want := sha256.New()
			hb := New(sha256.New())
			for _, n := range c.writes {
				p := make([]byte, n)
				for i := range p {
					p[i] = byte(rng.Uint32())
				}
				want.Write(p)
				hb.Write(p)
				clear(p) // the caller reuses its buffer at once
			}
			if got, w := hb.Sum(nil), want.Sum(nil); string(got) != string(w) {
				t.Fatalf("hash %x, want %x", got, w)
			}
			hb.Close() // again: harmless
			if hb.held != 0 {
				t.Errorf("%d buffers not given back", hb.held)
			}
			for deadline := time.Now().Add(5 * time.Second); runtime.NumGoroutine() > before; {
				if time.Now().After(deadline) {
					t.Fatalf("%d goroutines, %d before", runtime.NumGoroutine(), before)
				}
				time.Sleep(time.Millisecond)
			}
		})
	}
}

// TestHasherClosedEarly: a render that fails stops the hashing with
// Close alone (NarRender's defer), without a Sum.
func TestHasherClosedEarly(t *testing.T) {
	hb := New(sha256.New())
	hb.Write(make([]byte, 3*hashBehindBuf+5))
	hb.Close()
	if hb.held != 0 || hb.work != nil || hb.cur != nil {
		t.Fatalf("after Close: %d buffers held, goroutine channel %v, buffer %d bytes", hb.held, hb.work != nil, len(hb.cur))
	}
}
