package subst

import (
	"context"
	"fmt"
	"io"
	"net/http"
	"net/http/httptest"
	"strings"
	"sync"
	"sync/atomic"
	"testing"
	"time"

	"github.com/casnix/casnix/binarycache"
	"github.com/casnix/casnix/store"
)

// pullServer is a casnix HTTP binary cache over dst, pulling through s
// (as serve --http --substituters), signing with its own key.
func pullServer(t *testing.T, s *Substituter, dst *store.Store) (*httptest.Server, *binarycache.Server, store.PublicKeys) {
	t.Helper()
	key, pub := keyPair(t, "casnix-1")
	p := s.PullThrough(true)
	t.Cleanup(p.Close)
	h := &binarycache.Server{Store: dst, StoreDir: "/nix/store", Key: key, Pull: p}
	hs := httptest.NewServer(h)
	t.Cleanup(hs.Close)
	return hs, h, pub
}

// clientCopy copies the closure of name from the cache at url into a new
// store as Nix does (narinfo first, references first, each NAR checked by
// FetchNAR against its narinfo), requiring the casnix server's signature.
func clientCopy(ctx context.Context, url string, pub store.PublicKeys, dst *store.Store, name string) error {
	src, err := binarycache.OpenSource(url)
	if err != nil {
		return err
	}
	done := map[string]bool{}
	var get func(name string) error
	get = func(name string) error {
		if done[name] {
			return nil
		}
		done[name] = true
		rc, err := src.Open(ctx, store.HashPart(name)+".narinfo")
		if err != nil {
			return fmt.Errorf("%s.narinfo: %w", name, err)
		}
		in, err := binarycache.ParseNarinfo(rc, "/nix/store")
		rc.Close()
		if err != nil {
			return err
		}
		if pi := in.PathInfo(); in.Name != name || pub.Verify("/nix/store", &pi) == 0 {
			return fmt.Errorf("%s: narinfo of %s or not signed by the server", name, in.Name)
		}
		for _, r := range in.References {
			if r != name {
				if err := get(r); err != nil {
					return err
				}
			}
		}
		return binarycache.FetchNAR(ctx, dst, src, in)
	}
	return get(name)
}

func httpGet(t *testing.T, url string) (int, string) {
	t.Helper()
	resp, err := http.Get(url)
	if err != nil {
		t.Fatal(err)
	}
	defer resp.Body.Close()
	b, _ := io.ReadAll(resp.Body)
	return resp.StatusCode, string(b)
}

// metric is a casnix_http_pull_through_total result, or with a nars_
// prefix a casnix_http_pull_through_nars_total one.
func metric(t *testing.T, url, result string) string {
	t.Helper()
	_, body := httpGet(t, url+"/metrics")
	family := "casnix_http_pull_through_total"
	if r, ok := strings.CutPrefix(result, "nars_"); ok {
		family, result = "casnix_http_pull_through_nars_total", r
	}
	for _, l := range strings.Split(body, "\n") {
		if v, ok := strings.CutPrefix(l, family+`{result="`+result+`"} `); ok {
			return v
		}
	}
	t.Fatalf("no pull-through %s in /metrics:\n%s", result, body)
	return ""
}

// TestPullThrough: 16 clients copy the closure of C, which only the
// upstream has, through the casnix HTTP cache at once: each gets the right
// NARs with the server's signature, and the upstream served each NAR (and
// narinfo) once.
func TestPullThrough(t *testing.T) {
	f := newFixture(t)
	up := serve(t, f.cache(t, f.key))
	dst := openStore(t)
	hs, _, pub := pullServer(t, newSubst(t, dst, []string{up.URL}, Options{Keys: f.pub}), dst)
	var wg sync.WaitGroup
	clients := make([]*store.Store, 16)
	errs := make([]error, len(clients))
	for i := range clients {
		clients[i] = openStore(t)
		wg.Go(func() { errs[i] = clientCopy(context.Background(), hs.URL, pub, clients[i], pathC) })
	}
	wg.Wait()
	for i, c := range clients {
		if errs[i] != nil {
			t.Fatalf("client %d: %v", i, errs[i])
		}
		checkClosure(t, f, c)
	}
	checkClosure(t, f, dst)
	nars := up.narRequests()
	if len(nars) != 3 {
		t.Fatalf("upstream NAR requests %v, want 3 paths", nars)
	}
	for p, n := range nars {
		if n != 1 {
			t.Fatalf("upstream served %s %d times", p, n)
		}
	}
	for _, n := range []string{pathA, pathB, pathC} {
		if k := up.n("/" + store.HashPart(n) + ".narinfo"); k != 1 {
			t.Fatalf("upstream served %s.narinfo %d times", n, k)
		}
	}
	// The first narinfo request of C fetched the closure; every other was
	// a hit, unless it came while that fetch ran.
	if v := metric(t, hs.URL, "fetched"); v == "0" {
		t.Fatalf("fetched %s", v)
	}
	if v := metric(t, hs.URL, "failed"); v != "0" {
		t.Fatalf("failed %s", v)
	}
}

