package proto

import (
	"bufio"
	"bytes"
	"context"
	"crypto/rand"
	"crypto/sha256"
	"encoding/hex"
	"fmt"
	"os"
	"path/filepath"
	"slices"
	"strings"
	"sync/atomic"
	"testing"
	"time"

	"github.com/nix-community/go-nix/pkg/narinfo/signature"

	"github.com/casnix/casnix/nar"
	"github.com/casnix/casnix/store"
)

const testC = "cccccccccccccccccccccccccccccccc-c"

// narInfo is what a client claims about a NAR it uploads.
type narInfo struct {
	name, deriver, ca string
	hash              []byte // nil: sha256 of the NAR
	size              int64  // 0: the NAR's length
	refs, sigs        []string
	dontCheckSigs     bool
}

func (cl *client) writeInfo(in narInfo, data []byte) {
	h := sha256.Sum256(data)
	if in.hash == nil {
		in.hash = h[:]
	}
	if in.size == 0 {
		in.size = int64(len(data))
	}
	cl.w.str(full(in.name))
	if in.deriver != "" {
		cl.w.str(full(in.deriver))
	} else {
		cl.w.str("")
	}
	cl.w.str(hex.EncodeToString(in.hash))
	var refs []string
	for _, r := range in.refs {
		refs = append(refs, full(r))
	}
	cl.w.strings(refs)
	cl.w.u64(1700000000)
	cl.w.u64(uint64(in.size))
	cl.w.u64(0) // ultimate
	cl.w.strings(in.sigs)
	cl.w.str(in.ca)
}

// framed writes data as a framed upload in uneven chunks.
func (cl *client) framed(data []byte) {
	for len(data) > 0 {
		n := min(len(data), 1000+len(data)/3)
		cl.w.u64(uint64(n))
		cl.w.w.Write(data[:n])
		data = data[n:]
	}
	cl.w.u64(0)
}

func (cl *client) addToStoreNar(in narInfo, data []byte) error {
	cl.t.Helper()
	cl.w.u64(opAddToStoreNar)
	cl.writeInfo(in, data)
	cl.w.u64(0) // repair
	cl.w.boolean(in.dontCheckSigs)
	if cl.minor >= 23 {
		cl.framed(data)
		return cl.result()
	}
	// 1.21-1.22: the server pulls the NAR with STDERR_READ.
	cl.flush()
	rest := data
	for {
		switch code := cl.u64(); code {
		case stderrRead:
			n := cl.u64()
			chunk := rest[:min(uint64(len(rest)), n)]
			rest = rest[len(chunk):]
			cl.w.str(string(chunk))
			cl.flush()
		case stderrLast:
			return nil
		case stderrError:
			msg := cl.str()
			cl.u64()
			return &RemoteError{Msg: msg}
		default:
			cl.t.Fatalf("unexpected stderr code %#x", code)
		}
	}
}

// inStep checks the connection still answers after an op.
func (cl *client) inStep() {
	cl.t.Helper()
	cl.w.u64(opIsValidPath)
	cl.w.str(full(testA))
	cl.expectLast()
	if cl.u64() != 1 {
		cl.t.Fatal("connection out of step")
	}
}

func dumpNAR(t *testing.T, dir string) []byte {
	t.Helper()
	var buf bytes.Buffer
	if _, err := nar.DumpPath(&buf, dir); err != nil {
		t.Fatal(err)
	}
	return buf.Bytes()
}

func render(t *testing.T, st *store.Store, name string) []byte {
	t.Helper()
	var buf bytes.Buffer
	if _, err := st.NarRender(context.Background(), name, &buf); err != nil {
		t.Fatal(err)
	}
	return buf.Bytes()
}

