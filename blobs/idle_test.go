package blobs

import (
	"bytes"
	"context"
	"io"
	"math/rand"
	"sync"
	"testing"

	"golang.org/x/sys/unix"

	"github.com/casnix/casnix/db"
	"github.com/casnix/casnix/sched"
)

// TestWriterIdle: the compressors of a Writer for idle work
// (sched.WithIdle) run at idle priority, those of any other at ordinary
// priority, and both store what they are given.
func TestWriterIdle(t *testing.T) {
	var mu sync.Mutex
	var policies []uint32
	testHookCompress = func() {
		p, err := sched.Policy()
		if err != nil {
			t.Error(err)
		}
		mu.Lock()
		policies = append(policies, p)
		mu.Unlock()
	}
	t.Cleanup(func() { testHookCompress = nil })
	for _, tc := range []struct {
		name string
		ctx  context.Context
		idle bool
	}{
		{"ordinary", context.Background(), false},
		{"idle", sched.WithIdle(context.Background()), true},
	} {
		t.Run(tc.name, func(t *testing.T) {
			s, d := openBlobs(t, Options{Workers: 2, FrameSize: MaxChunk})
			policies = nil
			data := make([]byte, 2<<20)
			rand.New(rand.NewSource(1)).Read(data)
			w := s.NewWriter(tc.ctx)
			defer w.Done()
			dg, err := w.WriteBlob(bytes.NewReader(data), int64(len(data)))
			if err != nil {
				t.Fatal(err)
			}
			if err := w.Flush(); err != nil {
				t.Fatal(err)
			}
			if err := d.Write(tc.ctx, func(tx *db.Tx) error { return w.Commit(tc.ctx, tx) }); err != nil {
				t.Fatal(err)
			}
			w.Committed()
			mu.Lock()
			got := policies
			mu.Unlock()
			if len(got) < 2 {
				t.Fatalf("%d frames compressed, want several", len(got))
			}
			for _, p := range got {
				if (p == unix.SCHED_IDLE) != tc.idle {
					t.Fatalf("a compressor ran at policy %d; want idle %v", p, tc.idle)
				}
			}
			br, err := s.Open(context.Background(), dg)
			if err != nil {
				t.Fatal(err)
			}
			if got, err := io.ReadAll(br); err != nil || !bytes.Equal(got, data) {
				t.Fatalf("read back: %v, equal %v", err, bytes.Equal(got, data))
			}
		})
	}
}