// TestPullThroughUnsigned: a path the upstream has without a trusted
// signature is a 404, and nothing is stored.
func TestPullThroughUnsigned(t *testing.T) {
	f := newFixture(t)
	up := serve(t, f.cache(t, nil))
	dst := openStore(t)
	hs, _, _ := pullServer(t, newSubst(t, dst, []string{up.URL}, Options{Keys: f.pub}), dst)
	for _, n := range []string{pathA, pathC} {
		if code, _ := httpGet(t, hs.URL+"/"+store.HashPart(n)+".narinfo"); code != http.StatusNotFound {
			t.Fatalf("%s: status %d, want 404", n, code)
		}
		if valid(t, dst, n) {
			t.Fatalf("%s stored", n)
		}
	}
	if len(up.narRequests()) != 0 {
		t.Fatalf("NARs fetched: %v", up.narRequests())
	}
	if v := metric(t, hs.URL, "missing"); v != "2" {
		t.Fatalf("missing %s, want 2", v)
	}
}

// TestPullThroughUpstreamFailing: an upstream failing is a 502 (not a 404:
// clients retry or try their next cache), and is not remembered: once the
// upstream works the path is served. A failing narinfo fails the narinfo
// request; a failing NAR fails the NAR request (the narinfo is answered
// from the upstream's before the NAR is fetched).
func TestPullThroughUpstreamFailing(t *testing.T) {
	for _, what := range []string{"/" + store.HashPart(pathC) + ".narinfo", "/nar/"} {
		t.Run(what, func(t *testing.T) {
			f := newFixture(t)
			up := serve(t, f.cache(t, f.key))
			var failing atomic.Bool
			failing.Store(true)
			up.hook = func(w http.ResponseWriter, r *http.Request, n int) bool {
				if failing.Load() && strings.HasPrefix(r.URL.Path, what) {
					http.Error(w, "down", http.StatusServiceUnavailable)
					return true
				}
				return false
			}
			dst := openStore(t)
			hs, _, pub := pullServer(t, newSubst(t, dst, []string{up.URL}, Options{Keys: f.pub, Retries: -1}), dst)
			url := hs.URL + "/" + store.HashPart(pathC) + ".narinfo"
			code, body := httpGet(t, url)
			failed := "failed"
			if what == "/nar/" {
				if code != http.StatusOK {
					t.Fatalf("narinfo: status %d with the upstream's NARs failing, want 200", code)
				}
				code, _ = httpGet(t, hs.URL+"/"+narURL(t, body))
				failed = "nars_failed"
			}
			if code != http.StatusBadGateway {
				t.Fatalf("status %d with the upstream failing, want 502", code)
			}
			// Another path's request is unaffected by the failure: a path
			// nobody has is still a 404.
			if code, _ := httpGet(t, hs.URL+"/"+store.HashPart(pathX)+".narinfo"); code != http.StatusNotFound {
				t.Fatalf("unknown path: status %d", code)
			}
			if v := metric(t, hs.URL, failed); v != "1" {
				t.Fatalf("%s %s, want 1", failed, v)
			}
			failing.Store(false)
			if code, body := httpGet(t, url); code != http.StatusOK || !strings.Contains(body, "StorePath: /nix/store/"+pathC) {
				t.Fatalf("status %d after recovery: %s", code, body)
			}
			c := openStore(t)
			if err := clientCopy(context.Background(), hs.URL, pub, c, pathC); err != nil {
				t.Fatal(err)
			}
			checkClosure(t, f, c)
		})
	}
}

