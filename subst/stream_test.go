package subst

import (
	"bytes"
	"context"
	"crypto/rand"
	"crypto/sha256"
	"io"
	"net/http"
	"net/http/httptest"
	"os"
	"path/filepath"
	"regexp"
	"strconv"
	"strings"
	"sync"
	"sync/atomic"
	"testing"
	"time"

	"github.com/klauspost/compress/zstd"

	"github.com/casnix/casnix/binarycache"
	"github.com/casnix/casnix/nar"
	"github.com/casnix/casnix/store"
)

const pathD = "44444444444444444444444444444444-d"

// bigFixture is an upstream cache holding pathD, a 1 MiB NAR of random
// bytes (so zstd stores it in raw blocks, which a decoder hands on as they
// arrive), signed, with the given compression.
type bigFixture struct {
	pub store.PublicKeys
	dir string
	nar []byte
}

func newBigFixture(t *testing.T, compression string) *bigFixture {
	t.Helper()
	src := openStore(t)
	root := filepath.Join(t.TempDir(), "t")
	os.MkdirAll(root, 0o755)
	big := make([]byte, 1<<20)
	rand.Read(big)
	os.WriteFile(filepath.Join(root, "big"), big, 0o644)
	os.WriteFile(filepath.Join(root, "small"), []byte("small\n"), 0o644)
	var buf bytes.Buffer
	if _, err := nar.DumpPath(&buf, root); err != nil {
		t.Fatal(err)
	}
	data := bytes.Clone(buf.Bytes())
	b := src.NewBatch(context.Background())
	if _, err := b.Add(&buf, store.PathInfo{Name: pathD}); err != nil {
		t.Fatal(err)
	}
	if _, err := b.Commit(); err != nil {
		t.Fatal(err)
	}
	key, pub := keyPair(t, "up-1")
	dir := t.TempDir()
	ex := &binarycache.Exporter{Store: src, Dir: dir, StoreDir: "/nix/store", Compression: compression, Key: key, Jobs: 1}
	if _, err := ex.Export(context.Background(), []string{pathD}); err != nil {
		t.Fatal(err)
	}
	return &bigFixture{pub: pub, dir: dir, nar: data}
}

// slowNAR makes up serve NAR files in two parts: all but their last tail
// bytes at once, the rest once release is closed (or after 20 s, which
// fails the tests that wait for release), then the response ends (no
// Content-Length: the body's end is the handler's return, so a client
// cannot tell the body is complete before). mangle, when set, changes the
// file's bytes first; cut > 0 sends only that many bytes of it while a
// Content-Length announces all. finished is closed once a response ended.
type slowNAR struct {
	release, finished chan struct{}
	once              sync.Once
	tail              int
	mangle            func([]byte) []byte
	cut               int
}

// newSlowNAR: callers defer let, so a failed test does not hold the
// upstream's handler (nor casnix's, waiting for it) into the servers'
// Close.
func newSlowNAR() *slowNAR {
	return &slowNAR{release: make(chan struct{}), finished: make(chan struct{}), tail: 256 << 10}
}

// let lets the upstream send the rest.
func (sn *slowNAR) let() { sn.once.Do(func() { close(sn.release) }) }

func (sn *slowNAR) hook(dir string) func(w http.ResponseWriter, r *http.Request, n int) bool {
	return func(w http.ResponseWriter, r *http.Request, n int) bool {
		if !strings.HasPrefix(r.URL.Path, "/nar/") {
			return false
		}
		defer func() {
			select {
			case <-sn.finished:
			default:
				close(sn.finished)
			}
		}()
		data, err := os.ReadFile(filepath.Join(dir, r.URL.Path))
		if err != nil {
			http.NotFound(w, r)
			return true
		}
		if sn.mangle != nil {
			data = sn.mangle(data)
		}
		if sn.cut > 0 {
			w.Header().Set("Content-Length", strconv.Itoa(len(data)))
			data = data[:sn.cut]
		}
		first := max(len(data)-sn.tail, 0)
		w.Write(data[:first])
		http.NewResponseController(w).Flush()
		select {
		case <-sn.release:
		case <-time.After(20 * time.Second):
		case <-r.Context().Done():
			return true
		}
		w.Write(data[first:])
		return true
	}
}

