package subst

import (
	"bytes"
	"context"
	"crypto/ed25519"
	"crypto/rand"
	"encoding/base64"
	"errors"
	"fmt"
	"net"
	"net/http"
	"net/http/httptest"
	"os"
	"path/filepath"
	"strings"
	"sync"
	"sync/atomic"
	"testing"
	"time"

	"github.com/casnix/casnix/binarycache"
	"github.com/casnix/casnix/nar"
	"github.com/casnix/casnix/store"
)

const (
	pathA = "00000000000000000000000000000000-a"
	pathB = "11111111111111111111111111111111-b"
	pathC = "22222222222222222222222222222222-c"
	pathX = "33333333333333333333333333333333-x" // in no cache
)

func openStore(t testing.TB) *store.Store {
	t.Helper()
	st, err := store.Open(context.Background(), t.TempDir(), store.Options{StoreDir: "/nix/store"})
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { st.Close() })
	return st
}

func addTree(t *testing.T, st *store.Store, name string, refs ...string) {
	t.Helper()
	root := filepath.Join(t.TempDir(), "t")
	os.MkdirAll(filepath.Join(root, "sub"), 0o755)
	big := make([]byte, 200<<10)
	rand.Read(big)
	os.WriteFile(filepath.Join(root, "big"), big, 0o644)
	os.WriteFile(filepath.Join(root, "sub", "x"), []byte("#!/bin/sh\n"+strings.Join(refs, "\n")), 0o755)
	var buf bytes.Buffer
	if _, err := nar.DumpPath(&buf, root); err != nil {
		t.Fatal(err)
	}
	b := st.NewBatch(context.Background())
	if _, err := b.Add(&buf, store.PathInfo{Name: name, References: refs}); err != nil {
		t.Fatal(err)
	}
	if _, err := b.Commit(); err != nil {
		t.Fatal(err)
	}
}

func narOf(t *testing.T, st *store.Store, name string) []byte {
	t.Helper()
	var b bytes.Buffer
	if _, err := st.NarRender(context.Background(), name, &b); err != nil {
		t.Fatal(err)
	}
	return b.Bytes()
}

func keyPair(t *testing.T, name string) (*store.SecretKey, store.PublicKeys) {
	t.Helper()
	_, priv, err := ed25519.GenerateKey(rand.Reader)
	if err != nil {
		t.Fatal(err)
	}
	f := filepath.Join(t.TempDir(), "key")
	os.WriteFile(f, []byte(name+":"+base64.StdEncoding.EncodeToString(priv)+"\n"), 0o600)
	k, err := store.LoadSecretKeyFile(f)
	if err != nil {
		t.Fatal(err)
	}
	pub, err := store.ParsePublicKeys([]string{k.PublicKey()})
	if err != nil {
		t.Fatal(err)
	}
	return k, pub
}

// fixture is a source store holding C → B → A.
type fixture struct {
	src *store.Store
	key *store.SecretKey
	pub store.PublicKeys
}

func newFixture(t *testing.T) *fixture {
	src := openStore(t)
	addTree(t, src, pathA)
	addTree(t, src, pathB, pathA)
	addTree(t, src, pathC, pathB)
	key, pub := keyPair(t, "up-1")
	return &fixture{src: src, key: key, pub: pub}
}

// cache exports the closure of C into a new cache directory, signed by
// key (unsigned with nil).
func (f *fixture) cache(t *testing.T, key *store.SecretKey) string {
	t.Helper()
	dir := t.TempDir()
	ex := &binarycache.Exporter{Store: f.src, Dir: dir, StoreDir: "/nix/store", Compression: "zstd", Key: key, Jobs: 2}
	if _, err := ex.Export(context.Background(), []string{pathC}); err != nil {
		t.Fatal(err)
	}
	return dir
}

// server serves dir over HTTP on loopback, counting requests by path; hook,
// when set, may answer a request itself (returning true).
type server struct {
	*httptest.Server
	mu    sync.Mutex
	count map[string]int
	hook  func(w http.ResponseWriter, r *http.Request, n int) bool
}

