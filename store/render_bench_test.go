package store

import (
	"bytes"
	"context"
	"fmt"
	"io"
	"math"
	"math/rand"
	"os"
	"path/filepath"
	"slices"
	"testing"

	"github.com/klauspost/compress/zstd"
	"golang.org/x/sys/unix"

	"github.com/casnix/casnix/blobs"
	"github.com/casnix/casnix/castore"
	"github.com/casnix/casnix/db"
	"github.com/casnix/casnix/nar"
)

// textFile returns n bytes of text-like data (hex words of a shared
// vocabulary separated by spaces, like blobs' benchText): it compresses
// about 2x, so decoding costs what it costs on real files. Each seed gives
// other bytes, so files do not dedup.
func textFile(n int, seed int64) []byte {
	r := rand.New(rand.NewSource(seed))
	const digits = "0123456789abcdef"
	words := make([][]byte, 4000)
	for i := range words {
		w := make([]byte, 4+2*r.Intn(9))
		for k := range w {
			w[k] = digits[r.Intn(16)]
		}
		words[i] = w
	}
	var b bytes.Buffer
	b.Grow(n + 32)
	for b.Len() < n {
		b.Write(words[r.Intn(len(words))])
		b.WriteByte(' ')
	}
	return b.Bytes()[:n]
}

// manyFilesNAR returns the NAR of a tree of that many text-like files
// (seed picks their contents) with
// sizes spread log-uniformly over [minSize, maxSize], a dozen or so per
// directory, in a few levels of directories: the shape of a typical store
// path (lib/, share/doc/..., bin/), not one big file.
func manyFilesNAR(t testing.TB, files, minSize, maxSize int, seed int64) []byte {
	t.Helper()
	root := filepath.Join(t.TempDir(), "p")
	r := rand.New(rand.NewSource(int64(files)))
	for i := range files {
		dir := filepath.Join(root, fmt.Sprintf("d%02d", i/40), fmt.Sprintf("s%d", i%40/13))
		if err := os.MkdirAll(dir, 0o755); err != nil {
			t.Fatal(err)
		}
		size := int(float64(minSize) * math.Exp(r.Float64()*math.Log(float64(maxSize)/float64(minSize))))
		if err := os.WriteFile(filepath.Join(dir, fmt.Sprintf("f%04d", i)), textFile(size, seed+int64(i)), 0o644); err != nil {
			t.Fatal(err)
		}
	}
	var buf bytes.Buffer
	if _, err := nar.DumpPath(&buf, root); err != nil {
		t.Fatal(err)
	}
	return buf.Bytes()
}

// pathFrames lists the distinct frames holding a path's files, in pack
// order (the order ingest wrote them, which is the order a render reads
// them).
func pathFrames(t testing.TB, st *Store, name string) []db.Frame {
	t.Helper()
	ctx := context.Background()
	pi, err := st.Info(ctx, name)
	if err != nil {
		t.Fatal(err)
	}
	seen := map[int64]bool{}
	var out []db.Frame
	var walk func(n castore.Node)
	walk = func(n castore.Node) {
		switch {
		case n.Kind == castore.KindFile && n.Size > 0:
			fs, err := st.blobs.BlobFrames(ctx, n.Digest)
			if err != nil {
				t.Fatal(err)
			}
			for _, f := range fs {
				if !seen[f.ID] {
					seen[f.ID] = true
					out = append(out, f)
				}
			}
		case n.Kind == castore.KindDirectory:
			dir, err := st.Directory(ctx, n.Digest)
			if err != nil {
				t.Fatal(err)
			}
			for _, e := range dir.Entries() {
				walk(e.Node)
			}
		}
	}
	walk(pi.Root)
	slices.SortFunc(out, func(a, b db.Frame) int {
		if a.Pack != b.Pack {
			return int(a.Pack - b.Pack)
		}
		return int(a.Offset - b.Offset)
	})
	return out
}

// cpuSeconds is the CPU time (user + system) the process has used.
func cpuSeconds(b *testing.B) float64 {
	var ru unix.Rusage
	if err := unix.Getrusage(unix.RUSAGE_SELF, &ru); err != nil {
		b.Fatal(err)
	}
	return float64(ru.Utime.Nano()+ru.Stime.Nano()) / 1e9
}

