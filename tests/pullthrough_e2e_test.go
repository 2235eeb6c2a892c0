package tests

import (
	"fmt"
	"net/http"
	"net/http/httptest"
	"path/filepath"
	"regexp"
	"slices"
	"strings"
	"sync"
	"testing"

	"github.com/casnix/casnix/tests/nixtest"
)

// TestServePullThrough: casnix serve --http --substituters as a pull-through
// cache, with real Nix 2.8 on both sides. A real Nix writes a signed zstd
// cache of a closure; casnix, with an empty store, serves it over HTTP.
// 16 `nix copy --from http://casnix` into 16 fresh stores at once, requiring
// casnix's signature: each copy verifies and matches the source's
// path-infos, the upstream served each NAR once, a path nobody has is a
// 404, and /metrics counts the fetches.
func TestServePullThrough(t *testing.T) {
	f := nixtest.PopulateFixture(t)
	upKey, upPub := cacheKey(t, f.Store, "upstream-1")
	cache := filepath.Join(t.TempDir(), "cache")
	top, fod := f.Path(t, "diamond-top"), f.Path(t, "uses-fod")
	f.Nix(t, "copy", "--to", "file://"+cache+"?compression=zstd&secret-key="+upKey, top, fod)
	closure := f.Closure(t, top, fod)
	want := f.PathInfos(t)

	var mu sync.Mutex
	served := map[string]int{}
	files := http.FileServer(http.Dir(cache))
	up := httptest.NewServer(http.HandlerFunc(func(w http.ResponseWriter, r *http.Request) {
		mu.Lock()
		served[r.URL.Path]++
		mu.Unlock()
		files.ServeHTTP(w, r)
	}))
	defer up.Close()

	casKey, casPub := cacheKey(t, f.Store, "casnix-1")
	cas := nixtest.NewCasnix(t)
	d, url := cas.ServeHTTP(t, "--substituters", up.URL, "--trusted-public-keys", upPub, "--sign-key", casKey)

	dsts := make([]*nixtest.Store, 16)
	cacheHomes := make([]string, len(dsts))
	for i := range dsts {
		dsts[i] = nixtest.NewStore(t)
		// Each client its own narinfo disk cache: Nix 2.8's SQLite cache
		// fails ("constraint failed") under 16 concurrent writers, and the
		// clients must each ask casnix, not each other's cache.
		cacheHomes[i] = t.TempDir()
	}
	results := make([]*nixtest.Result, len(dsts))
	var wg sync.WaitGroup
	for i, dst := range dsts {
		wg.Go(func() {
			cmd := dst.Cmd("nix", append([]string{"copy", "--from", url, top, fod}, requireSigs(casPub)...)...)
			cmd.Env = append(slices.Clone(cmd.Env), "XDG_CACHE_HOME="+cacheHomes[i])
			results[i] = cmd.Try()
		})
	}
	wg.Wait()
	for i, r := range results {
		if !r.OK() {
			t.Fatalf("client %d: %s\ncasnix:\n%s", i, r, d.Output())
		}
	}
	for _, dst := range dsts {
		dst.Nix(t, append([]string{"store", "verify", "--all", "--sigs-needed", "1"}, requireSigs(casPub)...)...)
		wantClosure := map[string]nixtest.PathInfo{}
		for _, p := range closure {
			wantClosure[p] = want[p]
		}
		sameInfos(t, dst.PathInfos(t), wantClosure)
	}

	mu.Lock()
	nars := 0
	for p, n := range served {
		if strings.HasPrefix(p, "/nar/") {
			nars++
			if n != 1 {
				t.Errorf("upstream served %s %d times", p, n)
			}
		}
	}
	mu.Unlock()
	if nars != len(closure) {
		t.Errorf("upstream served %d NARs, want the closure's %d", nars, len(closure))
	}

	resp, err := http.Get(url + "/00000000000000000000000000000000.narinfo")
	if err != nil || resp.StatusCode != http.StatusNotFound {
		t.Errorf("unknown narinfo: %v %v", resp, err)
	}
	metrics := string(nixtest.HTTPGet(t, url+"/metrics"))
	counts := map[string]int{}
	for _, m := range regexp.MustCompile(`(?m)^casnix_http_pull_through_total\{result="(\w+)"\} (\d+)$`).FindAllStringSubmatch(metrics, -1) {
		var n int
		fmt.Sscan(m[2], &n)
		counts[m[1]] = n
	}
	if counts["fetched"] < 1 || counts["failed"] != 0 || counts["missing"] != 1 || counts["hit"] < 1 {
		t.Errorf("pull-through metrics %v:\n%s", counts, metrics)
	}

	// --no-http-pull-through: the store's paths only; nothing asked upstream.
	before := len(served)
	_, plain := nixtest.NewCasnix(t).ServeHTTP(t, "--substituters", up.URL, "--trusted-public-keys", upPub, "--no-http-pull-through")
	hash := strings.TrimPrefix(top, nixtest.StoreDir+"/")[:32]
	if resp, err := http.Get(plain + "/" + hash + ".narinfo"); err != nil || resp.StatusCode != http.StatusNotFound {
		t.Errorf("--no-http-pull-through: %v %v", resp, err)
	}
	mu.Lock()
	if len(served) != before || served["/"+hash+".narinfo"] != 1 {
		t.Errorf("--no-http-pull-through asked the upstream: %v", served)
	}
	mu.Unlock()
	t.Logf("16 clients copied %d paths; pull-through %v", len(closure), counts)
}