func serve(t *testing.T, dir string) *server {
	s := &server{count: map[string]int{}}
	fs := http.FileServer(http.Dir(dir))
	s.Server = httptest.NewServer(http.HandlerFunc(func(w http.ResponseWriter, r *http.Request) {
		s.mu.Lock()
		s.count[r.URL.Path]++
		n := s.count[r.URL.Path]
		hook := s.hook
		s.mu.Unlock()
		if hook != nil && hook(w, r, n) {
			return
		}
		fs.ServeHTTP(w, r)
	}))
	t.Cleanup(s.Close)
	return s
}

func (s *server) n(path string) int {
	s.mu.Lock()
	defer s.mu.Unlock()
	return s.count[path]
}

// narRequests counts requests of NAR files.
func (s *server) narRequests() map[string]int {
	s.mu.Lock()
	defer s.mu.Unlock()
	out := map[string]int{}
	for p, n := range s.count {
		if strings.HasPrefix(p, "/nar/") {
			out[p] = n
		}
	}
	return out
}

func newSubst(t *testing.T, st *store.Store, urls []string, opts Options) *Substituter {
	t.Helper()
	opts.StoreDir = "/nix/store"
	if opts.RetryDelay == 0 {
		opts.RetryDelay = time.Millisecond
	}
	s, err := New(st, urls, opts)
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(s.Close)
	return s
}

func checkClosure(t *testing.T, f *fixture, dst *store.Store) {
	t.Helper()
	for _, n := range []string{pathA, pathB, pathC} {
		if !bytes.Equal(narOf(t, dst, n), narOf(t, f.src, n)) {
			t.Fatalf("%s: NAR differs", n)
		}
		want, _ := f.src.Info(context.Background(), n)
		got, _ := dst.Info(context.Background(), n)
		if strings.Join(got.References, " ") != strings.Join(want.References, " ") {
			t.Fatalf("%s: references %v, want %v", n, got.References, want.References)
		}
	}
}

func valid(t *testing.T, st *store.Store, n string) bool {
	t.Helper()
	ok, err := st.IsValid(context.Background(), n)
	if err != nil {
		t.Fatal(err)
	}
	return ok
}

// TestSubstitute: a closure comes from a file:// and from an http://
// upstream, references first, signatures checked; a second call fetches
// nothing.
func TestSubstitute(t *testing.T) {
	f := newFixture(t)
	dir := f.cache(t, f.key)
	srv := serve(t, dir)
	for _, url := range []string{"file://" + dir, srv.URL} {
		t.Run(strings.SplitN(url, ":", 2)[0], func(t *testing.T) {
			ctx := context.Background()
			dst := openStore(t)
			addTree(t, dst, pathX) // unrelated, stays
			s := newSubst(t, dst, []string{url}, Options{Keys: f.pub})
			done, err := s.Substitute(ctx, []string{pathC}, true)
			if err != nil || len(done) != 3 {
				t.Fatalf("substitute: %v %v", done, err)
			}
			checkClosure(t, f, dst)
			if done, err := s.Substitute(ctx, []string{pathC}, true); err != nil || len(done) != 0 {
				t.Fatalf("second substitute: %v %v", done, err)
			}
			st := s.Stats()[0]
			if st.NarsFetched != 3 || st.NarinfoHits != 3 || st.Priority != 40 || !st.Up {
				t.Fatalf("stats %+v", st)
			}
		})
	}
}

// TestPriority: the lowest priority number wins; ?priority= overrides the
// cache's own (the exporter says 40); ties keep the order given.
func TestPriority(t *testing.T) {
	f := newFixture(t)
	d1, d2 := f.cache(t, f.key), f.cache(t, f.key)
	for _, tc := range []struct {
		name   string
		urls   []string
		winner int
	}{
		{"ties in order", []string{"file://" + d1, "file://" + d2}, 0},
		{"url priority lower", []string{"file://" + d1, "file://" + d2 + "?priority=10"}, 1},
		{"url priority higher", []string{"file://" + d1 + "?priority=60", "file://" + d2}, 1},
		{"both given", []string{"file://" + d1 + "?priority=5", "file://" + d2 + "?priority=6"}, 0},
	} {
		t.Run(tc.name, func(t *testing.T) {
			dst := openStore(t)
			s := newSubst(t, dst, tc.urls, Options{Keys: f.pub})
			if _, err := s.Substitute(context.Background(), []string{pathC}, true); err != nil {
				t.Fatal(err)
			}
			st := s.Stats()
			if st[tc.winner].NarsFetched != 3 || st[1-tc.winner].NarsFetched != 0 || st[1-tc.winner].NarinfoHits != 0 {
				t.Fatalf("stats %+v", st)
			}
		})
	}
	if _, err := New(nil, []string{"file:///x?priority=abc"}, Options{}); err == nil {
		t.Fatal("bad priority accepted")
	}
}