// BenchmarkNarRenderManyFiles renders a path of 300 text-like files of
// 1 KiB to 2 MiB (about 80 MB in 1 MiB frames, a dozen files per
// directory) with a cold frame cache (the packs in the page cache), as
// NarFromPath, dump, export and HTTP do, next to its anchor: the same
// frames decoded one after another by one zstd decoder. It reports CPU
// seconds per op (wall time swings with the machine's other load, and the
// two together show how parallel the render is) and frame decodes per op
// (each frame must be decoded once), of them by read-ahead's decoders
// (bg-decodes/op: off the rendering goroutine; on a loaded machine, where
// wall time says little, the clearest sign of how parallel a render is).
func BenchmarkNarRenderManyFiles(b *testing.B) {
	st, err := Open(context.Background(), b.TempDir(), Options{Blobs: blobs.Options{FrameSize: 1 << 20}})
	if err != nil {
		b.Fatal(err)
	}
	defer st.Close()
	n := manyFilesNAR(b, 300, 1<<10, 2<<20, 0)
	if err := add(b, st, pathA, n); err != nil {
		b.Fatal(err)
	}
	frames := pathFrames(b, st, pathA)
	b.Logf("NAR %d bytes, %d frames", len(n), len(frames))
	ctx := context.Background()
	run := func(name string, f func(b *testing.B)) {
		b.Run(name, func(b *testing.B) {
			b.SetBytes(int64(len(n)))
			c0, d0, bg0 := cpuSeconds(b), blobs.FrameDecodes(), blobs.BackgroundDecodes()
			f(b)
			b.ReportMetric(float64(blobs.FrameDecodes()-d0)/float64(b.N), "decodes/op")
			b.ReportMetric(float64(blobs.BackgroundDecodes()-bg0)/float64(b.N), "bg-decodes/op")
			b.ReportMetric((cpuSeconds(b)-c0)/float64(b.N), "cpu-s/op")
		})
	}
	run("anchor-zstd-1-decoder", func(b *testing.B) {
		dec, err := zstd.NewReader(nil, zstd.WithDecoderConcurrency(1))
		if err != nil {
			b.Fatal(err)
		}
		defer dec.Close()
		packs := map[int64]*os.File{}
		defer func() {
			for _, f := range packs {
				f.Close()
			}
		}()
		var out []byte
		for b.Loop() {
			for _, f := range frames {
				p := packs[f.Pack]
				if p == nil {
					if p, err = os.Open(st.blobs.PackPath(f.Pack)); err != nil {
						b.Fatal(err)
					}
					packs[f.Pack] = p
				}
				comp := make([]byte, f.CLen)
				if _, err := p.ReadAt(comp, f.DataOff); err != nil {
					b.Fatal(err)
				}
				if out, err = dec.DecodeAll(comp, out[:0]); err != nil {
					b.Fatal(err)
				}
			}
		}
	})
	run("NarRender", func(b *testing.B) {
		for b.Loop() {
			b.StopTimer()
			st.blobs.DropCache()
			b.StartTimer()
			if k, err := st.NarRender(ctx, pathA, io.Discard); err != nil || k != int64(len(n)) {
				b.Fatal(k, err)
			}
		}
	})
}

// TestRenderManyFilesDecodesEachFrameOnce: a render of a path of many
// files in many frames, with read-ahead across files, gives the NAR it was
// made from and decodes each of its frames once.
func TestRenderManyFilesDecodesEachFrameOnce(t *testing.T) {
	st, err := Open(context.Background(), t.TempDir(), Options{Blobs: blobs.Options{FrameSize: blobs.MaxChunk}})
	if err != nil {
		t.Fatal(err)
	}
	defer st.Close()
	n := manyFilesNAR(t, 120, 1<<10, 512<<10, 0)
	if err := add(t, st, pathA, n); err != nil {
		t.Fatal(err)
	}
	frames := pathFrames(t, st, pathA)
	if len(frames) < 40 {
		t.Fatalf("only %d frames: the test wants many", len(frames))
	}
	for round := range 3 {
		st.blobs.DropCache()
		before := blobs.FrameDecodes()
		if got := render(t, st, pathA); !bytes.Equal(got, n) {
			t.Fatalf("round %d: render differs from the NAR ingested", round)
		}
		if got := blobs.FrameDecodes() - before; got != int64(len(frames)) {
			t.Fatalf("round %d: %d frame decodes for %d frames", round, got, len(frames))
		}
	}
}

// TestConcurrentRendersDecodeEachFrameOnce: renders of several paths at
// once, in a cache the size serve gives it by default (40% of 128 MiB) and
// half the size of the paths, each with its 16 MiB of read-ahead, do not
// evict each other's frames before they are read: every frame is decoded
// once.
func TestConcurrentRendersDecodeEachFrameOnce(t *testing.T) {
	st, err := Open(context.Background(), t.TempDir(), Options{Blobs: blobs.Options{FrameSize: blobs.MaxChunk, CacheBytes: 128 << 20 * 4 / 10}})
	if err != nil {
		t.Fatal(err)
	}
	defer st.Close()
	// About 100 MB in all, twice the cache.
	names := []string{pathA, pathB, pathC, "33333333333333333333333333333333-d"}
	nars := make([][]byte, len(names))
	frames := map[int64]bool{}
	for i, name := range names {
		nars[i] = manyFilesNAR(t, 160, 1<<10, 1<<20, int64(1000*i))
		if err := add(t, st, name, nars[i]); err != nil {
			t.Fatal(err)
		}
		for _, f := range pathFrames(t, st, name) {
			frames[f.ID] = true
		}
	}
	st.blobs.DropCache()
	before := blobs.FrameDecodes()
	errs := make(chan error, len(names))
	for i, name := range names {
		go func() {
			var out bytes.Buffer
			_, err := st.NarRender(context.Background(), name, &out)
			if err == nil && !bytes.Equal(out.Bytes(), nars[i]) {
				err = fmt.Errorf("%s: render differs from the NAR ingested", name)
			}
			errs <- err
		}()
	}
	for range names {
		if err := <-errs; err != nil {
			t.Fatal(err)
		}
	}
	if got := blobs.FrameDecodes() - before; got != int64(len(frames)) {
		t.Fatalf("%d frame decodes for %d frames", got, len(frames))
	}
}
