// Package sched puts background work at idle CPU priority, so that it runs
// only on cycles nobody else wants (the background repack of a shared
// daemon must never slow a client down).
package sched

import (
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