func TestAddToStoreNar(t *testing.T) {
	sk, pk, err := signature.GenerateKeypair("casnix-test-1", rand.Reader)
	if err != nil {
		t.Fatal(err)
	}
	keys, _ := store.ParsePublicKeys([]string{pk.String()})
	good := treeNAR(t, "new contents of c")
	goodHash := sha256.Sum256(good)
	signed := func(refs ...string) string {
		pi := &store.PathInfo{Name: testC, NarHash: goodHash, NarSize: int64(len(good)), References: refs}
		sig, err := sk.Sign(rand.Reader, store.Fingerprint("/nix/store", pi))
		if err != nil {
			t.Fatal(err)
		}
		return sig.String()
	}
	wrong := sha256.Sum256([]byte("x"))
	caName, err := store.CA{Method: store.CANAR, Algo: "sha256", Hash: goodHash[:]}.Path("/nix/store", "c", nil, false)
	if err != nil {
		t.Fatal(err)
	}
	caStr := "fixed:r:sha256:" + store.NixBase32(goodHash[:])
	tests := []struct {
		name    string
		trusted bool
		minor   uint64
		in      narInfo
		data    []byte
		wantErr string // "" = accepted
		valid   string // path valid afterwards
	}{
		{"trusted, no sig check", true, 38, narInfo{name: testC, refs: []string{testA}, dontCheckSigs: true}, good, "", testC},
		{"protocol 1.22 pulls", true, 22, narInfo{name: testC, dontCheckSigs: true}, good, "", testC},
		{"protocol 1.23 framed", true, 23, narInfo{name: testC, dontCheckSigs: true}, good, "", testC},
		{"trusted but checks sigs: unsigned", true, 38, narInfo{name: testC}, good, "lacks a signature by a trusted key", ""},
		{"signed by trusted key", false, 38, narInfo{name: testC, refs: []string{testA}, sigs: []string{signed(testA)}}, good, "", testC},
		{"untrusted cannot waive sigs", false, 38, narInfo{name: testC, dontCheckSigs: true}, good, "lacks a signature", ""},
		{"signature over other refs", false, 38, narInfo{name: testC, refs: []string{testA}, sigs: []string{signed()}}, good, "lacks a signature", ""},
		{"untrusted, content-addressed", false, 38, narInfo{name: caName, ca: caStr}, good, "", caName},
		{"untrusted, false CA claim", false, 38, narInfo{name: testC, ca: caStr}, good, "content address mismatch", ""},
		{"wrong hash", true, 38, narInfo{name: testC, hash: wrong[:], dontCheckSigs: true}, good, "hash mismatch", ""},
		{"narSize too large", true, 38, narInfo{name: testC, size: int64(len(good)) + 8, dontCheckSigs: true}, good, "size mismatch", ""},
		{"narSize too small", true, 38, narInfo{name: testC, size: int64(len(good)) - 8, dontCheckSigs: true}, good, "NAR", ""},
		{"stream longer than NAR", true, 38, narInfo{name: testC, hash: goodHash[:], size: int64(len(good)), dontCheckSigs: true}, append(append([]byte{}, good...), make([]byte, 16)...), "longer than its narSize", ""},
		{"unknown reference", true, 38, narInfo{name: testC, refs: []string{"dddddddddddddddddddddddddddddddd-d"}, dontCheckSigs: true}, good, "reference", ""},
		{"path outside the store", true, 38, narInfo{name: "../../etc/passwd", dontCheckSigs: true}, good, "not", ""},
		{"garbage NAR", true, 38, narInfo{name: testC, dontCheckSigs: true}, bytes.Repeat([]byte("garbage!"), 100), "", ""},
		{"already valid is a no-op", true, 38, narInfo{name: testA, dontCheckSigs: true}, treeNAR(t, "other"), "", testA},
	}
	for _, tc := range tests {
		t.Run(tc.name, func(t *testing.T) {
			f := newFixture(t, func(s *Server) {
				s.Trusted = func(uint32, uint32) bool { return tc.trusted }
				s.RequireSigs = true
				s.PublicKeys = keys
			})
			before, _ := f.st.All(context.Background())
			cl := f.connect(t, tc.minor)
			err := cl.addToStoreNar(tc.in, tc.data)
			switch {
			case tc.valid != "" && err != nil:
				t.Fatalf("refused: %v", err)
			case tc.valid == "" && err == nil:
				t.Fatal("accepted")
			case tc.valid == "" && !strings.Contains(err.Error(), tc.wantErr):
				t.Fatalf("err = %v, want %q", err, tc.wantErr)
			}
			cl.inStep()
			after, _ := f.st.All(context.Background())
			if tc.valid == "" && len(after) != len(before) {
				t.Fatalf("store changed after a refused add: %v", after)
			}
			if tc.valid != "" && tc.valid != testA {
				if len(after) != len(before)+1 {
					t.Fatalf("paths %v", after)
				}
				if !bytes.Equal(render(t, f.st, tc.valid), tc.data) {
					t.Fatal("rendered NAR differs from the upload")
				}
				pi, err := f.st.Info(context.Background(), tc.valid)
				if err != nil || len(pi.References) != len(tc.in.refs) || pi.CA != tc.in.ca || len(pi.Sigs) != len(tc.in.sigs) {
					t.Fatalf("info %+v %v", pi, err)
				}
			}
			if rep, err := f.st.Verify(context.Background(), nil); err != nil || !rep.OK() {
				t.Fatalf("verify: %v %+v", err, rep)
			}
		})
	}
}

