package sched

import (
	"testing"

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
