package blobs

import (
	"bytes"
	"context"
	"io"
	"math/rand"
	"runtime"
	"sync"
	"testing"
	"time"

	"github.com/klauspost/compress/zstd"
)

// TestFrameCacheHeldNotRecycled: a frame evicted while a reader holds it
// keeps its buffer until the reader releases it.
func TestFrameCacheHeldNotRecycled(t *testing.T) {
	c := newFrameCache(2 * frameBufStep)
	held, fill := c.get(1)
	if !fill {
		t.Fatal("new id not filled")
	}
	held.data = append(getFrameBuf(frameBufStep), bytes.Repeat([]byte{7}, frameBufStep)...)
	c.done(held)
	for id := int64(2); id < 6; id++ { // evicts frame 1
		e, _ := c.get(id)
		e.data = getFrameBuf(frameBufStep)[:frameBufStep]
		c.done(e)
		c.release(e)
	}
	if _, ok := c.byID[1]; ok {
		t.Fatal("frame 1 not evicted")
	}
	for range 8 {
		b := getFrameBuf(frameBufStep)[:frameBufStep]
		if &b[0] == &held.data[0] {
			t.Fatal("a held frame's buffer was handed out again")
		}
		clear(b)
	}
	if !bytes.Equal(held.data, bytes.Repeat([]byte{7}, frameBufStep)) {
		t.Fatal("a held frame's data changed")
	}
	c.release(held)
	if held.refs != 0 {
		t.Fatalf("refs = %d after the last release", held.refs)
	}
}

// TestConcurrentReadersSmallCache: many readers of several blobs through a
// cache that holds one frame, so frames are evicted and their buffers reused
// while other readers copy from them; every byte read must be right (run
// with -race too).
func TestConcurrentReadersSmallCache(t *testing.T) {
	// 1 MiB frames: big enough for their buffers to be pooled.
	s, d := openBlobs(t, Options{FrameSize: 1 << 20, CacheBytes: 1, Level: zstd.SpeedFastest})
	var blobs [][]byte
	for i := range 4 {
		blobs = append(blobs, benchText(2<<20, int64(i)))
	}
	ds := writeBlobs(t, s, d, blobs...)
	ctx := context.Background()
	var wg sync.WaitGroup
	for g := range 8 {
		wg.Go(func() {
			r := rand.New(rand.NewSource(int64(g)))
			i := g % len(blobs)
			br, err := s.Open(ctx, ds[i])
			if err != nil {
				t.Error(err)
				return
			}
			if g%2 == 0 { // sequential, with read-ahead
				var got bytes.Buffer
				if _, err := br.WriteTo(&got); err != nil || !bytes.Equal(got.Bytes(), blobs[i]) {
					t.Errorf("blob %d: WriteTo differs (%v)", i, err)
				}
				return
			}
			for range 50 {
				off := r.Intn(len(blobs[i]))
				buf := make([]byte, r.Intn(300<<10))
				n, err := br.ReadAt(buf, int64(off))
				if err != nil && err != io.EOF || !bytes.Equal(buf[:n], blobs[i][off:off+n]) {
					t.Errorf("blob %d: ReadAt(%d, %d) differs (%v)", i, off, len(buf), err)
					return
				}
				br.ReadAhead(int64(off + n))
			}
		})
	}
	wg.Wait()
}

// TestReadAheadDecodesOnce: a sequential reader (the FUSE pattern: ReadAt
// calls, each announcing read-ahead) decodes every frame exactly once,
// although the frames just behind it are more recently used than the ones
// read-ahead decoded for it.
func TestReadAheadDecodesOnce(t *testing.T) {
	// A cache not much bigger than the read-ahead window.
	s, d := openBlobs(t, Options{FrameSize: MaxChunk, Level: zstd.SpeedFastest, CacheBytes: readAheadBytes + 4<<20})
	data := benchText(40<<20, 1)
	dg := writeBlobs(t, s, d, data)[0]
	br, err := s.Open(context.Background(), dg)
	if err != nil {
		t.Fatal(err)
	}
	frames := map[int64]bool{}
	for i := range br.chunks {
		loc, err := br.locate(i)
		if err != nil {
			t.Fatal(err)
		}
		frames[loc.ID] = true
	}
	before := frameDecodes.Load()
	buf := make([]byte, 128<<10)
	for off := int64(0); off < int64(len(data)); off += int64(len(buf)) {
		br.ReadAhead(off + int64(len(buf)))
		n, err := br.ReadAt(buf, off)
		if err != nil && err != io.EOF || !bytes.Equal(buf[:n], data[off:off+int64(n)]) {
			t.Fatalf("ReadAt(%d) differs (%v)", off, err)
		}
	}
	if got := frameDecodes.Load() - before; got != int64(len(frames)) {
		t.Fatalf("%d frame decodes for %d frames", got, len(frames))
	}
}

