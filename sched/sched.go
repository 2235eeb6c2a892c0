// Package sched puts background work at idle CPU priority, so that it runs
// only on cycles nobody else wants (the background repack of a shared
// daemon must never slow a client down).
package sched

import (
	"context"
	"runtime"

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
// A panic in fn is raised again in the caller.
func RunIdle(fn func()) { run(true, fn) }

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