// narURL is the URL a narinfo names.
func narURL(t *testing.T, narinfo string) string {
	t.Helper()
	in, err := binarycache.ParseNarinfo(strings.NewReader(narinfo), "/nix/store")
	if err != nil {
		t.Fatalf("%v:\n%s", err, narinfo)
	}
	return in.URL
}

// TestPullThroughFlood: 200 concurrent narinfo requests for a hash no
// upstream has make one upstream request per upstream (single-flight),
// and later ones none (negative cache); a request that is no hash part
// reaches no upstream.
func TestPullThroughFlood(t *testing.T) {
	f := newFixture(t)
	ups := []*server{serve(t, f.cache(t, f.key)), serve(t, f.cache(t, f.key))}
	slow := make(chan struct{})
	for _, up := range ups {
		up.hook = func(w http.ResponseWriter, r *http.Request, n int) bool {
			if strings.HasSuffix(r.URL.Path, ".narinfo") {
				<-slow
			}
			return false
		}
	}
	dst := openStore(t)
	hs, _, _ := pullServer(t, newSubst(t, dst, []string{ups[0].URL, ups[1].URL}, Options{Keys: f.pub}), dst)
	url := hs.URL + "/" + store.HashPart(pathX) + ".narinfo"
	codes := make(chan int, 200)
	client := &http.Client{Transport: &http.Transport{MaxConnsPerHost: 0, MaxIdleConnsPerHost: 200}}
	for range 200 {
		go func() {
			resp, err := client.Get(url)
			if err != nil {
				codes <- -1
				return
			}
			resp.Body.Close()
			codes <- resp.StatusCode
		}()
	}
	time.Sleep(300 * time.Millisecond)
	close(slow)
	for range 200 {
		if c := <-codes; c != http.StatusNotFound {
			t.Fatalf("status %d, want 404", c)
		}
	}
	if code, _ := httpGet(t, url); code != http.StatusNotFound {
		t.Fatalf("status %d", code)
	}
	if code, _ := httpGet(t, hs.URL+"/"+strings.Repeat("e", 32)+".narinfo"); code != http.StatusNotFound {
		t.Fatalf("status %d", code)
	}
	for i, up := range ups {
		if n := up.n("/" + store.HashPart(pathX) + ".narinfo"); n != 1 {
			t.Fatalf("upstream %d: %d narinfo requests, want 1", i, n)
		}
		if n := up.n("/" + strings.Repeat("e", 32) + ".narinfo"); n != 0 {
			t.Fatalf("upstream %d asked for a non-hash", i)
		}
	}
}

// slowPull serves eight unrelated paths (hash parts of fill) from an
// upstream whose NAR downloads take 100 ms each, through a pull-through
// cache into an empty store; most counts the NAR downloads that ran at
// once.
func slowPull(t *testing.T, fill string) (names []string, hs *httptest.Server, dst *store.Store, most *atomic.Int32) {
	t.Helper()
	for i := range 8 {
		names = append(names, strings.Repeat(fill, 31)+"abcdfghi"[i:i+1]+"-p")
	}
	src := openStore(t)
	for _, n := range names {
		addTree(t, src, n)
	}
	key, pub := keyPair(t, "up-1")
	dir := t.TempDir()
	ex := &binarycache.Exporter{Store: src, Dir: dir, StoreDir: "/nix/store", Compression: "zstd", Key: key, Jobs: 2}
	if _, err := ex.Export(context.Background(), names); err != nil {
		t.Fatal(err)
	}
	up := serve(t, dir)
	var inflight atomic.Int32
	most = new(atomic.Int32)
	up.hook = func(w http.ResponseWriter, r *http.Request, n int) bool {
		if strings.HasPrefix(r.URL.Path, "/nar/") {
			k := inflight.Add(1)
			for m := most.Load(); k > m && !most.CompareAndSwap(m, k); m = most.Load() {
			}
			time.Sleep(100 * time.Millisecond)
			inflight.Add(-1)
		}
		return false
	}
	dst = openStore(t)
	hs, _, _ = pullServer(t, newSubst(t, dst, []string{up.URL}, Options{Keys: pub}), dst)
	return names, hs, dst, most
}