// TestView: views return the same bytes as ReadAt, consecutive chunks of
// one frame come as one slice, and Release gives every frame back.
func TestView(t *testing.T) {
	s, d := openBlobs(t, Options{FrameSize: 1 << 20, Level: zstd.SpeedFastest})
	data := benchText(5<<20, 3)
	br, err := s.Open(context.Background(), writeBlobs(t, s, d, data)[0])
	if err != nil {
		t.Fatal(err)
	}
	r := rand.New(rand.NewSource(1))
	for range 100 {
		off := r.Int63n(int64(len(data)) + 10)
		n := r.Intn(600 << 10)
		v, err := br.View(off, n)
		if err != nil {
			t.Fatal(err)
		}
		want := data[min(off, int64(len(data))):min(off+int64(n), int64(len(data)))]
		var got []byte
		for _, sl := range v.Slices() {
			got = append(got, sl...)
		}
		if v.Len() != len(want) || !bytes.Equal(got, want) {
			t.Fatalf("View(%d, %d): %d bytes, differs from the blob", off, n, v.Len())
		}
		// One slice per frame touched: 600 KiB spans at most two 1 MiB frames.
		if len(v.Slices()) > 2 {
			t.Fatalf("View(%d, %d): %d slices", off, n, len(v.Slices()))
		}
		cp := make([]byte, n)
		if k := v.CopyTo(cp); !bytes.Equal(cp[:k], want) {
			t.Fatalf("CopyTo differs")
		}
		v.Release()
		v.Release()
	}
	s.cache.mu.Lock()
	defer s.cache.mu.Unlock()
	for el := s.cache.lru.Front(); el != nil; el = el.Next() {
		if e := el.Value.(*frameEntry); e.refs != 1 {
			t.Fatalf("frame %d: %d references left, want the cache's one", e.id, e.refs)
		}
	}
}

// TestReaderClaimsQueuedFrames: frames that read-ahead queued while every
// decoder slot is busy are decoded by the reader that needs them, each
// once, and the queued background decodes then give up without decoding.
func TestReaderClaimsQueuedFrames(t *testing.T) {
	s, d := openBlobs(t, Options{FrameSize: MaxChunk, Level: zstd.SpeedFastest, Decoders: 1})
	data := benchText(4<<20, 2)
	br, err := s.Open(context.Background(), writeBlobs(t, s, d, data)[0])
	if err != nil {
		t.Fatal(err)
	}
	frames := map[int64]bool{}
	for i := range br.chunks {
		loc, err := br.locate(i)
		if err != nil {
			t.Fatal(err)
		}
		frames[loc.ID] = true
	}
	if len(frames) < 4 {
		t.Fatalf("%d frames, want several", len(frames))
	}
	s.decodeSlots <- struct{}{} // the only slot: read-ahead can only queue
	before := frameDecodes.Load()
	br.ReadAhead(0)
	got := make([]byte, len(data))
	if n, err := br.ReadAt(got, 0); err != nil || n != len(data) || !bytes.Equal(got, data) {
		t.Fatalf("ReadAt: %d bytes, %v, equal %v", n, err, bytes.Equal(got, data))
	}
	if n := frameDecodes.Load() - before; n != int64(len(frames)) {
		t.Fatalf("%d frame decodes for %d frames", n, len(frames))
	}
	<-s.decodeSlots
	// The queued goroutines take the slot in turn, find their frame
	// claimed and give back their reference: then only the cache's is left.
	deadline := time.Now().Add(10 * time.Second)
	for {
		s.cache.mu.Lock()
		held := 0
		for el := s.cache.lru.Front(); el != nil; el = el.Next() {
			if e := el.Value.(*frameEntry); e.refs != 1 {
				held++
			}
		}
		s.cache.mu.Unlock()
		if held == 0 {
			break
		}
		if time.Now().After(deadline) {
			t.Fatalf("%d frames still referenced by queued decodes", held)
		}
		time.Sleep(time.Millisecond)
	}
	if n := frameDecodes.Load() - before; n != int64(len(frames)) {
		t.Fatalf("%d frame decodes for %d frames after the queue drained", n, len(frames))
	}
}

// TestReadAheadShare: read-ahead lists new frames only while its unread
// ones take at most half the cache; a reader getting one of them, or its
// eviction, makes room again.
func TestReadAheadShare(t *testing.T) {
	c := newFrameCache(8 << 20)
	var got []*frameEntry
	for id := int64(1); id <= 5; id++ {
		e, fill, ok := c.getAhead(id, 1<<20)
		if want := id <= 4; ok != want {
			t.Fatalf("frame %d: read-ahead allowed = %v, want %v (ahead bytes %d)", id, ok, want, c.aheadBytes)
		}
		if ok {
			if !fill {
				t.Fatalf("frame %d: new entry not to be filled", id)
			}
			got = append(got, e)
		}
	}
	// A frame already listed is always handed out.
	if e, _, ok := c.getAhead(2, 1<<20); !ok {
		t.Fatal("listed frame refused to read-ahead")
	} else {
		c.release(e)
	}
	// A reader takes frame 1: it no longer counts as read-ahead's.
	e, _ := c.get(1)
	c.release(e)
	if _, _, ok := c.getAhead(5, 1<<20); !ok {
		t.Fatalf("read-ahead still refused after a reader took a frame (ahead bytes %d)", c.aheadBytes)
	}
	for _, e := range got {
		e.data = make([]byte, 0, 1<<20)
		c.done(e)
		c.release(e)
	}
	if c.aheadBytes < 0 {
		t.Fatalf("ahead bytes went negative: %d", c.aheadBytes)
	}
}

