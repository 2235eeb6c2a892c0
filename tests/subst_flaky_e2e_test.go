package tests

import (
	"net"
	"net/http"
	"net/http/httptest"
	"os"
	"path/filepath"
	"regexp"
	"slices"
	"strconv"
	"strings"
	"sync"
	"testing"
	"time"

	"github.com/casnix/casnix/tests/nixtest"
)

// flakyCache serves a binary cache directory (written by real Nix) the way a flaky
// server would, deterministically: the first request for nix-cache-info, for each
// narinfo and for each NAR is answered 500; the second request for a NAR is cut off in
// the middle of its body (the connection closed after half the Content-Length); later
// ones are served, some slowly (a narinfo held back before its answer, a big NAR's
// body paused half way). It counts what it did, for comparison with casnix's counters.
type flakyCache struct {
	dir   string
	files http.Handler
	// delay is how long a slow answer waits (below casnix's timeouts).
	delay time.Duration

	mu       sync.Mutex
	seen     map[string]int // requests per URL path
	requests int            // narinfo and NAR requests
	failed   int            // of which answered 500 or cut off
	slow     int            // answers delayed
}

func newFlakyCache(dir string, delay time.Duration) *flakyCache {
	return &flakyCache{dir: dir, files: http.FileServer(http.Dir(dir)), delay: delay, seen: map[string]int{}}
}

// count records a request to p and returns how many there were so far.
func (f *flakyCache) count(p string) int {
	f.mu.Lock()
	defer f.mu.Unlock()
	f.seen[p]++
	if p != "/nix-cache-info" {
		f.requests++
	}
	return f.seen[p]
}

func (f *flakyCache) note(failed, slow bool) {
	f.mu.Lock()
	defer f.mu.Unlock()
	if failed {
		f.failed++
	}
	if slow {
		f.slow++
	}
}

// slowFor picks the narinfo answers that are delayed: about a third, by a
// character of their hash, so the choice is the same in every run.
func slowFor(p string) bool { return len(p) > 1 && p[1]%3 == 0 }

// pause waits d unless the client gave up first.
func pause(r *http.Request, d time.Duration) {
	t := time.NewTimer(d)
	defer t.Stop()
	select {
	case <-t.C:
	case <-r.Context().Done():
	}
}

func (f *flakyCache) ServeHTTP(w http.ResponseWriter, r *http.Request) {
	p := r.URL.Path
	n := f.count(p)
	switch {
	case p == "/nix-cache-info":
		if n == 1 {
			http.Error(w, "flaky: try again", http.StatusInternalServerError)
			return
		}
		f.files.ServeHTTP(w, r)
	case strings.HasSuffix(p, ".narinfo"):
		if n == 1 {
			f.note(true, false)
			http.Error(w, "flaky: try again", http.StatusInternalServerError)
			return
		}
		if n == 2 && slowFor(p) {
			f.note(false, true)
			pause(r, f.delay)
		}
		f.files.ServeHTTP(w, r)
	case strings.HasPrefix(p, "/nar/"):
		data, err := os.ReadFile(filepath.Join(f.dir, filepath.FromSlash(p)))
		if err != nil {
			http.NotFound(w, r)
			return
		}
		switch n {
		case 1:
			f.note(true, false)
			http.Error(w, "flaky: try again", http.StatusInternalServerError)
			return
		case 2:
			// Cut off: the client is promised the whole file and gets half.
			f.note(true, false)
			w.Header().Set("Content-Length", strconv.Itoa(len(data)))
			w.Write(data[:len(data)/2])
			w.(http.Flusher).Flush()
			if conn, _, err := w.(http.Hijacker).Hijack(); err == nil {
				conn.Close()
			}
			return
		}
		w.Header().Set("Content-Length", strconv.Itoa(len(data)))
		w.Write(data[:len(data)/2])
		if len(data) >= 64<<10 {
			// A big NAR's body stops flowing for a while half way.
			f.note(false, true)
			w.(http.Flusher).Flush()
			pause(r, f.delay)
		}
		w.Write(data[len(data)/2:])
	default:
		f.files.ServeHTTP(w, r)
	}
}

// metricValues parses the values of a per-upstream counter out of /metrics.
func metricValues(metrics, name string) map[string]int64 {
	out := map[string]int64{}
	re := regexp.MustCompile(`(?m)^` + regexp.QuoteMeta(name) + `\{upstream="([^"]*)"\} (\d+)$`)
	for _, m := range re.FindAllStringSubmatch(metrics, -1) {
		n, _ := strconv.ParseInt(m[2], 10, 64)
		out[m[1]] = n
	}
	return out
}

