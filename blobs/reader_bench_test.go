package blobs

import (
	"bytes"
	"context"
	"io"
	"math/rand"
	"sync"
	"sync/atomic"
	"testing"

	"github.com/klauspost/compress/zstd"
	"golang.org/x/sys/unix"

	"github.com/casnix/casnix/db"
	"github.com/casnix/casnix/digest"
)

// benchText returns n bytes of text-like data (random hex words separated
// by spaces, like bench/fuse.sh's 1 GiB file): it compresses about 2x, so
// decoding costs what it costs on real files.
func benchText(n int, seed int64) []byte {
	r := rand.New(rand.NewSource(seed))
	words := make([][]byte, 20000)
	for i := range words {
		w := make([]byte, 2+r.Intn(9))
		r.Read(w)
		words[i] = []byte(hexOf(w))
	}
	var b bytes.Buffer
	b.Grow(n + 32)
	for b.Len() < n {
		b.Write(words[r.Intn(len(words))])
		b.WriteByte(' ')
	}
	return b.Bytes()[:n]
}

func hexOf(b []byte) string {
	const digits = "0123456789abcdef"
	out := make([]byte, 2*len(b))
	for i, c := range b {
		out[2*i], out[2*i+1] = digits[c>>4], digits[c&15]
	}
	return string(out)
}

// benchBlob is one 256 MiB blob stored with the default options.
type benchBlob struct {
	s      *Store
	d      digest.Digest
	frames []db.Frame // the blob's frames in order
	size   int64
}

func setupBenchBlob(b *testing.B) *benchBlob {
	s, d := openBlobs(b, Options{})
	data := benchText(256<<20, 1)
	bb := &benchBlob{s: s, d: writeBlobs(b, s, d, data)[0], size: int64(len(data))}
	br, err := s.Open(context.Background(), bb.d)
	if err != nil {
		b.Fatal(err)
	}
	seen := map[int64]bool{}
	for i := range br.chunks {
		loc, err := br.locate(i)
		if err != nil {
			b.Fatal(err)
		}
		if !seen[loc.ID] {
			seen[loc.ID] = true
			bb.frames = append(bb.frames, loc.Frame)
		}
	}
	return bb
}

// cpuTime is the CPU time (user + system) the process has used.
func cpuTime(b *testing.B) float64 {
	var ru unix.Rusage
	if err := unix.Getrusage(unix.RUSAGE_SELF, &ru); err != nil {
		b.Fatal(err)
	}
	return float64(ru.Utime.Nano()+ru.Stime.Nano()) / 1e9
}

// withCPU runs a sub-benchmark that also reports the CPU seconds it used
// per op (on a shared machine wall time swings with other jobs' load, CPU
// time much less, and the two together show how parallel a reader is) and
// the frames it decoded per op (read-ahead must decode each frame once).
func withCPU(b *testing.B, name string, size int64, f func(b *testing.B)) {
	b.Run(name, func(b *testing.B) {
		b.SetBytes(size)
		c0 := cpuTime(b)
		frameDecodes.Store(0)
		f(b)
		b.ReportMetric(float64(frameDecodes.Load())/float64(b.N), "decodes/op")
		b.ReportMetric((cpuTime(b)-c0)/float64(b.N), "cpu-s/op")
	})
}

// BenchmarkBlobRead reads a 256 MiB blob (4 MiB frames, level "better")
// sequentially with a cold frame cache (the packs are in the page cache),
// the way each reader does it, next to its anchor: decoding the same frames
// one after another with one zstd decoder (what `zstd -d` would do).
func BenchmarkBlobRead(b *testing.B) {
	bb := setupBenchBlob(b)
	s := bb.s
	ctx := context.Background()
	cold := func(b *testing.B) *BlobReader {
		b.StopTimer()
		s.cache = newFrameCache(s.opts.CacheBytes)
		br, err := s.Open(ctx, bb.d)
		if err != nil {
			b.Fatal(err)
		}
		b.StartTimer()
		return br
	}
	withCPU(b, "anchor-zstd-1-decoder", bb.size, func(b *testing.B) {
		dec, err := zstd.NewReader(nil, zstd.WithDecoderConcurrency(1))
		if err != nil {
			b.Fatal(err)
		}
		defer dec.Close()
		var out []byte
		for b.Loop() {
			for _, f := range bb.frames {
				r, err := s.reader(f.Pack)
				if err != nil {
					b.Fatal(err)
				}
				comp := make([]byte, f.CLen)
				if _, err := r.ReadAt(comp, f.DataOff); err != nil {
					b.Fatal(err)
				}
				if out, err = dec.DecodeAll(comp, out[:0]); err != nil {
					b.Fatal(err)
				}
			}
		}
	})
	withCPU(b, "WriteTo", bb.size, func(b *testing.B) {
		for b.Loop() {
			br := cold(b)
			if n, err := br.WriteTo(io.Discard); err != nil || n != bb.size {
				b.Fatal(n, err)
			}
		}
	})
	withCPU(b, "Read-128KiB", bb.size, func(b *testing.B) {
		buf := make([]byte, 128<<10)
		for b.Loop() {
			br := cold(b)
			var n int64
			for {
				k, err := br.Read(buf)
				n += int64(k)
				if err == io.EOF {
					break
				}
				if err != nil {
					b.Fatal(err)
				}
			}
			if n != bb.size {
				b.Fatal(n)
			}
		}
	})
	// What fusefs does: 128 KiB reads in file order, two in flight (the
	// kernel's async read-ahead keeps several requests queued and go-fuse
	// serves them in parallel), each announcing the read-ahead; fusefs
	// hands out Views, ReadAt (which copies) is there for comparison.
	for _, view := range []bool{false, true} {
		name := "ReadAt-128KiB-fuse"
		if view {
			name = "View-128KiB-fuse"
		}
		withCPU(b, name, bb.size, func(b *testing.B) {
			for b.Loop() {
				br := cold(b)
				var wg sync.WaitGroup
				var next atomic.Int64
				const req = 128 << 10
				for range 2 {
					wg.Go(func() {
						buf := make([]byte, req)
						for {
							off := next.Add(req) - req
							if off >= bb.size {
								return
							}
							br.ReadAhead(off + req)
							if view {
								v, err := br.View(off, req)
								if err != nil {
									b.Error(err)
									return
								}
								v.Release()
							} else if _, err := br.ReadAt(buf, off); err != nil && err != io.EOF {
								b.Error(err)
								return
							}
						}
					})
				}
				wg.Wait()
			}
		})
	}
}