func (sn *slowNAR) done() bool {
	select {
	case <-sn.finished:
		return true
	default:
		return false
	}
}

// pullServerCompressed is pullServer with the narinfos pointing at
// compression (zstd or none).
func pullServerCompressed(t *testing.T, s *Substituter, dst *store.Store, compression string) (*httptest.Server, store.PublicKeys) {
	t.Helper()
	hs, h, pub := pullServer(t, s, dst)
	h.Compression = compression
	return hs, pub
}

// narBody opens the NAR at url of the casnix server and returns a reader
// of the decompressed NAR.
func narBody(t *testing.T, url string) (io.Reader, func()) {
	t.Helper()
	resp, err := http.Get(url)
	if err != nil {
		t.Fatal(err)
	}
	if resp.StatusCode != http.StatusOK {
		resp.Body.Close()
		t.Fatalf("GET %s: %s", url, resp.Status)
	}
	if !strings.HasSuffix(url, ".zst") {
		return resp.Body, func() { resp.Body.Close() }
	}
	dec, err := zstd.NewReader(resp.Body)
	if err != nil {
		t.Fatal(err)
	}
	return dec, func() { dec.Close(); resp.Body.Close() }
}

// openSpoolFiles counts this process's open spool files.
func openSpoolFiles(t *testing.T) int {
	t.Helper()
	fds, _ := os.ReadDir("/proc/self/fd")
	n := 0
	re := regexp.MustCompile(`/tmp/(nar|file)-[0-9]+ \(deleted\)$`)
	for _, fd := range fds {
		if l, err := os.Readlink("/proc/self/fd/" + fd.Name()); err == nil && re.MatchString(l) {
			n++
		}
	}
	return n
}

// settle waits until the substituter has no fetch, spool or background
// pull left, and no spool file is open.
func settle(t *testing.T, s *Substituter) {
	t.Helper()
	deadline := time.Now().Add(20 * time.Second)
	for {
		s.spoolMu.Lock()
		busy := len(s.spools) + len(s.holds)
		s.spoolMu.Unlock()
		busy += s.flightLen() + openSpoolFiles(t)
		if busy == 0 {
			return
		}
		if time.Now().After(deadline) {
			t.Fatalf("still busy: %d spools and holds, %d fetches, %d spool files", len(s.spools)+len(s.holds), s.flightLen(), openSpoolFiles(t))
		}
		time.Sleep(10 * time.Millisecond)
	}
}

