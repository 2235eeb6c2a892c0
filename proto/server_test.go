package proto

import (
	"bufio"
	"bytes"
	"context"
	"crypto/sha256"
	"encoding/binary"
	"encoding/hex"
	"errors"
	"io"
	"net"
	"os"
	"path/filepath"
	"strings"
	"testing"
	"time"

	"github.com/casnix/casnix/nar"
	"github.com/casnix/casnix/store"
)

const (
	testA = "00000000000000000000000000000000-a"
	testB = "11111111111111111111111111111111-b"
)

// stallTimeout is the fixture server's StallTimeout.
const stallTimeout = time.Second

// fixture is a real store (SQLite and packs in a temp dir) behind a real
// Unix socket.
type fixture struct {
	st   *store.Store
	sock string
	narA []byte
	stop func()
}

func treeNAR(t testing.TB, contents string) []byte {
	t.Helper()
	root := filepath.Join(t.TempDir(), "t")
	os.MkdirAll(filepath.Join(root, "bin"), 0o755)
	os.WriteFile(filepath.Join(root, "bin", "hello"), []byte(contents), 0o755)
	os.Symlink("bin/hello", filepath.Join(root, "link"))
	var buf bytes.Buffer
	if _, err := nar.DumpPath(&buf, root); err != nil {
		t.Fatal(err)
	}
	return buf.Bytes()
}

func newFixture(t testing.TB, opts ...func(*Server)) *fixture {
	t.Helper()
	ctx, cancel := context.WithCancel(context.Background())
	st, err := store.Open(ctx, t.TempDir(), store.Options{})
	if err != nil {
		t.Fatal(err)
	}
	f := &fixture{st: st, narA: treeNAR(t, strings.Repeat("hello world\n", 50000))}
	b := st.NewBatch(ctx)
	if _, err := b.Add(bytes.NewReader(f.narA), store.PathInfo{Name: testA, Sigs: []string{"k:c2ln"}, CA: ""}); err != nil {
		t.Fatal(err)
	}
	if _, err := b.Add(bytes.NewReader(treeNAR(t, "b")), store.PathInfo{Name: testB, References: []string{testA, testB}, Deriver: "22222222222222222222222222222222-b.drv"}); err != nil {
		t.Fatal(err)
	}
	if _, err := b.Commit(); err != nil {
		t.Fatal(err)
	}
	f.sock = filepath.Join(t.TempDir(), "s")
	ln, err := net.Listen("unix", f.sock)
	if err != nil {
		t.Fatal(err)
	}
	srv := &Server{Store: st, StoreDir: "/nix/store", NixVersion: "test", HandshakeTimeout: 500 * time.Millisecond, StallTimeout: stallTimeout}
	for _, o := range opts {
		o(srv)
	}
	done := make(chan error)
	go func() { done <- srv.Serve(ctx, ln, time.Second) }()
	f.stop = func() {
		cancel()
		if err := <-done; err != nil {
			t.Errorf("Serve: %v", err)
		}
		st.Close()
	}
	t.Cleanup(f.stop)
	return f
}

// client is a minimal worker-protocol client for tests.
type client struct {
	t     testing.TB
	c     net.Conn
	r     wireReader
	w     wireWriter
	minor uint64
	lines []string // STDERR_NEXT texts received
}

func (f *fixture) dial(t testing.TB) net.Conn {
	t.Helper()
	c, err := net.Dial("unix", f.sock)
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { c.Close() })
	return c
}