// TestPullThroughBoundedDownloads: narinfo requests for eight unrelated
// paths at once (a client asks for every path it copies up front) download
// their NARs ahead of the NAR requests (prefetch), but at most
// prefetchJobs at a time, plus the one closure whose fetch (and ingest)
// runs (pullSlots), not all at the same time.
func TestPullThroughBoundedDownloads(t *testing.T) {
	names, hs, dst, most := slowPull(t, "4")
	for _, n := range names {
		if code, body := httpGet(t, hs.URL+"/"+store.HashPart(n)+".narinfo"); code != http.StatusOK {
			t.Fatalf("%s.narinfo: %d %s", n, code, body)
		}
	}
	for deadline := time.Now().Add(30 * time.Second); ; time.Sleep(20 * time.Millisecond) {
		valid := 0
		for _, n := range names {
			if ok, err := dst.IsValid(context.Background(), n); err != nil {
				t.Fatal(err)
			} else if ok {
				valid++
			}
		}
		if valid == len(names) {
			break
		}
		if time.Now().After(deadline) {
			t.Fatalf("%d of %d paths pulled after 30 s", valid, len(names))
		}
	}
	if m := most.Load(); m < 2 || m > prefetchJobs+pullSlots {
		t.Fatalf("%d NAR downloads at once, want 2 to %d (prefetched, bounded)", m, prefetchJobs+pullSlots)
	}
}

func TestPrefetchGate(t *testing.T) {
	q := prefetchQuiet
	ms, qn := int64(time.Millisecond), int64(prefetchQuiet)
	for _, c := range []struct {
		name                   string
		lastPull, lastNAR, now int64
		want                   time.Duration
	}{
		{"nothing asked yet", 0, 0, 1000 * ms, 0},
		{"narinfo just asked", 1000 * ms, 0, 1000 * ms, q},
		{"narinfo asked a little before", 1000 * ms, 0, 1000*ms + qn/4, q - q/4},
		{"quiet long enough", 1000 * ms, 0, 1000*ms + qn, 0},
		{"NAR asked after the narinfo", 1000 * ms, 1000*ms + 1, 1000*ms + 2, 0},
		{"NAR asked before the narinfo", 1000 * ms, 999 * ms, 1000 * ms, q},
	} {
		if got := prefetchGate(c.lastPull, c.lastNAR, c.now); got != c.want {
			t.Errorf("%s: prefetchGate = %v, want %v", c.name, got, c.want)
		}
	}
}

// TestPullThroughPrefetchWaitsForNarinfos: while a client goes on asking
// for narinfos, the pull-through downloads only what the closure's fetch
// needs (one NAR at a time here), not the prefetches of every narinfo
// answered, which would take the CPU from the answers still to come; the
// prefetches start once the narinfos pause, or at once when a NAR is asked
// for.
func TestPullThroughPrefetchWaitsForNarinfos(t *testing.T) {
	defer func(d time.Duration) { prefetchQuiet = d }(prefetchQuiet)
	prefetchQuiet = 2 * time.Second
	names, hs, _, most := slowPull(t, "5")
	narinfo := func(n string) string {
		code, body := httpGet(t, hs.URL+"/"+store.HashPart(n)+".narinfo")
		if code != http.StatusOK {
			t.Fatalf("%s.narinfo: %d %s", n, code, body)
		}
		return body
	}
	// Well within prefetchQuiet of each other, for longer than three
	// downloads take.
	var last string
	for end := time.Now().Add(400 * time.Millisecond); time.Now().Before(end); time.Sleep(10 * time.Millisecond) {
		for _, n := range names {
			last = narinfo(n)
		}
	}
	if m := most.Load(); m > int32(pullSlots) {
		t.Fatalf("%d NAR downloads at once while narinfos were asked for, want at most %d (the closure's fetch)", m, pullSlots)
	}
	// A NAR request opens the gate without waiting for prefetchQuiet.
	t0 := time.Now()
	if code, body := httpGet(t, hs.URL+"/"+narURL(t, last)); code != http.StatusOK {
		t.Fatalf("NAR: %d %s", code, body)
	}
	for most.Load() < 2 {
		if time.Since(t0) > prefetchQuiet/2 {
			t.Fatalf("no prefetch %v after a NAR request (most %d at once)", time.Since(t0), most.Load())
		}
		time.Sleep(10 * time.Millisecond)
	}
}
