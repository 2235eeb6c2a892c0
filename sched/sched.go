// Package sched puts background work at idle CPU priority, so that it runs
// only on cycles nobody else wants (the background repack of a shared
// daemon must never slow a client down).
package sched

import (
	"context"
	"runtime"
	"sync"

	"golang.org/x/sys/unix"
)

// Idle locks the calling goroutine to its OS thread and moves the thread to
// Linux's SCHED_IDLE class. Go cannot give a goroutine a priority, only a
// thread: the caller must never call runtime.UnlockOSThread, so the thread
// is discarded when the goroutine ends instead of running other goroutines
// at idle priority. Goroutines it starts run on ordinary threads. It
// reports whether the kernel took the class (the work still runs if not).
func Idle() bool {
	runtime.LockOSThread()
	err := unix.SchedSetAttr(0, &unix.SchedAttr{Size: unix.SizeofSchedAttr, Policy: unix.SCHED_IDLE}, 0)
	return err == nil
}

// Policy is the scheduling policy of the calling thread (unix.SCHED_*), for
// tests.
func Policy() (uint32, error) {
	a, err := unix.SchedGetAttr(0, 0)
	if err != nil {
		return 0, err
	}
	return a.Policy, nil
}

type idleKey struct{}

// WithIdle marks the work done under the returned context as background
// work nobody waits for (the HTTP pull-through's ingest of what a client
// streams past it): the store runs its CPU work on idle threads (RunIdle)
// and its commits on ordinary ones (RunOrdinary). Work a client waits
// for must not carry it.
func WithIdle(ctx context.Context) context.Context {
	return context.WithValue(ctx, idleKey{}, true)
}

// IsIdle reports whether ctx marks idle work (WithIdle).
func IsIdle(ctx context.Context) bool {
	v, _ := ctx.Value(idleKey{}).(bool)
	return v
}

// RunIdle runs fn on a fresh goroutine at idle priority (Idle) and waits
// for it. The goroutine ends with fn, so its thread is discarded and no
// pooled thread stays idle. fn must not hold a lock ordinary work waits
// on for long: a busy machine may not run it for a while (RunOrdinary).
// Nor may it start idle threads of its own: at most GOMAXPROCS-1 RunIdle
// funcs (at least one) run at once, the others wait for a turn (or until
// ctx is done: ctx.Err()), because a thread the kernel leaves waiting
// holds one of Go's Ps all that time, and idle threads holding every P
// would keep every ordinary goroutine of the process waiting with them
// (four idle ingests with idle compressors on 2 CPUs that two spinning
// processes kept busy: an ordinary goroutine's 1 ms sleeps woke 140 ms late
// or more one time in ten, up to 0.5 s, against 20 ms beside four ordinary
// ingests and 0.1 ms with these turns). A panic in fn is raised again in
// the caller.
func RunIdle(ctx context.Context, fn func()) error {
	if err := turns.acquire(ctx); err != nil {
		return err
	}
	defer turns.release()
	run(true, fn)
	return nil
}

// turns counts the RunIdle funcs running.
var turns idleTurns

type idleTurns struct {
	mu      sync.Mutex
	running int
	waiting int           // RunIdle funcs waiting for a turn
	wake    chan struct{} // closed when a turn ends
}

// Waiting reports how many RunIdle funcs wait for a turn: long idle work
// holding one (the background repack) gives it up when others wait.
func Waiting() int {
	turns.mu.Lock()
	defer turns.mu.Unlock()
	return turns.waiting
}

// limit is how many may run: GOMAXPROCS can change (the FUSE mount adds
// two), so it is read each time.
func (t *idleTurns) limit() int { return max(1, runtime.GOMAXPROCS(0)-1) }

func (t *idleTurns) acquire(ctx context.Context) error {
	waiting := false
	defer func() {
		if waiting {
			t.mu.Lock()
			t.waiting--
			t.mu.Unlock()
		}
	}()
	for {
		t.mu.Lock()
		if t.running < t.limit() {
			t.running++
			if waiting {
				t.waiting--
				waiting = false
			}
			t.mu.Unlock()
			return nil
		}
		if !waiting {
			t.waiting++
			waiting = true
		}
		if t.wake == nil {
			t.wake = make(chan struct{})
		}
		wake := t.wake
		t.mu.Unlock()
		select {
		case <-wake:
		case <-ctx.Done():
			return ctx.Err()
		}
	}
}

func (t *idleTurns) release() {
	t.mu.Lock()
	defer t.mu.Unlock()
	t.running--
	if t.wake != nil {
		close(t.wake)
		t.wake = nil
	}
}

// RunOrdinary runs fn on a fresh goroutine, so on an ordinary thread even
// when the caller's is idle, and waits for it: for the short critical
// sections of idle work (an SQLite write transaction, whose lock every
// writer waits on).
func RunOrdinary(fn func()) { run(false, fn) }

func run(idle bool, fn func()) {
	done := make(chan any, 1)
	go func() {
		ok := false
		defer func() {
			if !ok {
				done <- recover()
			}
		}()
		if idle {
			Idle()
		}
		fn()
		ok = true
		done <- nil
	}()
	if p := <-done; p != nil {
		panic(p)
	}
}