func (f *fixture) connect(t testing.TB, minor uint64) *client {
	t.Helper()
	nc := f.dial(t)
	nc.SetDeadline(time.Now().Add(10 * time.Second))
	cl := &client{t: t, c: nc, r: wireReader{r: bufio.NewReader(nc)}, w: wireWriter{w: bufio.NewWriter(nc)}, minor: minor}
	cl.w.u64(workerMagic1)
	cl.flush()
	if m := cl.u64(); m != workerMagic2 {
		t.Fatalf("magic %#x", m)
	}
	if v := cl.u64(); v != 0x126 {
		t.Fatalf("server version %#x", v)
	}
	cl.w.u64(1<<8 | minor)
	if minor >= 38 {
		cl.w.strings([]string{"some-feature"})
		cl.flush()
		if feats, err := cl.r.strings(100); err != nil || len(feats) != 0 {
			t.Fatalf("features %v %v", feats, err)
		}
	}
	cl.w.u64(0) // cpu affinity
	cl.w.u64(0) // reserve space
	cl.flush()
	if minor >= 33 {
		if v, _ := cl.r.str(100); v != "test" {
			t.Fatalf("version string %q", v)
		}
	}
	if minor >= 35 {
		cl.u64() // trust
	}
	if l := cl.u64(); l != stderrLast {
		t.Fatalf("handshake ended with %#x", l)
	}
	// SetOptions, as every client sends first (with a setting that does
	// not matter to casnix: substituters would choose among upstreams).
	cl.w.u64(opSetOptions)
	for i := 0; i < 12; i++ {
		cl.w.u64(0)
	}
	cl.w.u64(1)
	cl.w.str("max-jobs")
	cl.w.str("1")
	cl.expectLast()
	return cl
}

func (cl *client) flush() {
	if err := cl.w.flush(); err != nil {
		cl.t.Fatal(err)
	}
}

func (cl *client) u64() uint64 {
	cl.t.Helper()
	v, err := cl.r.u64()
	if err != nil {
		cl.t.Fatal(err)
	}
	return v
}

func (cl *client) str() string {
	cl.t.Helper()
	s, err := cl.r.str(1 << 20)
	if err != nil {
		cl.t.Fatal(err)
	}
	return s
}

func (cl *client) strs() []string {
	cl.t.Helper()
	s, err := cl.r.strings(1 << 20)
	if err != nil {
		cl.t.Fatal(err)
	}
	return s
}

// result flushes the request and reads the stderr channel: nil on
// STDERR_LAST, the message on STDERR_ERROR.
func (cl *client) result() error {
	cl.t.Helper()
	cl.flush()
	for {
		switch code := cl.u64(); code {
		case stderrLast:
			return nil
		case stderrError:
			if cl.minor >= 26 {
				cl.str()
				cl.u64()
				cl.str()
				msg := cl.str()
				cl.u64()
				cl.u64()
				return errors.New(msg)
			}
			msg := cl.str()
			cl.u64()
			return errors.New(msg)
		case stderrNext:
			cl.lines = append(cl.lines, cl.str())
		default:
			cl.t.Fatalf("unexpected stderr code %#x", code)
		}
	}
}

func (cl *client) expectLast() {
	cl.t.Helper()
	if err := cl.result(); err != nil {
		cl.t.Fatalf("op failed: %v", err)
	}
}

func full(n string) string { return "/nix/store/" + n }