// freeAddr returns a loopback address nothing listens on (for a moment).
func freeAddr(t *testing.T) string {
	t.Helper()
	ln, err := net.Listen("tcp", "127.0.0.1:0")
	if err != nil {
		t.Fatal(err)
	}
	defer ln.Close()
	return ln.Addr().String()
}

// TestServeSubstitutersFlaky: real Nix 2.8 writes two signed binary caches, one xz- and
// one zstd-compressed, served on loopback by flakyCache: every narinfo and NAR (and
// nix-cache-info) fails with a 500 the first time, every NAR is cut off half way the
// second time, and some answers come slowly (1 s, well below casnix's timeouts).
// Through `casnix serve --substituters` over an empty store, real Nix clients (2.8, 2.26,
// 2.34) substitute a closure from each cache, with `nix-store -r` and with `nix build`:
// both succeed; every fetched path carries the caches' signature (`nix store verify
// --no-contents` through the daemon) and its contents verify (copied out of casnix's HTTP
// cache into a fresh Nix store, which checks each NarHash, then `nix store verify` there);
// path-info matches the source store; each NAR was fetched exactly three times (500, cut,
// whole), and casnix's /metrics count exactly the requests each upstream saw and the
// failures it answered; `casnix verify` passes after.
func TestServeSubstitutersFlaky(t *testing.T) {
	start := time.Now()
	f := nixtest.PopulateFixture(t)
	key, pub := cacheKey(t, f.Store, "upstream-1")
	_, strangerPub := cacheKey(t, f.Store, "stranger-1")
	tmp := t.TempDir()
	xzDir, zstdDir := filepath.Join(tmp, "xz"), filepath.Join(tmp, "zstd")
	// Two closures: one realised with nix-store -r from the xz cache, one with nix build
	// from the zstd cache; each holds NARs big enough to be paused half way.
	xzPaths := []string{f.Path(t, "diamond-top"), f.Path(t, "big-file")}
	zstdPaths := []string{f.Path(t, "chain2"), f.Path(t, "tree")}
	f.Nix(t, append([]string{"copy", "--to", "file://" + xzDir + "?compression=xz&secret-key=" + key}, xzPaths...)...)
	f.Nix(t, append([]string{"copy", "--to", "file://" + zstdDir + "?compression=zstd&secret-key=" + key}, zstdPaths...)...)
	want := f.PathInfos(t)
	xzClosure, zstdClosure := f.Closure(t, xzPaths...), f.Closure(t, zstdPaths...)
	// tree refers to single-file, which the xz cache lacks: the zstd cache has it.
	t.Logf("fixture and caches ready in %s", time.Since(start).Round(time.Millisecond))

	for _, suite := range nixtest.ClientSuites {
		t.Run(suite, func(t *testing.T) {
			t0 := time.Now()
			xzUp, zstdUp := newFlakyCache(xzDir, time.Second), newFlakyCache(zstdDir, time.Second)
			xzSrv, zstdSrv := httptest.NewServer(xzUp), httptest.NewServer(zstdUp)
			defer xzSrv.Close()
			defer zstdSrv.Close()
			xzURL, zstdURL := xzSrv.URL+"?priority=10", zstdSrv.URL+"?priority=20"

			cas := nixtest.NewCasnix(t)
			sockDir := t.TempDir()
			addr := freeAddr(t)
			d := cas.Serve(t, filepath.Join(sockDir, "casnix.sock"), "--http", addr,
				"--substituters", xzURL, "--substituters", zstdURL, "--trusted-public-keys", pub)
			// The client names both upstreams as its substituters (without casnix's
			// priorities: the daemon's own order stands).
			c := nixtest.RequireNixClient(t, suite).Bind(sockDir).UseSubstituters(xzSrv.URL, zstdSrv.URL)
			t.Logf("Nix %s", c.Version(t))

			r := c.Try("nix-store", "--store", d.URL(), "-r", xzPaths[0], xzPaths[1])
			if !r.OK() || !slices.Equal(nixtest.SortedLines(r.Stdout), nixtest.SortedLines([]byte(strings.Join(xzPaths, "\n")))) {
				t.Fatalf("nix-store -r through flaky upstreams:\n%s\ncasnix:\n%s", r, d.Output())
			}
			t.Logf("nix-store -r: %s", r.Duration.Round(time.Millisecond))
			r = c.Try(append([]string{"nix", "build", "--store", d.URL(), "--no-link"}, zstdPaths...)...)
			if !r.OK() {
				t.Fatalf("nix build through flaky upstreams:\n%s\ncasnix:\n%s", r, d.Output())
			}
			t.Logf("nix build: %s", r.Duration.Round(time.Millisecond))

			closure := slices.Compact(slices.Sorted(slices.Values(slices.Concat(xzClosure, zstdClosure))))
			// Every fetched path carries the caches' signature, as the daemon tells...
			verifySigs := func(key string) *nixtest.Result {
				return c.Try(append([]string{"nix", "store", "verify", "--store", d.URL(), "--no-contents", "--sigs-needed", "1",
					"--option", "trusted-public-keys", key}, closure...)...)
			}
			if r := verifySigs(pub); !r.OK() {
				t.Errorf("signatures of the substituted paths:\n%s", r)
			}
			if r := verifySigs(strangerPub); r.OK() { // the check is not vacuous
				t.Errorf("the substituted paths verify with a key that signed none of them:\n%s", r)
			}
			// ...and its contents are what the signature covers: copied out of casnix's
			// HTTP cache (NARs rendered from what it stored) into a fresh Nix store, which
			// checks each NAR against its NarHash, then verified there from the files. (A
			// unix:// store's nix store verify and --verify-path read the client's own
			// file system, which does not hold the paths.)
			out := nixtest.NewStore(t)
			out.Nix(t, append(append([]string{"copy", "--from", "http://" + addr}, requireSigs(pub)...), closure...)...)
			out.Nix(t, append(append([]string{"store", "verify", "--sigs-needed", "1"}, requireSigs(pub)...), closure...)...)
			got, err := nixtest.ParsePathInfoJSON(c.Run(t, append(append(c.PathInfoJSONArgs(t), "--store", d.URL()), closure...)...).Stdout)
			if err != nil {
				t.Fatal(err)
			}
			wantClosure := map[string]nixtest.PathInfo{}
			for _, p := range closure {
				wantClosure[p] = want[p]
			}
			sameInfos(t, got, wantClosure)

			// What the upstreams saw: each NAR three times (500, cut, whole); and
			// casnix's counters, per upstream, agree with them.
			metrics := string(nixtest.HTTPGet(t, "http://"+addr+"/metrics"))
			requests := metricValues(metrics, "casnix_substituter_requests_total")
			errs := metricValues(metrics, "casnix_substituter_errors_total")
			nars := metricValues(metrics, "casnix_substituter_nars_total")
			fetched := 0
			for _, up := range []struct {
				url string
				fc  *flakyCache
			}{{xzURL, xzUp}, {zstdURL, zstdUp}} {
				up.fc.mu.Lock()
				narCount := 0
				for p, n := range up.fc.seen {
					if strings.HasPrefix(p, "/nar/") {
						narCount++
						if n != 3 {
							t.Errorf("%s: %s requested %d times, want 3 (500, cut, whole)", up.url, p, n)
						}
					}
				}
				fetched += narCount
				if requests[up.url] != int64(up.fc.requests) || errs[up.url] != int64(up.fc.failed) || nars[up.url] != int64(narCount) {
					t.Errorf("%s: casnix counts %d requests, %d errors, %d NARs; the upstream saw %d requests, failed %d, served %d NARs",
						up.url, requests[up.url], errs[up.url], nars[up.url], up.fc.requests, up.fc.failed, narCount)
				}
				t.Logf("%s: %d requests, %d failed, %d slow, %d NARs", up.url, up.fc.requests, up.fc.failed, up.fc.slow, narCount)
				up.fc.mu.Unlock()
			}
			if fetched != len(closure) {
				t.Errorf("%d NARs fetched, want the closures' %d", fetched, len(closure))
			}
			xzUp.mu.Lock()
			zstdUp.mu.Lock()
			if xzUp.slow == 0 || zstdUp.slow == 0 {
				t.Errorf("no slow answers: xz %d, zstd %d", xzUp.slow, zstdUp.slow)
			}
			zstdUp.mu.Unlock()
			xzUp.mu.Unlock()

			if err := d.Stop(30 * time.Second); err != nil {
				t.Errorf("casnix serve: %v\n%s", err, d.Output())
			}
			if r := cas.Try("verify"); !r.OK() {
				t.Errorf("casnix verify:\n%s", r)
			}
			if left := leftovers(t, cas.DataDir); len(left) > 0 {
				t.Errorf("left in the data dir after serve stopped: %v", left)
			}
			t.Logf("%s done in %s", suite, time.Since(t0).Round(time.Millisecond))
		})
	}
}
