package proto

import (
	"bytes"
	"context"
	"crypto/sha256"
	"encoding/hex"
	"errors"
	"io"
	"net"
	"path/filepath"
	"strings"
	"testing"
	"time"

	"github.com/casnix/casnix/store"
)

// served is a Server on a real socket whose shutdown the test drives.
type served struct {
	srv      *Server
	st       *store.Store
	sock     string
	shutdown context.CancelFunc
	done     chan error
}

func serve(t *testing.T, drain time.Duration, opts ...func(*Server)) *served {
	t.Helper()
	f := newFixture(t) // a store with testA and testB
	sv := &served{st: f.st, sock: filepath.Join(t.TempDir(), "s"), done: make(chan error, 1)}
	ln, err := net.Listen("unix", sv.sock)
	if err != nil {
		t.Fatal(err)
	}
	sv.srv = &Server{Store: f.st, StoreDir: "/nix/store", NixVersion: "test", HandshakeTimeout: 5 * time.Second, StallTimeout: 5 * time.Second}
	for _, o := range opts {
		o(sv.srv)
	}
	ctx, cancel := context.WithCancel(context.Background())
	sv.shutdown = cancel
	go func() { sv.done <- sv.srv.Serve(ctx, ln, drain) }()
	t.Cleanup(func() {
		cancel()
		sv.srv.Abort()
		sv.wait(t, 10*time.Second)
	})
	return sv
}

// wait waits for Serve to return, at most within.
func (sv *served) wait(t *testing.T, within time.Duration) time.Duration {
	t.Helper()
	start := time.Now()
	select {
	case err, ok := <-sv.done:
		if ok {
			close(sv.done)
			if err != nil {
				t.Errorf("Serve: %v", err)
			}
		}
	case <-time.After(within):
		t.Fatalf("Serve still running after %v", within)
	}
	return time.Since(start)
}

func (sv *served) running() bool {
	select {
	case err, ok := <-sv.done:
		if ok {
			sv.done <- err
		}
		return false
	default:
		return true
	}
}

func (sv *served) dial(t *testing.T) *Client {
	t.Helper()
	cl, err := Dial(sv.sock)
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { cl.Close() })
	return cl
}

func valid(t *testing.T, cl *Client, name string) {
	t.Helper()
	ok, err := cl.IsValidPath(full(name))
	if err != nil || !ok {
		t.Fatalf("IsValidPath(%s) = %v, %v", name, ok, err)
	}
}

// TestShutdownDrains checks the shutdown order: the listener is closed at
// once, open connections go on with every op they send until their
// clients hang up, and an upload in flight completes.
func TestShutdownDrains(t *testing.T) {
	sv := serve(t, time.Minute, func(s *Server) { s.Trusted = func(uint32, uint32) bool { return true } })
	a := sv.dial(t)
	b := sv.dial(t)
	valid(t, a, testA)

	// An upload in flight when the shutdown begins: half of it sent.
	data := treeNAR(t, strings.Repeat("upload in flight\n", 100000))
	pr, pw := io.Pipe()
	upload := make(chan error, 1)
	go func() {
		sum := sha256Hex(data)
		upload <- b.AddToStoreNar(AddInfo{Path: full("44444444444444444444444444444444-up"), NarHash: sum, NarSize: uint64(len(data))}, pr)
	}()
	if _, err := pw.Write(data[:len(data)/2]); err != nil {
		t.Fatal(err)
	}

	sv.shutdown()
	// The socket stops answering at once.
	deadline := time.Now().Add(5 * time.Second)
	for {
		c, err := net.Dial("unix", sv.sock)
		if err != nil {
			break
		}
		c.Close()
		if time.Now().After(deadline) {
			t.Fatal("the socket still accepts connections after the shutdown began")
		}
		time.Sleep(10 * time.Millisecond)
	}

	// The upload completes and is valid.
	if _, err := pw.Write(data[len(data)/2:]); err != nil {
		t.Fatal(err)
	}
	pw.Close()
	if err := <-upload; err != nil {
		t.Fatalf("upload in flight at shutdown: %v", err)
	}
	// The connections serve further ops: not just the one in flight.
	for range 3 {
		valid(t, a, testA)
		valid(t, b, "44444444444444444444444444444444-up")
	}
	var nar bytes.Buffer
	if _, err := a.NarFromPath(full(testA), &nar); err != nil {
		t.Fatalf("NarFromPath while draining: %v", err)
	}
	if !sv.running() {
		t.Fatal("Serve returned while connections were open")
	}
	a.Close()
	b.Close()
	if took := sv.wait(t, 10*time.Second); took > 5*time.Second {
		t.Errorf("Serve took %v to return after the last client hung up", took)
	}
}

