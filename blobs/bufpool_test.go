package blobs

import (
	"math/rand"
	"testing"
)

// TestBufClass: a class holds what was asked for, wastes at most an eighth
// (past the smallest class), and its size maps back to itself, so putBuf
// returns getBuf's buffers to the pool they came from.
func TestBufClass(t *testing.T) {
	seen := map[int]int{} // index -> size
	for _, n := range []int{0, 1, 100, minBufClass, minBufClass + 1, 60 << 10, 1 << 20, 1<<20 + 1,
		4 << 20, 4<<20 + 4<<20/64 + 64, 16 << 20, 256<<20 - 1} {
		i, size := bufClass(n)
		if size < n {
			t.Errorf("bufClass(%d) = %d bytes: too small", n, size)
		}
		if n > minBufClass && size-n > n/8+1 {
			t.Errorf("bufClass(%d) = %d bytes: wastes more than an eighth", n, size)
		}
		if j, s := bufClass(size); j != i || s != size {
			t.Errorf("bufClass(%d) = %d, %d; its size gives %d, %d", n, i, size, j, s)
		}
		if i < 0 || i >= len(bufPools) {
			t.Fatalf("bufClass(%d): index %d out of range", n, i)
		}
		if s, ok := seen[i]; ok && s != size {
			t.Errorf("index %d has sizes %d and %d", i, s, size)
		}
		seen[i] = size
		b := getBuf(n)
		if len(b) != 0 || cap(b) < n {
			t.Errorf("getBuf(%d): len %d cap %d", n, len(b), cap(b))
		}
		putBuf(b)
	}
}

// TestPutBufOddCapacity: a buffer whose capacity is no class's (grown by an
// append, or made elsewhere) is dropped, never handed out as a bigger class.
func TestPutBufOddCapacity(t *testing.T) {
	for range 100 {
		putBuf(make([]byte, 0, 5000)) // between the classes of 4096 and 5120
	}
	for range 100 {
		if b := getBuf(5120); cap(b) < 5120 {
			t.Fatalf("getBuf(5120) handed out a buffer of %d bytes", cap(b))
		}
	}
}

// TestWriterGivesItsBuffersBack: a writer per ingested path (as imports
// and substitutions use them) gives back every frame buffer it takes, so a
// run of paths allocates no frame-size buffer per path. Before, every
// writer left the buffer it took after its last frame to the garbage
// collector: 4 MiB a path. Counted at getBuf and putBuf (bufsOut), not by
// what is allocated, since the pools may drop what they are given (the race
// detector makes them drop a quarter of it).
func TestWriterGivesItsBuffersBack(t *testing.T) {
	rng := rand.New(rand.NewSource(4))
	for _, c := range []struct {
		name  string
		frame int
		size  int
	}{
		{"one small blob", 16 << 20, 10},
		{"a blob of several frames", 1 << 20, 5 << 20},
	} {
		t.Run(c.name, func(t *testing.T) {
			s, d := openBlobs(t, Options{FrameSize: c.frame})
			for i := range 5 {
				blob := make([]byte, c.size)
				rng.Read(blob)
				before := bufsOut.Load()
				writeBlobs(t, s, d, blob)
				if n := bufsOut.Load() - before; n != 0 {
					t.Fatalf("path %d: the writer kept %d buffers", i, n)
				}
			}
		})
	}
}