func TestAddMultipleToStore(t *testing.T) {
	f := newFixture(t)
	cl := f.connect(t, 38)
	names := []string{
		"jjjjjjjjjjjjjjjjjjjjjjjjjjjjjjjj-j",
		"ffffffffffffffffffffffffffffffff-f",
		testA, // valid already: skipped
	}
	nars := [][]byte{treeNAR(t, "e"), treeNAR(t, "f"), f.narA}
	var stream bytes.Buffer
	sw := &client{t: t, w: wireWriter{w: bufio.NewWriter(&stream)}}
	sw.w.u64(uint64(len(names)))
	for i, n := range names {
		var refs []string
		if i == 1 {
			refs = []string{names[0], testA} // a reference earlier in the same upload
		}
		sw.writeInfo(narInfo{name: n, refs: refs}, nars[i])
		sw.w.w.Write(nars[i])
	}
	sw.flush()
	cl.w.u64(opAddMultipleToStore)
	cl.w.u64(0) // repair
	cl.w.u64(1) // dontCheckSigs (root is trusted)
	cl.framed(stream.Bytes())
	if err := cl.result(); err != nil {
		t.Fatal(err)
	}
	cl.inStep()
	for i, n := range names {
		if !bytes.Equal(render(t, f.st, n), nars[i]) {
			t.Fatalf("%s differs", n)
		}
	}
	refs, err := f.st.Referrers(context.Background(), names[0])
	if err != nil || len(refs) != 1 || refs[0] != names[1] {
		t.Fatalf("referrers %v %v", refs, err)
	}

	// A bad entry in the middle fails the op and leaves nothing of it.
	stream.Reset()
	sw.w.u64(2)
	g := treeNAR(t, "g")
	sw.writeInfo(narInfo{name: "gggggggggggggggggggggggggggggggg-g"}, g)
	sw.w.w.Write(g)
	h := treeNAR(t, "h")
	sw.writeInfo(narInfo{name: "hhhhhhhhhhhhhhhhhhhhhhhhhhhhhhhh-h", size: int64(len(h)) + 8}, h)
	sw.w.w.Write(h)
	sw.flush()
	cl.w.u64(opAddMultipleToStore)
	cl.w.u64(0)
	cl.w.u64(1)
	cl.framed(stream.Bytes())
	if err := cl.result(); err == nil {
		t.Fatal("accepted a short NAR")
	}
	cl.inStep()
	for _, n := range []string{"gggggggggggggggggggggggggggggggg-g", "hhhhhhhhhhhhhhhhhhhhhhhhhhhhhhhh-h"} {
		if ok, _ := f.st.IsValid(context.Background(), n); ok {
			t.Fatalf("%s became valid from a failed upload", n)
		}
	}
}