// TestNarinfoCache: hits and misses are remembered for their TTLs, on a
// fake clock, and a bounded cache stays bounded.
func TestNarinfoCache(t *testing.T) {
	f := newFixture(t)
	srv := serve(t, f.cache(t, f.key))
	var now atomic.Int64
	now.Store(time.Date(2026, 1, 1, 0, 0, 0, 0, time.UTC).UnixNano())
	clock := func() time.Time { return time.Unix(0, now.Load()) }
	dst := openStore(t)
	s := newSubst(t, dst, []string{srv.URL}, Options{Now: clock, PositiveTTL: time.Hour, NegativeTTL: time.Minute})
	ctx := context.Background()
	niC := "/" + store.HashPart(pathC) + ".narinfo"
	niX := "/" + store.HashPart(pathX) + ".narinfo"
	query := func(name string, want bool) {
		t.Helper()
		fd, err := s.Query(ctx, name)
		if err != nil || (fd != nil) != want {
			t.Fatalf("query %s: %v %v", name, fd, err)
		}
	}
	for _, step := range []struct {
		advance      time.Duration
		nC, nX, info int
	}{
		{0, 1, 1, 1},
		{30 * time.Second, 1, 1, 1},
		{31 * time.Second, 1, 2, 1}, // negative expired
		{60 * time.Minute, 2, 3, 1}, // positive expired too
	} {
		now.Add(int64(step.advance))
		query(pathC, true)
		query(pathX, false)
		if srv.n(niC) != step.nC || srv.n(niX) != step.nX || srv.n("/nix-cache-info") != step.info {
			t.Fatalf("after %v: %d %d %d requests", step.advance, srv.n(niC), srv.n(niX), srv.n("/nix-cache-info"))
		}
	}
	small := newSubst(t, dst, []string{srv.URL}, Options{MaxCached: 2})
	for _, n := range []string{pathA, pathB, pathC, pathX} {
		small.Query(ctx, n)
	}
	if len(small.cache) > 2 {
		t.Fatalf("cache holds %d entries", len(small.cache))
	}
}

