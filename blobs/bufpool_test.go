package blobs

import (
	"fmt"
	"runtime"
	"runtime/debug"
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
// and substitutions use them) takes its frame buffer from the pool and gives
// it back, so a run of small paths allocates no frame-size buffer per path.
// Before, every writer left the buffer it took after its last frame to the
// garbage collector: 4 MiB a path.
func TestWriterGivesItsBuffersBack(t *testing.T) {
	if raceEnabled {
		t.Skip("the race detector makes sync.Pool drop buffers at random; go test without -race runs this")
	}
	// Frames larger than the default, so that one left behind per writer
	// stands out from what every writer allocates besides (its chunker's
	// and its pack writer's buffers, about 1.6 MB).
	s, d := openBlobs(t, Options{FrameSize: 16 << 20})
	// With the collector off, the pool keeps what is put in it, so what
	// is allocated is what the writers did not give back.
	defer debug.SetGCPercent(debug.SetGCPercent(-1))
	writeBlobs(t, s, d, []byte("warm-up")) // the pool's first buffers
	const paths = 20
	var before, after runtime.MemStats
	runtime.ReadMemStats(&before)
	for i := range paths {
		writeBlobs(t, s, d, []byte(fmt.Sprintf("path %d", i)))
	}
	runtime.ReadMemStats(&after)
	perPath := (after.TotalAlloc - before.TotalAlloc) / paths
	if frame := uint64(s.opts.FrameSize); perPath > frame/4 {
		t.Errorf("a writer of one small blob allocated %d bytes, frames are %d: its buffers are not reused", perPath, frame)
	}
}