// TestAddToStoreCA checks the content-addressed adds against store paths
// Nix 2.8 computed for the same contents (store.TestCAPath's vectors).
func TestAddToStoreCA(t *testing.T) {
	f := newFixture(t, func(s *Server) {
		s.Trusted = func(uint32, uint32) bool { return false } // CA adds need no trust
		s.RequireSigs = true
	})
	cl := f.connect(t, 38)
	dir := filepath.Join(t.TempDir(), "d")
	os.MkdirAll(filepath.Join(dir, "sub"), 0o755)
	os.WriteFile(filepath.Join(dir, "sub", "x"), []byte("hi\n"), 0o644)
	os.Symlink("x", filepath.Join(dir, "sub", "l"))
	dirNAR := dumpNAR(t, dir)
	cases := []struct {
		name, method string
		dump         []byte
		refs         []string
		want         string
	}{
		{"f", "fixed:sha256", []byte("hello\n"), nil, "1p9q0bz6f22dyxh4lw8xs08p4201vyq4-f"},
		{"f", "fixed:sha1", []byte("hello\n"), nil, "pbqmppvgnnyqxagz7bnmwfdfvr3h43f2-f"},
		{"d", "fixed:r:sha256", dirNAR, nil, "i13kz2gysik8acx94qnn0iz68iavj7d7-d"},
		{"d", "fixed:r:sha512", dirNAR, nil, "qjgn7wwxaa2ihrfqbhhkx7ncifq9hp3k-d"},
		{"t", "text:sha256", []byte("hello"), nil, "vqpn17r03lqabwk0wksgpbgy620zwfd4-t"},
		{"t2", "text:sha256", []byte("see /nix/store/vqpn17r03lqabwk0wksgpbgy620zwfd4-t"), []string{"vqpn17r03lqabwk0wksgpbgy620zwfd4-t"}, "aa9v1s45k4l7wrfxas55l7fp8wq4ing9-t2"},
	}
	for _, c := range cases {
		cl.w.u64(opAddToStore)
		cl.w.str(c.name)
		cl.w.str(c.method)
		var refs []string
		for _, r := range c.refs {
			refs = append(refs, full(r))
		}
		cl.w.strings(refs)
		cl.w.u64(0)
		cl.framed(c.dump)
		if err := cl.result(); err != nil {
			t.Fatalf("%s %s: %v", c.method, c.name, err)
		}
		if got := cl.str(); got != full(c.want) {
			t.Fatalf("%s %s: path %s, want %s", c.method, c.name, got, full(c.want))
		}
		if ca := cl.addedInfo(); !strings.HasPrefix(ca, c.method+":") {
			t.Fatalf("ca %q", ca)
		}
	}
	// Old AddTextToStore gives the same path.
	cl.w.u64(opAddTextToStore)
	cl.w.str("t")
	cl.w.str("hello")
	cl.w.strings(nil)
	cl.expectLast()
	if got := cl.str(); got != full("vqpn17r03lqabwk0wksgpbgy620zwfd4-t") {
		t.Fatalf("AddTextToStore: %s", got)
	}
	// Bad method and unknown reference are refused with the upload drained.
	for _, bad := range []struct{ method, ref string }{{"fixed:blake9", ""}, {"text:sha256", "dddddddddddddddddddddddddddddddd-d"}, {"fixed:sha256", testA}} {
		cl.w.u64(opAddToStore)
		cl.w.str("x")
		cl.w.str(bad.method)
		if bad.ref != "" {
			cl.w.strings([]string{full(bad.ref)})
		} else {
			cl.w.strings(nil)
		}
		cl.w.u64(0)
		cl.framed([]byte("data"))
		if err := cl.result(); err == nil {
			t.Fatalf("%v accepted", bad)
		}
		cl.inStep()
	}
}

func TestRealisations(t *testing.T) {
	sk, pk, err := signature.GenerateKeypair("casnix-test-1", rand.Reader)
	if err != nil {
		t.Fatal(err)
	}
	keys, _ := store.ParsePublicKeys([]string{pk.String()})
	f := newFixture(t, func(s *Server) {
		s.RequireSigs = true
		s.PublicKeys = keys
	})
	const id = "sha256:1f2bb2f1d0e8c7a8cbc0a68c1a2d0b3b0b7ba4c9c51b9e8b1a3c9d4e5f60718a!out"
	r := &store.Realisation{ID: id, OutPath: testB, DependentRealisations: map[string]string{}}
	sig, err := sk.Sign(rand.Reader, r.Fingerprint())
	if err != nil {
		t.Fatal(err)
	}
	if want := `{"dependentRealisations":{},"id":"` + id + `","outPath":"` + testB + `"}`; r.Fingerprint() != want {
		t.Fatalf("fingerprint %s, want %s", r.Fingerprint(), want)
	}
	cl := f.connect(t, 38)
	register := func(json string) error {
		cl.w.u64(opRegisterDrvOutput)
		cl.w.str(json)
		return cl.result()
	}
	query := func(id string) []string {
		cl.w.u64(opQueryRealisation)
		cl.w.str(id)
		if err := cl.result(); err != nil {
			t.Fatal(err)
		}
		return cl.strs()
	}
	if got := query(id); len(got) != 0 {
		t.Fatalf("realisation before registering: %v", got)
	}
	if err := register(r.JSON()); err == nil || !strings.Contains(err.Error(), "lacks a signature") {
		t.Fatalf("unsigned realisation: %v", err)
	}
	r.Signatures = []string{sig.String()}
	for _, bad := range []string{"{", `{"id":"nohash","outPath":"` + testB + `"}`,
		`{"id":"` + id + `","outPath":"33333333333333333333333333333333-gone","signatures":["` + sig.String() + `"]}`} {
		if err := register(bad); err == nil {
			t.Fatalf("registered %s", bad)
		}
	}
	if err := register(r.JSON()); err != nil {
		t.Fatal(err)
	}
	got := query(id)
	if len(got) != 1 || got[0] != r.JSON() {
		t.Fatalf("realisation %v, want %s", got, r.JSON())
	}
	back, err := store.ParseRealisation(got[0])
	if err != nil || keys.VerifyFingerprint(back.Fingerprint(), back.Signatures) != 1 {
		t.Fatalf("round trip: %+v %v", back, err)
	}
	// Protocol 1.30 asks for output paths.
	old := f.connect(t, 30)
	old.w.u64(opQueryRealisation)
	old.w.str(id)
	if err := old.result(); err != nil {
		t.Fatal(err)
	}
	if got := old.strs(); len(got) != 1 || got[0] != full(testB) {
		t.Fatalf("1.30 answer %v", got)
	}
	cl.inStep()
}

