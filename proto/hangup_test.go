package proto

import (
	"bytes"
	"context"
	"log/slog"
	"net"
	"os"
	"path/filepath"
	"strings"
	"sync"
	"sync/atomic"
	"testing"
	"time"

	"golang.org/x/sys/unix"

	"github.com/casnix/casnix/lockfile"
	"github.com/casnix/casnix/store"
)

// syncBuffer is a bytes.Buffer the server's logger and the test share.
type syncBuffer struct {
	mu sync.Mutex
	b  bytes.Buffer
}

func (s *syncBuffer) Write(p []byte) (int, error) {
	s.mu.Lock()
	defer s.mu.Unlock()
	return s.b.Write(p)
}

func (s *syncBuffer) String() string {
	s.mu.Lock()
	defer s.mu.Unlock()
	return s.b.String()
}

// flockHeld reports whether anyone holds a flock on path, by trying to take
// it without waiting (and letting it go at once). /proc/locks is no oracle:
// it is read in pieces while other tests' locks come and go, and a line
// can be skipped.
func flockHeld(t *testing.T, path string) bool {
	t.Helper()
	f, err := os.Open(path)
	if err != nil {
		if os.IsNotExist(err) {
			return false
		}
		t.Fatal(err)
	}
	defer f.Close()
	switch err := unix.Flock(int(f.Fd()), unix.LOCK_EX|unix.LOCK_NB); err {
	case nil:
		unix.Flock(int(f.Fd()), unix.LOCK_UN)
		return false
	case unix.EWOULDBLOCK:
		return true
	default:
		t.Fatalf("flock %s: %v", path, err)
		return false
	}
}

// waitFor polls cond until it holds or within passes.
func waitFor(within time.Duration, cond func() bool) bool {
	for end := time.Now().Add(within); ; time.Sleep(10 * time.Millisecond) {
		if cond() {
			return true
		}
		if time.Now().After(end) {
			return false
		}
	}
}

// splitRequest sends what the client wrote so far and pauses, so the
// server reads the op's arguments in a read of their own, which sets the
// stall timeout's read deadline, as a request split over packets does.
func splitRequest(cl *client) {
	cl.flush()
	time.Sleep(50 * time.Millisecond)
}

// TestHangupStopsOp: an op that works without reading from its client
// (VerifyStore, CollectGarbage) stops when the client hangs up, and
// releases its lock at once, even if the client sent a byte more first; a
// client that only half-closes still gets its answer. An untrusted client
// starting a verify and hanging up, again and again, could otherwise keep
// everyone else's verify refused. Each op is held inside its lock by a
// lock it waits for (as behind a long collection), so without hang-up
// detection it would wait until the test lets it go.
func TestHangupStopsOp(t *testing.T) {
	verify := func(cl *client) {
		cl.w.u64(opVerifyStore)
		splitRequest(cl)
		cl.w.boolean(true) // checkContents
		cl.w.boolean(false)
	}
	deleteDead := func(cl *client) {
		cl.w.u64(opCollectGarbage)
		splitRequest(cl)
		cl.w.u64(uint64(store.GCDeleteDead))
		cl.w.strings(nil)
		for i := 0; i < 5; i++ { // ignoreLiveness, maxFreed, 3 obsolete
			cl.w.u64(0)
		}
	}
	ops := []struct {
		name    string
		trusted bool
		send    func(*client)
		// block holds the op inside its lock (held, a file of the data
		// dir) until the returned func is called.
		block  func(t *testing.T, st *store.Store) func()
		held   string
		answer func(*client)
	}{
		{"VerifyStore untrusted", false, verify, blockOnRunLock, "verify.lock", func(cl *client) { cl.u64() }},
		{"VerifyStore trusted", true, verify, blockOnRunLock, "verify.lock", func(cl *client) { cl.u64() }},
		{"CollectGarbage delete", true, deleteDead, blockOnGCLock, "gc.run", func(cl *client) { cl.strs(); cl.u64(); cl.u64() }},
	}
	hangups := []struct {
		name  string
		do    func(*client)
		stops bool
	}{
		{"close", func(cl *client) { cl.c.Close() }, true},
		{"byte then close", func(cl *client) { cl.c.Write([]byte{0}); cl.c.Close() }, true},
		// The read deadline the op's arguments set must not end the watch.
		{"close past the stall timeout", func(cl *client) { time.Sleep(stallTimeout + 500*time.Millisecond); cl.c.Close() }, true},
		{"half-close", func(cl *client) { cl.c.(*net.UnixConn).CloseWrite() }, false},
	}
	for _, op := range ops {
		for _, hu := range hangups {
			t.Run(op.name+"/"+hu.name, func(t *testing.T) {
				var trusted atomic.Bool
				trusted.Store(true)
				logs := &syncBuffer{}
				f := newFixture(t, func(s *Server) {
					s.Trusted = func(uint32, uint32) bool { return trusted.Load() }
					s.Logger = slog.New(slog.NewTextHandler(logs, nil))
				})
				held := filepath.Join(f.st.Dir(), op.held)
				release := op.block(t, f.st)
				defer release()
				trusted.Store(op.trusted)
				cl := f.connect(t, 38)
				op.send(cl)
				cl.flush()
				if !waitFor(5*time.Second, func() bool { return flockHeld(t, held) }) {
					t.Fatalf("%s never held %s", op.name, op.held)
				}
				hu.do(cl)
				freed := waitFor(2*time.Second, func() bool { return !flockHeld(t, held) })
				if hu.stops {
					if !freed {
						t.Fatalf("%s still held 2s after the client hung up", op.held)
					}
					if op.held == "verify.lock" {
						unlock, err := f.st.LockVerify(context.Background(), false)
						if err != nil {
							t.Fatalf("another verify after the hang-up: %v", err)
						}
						unlock()
					}
					if !waitFor(2*time.Second, func() bool { return strings.Contains(logs.String(), "client hung up; op stopped") }) {
						t.Errorf("the stop is not logged:\n%s", logs)
					}
				} else {
					if freed {
						t.Fatalf("%s stopped when its client only half-closed", op.name)
					}
					release()
					if err := cl.result(); err != nil {
						t.Fatalf("%s after a half-close: %v", op.name, err)
					}
					op.answer(cl)
				}
				if strings.Contains(logs.String(), "level=ERROR") {
					t.Errorf("errors logged:\n%s", logs)
				}
			})
		}
	}
}

// blockOnRunLock holds the collection lock a verify takes shared (as a
// collection deleting does), so a verify waits inside verify.lock.
func blockOnRunLock(t *testing.T, st *store.Store) func() {
	unlock, err := lockfile.Open(context.Background(), filepath.Join(st.Dir(), "gc.run"), unix.LOCK_EX)
	if err != nil {
		t.Fatal(err)
	}
	return sync.OnceFunc(unlock)
}

// blockOnGCLock holds the GC lock shared (as an upload does), so a
// collection deleting waits for it inside gc.run.
func blockOnGCLock(t *testing.T, st *store.Store) func() {
	unlock, err := st.SharedGCLock(context.Background())
	if err != nil {
		t.Fatal(err)
	}
	return sync.OnceFunc(unlock)
}
