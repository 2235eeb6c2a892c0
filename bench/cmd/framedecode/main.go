// Command framedecode measures how fast casnix's zstd decoder decodes the
// frames of pack files: the CPU floor of a cold read through the FUSE mount,
// for comparing data dirs imported with different --zstd-level and
// --frame-size.
//
//	framedecode [-decoders N] [-runs R] PACK...
//
// It loads the packs' frames into memory, then R times decodes every frame
// once with N goroutines sharing one decoder set up as blobs.Open sets it
// up (checksums verified), each goroutine decoding into a few buffers in
// turn (as the frame cache recycles them). It prints per run: frames, raw
// MB, wall seconds, CPU seconds of the process and raw MB per CPU second
// (MB = 10^6 bytes).
package main

import (
	"bufio"
	"errors"
	"flag"
	"fmt"
	"io"
	"os"
	"sync"
	"syscall"
	"time"

	"github.com/klauspost/compress/zstd"

	"github.com/casnix/casnix/blobs/pack"
)

type frame struct {
	comp []byte
	raw  int64
}

func main() {
	decoders := flag.Int("decoders", 1, "goroutines decoding at once")
	runs := flag.Int("runs", 3, "passes over all frames")
	flag.Parse()
	if flag.NArg() == 0 || *decoders < 1 || *runs < 1 {
		fmt.Fprintln(os.Stderr, "usage: framedecode [-decoders N] [-runs R] PACK...")
		os.Exit(2)
	}
	var frames []frame
	for _, p := range flag.Args() {
		fs, err := load(p)
		if err != nil {
			fmt.Fprintln(os.Stderr, "error:", err)
			os.Exit(1)
		}
		frames = append(frames, fs...)
	}
	dec, err := zstd.NewReader(nil, zstd.WithDecoderConcurrency(0),
		zstd.WithDecoderMaxMemory(pack.MaxFrameBytes), zstd.IgnoreChecksum(false))
	if err != nil {
		fmt.Fprintln(os.Stderr, "error:", err)
		os.Exit(1)
	}
	var raw int64
	for _, f := range frames {
		raw += f.raw
	}
	for range *runs {
		c0, t0 := cpu(), time.Now()
		if err := decodeAll(dec, frames, *decoders); err != nil {
			fmt.Fprintln(os.Stderr, "error:", err)
			os.Exit(1)
		}
		wall, c := time.Since(t0).Seconds(), (cpu() - c0).Seconds()
		fmt.Printf("frames=%d raw_mb=%.0f decoders=%d wall_s=%.3f cpu_s=%.3f mb_per_cpu_s=%.0f\n",
			len(frames), float64(raw)/1e6, *decoders, wall, c, float64(raw)/1e6/c)
	}
}

// load reads every frame record of one pack file.
func load(path string) ([]frame, error) {
	f, err := os.Open(path)
	if err != nil {
		return nil, err
	}
	defer f.Close()
	r := bufio.NewReaderSize(f, 1<<20)
	h := make([]byte, pack.HeaderSize)
	if _, err := io.ReadFull(r, h); err != nil {
		return nil, fmt.Errorf("%s: header: %w", path, err)
	}
	if err := pack.CheckHeader(h); err != nil {
		return nil, fmt.Errorf("%s: %w", path, err)
	}
	var out []frame
	for {
		rec, err := pack.ReadRecord(r)
		if errors.Is(err, io.EOF) {
			return out, nil
		}
		if err != nil {
			return nil, fmt.Errorf("%s: frame %d: %w", path, len(out), err)
		}
		comp := make([]byte, rec.CLen)
		if _, err := io.ReadFull(r, comp); err != nil {
			return nil, fmt.Errorf("%s: frame %d: %w", path, len(out), err)
		}
		out = append(out, frame{comp: comp, raw: rec.RawLen})
	}
}

// decodeAll decodes every frame once with n goroutines.
func decodeAll(dec *zstd.Decoder, frames []frame, n int) error {
	next := make(chan frame)
	errs := make(chan error, n)
	var wg sync.WaitGroup
	for range n {
		wg.Go(func() {
			// Four buffers in turn: a decoded frame is not reused at once.
			var bufs [4][]byte
			k := 0
			for f := range next {
				out, err := dec.DecodeAll(f.comp, bufs[k][:0])
				if err == nil && int64(len(out)) != f.raw {
					err = fmt.Errorf("frame decoded to %d bytes, record says %d", len(out), f.raw)
				}
				if err != nil {
					errs <- err
					for range next { // drain
					}
					return
				}
				bufs[k] = out
				k = (k + 1) % len(bufs)
			}
		})
	}
	for _, f := range frames {
		next <- f
	}
	close(next)
	wg.Wait()
	close(errs)
	return <-errs
}

func cpu() time.Duration {
	var ru syscall.Rusage
	if err := syscall.Getrusage(syscall.RUSAGE_SELF, &ru); err != nil {
		return 0
	}
	return time.Duration(ru.Utime.Nano() + ru.Stime.Nano())
}