func TestGCOps(t *testing.T) {
	var untrusted atomic.Bool
	f := newFixture(t, func(s *Server) { s.Trusted = func(uint32, uint32) bool { return !untrusted.Load() } })
	gc := func(cl *client, action uint64, paths ...string) ([]string, error) {
		cl.w.u64(opCollectGarbage)
		cl.w.u64(action)
		var full_ []string
		for _, p := range paths {
			full_ = append(full_, full(p))
		}
		cl.w.strings(full_)
		cl.w.u64(0) // ignoreLiveness
		cl.w.u64(0) // maxFreed
		cl.w.u64(0)
		cl.w.u64(0)
		cl.w.u64(0)
		if err := cl.result(); err != nil {
			return nil, err
		}
		out := cl.strs()
		cl.u64()
		cl.u64()
		return out, nil
	}
	holder := f.connect(t, 38)
	holder.w.u64(opAddTempRoot)
	holder.w.str(full(testB))
	holder.expectLast()
	holder.u64()
	cl := f.connect(t, 38)
	if dead, err := gc(cl, 1); err != nil || len(dead) != 0 {
		t.Fatalf("dead paths while testB is a temp root of a live connection: %v %v", dead, err)
	}
	if _, err := gc(cl, 3, testB); err == nil || !strings.Contains(err.Error(), "alive") {
		t.Fatalf("deleting a temp-rooted path: %v", err)
	}
	holder.c.Close()
	// The holder's roots go when its connection ends.
	var dead []string
	for i := 0; i < 100; i++ {
		if dead, _ = gc(cl, 1); len(dead) == 2 {
			break
		}
		time.Sleep(20 * time.Millisecond)
	}
	if len(dead) != 2 {
		t.Fatalf("dead after the holder left: %v", dead)
	}
	// A perm root keeps testA (and is what FindRoots reports).
	link := filepath.Join(t.TempDir(), "result")
	cl.w.u64(opAddPermRoot)
	cl.w.str(full(testA))
	cl.w.str(link)
	cl.expectLast()
	if got := cl.str(); got != link {
		t.Fatalf("AddPermRoot returned %q", got)
	}
	cl.w.u64(opFindRoots)
	cl.expectLast()
	n := cl.u64()
	var roots []string
	for i := uint64(0); i < n; i++ {
		roots = append(roots, cl.str()+" -> "+cl.str())
	}
	if !slices.Contains(roots, link+" -> "+full(testA)) {
		t.Fatalf("FindRoots: %v", roots)
	}
	// Untrusted: may list, may not delete or make perm roots, sees censored links.
	untrusted.Store(true)
	un := f.connect(t, 38)
	if _, err := gc(un, 2); err == nil || !strings.Contains(err.Error(), "not privileged") {
		t.Fatalf("untrusted delete: %v", err)
	}
	if _, err := gc(un, 3, testB); err == nil {
		t.Fatal("untrusted delete-specific allowed")
	}
	un.w.u64(opAddPermRoot)
	un.w.str(full(testA))
	un.w.str(link + "2")
	if err := un.result(); err == nil {
		t.Fatal("untrusted perm root allowed")
	}
	un.w.u64(opFindRoots)
	un.expectLast()
	for i, n := uint64(0), un.u64(); i < n; i++ {
		if l := un.str(); l != "{censored}" {
			t.Fatalf("untrusted client sees root %s", l)
		}
		un.str()
	}
	un.inStep()
	untrusted.Store(false)
	deleted, err := gc(cl, 2)
	if err != nil || len(deleted) != 1 || deleted[0] != full(testB) {
		t.Fatalf("delete dead: %v %v", deleted, err)
	}
	if ok, _ := f.st.IsValid(context.Background(), testB); ok {
		t.Fatal("testB still valid after GC")
	}
	if !bytes.Equal(render(t, f.st, testA), f.narA) {
		t.Fatal("live path changed by GC")
	}
	cl.inStep()
}