// TestPullThroughStreamsNAR: the NAR of a path being pulled reaches its
// clients while the upstream is still sending it: the upstream holds its
// last 256 KiB back until two clients, the second joining mid-stream,
// have each received the first 64 KiB of the NAR (zstd on the fly, or
// as it is; raw, a third asks for a Range from byte 1000). Both then get the whole NAR, the upstream sent it once, the
// store holds the path afterwards and serves the same NAR from there, and
// no spool file is left open.
func TestPullThroughStreamsNAR(t *testing.T) {
	for _, comp := range []string{"zstd", "none"} {
		t.Run(comp, func(t *testing.T) {
			f := newBigFixture(t, "zstd")
			up := serve(t, f.dir)
			sn := newSlowNAR()
			defer sn.let()
			up.hook = sn.hook(f.dir)
			dst := openStore(t)
			s := newSubst(t, dst, []string{up.URL}, Options{Keys: f.pub})
			hs, pub := pullServerCompressed(t, s, dst, comp)

			code, body := httpGet(t, hs.URL+"/"+store.HashPart(pathD)+".narinfo")
			if code != http.StatusOK {
				t.Fatalf("narinfo: %d %s", code, body)
			}
			in, err := binarycache.ParseNarinfo(strings.NewReader(body), "/nix/store")
			if err != nil {
				t.Fatal(err)
			}
			pi := in.PathInfo()
			if in.NarHash != sha256.Sum256(f.nar) || in.NarSize != int64(len(f.nar)) || in.FileHash != nil || in.FileSize != 0 ||
				pub.Verify("/nix/store", &pi) == 0 {
				t.Fatalf("narinfo before the NAR is here:\n%s", body)
			}
			if sn.done() {
				t.Fatal("the narinfo waited for the upstream NAR")
			}

			readers := make([]io.Reader, 2)
			for i := range readers {
				r, closeBody := narBody(t, hs.URL+"/"+in.URL)
				defer closeBody()
				first := make([]byte, 64<<10)
				if _, err := io.ReadFull(r, first); err != nil {
					t.Fatalf("client %d: %v", i, err)
				}
				if !bytes.Equal(first, f.nar[:len(first)]) {
					t.Fatalf("client %d: first bytes differ", i)
				}
				if sn.done() {
					t.Fatalf("client %d got its first bytes only after the upstream finished", i)
				}
				readers[i] = io.MultiReader(bytes.NewReader(first), r)
			}
			if comp == "none" {
				// A Range request of the raw NAR, mid-stream: 206 and
				// the bytes from there (the skipped ones read and
				// dropped, for the reader's hash check).
				req, _ := http.NewRequest(http.MethodGet, hs.URL+"/"+in.URL, nil)
				req.Header.Set("Range", "bytes=1000-")
				resp, err := http.DefaultClient.Do(req)
				if err != nil {
					t.Fatal(err)
				}
				defer resp.Body.Close()
				if resp.StatusCode != http.StatusPartialContent {
					t.Fatalf("Range: %s", resp.Status)
				}
				first := make([]byte, 1000)
				if _, err := io.ReadFull(resp.Body, first); err != nil || !bytes.Equal(first, f.nar[1000:2000]) {
					t.Fatalf("Range: first bytes %v", err)
				}
				readers = append(readers, io.MultiReader(bytes.NewReader(f.nar[:1000]), bytes.NewReader(first), resp.Body))
			}
			sn.let()
			for i, r := range readers {
				got, err := io.ReadAll(r)
				if err != nil || !bytes.Equal(got, f.nar) {
					t.Fatalf("client %d: %d bytes, %v; want the %d-byte NAR", i, len(got), err, len(f.nar))
				}
			}
			settle(t, s)
			if !valid(t, dst, pathD) {
				t.Fatal("not stored after the pull")
			}
			if !bytes.Equal(narOf(t, dst, pathD), f.nar) {
				t.Fatal("stored NAR differs")
			}
			if nars := up.narRequests(); len(nars) != 1 {
				t.Fatalf("upstream NAR requests %v, want one", nars)
			}
			for _, n := range up.narRequests() {
				if n != 1 {
					t.Fatalf("upstream NAR requests %v, want one", up.narRequests())
				}
			}
			// From the store now, at the same URL.
			r, closeBody := narBody(t, hs.URL+"/"+in.URL)
			got, err := io.ReadAll(r)
			closeBody()
			if err != nil || !bytes.Equal(got, f.nar) {
				t.Fatalf("NAR from the store: %d bytes, %v", len(got), err)
			}
			if v, want := metric(t, hs.URL, "nars_streamed"), strconv.Itoa(len(readers)); v != want {
				t.Fatalf("streamed %s, want %s", v, want)
			}
		})
	}
}

