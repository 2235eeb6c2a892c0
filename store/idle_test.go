package store

import (
	"bytes"
	"context"
	"io"
	"sync"
	"testing"

	"golang.org/x/sys/unix"

	"github.com/casnix/casnix/sched"
)

// policyReader records the scheduling policy of the threads that read it:
// those of the ingest.
type policyReader struct {
	r        io.Reader
	mu       sync.Mutex
	policies map[uint32]bool
}

func (p *policyReader) Read(b []byte) (int, error) {
	pol, err := sched.Policy()
	if err != nil {
		return 0, err
	}
	p.mu.Lock()
	p.policies[pol] = true
	p.mu.Unlock()
	return p.r.Read(b)
}

// onIdleThread runs fn on an idle thread of its own, outside
// sched.RunIdle's turns (which Batch.Add takes).
func onIdleThread(fn func()) {
	done := make(chan struct{})
	go func() {
		defer close(done)
		sched.Idle()
		fn()
	}()
	<-done
}

// TestBatchIdle: a batch of idle work (sched.WithIdle, the pull-through's
// ingest) parses its NAR on an idle thread and commits on an ordinary one,
// even when its caller's thread is idle; any other batch does both on
// ordinary threads. Both store the path.
func TestBatchIdle(t *testing.T) {
	var mu sync.Mutex
	var commits []uint32
	testHookCommit = func() {
		p, err := sched.Policy()
		if err != nil {
			t.Error(err)
		}
		mu.Lock()
		commits = append(commits, p)
		mu.Unlock()
	}
	t.Cleanup(func() { testHookCommit = nil })
	for _, tc := range []struct {
		name string
		ctx  context.Context
		// run is the thread the caller runs the batch on.
		run  func(func())
		idle bool
	}{
		{"ordinary", context.Background(), func(fn func()) { fn() }, false},
		{"idle", sched.WithIdle(context.Background()), func(fn func()) { fn() }, true},
		{"idle from an idle thread", sched.WithIdle(context.Background()), onIdleThread, true},
	} {
		t.Run(tc.name, func(t *testing.T) {
			st := openStore(t)
			commits = nil
			n := treeNAR(t, 1<<20)
			name := pathA
			pr := &policyReader{r: bytes.NewReader(n), policies: map[uint32]bool{}}
			var err error
			tc.run(func() {
				b := st.NewBatch(tc.ctx)
				if _, err = b.Add(pr, PathInfo{Name: name}); err != nil {
					b.Abort()
					return
				}
				_, err = b.Commit()
			})
			if err != nil {
				t.Fatal(err)
			}
			if len(pr.policies) != 1 || pr.policies[unix.SCHED_IDLE] != tc.idle {
				t.Fatalf("the ingest read at policies %v; want idle %v", pr.policies, tc.idle)
			}
			mu.Lock()
			got := commits
			mu.Unlock()
			if len(got) != 1 || got[0] == unix.SCHED_IDLE {
				t.Fatalf("commit transactions ran at policies %v; want one, not idle", got)
			}
			if !bytes.Equal(render(t, st, name), n) {
				t.Fatal("NAR differs")
			}
		})
	}
}
