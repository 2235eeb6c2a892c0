package fusefs

import (
	"bytes"
	"context"
	"fmt"
	"io"
	"math/rand"
	"os"
	"path/filepath"
	"sync"
	"testing"

	"github.com/hanwen/go-fuse/v2/fuse"
	"github.com/klauspost/compress/zstd"
	"golang.org/x/sys/unix"

	"github.com/casnix/casnix/blobs"
	"github.com/casnix/casnix/store"
	"github.com/casnix/casnix/tests/nixtest"
)

// go-fuse writes a read result with one writev, and calls Done only after
// it, when the result has this (unexported there) method; viewResult must
// keep it, or frames would go back to the cache before the kernel has the
// bytes.
var _ interface {
	Slices() ([][]byte, fuse.Status)
} = viewResult{}

// TestConcurrentReadsSmallCache: several processes' worth of readers, at
// once, of files spanning many frames, through a frame cache of a few
// frames: frames are evicted and their buffers reused while reads are in
// flight, and every byte must still be right. Sequential and random reads;
// the files' pages are dropped between rounds, so reads reach casnix again.
func TestConcurrentReadsSmallCache(t *testing.T) {
	nixtest.RequireFUSE(t)
	st, err := store.Open(context.Background(), t.TempDir(), store.Options{
		Blobs: blobs.Options{FrameSize: 1 << 20, CacheBytes: 3 << 20, Level: zstd.SpeedFastest},
	})
	if err != nil {
		t.Fatal(err)
	}
	src := filepath.Join(t.TempDir(), "src")
	if err := os.MkdirAll(src, 0o755); err != nil {
		t.Fatal(err)
	}
	r := rand.New(rand.NewSource(1))
	files := map[string][]byte{}
	for i := range 4 {
		// Compressible but distinct: random words.
		var b bytes.Buffer
		for b.Len() < 6<<20 {
			fmt.Fprintf(&b, "%x ", r.Uint32()>>uint(r.Intn(24)))
		}
		name := fmt.Sprintf("f%d", i)
		files[name] = b.Bytes()
		if err := os.WriteFile(filepath.Join(src, name), b.Bytes(), 0o444); err != nil {
			t.Fatal(err)
		}
	}
	addTree(t, st, pathA, src)
	mnt := t.TempDir()
	srv, err := Mount(mnt, st, Options{ListRoot: true})
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() {
		if err := srv.Unmount(); err != nil {
			t.Errorf("unmount: %v", err)
		}
		st.Close()
	})
	for round := range 3 {
		var wg sync.WaitGroup
		for name, want := range files {
			p := filepath.Join(mnt, pathA, name)
			wg.Go(func() { // sequential
				got, err := os.ReadFile(p)
				if err != nil || !bytes.Equal(got, want) {
					t.Errorf("round %d: %s read whole differs (%v)", round, name, err)
				}
			})
			wg.Go(func() { // random
				f, err := os.Open(p)
				if err != nil {
					t.Error(err)
					return
				}
				defer f.Close()
				r := rand.New(rand.NewSource(int64(len(name) + round)))
				for range 30 {
					off := r.Intn(len(want))
					buf := make([]byte, r.Intn(512<<10))
					n, err := f.ReadAt(buf, int64(off))
					if err != nil && err != io.EOF || !bytes.Equal(buf[:n], want[off:off+n]) {
						t.Errorf("round %d: %s ReadAt(%d, %d) differs (%v)", round, name, off, len(buf), err)
						return
					}
				}
			})
		}
		wg.Wait()
		// Drop the files' pages so the next round reads through casnix.
		for name := range files {
			f, err := os.Open(filepath.Join(mnt, pathA, name))
			if err != nil {
				t.Fatal(err)
			}
			err = unix.Fadvise(int(f.Fd()), 0, 0, unix.FADV_DONTNEED)
			f.Close()
			if err != nil {
				t.Fatal(err)
			}
		}
	}
}

// TestReadAheadWindow: a mount gets the kernel read-ahead window it asks
// for (ReadAheadKB by default), and a sequential read through it arrives
// in requests larger than the kernel's 128 KiB default.
func TestReadAheadWindow(t *testing.T) {
	for _, tc := range []struct {
		name string
		opt  int
		want int
	}{
		{"default", 0, ReadAheadKB},
		{"explicit", 2048, 2048},
	} {
		t.Run(tc.name, func(t *testing.T) {
			nixtest.RequireFUSE(t)
			st, err := store.Open(context.Background(), t.TempDir(), store.Options{})
			if err != nil {
				t.Fatal(err)
			}
			src := sourceTree(t)
			addTree(t, st, pathA, src)
			mnt := t.TempDir()
			srv, err := Mount(mnt, st, Options{ReadAheadKB: tc.opt})
			if err != nil {
				t.Fatal(err)
			}
			t.Cleanup(func() {
				if err := srv.Unmount(); err != nil {
					t.Errorf("unmount: %v", err)
				}
				st.Close()
			})
			got, err := readAhead(mnt)
			if err != nil {
				t.Fatal(err)
			}
			if got != tc.want {
				t.Fatalf("read_ahead_kb = %d, want %d", got, tc.want)
			}
			want, err := os.ReadFile(filepath.Join(src, "share", "big"))
			if err != nil {
				t.Fatal(err)
			}
			largestRead.Store(0)
			b, err := os.ReadFile(filepath.Join(mnt, pathA, "share", "big"))
			if err != nil || !bytes.Equal(b, want) {
				t.Fatalf("read differs (%v)", err)
			}
			if n := largestRead.Load(); n <= 128<<10 {
				t.Fatalf("largest READ request %d bytes, want more than the kernel default's 128 KiB", n)
			}
		})
	}
}