// TestPullThroughBadNAR: an upstream NAR that turns out bad (wrong bytes
// anywhere, cut off, too long) fails the client's download short of the
// NAR's end, however it decodes what came. The upstream sends all it has
// and then holds the response open: while it does, the client must not
// have the whole NAR (the last bytes wait for the checks, which wait for
// the upstream's end); once it ends, the client gets an error, not an end.
// The path is not stored and no spool file is left.
func TestPullThroughBadNAR(t *testing.T) {
	flip := func(at func(n int) int) func([]byte) []byte {
		return func(b []byte) []byte {
			b = bytes.Clone(b)
			b[at(len(b))] ^= 1
			return b
		}
	}
	for _, tc := range []struct {
		name   string
		mangle func([]byte) []byte
		cut    func(n int) int
		tail   int // bytes the upstream holds back until the release
	}{
		{name: "flipped byte", mangle: flip(func(n int) int { return n / 2 })},
		{name: "flipped last byte", mangle: flip(func(n int) int { return n - 1 })},
		{name: "flipped byte before the last 16", mangle: flip(func(n int) int { return n - 17 })},
		{name: "cut off", cut: func(n int) int { return n - 100 }},
		{name: "cut off at the last byte", cut: func(n int) int { return n - 1 }},
		// The bytes too many come after the release: sent at once, they
		// would fail the download before the client asks (a 502, fine,
		// but not what this test is about).
		{name: "too long", mangle: func(b []byte) []byte { return append(bytes.Clone(b), make([]byte, 1000)...) }, tail: 1000},
	} {
		for _, comp := range []string{"zstd", "none"} {
			t.Run(tc.name+"/"+comp, func(t *testing.T) {
				f := newBigFixture(t, "none") // the file is the NAR: every change is a bad NAR
				up := serve(t, f.dir)
				sn := newSlowNAR()
				defer sn.let()
				sn.tail, sn.mangle = tc.tail, tc.mangle
				if tc.cut != nil {
					sn.cut = tc.cut(len(f.nar))
				}
				up.hook = sn.hook(f.dir)
				dst := openStore(t)
				s := newSubst(t, dst, []string{up.URL}, Options{Keys: f.pub, Retries: -1})
				hs, _ := pullServerCompressed(t, s, dst, comp)
				code, body := httpGet(t, hs.URL+"/"+store.HashPart(pathD)+".narinfo")
				if code != http.StatusOK {
					t.Fatalf("narinfo: %d %s", code, body)
				}
				r, closeBody := narBody(t, hs.URL+"/"+narURL(t, body))
				defer closeBody()
				var got atomic.Int64
				var readErr error
				ended := make(chan struct{})
				go func() {
					defer close(ended)
					buf := make([]byte, 32<<10)
					for {
						n, err := r.Read(buf)
						got.Add(int64(n))
						if err != nil {
							readErr = err
							return
						}
					}
				}()
				// Until the client's bytes stop coming (or its download ends).
				for last := int64(-1); ; {
					select {
					case <-ended:
					case <-time.After(300 * time.Millisecond):
						if cur := got.Load(); cur != last {
							last = cur
							continue
						}
					}
					break
				}
				if n := got.Load(); n >= int64(len(f.nar)) {
					t.Fatalf("client got all %d bytes of a bad NAR while the upstream was still sending", n)
				}
				sn.let()
				<-ended
				if n := got.Load(); readErr == io.EOF || n >= int64(len(f.nar)) {
					t.Fatalf("client got %d of %d bytes, then %v: a bad NAR must fail before its end", n, len(f.nar), readErr)
				}
				settle(t, s)
				if valid(t, dst, pathD) {
					t.Fatal("bad NAR stored")
				}
				if st, err := dst.Stats(context.Background()); err != nil || st.Paths != 0 {
					t.Fatalf("store stats %+v %v", st, err)
				}
				if v := metric(t, hs.URL, "nars_failed"); v != "1" {
					t.Fatalf("nars failed %s, want 1", v)
				}
				if v := metric(t, hs.URL, "nars_streamed"); v != "0" {
					t.Fatalf("nars streamed %s, want 0", v)
				}
			})
		}
	}
}