func TestQueriesAcrossVersions(t *testing.T) {
	f := newFixture(t)
	for _, minor := range []uint64{21, 23, 25, 32, 34, 35, 37, 38} {
		t.Run(string(rune('0'+minor/10))+string(rune('0'+minor%10)), func(t *testing.T) {
			cl := f.connect(t, minor)

			cl.w.u64(opIsValidPath)
			cl.w.str(full(testA))
			cl.expectLast()
			if cl.u64() != 1 {
				t.Fatal("A not valid")
			}

			cl.w.u64(opQueryPathInfo)
			cl.w.str(full(testB))
			cl.expectLast()
			if minor >= 17 && cl.u64() != 1 {
				t.Fatal("B not valid")
			}
			if d := cl.str(); d != full("22222222222222222222222222222222-b.drv") {
				t.Fatalf("deriver %q", d)
			}
			cl.str() // narHash
			if refs := cl.strs(); strings.Join(refs, " ") != full(testA)+" "+full(testB) {
				t.Fatalf("refs %v", refs)
			}
			cl.u64()
			cl.u64()
			cl.u64()
			cl.strs()
			cl.str()

			// An invalid path is "false", not an error.
			cl.w.u64(opQueryPathInfo)
			cl.w.str(full("33333333333333333333333333333333-x"))
			cl.expectLast()
			if cl.u64() != 0 {
				t.Fatal("missing path reported valid")
			}

			cl.w.u64(opQueryValidPaths)
			cl.w.strings([]string{full(testB), full("33333333333333333333333333333333-x"), full(testA)})
			if minor >= 27 {
				cl.w.u64(0)
			}
			cl.expectLast()
			if v := cl.strs(); strings.Join(v, " ") != full(testA)+" "+full(testB) {
				t.Fatalf("valid %v", v)
			}

			cl.w.u64(opQueryReferrers)
			cl.w.str(full(testA))
			cl.expectLast()
			if v := cl.strs(); strings.Join(v, " ") != full(testB) {
				t.Fatalf("referrers %v", v)
			}

			cl.w.u64(opQueryPathFromHashPart)
			cl.w.str(testB[:32])
			cl.expectLast()
			if p := cl.str(); p != full(testB) {
				t.Fatalf("from hash part %q", p)
			}

			cl.w.u64(opQueryRealisation)
			cl.w.str("sha256:00!out")
			cl.expectLast()
			if minor < 31 {
				cl.strs()
			} else if cl.u64() != 0 {
				t.Fatal("realisation found")
			}

			cl.w.u64(opAddTempRoot)
			cl.w.str(full(testA))
			cl.expectLast()
			cl.u64()

			// A refused op leaves the connection usable.
			cl.w.u64(opEnsurePath)
			cl.w.str(full("33333333333333333333333333333333-x"))
			if err := cl.result(); err == nil || !strings.Contains(err.Error(), "is not valid") {
				t.Fatalf("EnsurePath of a missing path: %v", err)
			}
			cl.w.u64(opQueryAllValidPaths)
			cl.expectLast()
			if v := cl.strs(); len(v) != 2 {
				t.Fatalf("all %v", v)
			}
		})
	}
}

func TestNarFromPath(t *testing.T) {
	f := newFixture(t)
	cl := f.connect(t, 38)
	cl.w.u64(opNarFromPath)
	cl.w.str(full(testA))
	cl.expectLast()
	got := make([]byte, len(f.narA))
	if _, err := io.ReadFull(cl.r.r, got); err != nil {
		t.Fatal(err)
	}
	if !bytes.Equal(got, f.narA) {
		t.Fatal("NAR differs")
	}
	// A client hanging up in the middle of a NAR does not disturb others.
	cl2 := f.connect(t, 38)
	cl2.w.u64(opNarFromPath)
	cl2.w.str(full(testA))
	cl2.expectLast()
	cl2.c.Close()
	cl.w.u64(opIsValidPath)
	cl.w.str(full(testA))
	cl.expectLast()
	cl.u64()
}

func TestQueryPathInfoHash(t *testing.T) {
	f := newFixture(t)
	cl := f.connect(t, 38)
	cl.w.u64(opQueryPathInfo)
	cl.w.str(full(testA))
	cl.expectLast()
	cl.u64()
	cl.str()
	sum := sha256.Sum256(f.narA)
	if h := cl.str(); h != hex.EncodeToString(sum[:]) {
		t.Fatalf("narHash %s", h)
	}
}