// TestShutdownEnds checks what ends a drain that clients do not end: the
// timeout, or Abort (a second SIGTERM). Either closes the connections.
func TestShutdownEnds(t *testing.T) {
	tests := []struct {
		name  string
		drain time.Duration
		abort bool
		max   time.Duration
	}{
		{"timeout", 500 * time.Millisecond, false, 5 * time.Second},
		{"abort", time.Hour, true, 5 * time.Second},
	}
	for _, tc := range tests {
		t.Run(tc.name, func(t *testing.T) {
			sv := serve(t, tc.drain)
			idle := sv.dial(t)
			// A client stalled in the middle of an op.
			stalled := sv.dial(t)
			stalled.w.u64(opIsValidPath)
			stalled.w.u64(100) // a path length, and no path
			if err := stalled.w.flush(); err != nil {
				t.Fatal(err)
			}
			valid(t, idle, testA)
			start := time.Now()
			sv.shutdown()
			if tc.abort {
				time.Sleep(200 * time.Millisecond)
				if !sv.running() {
					t.Fatal("Serve returned before the drain ended")
				}
				sv.srv.Abort()
			}
			sv.wait(t, tc.max)
			if took := time.Since(start); took < min(tc.drain, 200*time.Millisecond) {
				t.Errorf("Serve returned after %v, before the drain ended", took)
			}
			for _, cl := range []*Client{idle, stalled} {
				cl.c.SetReadDeadline(time.Now().Add(5 * time.Second))
				if _, err := io.Copy(io.Discard, cl.c); err != nil {
					t.Errorf("connection not closed: %v", err)
				}
			}
		})
	}
}

// TestConnectionLimits checks --max-connections and
// --max-connections-per-user: a connection over a limit is refused in the
// handshake with an error naming the limit, others go on, and a slot
// freed is taken again.
func TestConnectionLimits(t *testing.T) {
	tests := []struct {
		name    string
		trusted bool
		max     int
		perUser int
		open    int // connections that get in
		want    string
	}{
		{"per user", false, 10, 2, 2, "--max-connections-per-user 2"},
		{"total", false, 3, 0, 3, "--max-connections 3"},
		{"trusted users are exempt from the per-user cap", true, 4, 2, 4, "--max-connections 4"},
	}
	for _, tc := range tests {
		t.Run(tc.name, func(t *testing.T) {
			sv := serve(t, time.Second, func(s *Server) {
				s.Trusted = func(uint32, uint32) bool { return tc.trusted }
				s.MaxConnections = tc.max
				s.MaxConnectionsPerUser = tc.perUser
			})
			var open []*Client
			for range tc.open {
				open = append(open, sv.dial(t))
			}
			for range 2 {
				_, err := Dial(sv.sock)
				var re *RemoteError
				if !errors.As(err, &re) || !strings.Contains(re.Msg, tc.want) {
					t.Fatalf("connection over the limit: err = %v, want a remote error naming %q", err, tc.want)
				}
			}
			for _, cl := range open {
				valid(t, cl, testA)
			}
			open[0].Close()
			// The freed slot is counted free once the server sees the
			// hang-up.
			deadline := time.Now().Add(5 * time.Second)
			for {
				cl, err := Dial(sv.sock)
				if err == nil {
					valid(t, cl, testA)
					cl.Close()
					break
				}
				if time.Now().After(deadline) {
					t.Fatalf("a freed slot is not reused: %v", err)
				}
				time.Sleep(20 * time.Millisecond)
			}
		})
	}
}

func sha256Hex(b []byte) string {
	sum := sha256.Sum256(b)
	return hex.EncodeToString(sum[:])
}

func (s *Server) open() int {
	s.mu.Lock()
	defer s.mu.Unlock()
	return len(s.conns)
}

// TestStalledReader checks that a client that asks for a NAR and stops
// reading is dropped after the stall timeout instead of holding its
// connection (goroutine, buffers, frame cache entries) for ever.
func TestStalledReader(t *testing.T) {
	sv := serve(t, time.Second, func(s *Server) { s.StallTimeout = 300 * time.Millisecond })
	big := treeNAR(t, strings.Repeat("no one reads this\n", 1<<20)) // 18 MiB: more than socket buffers hold
	b := sv.st.NewBatch(t.Context())
	const name = "55555555555555555555555555555555-big"
	if _, err := b.Add(bytes.NewReader(big), store.PathInfo{Name: name}); err != nil {
		t.Fatal(err)
	}
	if _, err := b.Commit(); err != nil {
		t.Fatal(err)
	}
	cl := sv.dial(t)
	cl.w.u64(opNarFromPath)
	cl.w.str(full(name))
	if err := cl.w.flush(); err != nil {
		t.Fatal(err)
	}
	deadline := time.Now().Add(10 * time.Second)
	for sv.srv.open() > 0 {
		if time.Now().After(deadline) {
			t.Fatal("the server still holds a connection whose client stopped reading")
		}
		time.Sleep(50 * time.Millisecond)
	}
}