// TestFlaky: 500s, connections cut in the middle of a NAR and answers
// slower than the timeout are retried; transient narinfo failures are not
// cached as misses, and fail over to the next upstream.
func TestFlaky(t *testing.T) {
	f := newFixture(t)
	dir := f.cache(t, f.key)
	for _, tc := range []struct {
		name string
		hook func(w http.ResponseWriter, r *http.Request, n int) bool
	}{
		{"500", func(w http.ResponseWriter, r *http.Request, n int) bool {
			if n <= 2 && r.URL.Path != "/nix-cache-info" {
				http.Error(w, "busy", http.StatusInternalServerError)
				return true
			}
			return false
		}},
		{"cut", func(w http.ResponseWriter, r *http.Request, n int) bool {
			if n > 1 || !strings.HasPrefix(r.URL.Path, "/nar/") {
				return false
			}
			data, _ := os.ReadFile(filepath.Join(dir, r.URL.Path))
			w.Header().Set("Content-Length", fmt.Sprint(len(data)))
			w.Write(data[:len(data)/2])
			w.(http.Flusher).Flush()
			conn, _, _ := w.(http.Hijacker).Hijack()
			conn.Close()
			return true
		}},
		// A server error on nix-cache-info is retried as any other
		// request's, not taken for a cache that is down.
		{"nix-cache-info 500", func(w http.ResponseWriter, r *http.Request, n int) bool {
			if n <= 2 && r.URL.Path == "/nix-cache-info" {
				http.Error(w, "busy", http.StatusBadGateway)
				return true
			}
			if n == 1 && r.URL.Path != "/nix-cache-info" {
				http.Error(w, "busy", http.StatusInternalServerError)
				return true
			}
			return false
		}},
		{"slow", func(w http.ResponseWriter, r *http.Request, n int) bool {
			if n == 1 && r.URL.Path != "/nix-cache-info" {
				time.Sleep(400 * time.Millisecond)
			}
			return false
		}},
	} {
		t.Run(tc.name, func(t *testing.T) {
			srv := serve(t, dir)
			srv.hook = tc.hook
			dst := openStore(t)
			s := newSubst(t, dst, []string{srv.URL}, Options{Keys: f.pub, Timeout: 150 * time.Millisecond, Retries: 3})
			if _, err := s.Substitute(context.Background(), []string{pathC}, true); err != nil {
				t.Fatal(err)
			}
			checkClosure(t, f, dst)
			if st := s.Stats()[0]; st.Errors == 0 {
				t.Fatalf("no errors counted: %+v", st)
			}
		})
	}
	t.Run("NAR failover", func(t *testing.T) {
		bad := serve(t, dir)
		bad.hook = func(w http.ResponseWriter, r *http.Request, n int) bool {
			if !strings.HasPrefix(r.URL.Path, "/nar/") {
				return false
			}
			http.Error(w, "down", http.StatusServiceUnavailable)
			return true
		}
		good := serve(t, dir)
		dst := openStore(t)
		s := newSubst(t, dst, []string{bad.URL + "?priority=1", good.URL + "?priority=2"}, Options{Keys: f.pub, Retries: 1})
		if _, err := s.Substitute(context.Background(), []string{pathC}, true); err != nil {
			t.Fatal(err)
		}
		checkClosure(t, f, dst)
		if st := s.Stats(); st[0].NarsFetched != 0 || st[1].NarsFetched != 3 || st[0].Errors != 6 {
			t.Fatalf("stats %+v", st)
		}
	})
	t.Run("failover", func(t *testing.T) {
		bad := serve(t, dir)
		bad.hook = func(w http.ResponseWriter, r *http.Request, n int) bool {
			if r.URL.Path == "/nix-cache-info" {
				return false
			}
			http.Error(w, "down", http.StatusBadGateway)
			return true
		}
		good := serve(t, dir)
		dst := openStore(t)
		s := newSubst(t, dst, []string{bad.URL + "?priority=1", good.URL + "?priority=2"}, Options{Keys: f.pub, Retries: 1})
		if _, err := s.Substitute(context.Background(), []string{pathC}, true); err != nil {
			t.Fatal(err)
		}
		checkClosure(t, f, dst)
		// The failures were not cached as misses: once the first upstream
		// answers, it is asked (and wins) again.
		bad.hook = nil
		ni := "/" + store.HashPart(pathC) + ".narinfo"
		before := bad.n(ni)
		fd, err := s.Query(context.Background(), pathC)
		if err != nil || fd.Upstream.URL != bad.URL+"?priority=1" || bad.n(ni) != before+1 {
			t.Fatalf("after recovery: %v %v, %d requests", fd, err, bad.n(ni)-before)
		}
	})
}

// TestDownUpstream: an upstream on a closed port neither stops New nor
// substitution from the others; it is skipped for the backoff and asked
// again after it.
func TestDownUpstream(t *testing.T) {
	f := newFixture(t)
	ln, err := net.Listen("tcp", "127.0.0.1:0")
	if err != nil {
		t.Fatal(err)
	}
	down := "http://" + ln.Addr().String()
	ln.Close()
	srv := serve(t, f.cache(t, f.key))
	var now atomic.Int64
	clock := func() time.Time { return time.Unix(0, now.Load()) }
	dst := openStore(t)
	s := newSubst(t, dst, []string{down + "?priority=1", srv.URL}, Options{Keys: f.pub, Now: clock, Backoff: time.Minute})
	if _, err := s.Substitute(context.Background(), []string{pathC}, true); err != nil {
		t.Fatal(err)
	}
	st := s.Stats()
	if st[0].Up || st[0].CacheInfoErrors != 1 || !strings.Contains(st[0].DownError, "nix-cache-info") || st[1].NarsFetched != 3 {
		t.Fatalf("stats %+v", st)
	}
	s.Query(context.Background(), pathX)
	if st := s.Stats(); st[0].CacheInfoErrors != 1 {
		t.Fatalf("down upstream asked again within its backoff: %+v", st[0])
	}
	now.Add(int64(2 * time.Minute))
	s.Query(context.Background(), pathX)
	if st := s.Stats(); st[0].CacheInfoErrors != 2 {
		t.Fatalf("down upstream not asked again after its backoff: %+v", st[0])
	}
}

