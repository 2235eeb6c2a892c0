package proto

import (
	"bytes"
	"io"
	"net"
	"runtime"
	"strings"
	"testing"
	"time"
)

// allocDuring is the bytes the process allocated while run ran.
func allocDuring(run func()) uint64 {
	var before, after runtime.MemStats
	runtime.GC()
	runtime.ReadMemStats(&before)
	run()
	runtime.ReadMemStats(&after)
	return after.TotalAlloc - before.TotalAlloc
}

// hangUp ends the client's side and waits for the server to close the
// connection, so everything it allocated for the request is counted.
func (cl *client) hangUp() {
	cl.t.Helper()
	cl.flush()
	cl.c.(*net.UnixConn).CloseWrite()
	cl.c.SetReadDeadline(time.Now().Add(10 * time.Second))
	if _, err := io.Copy(io.Discard, cl.c); err != nil {
		cl.t.Fatalf("waiting for the server to close: %v", err)
	}
}

// TestAnnouncedLengths sends requests whose lengths announce far more than
// follows: what the server allocates must follow the bytes that arrive,
// not the lengths a client claims, and an over-limit length is refused
// with an error.
func TestAnnouncedLengths(t *testing.T) {
	f := newFixture(t)
	const limit = 8 << 20 // allocations the whole exchange may cost
	tests := []struct {
		name    string
		send    func(cl *client)
		wantErr string // "" = the client hangs up in the middle
	}{
		{"AddTextToStore text of 1 GiB, 100 KiB sent", func(cl *client) {
			cl.w.u64(opAddTextToStore)
			cl.w.str("t")
			cl.w.u64(1 << 30)
			cl.w.w.Write(make([]byte, 100<<10))
		}, ""},
		{"AddTextToStore text over the limit", func(cl *client) {
			cl.w.u64(opAddTextToStore)
			cl.w.str("t")
			cl.w.u64(maxText + 1)
		}, "exceeds the limit"},
		{"signature of 1 MiB, nothing sent", func(cl *client) {
			cl.w.u64(opAddSignatures)
			cl.w.str(full(testA))
			cl.w.u64(1)
			cl.w.u64(maxString)
		}, ""},
		{"many 1 MiB signatures announced", func(cl *client) {
			cl.w.u64(opAddSignatures)
			cl.w.str(full(testA))
			cl.w.u64(maxListLen)
			for range 3 {
				cl.w.u64(maxString)
				cl.w.w.Write(make([]byte, 1000))
			}
		}, ""},
		{"SetOptions override of 1 MiB, nothing sent", func(cl *client) {
			cl.w.u64(opSetOptions)
			for range 12 {
				cl.w.u64(0)
			}
			cl.w.u64(1)
			cl.w.str("substituters")
			cl.w.u64(maxString)
		}, ""},
	}
	for _, tc := range tests {
		t.Run(tc.name, func(t *testing.T) {
			cl := f.connect(t, 38)
			var err error
			got := allocDuring(func() {
				tc.send(cl)
				if tc.wantErr != "" {
					err = cl.result()
				}
				cl.hangUp()
			})
			if got > limit {
				t.Errorf("the server allocated %d MiB for the request; want at most %d MiB", got>>20, limit>>20)
			}
			if tc.wantErr != "" && (err == nil || !strings.Contains(err.Error(), tc.wantErr)) {
				t.Errorf("err = %v, want one containing %q", err, tc.wantErr)
			}
			// Other clients are served as before.
			good := f.connect(t, 38)
			good.w.u64(opIsValidPath)
			good.w.str(full(testA))
			good.expectLast()
			if good.u64() != 1 {
				t.Error("IsValidPath after the request: wrong answer")
			}
		})
	}
}

// TestAddTextToStoreSpooled checks that a text too big to be held in
// memory (it is spooled to a file) makes the same path as AddToStore's
// text method.
func TestAddTextToStoreSpooled(t *testing.T) {
	f := newFixture(t)
	cl := f.connect(t, 38)
	text := bytes.Repeat([]byte("spooled text\n"), 3*readStep/13)
	cl.w.u64(opAddToStore)
	cl.w.str("big")
	cl.w.str("text:sha256")
	cl.w.strings(nil)
	cl.w.u64(0)
	cl.framed(text)
	cl.expectLast()
	want := cl.str()
	cl.str()
	cl.str()
	cl.strs()
	cl.u64()
	cl.u64()
	cl.u64()
	cl.strs()
	cl.str()
	for _, n := range []int{len(text), readStep, 10} {
		cl.w.u64(opAddTextToStore)
		cl.w.str("big")
		cl.w.str(string(text[:n]))
		cl.w.strings(nil)
		cl.expectLast()
		got := cl.str()
		if n == len(text) && got != want {
			t.Errorf("AddTextToStore of %d bytes: %s, want %s", n, got, want)
		}
		name, _ := strings.CutPrefix(got, "/nix/store/")
		if !bytes.Contains(render(t, f.st, name), text[:n]) {
			t.Errorf("%d bytes: the stored NAR does not hold the text", n)
		}
	}
}
