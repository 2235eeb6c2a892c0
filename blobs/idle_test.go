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
	"github.com/casnix/casnix/digest"
	"github.com/casnix/casnix/sched"
)

// TestWriterIdle: a Writer for idle work (sched.WithIdle) compresses on
// its caller's thread, which the store put at idle priority (no idle
// compressor threads of its own: sched.RunIdle bounds them); any other
// Writer compresses on compressor goroutines at ordinary priority, even
// when its caller's thread is idle. Both store what they are given.
func TestWriterIdle(t *testing.T) {
	type frame struct {
		tid    int
		policy uint32
	}
	var mu sync.Mutex
	var frames []frame
	testHookCompress = func() {
		p, err := sched.Policy()
		if err != nil {
			t.Error(err)
		}
		mu.Lock()
		frames = append(frames, frame{unix.Gettid(), p})
		mu.Unlock()
	}
	t.Cleanup(func() { testHookCompress = nil })
	for _, tc := range []struct {
		name string
		ctx  context.Context
		// inline: frames are compressed on the caller's thread.
		inline bool
	}{
		{"ordinary", context.Background(), false},
		{"idle", sched.WithIdle(context.Background()), true},
	} {
		t.Run(tc.name, func(t *testing.T) {
			s, d := openBlobs(t, Options{Workers: 2, FrameSize: MaxChunk})
			frames = nil
			data := make([]byte, 2<<20)
			rand.New(rand.NewSource(1)).Read(data)
			w := s.NewWriter(tc.ctx)
			defer w.Done()
			var caller int
			var dg digest.Digest
			var err error
			// The caller runs on an idle thread of its own, as Batch.Add
			// runs idle work (sched.RunIdle).
			done := make(chan struct{})
			go func() {
				defer close(done)
				sched.Idle()
				caller = unix.Gettid()
				if dg, err = w.WriteBlob(bytes.NewReader(data), int64(len(data))); err == nil {
					err = w.EndGroup()
				}
			}()
			<-done
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
			got := frames
			mu.Unlock()
			if len(got) < 2 {
				t.Fatalf("%d frames compressed, want several", len(got))
			}
			for _, f := range got {
				if (f.tid == caller) != tc.inline || (f.policy == unix.SCHED_IDLE) != tc.inline {
					t.Fatalf("a frame compressed on thread %d (the caller's: %d) at policy %d; want inline %v", f.tid, caller, f.policy, tc.inline)
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
