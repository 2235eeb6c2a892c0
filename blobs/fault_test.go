package blobs

import (
	"bytes"
	"context"
	"errors"
	"io"
	"math/rand"
	"os"
	"sync"
	"syscall"
	"testing"

	"github.com/casnix/casnix/blobs/pack"
)

// faultyPacks fails the Nth write to a pack (optionally after writing half
// of it, a short write) or the Nth sync, with err, and remembers the file it
// failed on.
type faultyPacks struct {
	mu              sync.Mutex
	writes, syncs   int
	failWrite       int
	short           bool
	failSync        int
	err             error
	failedOn        *os.File
	syncsAfterFault int
}

type faultyWriter struct {
	f  *faultyPacks
	w  io.Writer
	os *os.File
}

func (f *faultyPacks) Writer(id int64, w io.Writer) io.Writer {
	file, _ := w.(*os.File)
	return faultyWriter{f: f, w: w, os: file}
}

func (fw faultyWriter) Write(p []byte) (int, error) {
	f := fw.f
	f.mu.Lock()
	f.writes++
	fail := f.writes == f.failWrite
	if fail {
		f.failedOn = fw.os
	}
	f.mu.Unlock()
	if !fail {
		return fw.w.Write(p)
	}
	if f.short {
		n, err := fw.w.Write(p[:len(p)/2])
		if err != nil {
			return n, err
		}
		return n, f.err
	}
	return 0, f.err
}

func (f *faultyPacks) Sync(id int64, file *os.File) error {
	f.mu.Lock()
	defer f.mu.Unlock()
	f.syncs++
	if f.failedOn != nil {
		f.syncsAfterFault++
	}
	if f.syncs == f.failSync {
		f.failedOn = file
		return f.err
	}
	return fdatasync(file)
}

// TestPackFaults injects write errors, short writes and fsync errors into a
// Writer's packs. The Writer must report the error (never acknowledge what
// it wrote), not sync again after it, and close the file it failed on
// rather than hand it to the next Writer (style.md: a writer that saw a
// write error is poisoned). The next Writer must then work, with the failed
// bytes trimmed off and everything committed readable and verified.
func TestPackFaults(t *testing.T) {
	tests := []struct {
		name   string
		faults *faultyPacks
	}{
		{"first write ENOSPC", &faultyPacks{failWrite: 1, err: syscall.ENOSPC}},
		{"short write ENOSPC", &faultyPacks{failWrite: 2, short: true, err: syscall.ENOSPC}},
		{"third write EIO", &faultyPacks{failWrite: 3, err: syscall.EIO}},
		{"fsync EIO", &faultyPacks{failSync: 1, err: syscall.EIO}},
		{"fsync ENOSPC", &faultyPacks{failSync: 1, err: syscall.ENOSPC}},
	}
	for _, tc := range tests {
		t.Run(tc.name, func(t *testing.T) {
			ctx := context.Background()
			// Small frames, so 3 MiB makes several writes of the 1 MiB buffer.
			s, d := openBlobs(t, Options{FrameSize: MaxChunk})
			r := rand.New(rand.NewSource(1))
			blob := func(n int) []byte {
				b := make([]byte, n)
				r.Read(b)
				return b
			}
			before := [][]byte{blob(300 << 10)}
			dBefore := writeBlobs(t, s, d, before...)

			f := tc.faults
			s.faults = f
			w := s.NewWriter(ctx)
			junk := blob(3 << 20)
			_, err := w.WriteBlob(bytes.NewReader(junk), int64(len(junk)))
			if err == nil {
				err = w.Flush()
			}
			if !errors.Is(err, f.err) {
				t.Fatalf("writer error %v, want %v", err, f.err)
			}
			if err := w.Commit(ctx, nil); !errors.Is(err, f.err) {
				t.Fatalf("Commit after the fault: %v, want the fault again", err)
			}
			w.Done()
			if f.failedOn == nil {
				t.Fatal("the fault was never hit")
			}
			if f.syncsAfterFault != 0 {
				t.Errorf("%d syncs after the fault: a failed fsync must not be retried nor followed by another", f.syncsAfterFault)
			}
			if _, err := f.failedOn.Stat(); !errors.Is(err, os.ErrClosed) {
				t.Errorf("the pack file the fault hit is still open (%v): it must be poisoned, not reused", err)
			}

			s.faults = nil
			after := [][]byte{blob(200 << 10), blob(1 << 20)}
			dAfter := writeBlobs(t, s, d, after...)
			for i, dg := range append(dBefore, dAfter...) {
				want := append(before, after...)[i]
				br, err := s.Open(ctx, dg)
				if err != nil {
					t.Fatal(err)
				}
				got, err := io.ReadAll(br)
				if err != nil || !bytes.Equal(got, want) {
					t.Fatalf("blob %d reads back wrong (%v)", i, err)
				}
			}
			dam, err := s.Verify(ctx, nil)
			if err != nil || len(dam) != 0 {
				t.Fatalf("verify: %v %v", err, dam)
			}
			// No bytes of the failed Writer are left behind in the packs used since.
			ids, err := d.Packs(ctx)
			if err != nil {
				t.Fatal(err)
			}
			for _, id := range ids {
				end, err := d.PackEnd(ctx, id)
				if err != nil {
					t.Fatal(err)
				}
				st, err := os.Stat(s.PackPath(id))
				if err != nil || end == 0 {
					continue // never written to, or never got a frame
				}
				if st.Size() != end {
					t.Errorf("pack %d is %d bytes, its committed frames end at %d", id, st.Size(), end)
				}
			}
		})
	}
}

// TestPackHeaderFault: a new pack whose header write fails (a full disk)
// is left with a row and a short file. A later process must not call that
// pack corrupt and refuse every import: it has no frame, so it is given its
// header again.
func TestPackHeaderFault(t *testing.T) {
	ctx := context.Background()
	s, d := openBlobs(t, Options{})
	f := &faultyPacks{failWrite: 1, short: true, err: syscall.ENOSPC}
	s.faults = f
	w := s.NewWriter(ctx)
	b := bytes.Repeat([]byte("x"), 100<<10)
	_, err := w.WriteBlob(bytes.NewReader(b), int64(len(b)))
	if err == nil {
		err = w.Flush()
	}
	w.Done()
	if !errors.Is(err, syscall.ENOSPC) {
		t.Fatalf("writer error %v, want ENOSPC from the pack header", err)
	}
	ids, err := d.Packs(ctx)
	if err != nil || len(ids) != 1 {
		t.Fatalf("packs %v (%v), want the one allocated", ids, err)
	}
	if st, err := os.Stat(s.PackPath(ids[0])); err != nil || st.Size() >= pack.HeaderSize {
		t.Fatalf("pack file %v (%v): want one with a short header", st, err)
	}

	// A new process on the same data dir.
	s2, err := Open(s.dir, d, Options{})
	if err != nil {
		t.Fatal(err)
	}
	defer s2.Close()
	got := writeBlobs(t, s2, d, b)
	br, err := s2.Open(ctx, got[0])
	if err != nil {
		t.Fatal(err)
	}
	if data, err := io.ReadAll(br); err != nil || !bytes.Equal(data, b) {
		t.Fatalf("blob reads back wrong (%v)", err)
	}
	if dam, err := s2.Verify(ctx, nil); err != nil || len(dam) != 0 {
		t.Fatalf("verify: %v %v", err, dam)
	}
	if dam, err := s2.VerifyHeaders(ctx); err != nil || len(dam) != 0 {
		t.Fatalf("verify headers: %v %v", err, dam)
	}
}
