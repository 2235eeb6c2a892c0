package subst

import (
	"bytes"
	"context"
	"fmt"
	"math/rand"
	"os"
	"path/filepath"
	"testing"
	"time"

	"golang.org/x/sys/unix"

	"github.com/casnix/casnix/binarycache"
	"github.com/casnix/casnix/nar"
	"github.com/casnix/casnix/store"
)

// benchText is n bytes of text-like data (words of a shared vocabulary):
// it compresses a few times, as real files do, so decompressing the
// upstream file and compressing the packs cost what they cost.
func benchText(n int, seed int64) []byte {
	r := rand.New(rand.NewSource(seed))
	words := make([][]byte, 4000)
	for i := range words {
		w := make([]byte, 4+2*r.Intn(9))
		for k := range w {
			w[k] = "0123456789abcdef"[r.Intn(16)]
		}
		words[i] = w
	}
	var b bytes.Buffer
	for b.Len() < n {
		b.Write(words[r.Intn(len(words))])
		b.WriteByte(' ')
	}
	return b.Bytes()[:n]
}

// BenchmarkSubstitute substitutes one path of 64 MiB (8 files) from a
// file:// zstd cache into an empty store per iteration, fetched directly
// (FetchNAR: upstream → decompress → ingest) and spooled (with a
// PullThrough open: upstream → decompress → spool file → ingest), the
// cost the pull-through adds to every substitution of its process.
// Reports MB/s of NAR and CPU seconds per op (the whole process).
//
//	go test -run '^$' -bench Substitute -count 5 ./subst/
func BenchmarkSubstitute(b *testing.B) {
	ctx := context.Background()
	src := openStore(b)
	root := filepath.Join(b.TempDir(), "p")
	os.MkdirAll(root, 0o755)
	for i := range 8 {
		os.WriteFile(filepath.Join(root, fmt.Sprintf("f%d", i)), benchText(8<<20, int64(i)), 0o644)
	}
	var buf bytes.Buffer
	if _, err := nar.DumpPath(&buf, root); err != nil {
		b.Fatal(err)
	}
	narSize := int64(buf.Len())
	batch := src.NewBatch(ctx)
	if _, err := batch.Add(&buf, store.PathInfo{Name: pathD}); err != nil {
		b.Fatal(err)
	}
	if _, err := batch.Commit(); err != nil {
		b.Fatal(err)
	}
	dir := b.TempDir()
	ex := &binarycache.Exporter{Store: src, Dir: dir, StoreDir: "/nix/store", Compression: "zstd", Jobs: 1}
	if _, err := ex.Export(ctx, []string{pathD}); err != nil {
		b.Fatal(err)
	}
	for _, mode := range []string{"direct", "spooled"} {
		b.Run(mode, func(b *testing.B) {
			b.SetBytes(narSize)
			var cpu time.Duration
			for b.Loop() {
				b.StopTimer()
				dst := openStore(b)
				s, err := New(dst, []string{"file://" + dir}, Options{StoreDir: "/nix/store"})
				if err != nil {
					b.Fatal(err)
				}
				var p *PullThrough
				if mode == "spooled" {
					p = s.PullThrough(false)
				}
				c0 := cpuTime()
				b.StartTimer()
				if _, err := s.Substitute(ctx, []string{pathD}, false); err != nil {
					b.Fatal(err)
				}
				b.StopTimer()
				cpu += cpuTime() - c0
				if p != nil {
					p.Close()
				}
				s.Close()
				dst.Close()
				b.StartTimer()
			}
			b.ReportMetric(cpu.Seconds()/float64(b.N), "cpu-s/op")
		})
	}
}

// cpuTime is the process's user and system CPU time so far.
func cpuTime() time.Duration {
	var ru unix.Rusage
	unix.Getrusage(unix.RUSAGE_SELF, &ru)
	return time.Duration(ru.Utime.Nano() + ru.Stime.Nano())
}