// TestAddToStoreOld is AddToStore before protocol 1.25: the data is a NAR
// straight on the connection, flat or recursive, and the answer a path.
func TestAddToStoreOld(t *testing.T) {
	f := newFixture(t)
	cl := f.connect(t, 24)
	dir := filepath.Join(t.TempDir(), "d")
	os.MkdirAll(filepath.Join(dir, "sub"), 0o755)
	os.WriteFile(filepath.Join(dir, "sub", "x"), []byte("hi\n"), 0o644)
	os.Symlink("x", filepath.Join(dir, "sub", "l"))
	file := filepath.Join(t.TempDir(), "f")
	os.WriteFile(file, []byte("hello\n"), 0o644)
	for _, c := range []struct {
		name, algo       string
		fixed, recursive uint64
		src, want        string
	}{
		{"f", "sha1", 1, 0, file, "pbqmppvgnnyqxagz7bnmwfdfvr3h43f2-f"},
		{"f", "sha256", 1, 0, file, "1p9q0bz6f22dyxh4lw8xs08p4201vyq4-f"},
		{"d", "sha256", 1, 1, dir, "i13kz2gysik8acx94qnn0iz68iavj7d7-d"},
		{"d", "sha1", 0, 0, dir, "i13kz2gysik8acx94qnn0iz68iavj7d7-d"}, // not fixed: NAR sha256
	} {
		cl.w.u64(opAddToStore)
		cl.w.str(c.name)
		cl.w.u64(c.fixed)
		cl.w.u64(c.recursive)
		cl.w.str(c.algo)
		cl.w.w.Write(dumpNAR(t, c.src))
		if err := cl.result(); err != nil {
			t.Fatalf("%+v: %v", c, err)
		}
		if got := cl.str(); got != full(c.want) {
			t.Fatalf("%+v: path %s, want %s", c, got, full(c.want))
		}
	}
	// A flat add of a directory is refused; the connection stays usable.
	cl.w.u64(opAddToStore)
	cl.w.str("d")
	cl.w.u64(1)
	cl.w.u64(0)
	cl.w.str("sha256")
	cl.w.w.Write(dumpNAR(t, dir))
	if err := cl.result(); err == nil {
		t.Fatal("flat add of a directory accepted")
	}
	cl.inStep()
}

// TestVerifyStorePolicy: anyone may check the store, only trusted clients
// may ask for repair; an untrusted check finding another running is
// refused instead of queued.
func TestVerifyStorePolicy(t *testing.T) {
	var untrusted atomic.Bool
	f := newFixture(t, func(s *Server) { s.Trusted = func(uint32, uint32) bool { return !untrusted.Load() } })
	verify := func(cl *client, check, repair bool) (bool, error) {
		cl.w.u64(opVerifyStore)
		cl.w.boolean(check)
		cl.w.boolean(repair)
		if err := cl.result(); err != nil {
			return false, err
		}
		return cl.u64() != 0, nil
	}
	untrusted.Store(true)
	un := f.connect(t, 38)
	for _, tc := range []struct {
		name          string
		check, repair bool
		busy          bool
		wantErr       string
	}{
		{"check", true, false, false, ""},
		{"consistency only", false, false, false, ""},
		{"repair", true, true, false, "not privileged to repair"},
		{"check while another runs", true, false, true, "another store verification is running"},
	} {
		var unlock func()
		if tc.busy {
			var err error
			if unlock, err = f.st.LockVerify(context.Background(), true); err != nil {
				t.Fatal(err)
			}
		}
		bad, err := verify(un, tc.check, tc.repair)
		if unlock != nil {
			unlock()
		}
		if tc.wantErr == "" && (err != nil || bad) {
			t.Fatalf("%s: errors found %v, err %v", tc.name, bad, err)
		}
		if tc.wantErr != "" && (err == nil || !strings.Contains(err.Error(), tc.wantErr)) {
			t.Fatalf("%s: err %v, want %q", tc.name, err, tc.wantErr)
		}
	}
	un.inStep()
}