// TestBadClients: each misbehaving client gets its connection ended
// cleanly, and the daemon keeps serving everyone else.
func TestBadClients(t *testing.T) {
	f := newFixture(t)
	good := f.connect(t, 38)
	check := func(t *testing.T) {
		t.Helper()
		good.w.u64(opIsValidPath)
		good.w.str(full(testA))
		good.expectLast()
		if good.u64() != 1 {
			t.Fatal("good client got a wrong answer")
		}
	}
	tests := []struct {
		name string
		run  func(t *testing.T)
	}{
		{"unknown op", func(t *testing.T) {
			cl := f.connect(t, 38)
			cl.w.u64(999)
			if err := cl.result(); err == nil || !strings.Contains(err.Error(), "invalid operation 999") {
				t.Fatalf("err = %v", err)
			}
			if _, err := cl.r.u64(); err == nil {
				t.Fatal("connection still open after an unknown op")
			}
		}},
		{"string length 2^63", func(t *testing.T) {
			cl := f.connect(t, 38)
			cl.w.u64(opIsValidPath)
			cl.w.u64(1 << 63)
			if err := cl.result(); err == nil || !strings.Contains(err.Error(), "exceeds the limit") {
				t.Fatalf("err = %v", err)
			}
		}},
		{"path outside the store", func(t *testing.T) {
			cl := f.connect(t, 38)
			cl.w.u64(opIsValidPath)
			cl.w.str("/etc/passwd")
			if err := cl.result(); err == nil || !strings.Contains(err.Error(), "not in the Nix store") {
				t.Fatalf("err = %v", err)
			}
			// Fully read request: the connection goes on.
			cl.w.u64(opIsValidPath)
			cl.w.str(full(testA))
			cl.expectLast()
			cl.u64()
		}},
		{"bad magic", func(t *testing.T) {
			c := f.dial(t)
			c.Write(make([]byte, 8))
			c.SetReadDeadline(time.Now().Add(5 * time.Second))
			if _, err := io.ReadAll(c); err != nil {
				t.Fatalf("read: %v", err)
			}
		}},
		{"silent client", func(t *testing.T) {
			c := f.dial(t)
			c.SetReadDeadline(time.Now().Add(5 * time.Second))
			start := time.Now()
			if _, err := io.ReadAll(c); err != nil {
				t.Fatalf("not closed by the handshake timeout: %v", err)
			}
			if time.Since(start) > 3*time.Second {
				t.Fatal("handshake timeout not applied")
			}
		}},
		{"stalls mid-op", func(t *testing.T) {
			cl := f.connect(t, 38)
			cl.w.u64(opIsValidPath)
			cl.w.u64(40) // promises a 40-byte string, sends nothing
			cl.flush()
			cl.c.SetReadDeadline(time.Now().Add(5 * time.Second))
			if _, err := io.ReadAll(cl.c); err != nil {
				t.Fatalf("not closed by the stall timeout: %v", err)
			}
		}},
		{"hang up mid-request", func(t *testing.T) {
			cl := f.connect(t, 38)
			cl.w.u64(opQueryValidPaths)
			cl.w.u64(3)
			cl.w.str(full(testA))
			cl.flush()
			cl.c.Close()
		}},
		{"refused upload is drained", func(t *testing.T) {
			cl := f.connect(t, 38)
			cl.w.u64(opAddMultipleToStore)
			cl.w.u64(0)
			cl.w.u64(0)
			for i := 0; i < 3; i++ {
				cl.w.u64(5)
				cl.w.w.WriteString("abcde")
			}
			cl.w.u64(0)
			if err := cl.result(); err == nil {
				t.Fatal("upload accepted")
			}
			cl.w.u64(opIsValidPath)
			cl.w.str(full(testA))
			cl.expectLast()
			if cl.u64() != 1 {
				t.Fatal("out of step after a drained upload")
			}
		}},
		{"build is refused", func(t *testing.T) {
			cl := f.connect(t, 38)
			cl.w.u64(opBuildPaths)
			cl.w.strings([]string{full("33333333333333333333333333333333-x.drv") + "!out"})
			cl.w.u64(0)
			if err := cl.result(); err == nil || !strings.Contains(err.Error(), "does not build") {
				t.Fatalf("err = %v", err)
			}
			cl.w.u64(opBuildPaths) // valid paths "build" fine
			cl.w.strings([]string{full(testA)})
			cl.w.u64(0)
			cl.expectLast()
			cl.u64()
		}},
	}
	for _, tc := range tests {
		t.Run(tc.name, func(t *testing.T) {
			tc.run(t)
			check(t)
		})
	}
}