// TestPrefetch: Prefetch(n) lists for decoding the frames of a blob's
// first n bytes (readAheadBytes at most) and no others, a read from the
// start then continues the window and decodes each frame once, and
// DropCache gives read-ahead its share back.
func TestPrefetch(t *testing.T) {
	s, d := openBlobs(t, Options{FrameSize: MaxChunk, Level: zstd.SpeedFastest})
	data := benchText(40<<20, 2)
	dg := writeBlobs(t, s, d, data)[0]
	ctx := context.Background()
	frames, err := s.BlobFrames(ctx, dg)
	if err != nil {
		t.Fatal(err)
	}
	// rawUpTo is the raw size of the frames holding the blob's first n bytes.
	rawUpTo := func(n int64) int64 {
		br, err := s.Open(ctx, dg)
		if err != nil {
			t.Fatal(err)
		}
		seen := map[int64]bool{}
		var sum int64
		for i := 0; i < len(br.chunks) && br.chunks[i].off < n; i++ {
			loc, err := br.locate(i)
			if err != nil {
				t.Fatal(err)
			}
			if !seen[loc.ID] {
				seen[loc.ID] = true
				sum += loc.RawLen
			}
		}
		return sum
	}
	aheadBytes := func() int64 {
		s.cache.mu.Lock()
		defer s.cache.mu.Unlock()
		return s.cache.aheadBytes
	}
	for _, tc := range []struct{ n, want int64 }{
		{3 << 20, rawUpTo(3 << 20)},
		{64 << 20, rawUpTo(readAheadBytes)}, // capped at the window
	} {
		s.DropCache()
		if got := aheadBytes(); got != 0 {
			t.Fatalf("after DropCache, read-ahead holds %d bytes", got)
		}
		br, err := s.Open(ctx, dg)
		if err != nil {
			t.Fatal(err)
		}
		br.Prefetch(tc.n)
		br.Prefetch(tc.n) // nothing new
		if got := aheadBytes(); got != tc.want {
			t.Errorf("Prefetch(%d) listed %d bytes of frames, want %d", tc.n, got, tc.want)
		}
		// Let the decodes finish, so none is counted below.
		s.cache.mu.Lock()
		var listed []*frameEntry
		for el := s.cache.lru.Front(); el != nil; el = el.Next() {
			listed = append(listed, el.Value.(*frameEntry))
		}
		s.cache.mu.Unlock()
		for _, e := range listed {
			<-e.ready
		}
	}

	s.DropCache()
	before := frameDecodes.Load()
	br, err := s.Open(ctx, dg)
	if err != nil {
		t.Fatal(err)
	}
	br.Prefetch(3 << 20)
	var out bytes.Buffer
	if _, err := br.WriteTo(&out); err != nil || !bytes.Equal(out.Bytes(), data) {
		t.Fatalf("read after Prefetch differs (%v)", err)
	}
	if got := frameDecodes.Load() - before; got != int64(len(frames)) {
		t.Errorf("%d frame decodes for %d frames", got, len(frames))
	}
}

// TestFrameBufsSurviveGC: a freed frame buffer is handed out again after
// garbage collections (a sync.Pool would have dropped it), only for frames
// it fits without wasting more than a quarter of itself, and the free list
// stays within frameBufKeep.
func TestFrameBufsSurviveGC(t *testing.T) {
	frameBufs.mu.Lock()
	frameBufs.free, frameBufs.bytes = nil, 0
	frameBufs.mu.Unlock()

	b := getFrameBuf(3<<20 + 1)
	if cap(b) != 3<<20+frameBufStep {
		t.Fatalf("cap %d, want %d (rounded up to the step)", cap(b), 3<<20+frameBufStep)
	}
	p := &b[:1][0]
	putFrameBuf(b)
	runtime.GC()
	runtime.GC()
	for _, tc := range []struct {
		n     int64
		reuse bool
	}{
		{2 << 20, false},  // would waste more than a quarter
		{16 << 20, false}, // does not fit
		{3 << 20, true},
	} {
		got := getFrameBuf(tc.n)
		if reused := &got[:1][0] == p; reused != tc.reuse {
			t.Errorf("getFrameBuf(%d): reused %v, want %v", tc.n, reused, tc.reuse)
		}
		if cap(got) < int(tc.n) || len(got) != 0 {
			t.Errorf("getFrameBuf(%d): len %d cap %d", tc.n, len(got), cap(got))
		}
		if !tc.reuse {
			continue
		}
		putFrameBuf(got)
	}
	for range 2 * frameBufKeep / (4 << 20) {
		putFrameBuf(make([]byte, 0, 4<<20))
	}
	frameBufs.mu.Lock()
	defer frameBufs.mu.Unlock()
	if frameBufs.bytes > frameBufKeep {
		t.Errorf("free list holds %d bytes, limit %d", frameBufs.bytes, frameBufKeep)
	}
}