// TestHungUpstream: an upstream that accepts connections and never
// answers is given up after InfoTimeout, and the next one serves.
func TestHungUpstream(t *testing.T) {
	f := newFixture(t)
	hung := serve(t, t.TempDir())
	hung.hook = func(w http.ResponseWriter, r *http.Request, n int) bool {
		<-r.Context().Done()
		return true
	}
	good := serve(t, f.cache(t, f.key))
	dst := openStore(t)
	s := newSubst(t, dst, []string{hung.URL + "?priority=1", good.URL},
		Options{Keys: f.pub, InfoTimeout: 200 * time.Millisecond, Timeout: time.Hour})
	// Without InfoTimeout the lookup would wait for the hung upstream past this.
	ctx, cancel := context.WithTimeout(context.Background(), 30*time.Second)
	defer cancel()
	if _, err := s.Substitute(ctx, []string{pathC}, true); err != nil {
		t.Fatal(err)
	}
	if st := s.Stats(); st[0].Up || st[0].CacheInfoErrors != 1 || st[1].NarsFetched != 3 {
		t.Fatalf("stats %+v", st)
	}
}

// TestHungLowerPriority: an upstream that never answers, placed by its URL
// after a good one, is not contacted by lookups the good one answers, so
// they do not wait for it; a path only it could have fails after
// InfoTimeout with an error naming the path and why the upstream was
// skipped, and the next lookup skips it at once (backoff).
func TestHungLowerPriority(t *testing.T) {
	f := newFixture(t)
	hung := serve(t, t.TempDir())
	hung.hook = func(w http.ResponseWriter, r *http.Request, n int) bool {
		<-r.Context().Done()
		return true
	}
	good := serve(t, f.cache(t, f.key))
	dst := openStore(t)
	s := newSubst(t, dst, []string{hung.URL + "?priority=50", good.URL + "?priority=10"},
		Options{Keys: f.pub, InfoTimeout: 500 * time.Millisecond, Timeout: time.Hour})
	// Without the lazy contact, the lookup would wait InfoTimeout for the
	// hung upstream first, and it would have been asked.
	t0 := time.Now()
	if _, err := s.Substitute(context.Background(), []string{pathC}, true); err != nil {
		t.Fatal(err)
	}
	if d := time.Since(t0); hung.n("/nix-cache-info") != 0 {
		t.Fatalf("the hung upstream was contacted for paths the good one has (after %v)", d)
	}
	checkClosure(t, f, dst)

	_, err := s.Substitute(context.Background(), []string{pathX}, true)
	if err == nil || !errors.Is(err, ErrNoSubstitute) || !strings.Contains(err.Error(), pathX) ||
		!strings.Contains(err.Error(), "skipped as down") || !strings.Contains(err.Error(), hung.URL+"/nix-cache-info: no answer within 500ms") {
		t.Fatalf("path only a hung upstream could have: %v", err)
	}
	if st := s.Stats(); st[0].Up || st[0].CacheInfoErrors != 1 || st[1].NarsFetched != 3 {
		t.Fatalf("stats %+v", st)
	}
	// Within the backoff the hung upstream is not asked again.
	if _, err := s.Substitute(context.Background(), []string{pathX}, true); err == nil || hung.n("/nix-cache-info") != 1 {
		t.Fatalf("second lookup: %v; nix-cache-info asked %d times", err, hung.n("/nix-cache-info"))
	}
}