// TestUnreadableIndirectRoot: an untrusted client registering an indirect
// root through a regular file ("/etc/passwd/x") does not break FindRoots or
// later collections, as it did when an unreadable root was fatal.
func TestUnreadableIndirectRoot(t *testing.T) {
	f := newFixture(t, func(s *Server) { s.Trusted = func(uint32, uint32) bool { return false } })
	un := f.connect(t, 38)
	for _, link := range []string{"/etc/passwd/x", "relative"} {
		un.w.u64(opAddIndirectRoot)
		un.w.str(link)
		err := un.result()
		if (link == "relative") != (err != nil) {
			t.Fatalf("AddIndirectRoot(%q): %v", link, err)
		}
		if err == nil {
			un.u64()
		}
	}
	un.w.u64(opFindRoots)
	if err := un.result(); err != nil {
		t.Fatalf("FindRoots: %v", err)
	}
	for i, n := uint64(0), un.u64(); i < n; i++ {
		un.str()
		un.str()
	}
	un.w.u64(opCollectGarbage)
	un.w.u64(uint64(store.GCReturnDead))
	un.w.strings(nil)
	for i := 0; i < 5; i++ {
		un.w.u64(0)
	}
	if err := un.result(); err != nil {
		t.Fatalf("print-dead: %v", err)
	}
	un.strs()
	un.u64()
	un.u64()
	un.inStep()
	if _, err := f.st.GC(context.Background(), store.GCOptions{Action: store.GCDeleteDead}); err != nil {
		t.Fatalf("collection after the bad root: %v", err)
	}
}

// TestForgedDerivationOutputs: an untrusted client adding a .drv (text,
// content-addressed, so anyone may) whose output claims an existing path
// does not become that path's deriver; a real derivation made by Nix,
// added the same way, gets its outputs.
func TestForgedDerivationOutputs(t *testing.T) {
	f := newFixture(t, func(s *Server) { s.Trusted = func(uint32, uint32) bool { return false } })
	cl := f.connect(t, 38)
	addText := func(name, contents string) string {
		cl.w.u64(opAddTextToStore)
		cl.w.str(name)
		cl.w.str(contents)
		cl.w.strings(nil)
		cl.expectLast()
		return cl.str()
	}
	outputMap := func(drv string) map[string]string {
		cl.w.u64(opQueryDerivationOutputMap)
		cl.w.str(drv)
		cl.expectLast()
		out := map[string]string{}
		for i, n := uint64(0), cl.u64(); i < n; i++ {
			k := cl.str()
			out[k] = cl.str()
		}
		return out
	}
	const realName = "h32dahq0bx5rp1krcdx3a53asj21jvhk-has-multi-out.drv"
	real, err := os.ReadFile(filepath.Join("..", "store", "testdata", "drv", realName))
	if err != nil {
		t.Fatal(err)
	}
	if got := addText("has-multi-out.drv", string(real)); got != full(realName) {
		t.Fatalf("real derivation added as %s, want %s", got, full(realName))
	}
	if got := outputMap(full(realName)); len(got) != 2 || got["out"] != full("55lwldka5nyxa08wnvlizyqw02ihy8ic-has-multi-out") {
		t.Fatalf("real derivation's outputs: %v", got)
	}
	forged := strings.ReplaceAll(string(real), "/nix/store/55lwldka5nyxa08wnvlizyqw02ihy8ic-has-multi-out", full(testA))
	drv := addText("has-multi-out.drv", forged)
	if got := outputMap(drv); len(got) != 0 {
		t.Fatalf("forged derivation's outputs recorded: %v", got)
	}
	cl.w.u64(opQueryValidDerivers)
	cl.w.str(full(testA))
	cl.expectLast()
	if got := cl.strs(); slices.Contains(got, drv) {
		t.Fatalf("forged %s is a valid deriver of %s: %v", drv, testA, got)
	}
	cl.inStep()
}

