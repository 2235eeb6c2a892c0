package sched

import (
	"context"
	"runtime"
	"sync"
	"testing"
	"time"

	"golang.org/x/sys/unix"
)

// TestIdle: the goroutine's thread runs in SCHED_IDLE afterwards, and a
// goroutine it starts does not.
func TestIdle(t *testing.T) {
	type result struct {
		ok            bool
		self, child   uint32
		selfE, childE error
	}
	done := make(chan result)
	go func() {
		var r result
		r.ok = Idle()
		r.self, r.selfE = Policy()
		c := make(chan struct{})
		go func() {
			r.child, r.childE = Policy()
			close(c)
		}()
		<-c
		done <- r
	}()
	r := <-done
	if !r.ok || r.selfE != nil || r.self != unix.SCHED_IDLE {
		t.Fatalf("Idle: took %v; policy %d (%v), want SCHED_IDLE", r.ok, r.self, r.selfE)
	}
	if r.childE != nil || r.child == unix.SCHED_IDLE {
		t.Errorf("a goroutine started from the idle one runs at policy %d (%v)", r.child, r.childE)
	}
}

// TestRun: RunIdle runs its func at idle priority and RunOrdinary at
// ordinary priority, whichever thread calls them, and both raise a panic
// in the caller.
func TestRun(t *testing.T) {
	policy := func(run func(func())) uint32 {
		var p uint32
		var err error
		run(func() { p, err = Policy() })
		if err != nil {
			t.Fatal(err)
		}
		return p
	}
	for _, tc := range []struct {
		name     string
		run      func(func())
		wantIdle bool
	}{
		{"RunIdle", runIdle, true},
		{"RunOrdinary", RunOrdinary, false},
		{"RunOrdinary from idle", func(fn func()) { runIdle(func() { RunOrdinary(fn) }) }, false},
		{"RunIdle from ordinary", func(fn func()) { RunOrdinary(func() { runIdle(fn) }) }, true},
	} {
		t.Run(tc.name, func(t *testing.T) {
			if got := policy(tc.run) == unix.SCHED_IDLE; got != tc.wantIdle {
				t.Fatalf("idle %v, want %v", got, tc.wantIdle)
			}
			func() {
				defer func() {
					if r := recover(); r != "boom" {
						t.Fatalf("recovered %v, want the func's panic", r)
					}
				}()
				tc.run(func() { panic("boom") })
			}()
		})
	}
	if p := policy(func(fn func()) { fn() }); p == unix.SCHED_IDLE {
		t.Fatal("the test's own thread went idle")
	}
}

func runIdle(fn func()) {
	if err := RunIdle(context.Background(), fn); err != nil {
		panic(err)
	}
}

// TestRunIdleTurns: at most GOMAXPROCS-1 RunIdle funcs run at once (one
// with GOMAXPROCS 1), the others wait for a turn, and one whose context
// ends while it waits returns its error without running.
func TestRunIdleTurns(t *testing.T) {
	defer runtime.GOMAXPROCS(runtime.GOMAXPROCS(0))
	for _, tc := range []struct{ procs, want int }{{1, 1}, {2, 1}, {3, 2}} {
		runtime.GOMAXPROCS(tc.procs)
		var mu sync.Mutex
		running, most := 0, 0
		release := make(chan struct{})
		var wg sync.WaitGroup
		for range tc.want + 2 {
			wg.Go(func() {
				runIdle(func() {
					mu.Lock()
					running++
					most = max(most, running)
					mu.Unlock()
					<-release
					mu.Lock()
					running--
					mu.Unlock()
				})
			})
		}
		for deadline := time.Now().Add(10 * time.Second); ; time.Sleep(time.Millisecond) {
			mu.Lock()
			n := running
			mu.Unlock()
			if n == tc.want && Waiting() == 2 {
				break
			}
			if time.Now().After(deadline) {
				t.Fatalf("GOMAXPROCS %d: %d running, %d waiting, want %d and 2", tc.procs, n, Waiting(), tc.want)
			}
		}
		ctx, cancel := context.WithTimeout(context.Background(), 20*time.Millisecond)
		ran := false
		if err := RunIdle(ctx, func() { ran = true }); err != context.DeadlineExceeded || ran {
			t.Fatalf("GOMAXPROCS %d: waiting with an ended context: %v, ran %v", tc.procs, err, ran)
		}
		cancel()
		close(release)
		wg.Wait()
		if w := Waiting(); w != 0 {
			t.Fatalf("GOMAXPROCS %d: %d still counted waiting", tc.procs, w)
		}
		if most != tc.want {
			t.Fatalf("GOMAXPROCS %d: %d ran at once, want %d", tc.procs, most, tc.want)
		}
	}
}

// TestWithIdle: only a context WithIdle marked (or one derived from it)
// says idle.
func TestWithIdle(t *testing.T) {
	ctx := context.Background()
	if IsIdle(ctx) {
		t.Fatal("background is idle")
	}
	idle := WithIdle(ctx)
	child, cancel := context.WithCancel(idle)
	defer cancel()
	if !IsIdle(idle) || !IsIdle(child) {
		t.Fatal("marked context not idle")
	}
}