// FuzzSession feeds arbitrary client bytes to a daemon session over a real
// store: it must never panic or hang, whatever it reads.
func FuzzSession(f *testing.F) {
	hs := func(minor uint64, ops ...[]byte) []byte {
		var b bytes.Buffer
		put := func(v uint64) { binary.Write(&b, binary.LittleEndian, v) }
		put(workerMagic1)
		put(1<<8 | minor)
		if minor >= 38 {
			put(0)
		}
		put(0)
		put(0)
		for _, o := range ops {
			b.Write(o)
		}
		return b.Bytes()
	}
	str := func(s string) []byte {
		b := binary.LittleEndian.AppendUint64(nil, uint64(len(s)))
		b = append(b, s...)
		return append(b, make([]byte, (8-len(s)%8)%8)...)
	}
	u := func(v uint64) []byte { return binary.LittleEndian.AppendUint64(nil, v) }
	cat := func(bs ...[]byte) []byte { return bytes.Join(bs, nil) }
	f.Add(hs(38))
	f.Add(hs(34, cat(u(opIsValidPath), str(full(testA)))))
	f.Add(hs(38, cat(u(opQueryPathInfo), str(full(testB))), cat(u(opQueryValidPaths), u(1), str(full(testA)), u(0))))
	f.Add(hs(38, cat(u(opNarFromPath), str(full(testA)))))
	f.Add(hs(22, cat(u(opAddToStoreNar), str(full(testA)), str(""), str(""), u(0), u(0), u(0), u(0), u(0), str(""), u(0), u(0))))
	f.Add(hs(38, cat(u(opAddMultipleToStore), u(0), u(0), u(3), []byte("abc"), u(0))))
	f.Add(hs(38, cat(u(opQueryMissing), u(1), str(full(testB)+"!out"))))
	f.Add(hs(38, cat(u(opCollectGarbage), u(3), u(1), str(full(testA)), u(0), u(0), u(0), u(0), u(0))))
	opts := bytes.Repeat(u(0), 12)
	f.Add(hs(38, cat(u(opSetOptions), opts, u(3), str("substituters"), str("https://a/ file:///b"),
		str("extra-substituters"), str("c"), str("max-jobs"), str("1")), cat(u(opHasSubstitutes), str(full(testA)))))
	fx := newFixture(f)
	f.Fuzz(func(t *testing.T, in []byte) {
		srv := &Server{Store: fx.st, StoreDir: "/nix/store", NixVersion: "fuzz"}
		done := make(chan struct{})
		go func() {
			srv.ServeStdio(context.Background(), bytes.NewReader(in), io.Discard, false)
			close(done)
		}()
		select {
		case <-done:
		case <-time.After(10 * time.Second):
			t.Fatal("session hung on finite input")
		}
	})
}

// TestHasSubstitutes checks op 3, which old daemons still serve: false
// for any store path (this server has no substituters), an error for a path
// outside the store, and the connection goes on either way.
func TestHasSubstitutes(t *testing.T) {
	f := newFixture(t)
	for _, minor := range []uint64{21, 38} {
		cl := f.connect(t, minor)
		for _, p := range []string{full(testA), full("33333333333333333333333333333333-missing")} {
			cl.w.u64(opHasSubstitutes)
			cl.w.str(p)
			cl.expectLast()
			if got := cl.u64(); got != 0 {
				t.Errorf("1.%d HasSubstitutes(%s) = %d, want 0", minor, p, got)
			}
		}
		cl.w.u64(opHasSubstitutes)
		cl.w.str("/etc/passwd")
		if err := cl.result(); err == nil || !strings.Contains(err.Error(), "not in the Nix store") {
			t.Errorf("1.%d HasSubstitutes(/etc/passwd): err = %v", minor, err)
		}
		cl.w.u64(opIsValidPath)
		cl.w.str(full(testA))
		cl.expectLast()
		if cl.u64() != 1 {
			t.Errorf("1.%d: connection out of step after HasSubstitutes", minor)
		}
	}
}