// TestAddToStoreOldFullDisk: when the spool file of an old-protocol AddToStore cannot be
// written (ENOSPC, from /dev/full), the client is told "no space left on device" and the
// connection stays in step, the NAR read to its end, instead of being dropped.
func TestAddToStoreOldFullDisk(t *testing.T) {
	f := newFixture(t)
	// The spool file is unlinked once open, so it is opened through a symlink of its
	// own: removing that leaves /dev/full alone.
	links := t.TempDir()
	var n atomic.Int64
	spoolTemp = func(string, string) (*os.File, error) {
		link := filepath.Join(links, fmt.Sprint(n.Add(1)))
		if err := os.Symlink("/dev/full", link); err != nil {
			return nil, err
		}
		return os.OpenFile(link, os.O_RDWR, 0)
	}
	defer func() { spoolTemp = os.CreateTemp }()
	file := filepath.Join(t.TempDir(), "f")
	os.WriteFile(file, bytes.Repeat([]byte("full disk\n"), 100000), 0o644)
	cl := f.connect(t, 24)
	cl.w.u64(opAddToStore)
	cl.w.str("f")
	cl.w.u64(1)
	cl.w.u64(0)
	cl.w.str("sha256")
	cl.w.w.Write(dumpNAR(t, file))
	err := cl.result()
	if err == nil || !strings.Contains(err.Error(), "no space left on device") {
		t.Fatalf("AddToStore with a full spool disk: %v, want an error saying no space left on device", err)
	}
	cl.inStep()

	// The same with a framed upload (protocol 1.25 and later).
	cl = f.connect(t, 38)
	cl.w.u64(opAddToStore)
	cl.w.str("f")
	cl.w.str("fixed:r:sha256")
	cl.w.strings(nil)
	cl.w.u64(0)
	cl.framed(dumpNAR(t, file))
	err = cl.result()
	if err == nil || !strings.Contains(err.Error(), "no space left on device") {
		t.Fatalf("framed AddToStore with a full spool disk: %v, want an error saying no space left on device", err)
	}
	cl.inStep()
}

// addedInfo reads the rest of an AddToStore (protocol 1.25+) reply after
// its path, the path-info, and returns its content address.
func (cl *client) addedInfo() (ca string) {
	cl.str()  // deriver
	cl.str()  // narHash
	cl.strs() // references
	cl.u64()  // registration time
	cl.u64()  // narSize
	cl.u64()  // ultimate
	cl.strs() // signatures
	return cl.str()
}

// TestAddNames: an untrusted client cannot add a path whose name Nix 2.34
// refuses (nix-daemon refuses it too; a Nix client meeting one in
// QueryAllValidPaths fails to parse it, so one user's odd path would break
// every user's `nix path-info --all`): the add fails, the connection stays
// in step and no such path is valid. Names Nix takes are added.
func TestAddNames(t *testing.T) {
	f := newFixture(t, func(s *Server) { s.Trusted = func(uint32, uint32) bool { return false } })
	cl := f.connect(t, 38)
	for _, tc := range []struct {
		name string
		ok   bool
	}{
		{"", false},
		{".", false},
		{"..", false},
		{".-x", false},
		{"..-x", false},
		{strings.Repeat("a", 212), false},
		{"a b", false},
		{".hidden", true},
		{"..x", true},
		{strings.Repeat("a", 211), true},
	} {
		for _, old := range []bool{false, true} {
			if old {
				cl.w.u64(opAddTextToStore)
				cl.w.str(tc.name)
				cl.w.str("text of " + tc.name)
				cl.w.strings(nil)
			} else {
				cl.w.u64(opAddToStore)
				cl.w.str(tc.name)
				cl.w.str("fixed:sha256")
				cl.w.strings(nil)
				cl.w.u64(0)
				cl.framed([]byte("contents of " + tc.name))
			}
			err := cl.result()
			if (err == nil) != tc.ok {
				t.Fatalf("add %q (AddTextToStore %v): error %v, want ok=%v", tc.name, old, err, tc.ok)
			}
			if err == nil {
				got := cl.str()
				if !strings.HasSuffix(got, "-"+tc.name) {
					t.Fatalf("add %q: path %s", tc.name, got)
				}
				if !old {
					cl.addedInfo()
				}
			}
			cl.inStep()
		}
	}
	cl.w.u64(opQueryAllValidPaths)
	cl.expectLast()
	for _, p := range cl.strs() {
		if err := store.ValidateName(strings.TrimPrefix(p, "/nix/store/")); err != nil {
			t.Errorf("valid path %s: %v", p, err)
		}
	}
}