// TestSignatures: unsigned paths and paths signed by an unknown key are
// refused (with the path and upstream named, nothing stored) unless checks
// are off.
func TestSignatures(t *testing.T) {
	f := newFixture(t)
	other, _ := keyPair(t, "other-1")
	for _, tc := range []struct {
		name string
		key  *store.SecretKey
	}{{"unsigned", nil}, {"wrong key", other}} {
		t.Run(tc.name, func(t *testing.T) {
			dir := f.cache(t, tc.key)
			dst := openStore(t)
			s := newSubst(t, dst, []string{"file://" + dir}, Options{Keys: f.pub})
			_, err := s.Substitute(context.Background(), []string{pathC}, true)
			var ue *binarycache.UntrustedError
			if !errors.As(err, &ue) || !strings.Contains(err.Error(), pathC) || !strings.Contains(err.Error(), "file://"+dir) {
				t.Fatalf("got %v", err)
			}
			for _, n := range []string{pathA, pathB, pathC} {
				if valid(t, dst, n) {
					t.Fatalf("%s substituted", n)
				}
			}
			// A substituter marked trusted needs no signatures.
			tr := newSubst(t, dst, []string{"file://" + dir + "?trusted=1"}, Options{Keys: f.pub})
			if _, err := tr.Substitute(context.Background(), []string{pathC}, true); err != nil {
				t.Fatalf("trusted upstream: %v", err)
			}
			checkClosure(t, f, dst)
			dst2 := openStore(t)
			s2 := newSubst(t, dst2, []string{"file://" + dir}, Options{Keys: f.pub})
			if _, err := s2.Substitute(context.Background(), []string{pathC}, false); err != nil {
				t.Fatalf("without checks: %v", err)
			}
			checkClosure(t, f, dst2)
		})
	}
}

// rewrite changes the narinfo of name in dir and signs it again with key,
// so only the content checks can catch the lie.
func rewrite(t *testing.T, dir, name string, key *store.SecretKey, change func(*binarycache.Info)) {
	t.Helper()
	p := filepath.Join(dir, store.HashPart(name)+".narinfo")
	fh, err := os.Open(p)
	if err != nil {
		t.Fatal(err)
	}
	in, err := binarycache.ParseNarinfo(fh, "/nix/store")
	fh.Close()
	if err != nil {
		t.Fatal(err)
	}
	change(in)
	pi := in.PathInfo()
	sig, err := key.Sign("/nix/store", &pi)
	if err != nil {
		t.Fatal(err)
	}
	in.Sigs = []string{sig}
	if err := os.WriteFile(p, in.Format("/nix/store"), 0o644); err != nil {
		t.Fatal(err)
	}
}

// TestLyingNarinfo: a (validly signed) narinfo whose NarHash, NarSize or
// References do not match the NAR is rejected, and nothing of the path or
// its referrers is left in the store.
func TestLyingNarinfo(t *testing.T) {
	f := newFixture(t)
	for _, tc := range []struct {
		name   string
		change func(*binarycache.Info)
	}{
		{"NarHash", func(in *binarycache.Info) { in.NarHash[0] ^= 1 }},
		{"NarSize", func(in *binarycache.Info) { in.NarSize += 8 }},
		{"NarSize short", func(in *binarycache.Info) { in.NarSize -= 8 }},
		{"missing reference", func(in *binarycache.Info) { in.References = append(in.References, pathX) }},
	} {
		t.Run(tc.name, func(t *testing.T) {
			dir := f.cache(t, f.key)
			rewrite(t, dir, pathB, f.key, tc.change)
			dst := openStore(t)
			s := newSubst(t, dst, []string{"file://" + dir}, Options{Keys: f.pub, Retries: -1})
			_, err := s.Substitute(context.Background(), []string{pathC}, true)
			if err == nil || !strings.Contains(err.Error(), pathB) {
				t.Fatalf("got %v", err)
			}
			if valid(t, dst, pathB) || valid(t, dst, pathC) {
				t.Fatal("lying path or its referrer is valid")
			}
			if tc.name != "missing reference" && s.Stats()[0].NarsFetched != 1 {
				t.Fatalf("stats %+v", s.Stats()[0])
			}
			all, _ := dst.All(context.Background())
			if len(all) > 1 {
				t.Fatalf("store holds %v", all)
			}
		})
	}
}

// TestSingleFlight: two substitutions of one closure at once fetch each
// NAR once, and both succeed.
func TestSingleFlight(t *testing.T) {
	f := newFixture(t)
	srv := serve(t, f.cache(t, f.key))
	srv.hook = func(w http.ResponseWriter, r *http.Request, n int) bool {
		if strings.HasPrefix(r.URL.Path, "/nar/") {
			time.Sleep(100 * time.Millisecond) // both are waiting by now
		}
		return false
	}
	dst := openStore(t)
	s := newSubst(t, dst, []string{srv.URL}, Options{Keys: f.pub})
	var wg sync.WaitGroup
	errs := make([]error, 2)
	for i := range errs {
		wg.Go(func() { _, errs[i] = s.Substitute(context.Background(), []string{pathC}, true) })
	}
	wg.Wait()
	if errs[0] != nil || errs[1] != nil {
		t.Fatal(errs)
	}
	checkClosure(t, f, dst)
	nars := srv.narRequests()
	if len(nars) != 3 {
		t.Fatalf("NAR requests %v", nars)
	}
	for p, n := range nars {
		if n != 1 {
			t.Fatalf("%s fetched %d times", p, n)
		}
	}
}

// TestPlanSizes: Resolve reports what is present, what would be fetched
// (with download and NAR sizes) and what cannot be had.
func TestPlanSizes(t *testing.T) {
	f := newFixture(t)
	dir := f.cache(t, f.key)
	dst := openStore(t)
	s := newSubst(t, dst, []string{"file://" + dir}, Options{Keys: f.pub})
	if _, err := s.Substitute(context.Background(), []string{pathA}, true); err != nil {
		t.Fatal(err)
	}
	p, err := s.Resolve(context.Background(), []string{pathC, pathX}, true)
	if err != nil {
		t.Fatal(err)
	}
	dl, ns := p.Sizes()
	pb, _ := f.src.Info(context.Background(), pathB)
	pc, _ := f.src.Info(context.Background(), pathC)
	if len(p.Fetch) != 2 || len(p.Present) != 1 || !errors.Is(p.Missing[pathX], ErrNoSubstitute) ||
		ns != pb.NarSize+pc.NarSize || dl <= 0 {
		t.Fatalf("plan %+v, sizes %d %d", p, dl, ns)
	}
}

// TestCloseWaits: Close cancels a fetch in flight and returns only once it
// ended, with nothing of the path left, so the store can be closed next.
func TestCloseWaits(t *testing.T) {
	f := newFixture(t)
	srv := serve(t, f.cache(t, f.key))
	release := make(chan struct{})
	defer close(release)
	started := make(chan struct{}, 8)
	srv.hook = func(w http.ResponseWriter, r *http.Request, n int) bool {
		if !strings.HasPrefix(r.URL.Path, "/nar/") {
			return false
		}
		// Headers only, then nothing: any body bytes would be a NAR
		// (or a compressed stream) the fetch could reject at once,
		// before the caller's cancel, and the test would race that.
		w.Header().Set("Content-Length", "1000000")
		w.(http.Flusher).Flush()
		started <- struct{}{}
		select { // a stalled body
		case <-release:
		case <-r.Context().Done():
		}
		return true
	}
	dst := openStore(t)
	s, err := New(dst, []string{srv.URL}, Options{StoreDir: "/nix/store", Keys: f.pub})
	if err != nil {
		t.Fatal(err)
	}
	ctx, cancel := context.WithCancel(context.Background())
	done := make(chan error)
	go func() { _, err := s.Substitute(ctx, []string{pathC}, true); done <- err }()
	<-started
	cancel() // the caller gives up; the fetch goes on for others
	if err := <-done; !errors.Is(err, context.Canceled) {
		t.Fatalf("caller: %v", err)
	}
	s.Close()
	if s.flightLen() != 0 || valid(t, dst, pathA) {
		t.Fatal("fetch still in flight or path valid after Close")
	}
}
