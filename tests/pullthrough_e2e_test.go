package tests

import (
	"bytes"
	"fmt"
	"net/http"
	"net/http/httptest"
	"os"
	"path/filepath"
	"regexp"
	"slices"
	"strings"
	"sync"
	"testing"
	"time"

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
	// The clients may be done before casnix's ingest of what it streamed
	// to them is: once it is, a narinfo request is a hit.
	topHash := strings.TrimPrefix(top, nixtest.StoreDir+"/")[:32]
	var metrics string
	counts := map[string]int{}
	for deadline := time.Now().Add(time.Minute); ; time.Sleep(100 * time.Millisecond) {
		nixtest.HTTPGet(t, url+"/"+topHash+".narinfo")
		metrics = string(nixtest.HTTPGet(t, url+"/metrics"))
		for _, m := range regexp.MustCompile(`(?m)^casnix_http_pull_through_total\{result="(\w+)"\} (\d+)$`).FindAllStringSubmatch(metrics, -1) {
			var n int
			fmt.Sscan(m[2], &n)
			counts[m[1]] = n
		}
		if counts["hit"] >= 1 || time.Now().After(deadline) {
			break
		}
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

// slowWriter sends a response in pieces of 64 KiB, each flushed, 20 ms
// apart (3.2 MB/s): an upstream slow enough that a NAR is still arriving when the
// client asks casnix for it.
type slowWriter struct{ http.ResponseWriter }

func (w slowWriter) Write(p []byte) (int, error) {
	var n int
	for len(p) > 0 {
		k := min(len(p), 64<<10)
		m, err := w.ResponseWriter.Write(p[:k])
		n += m
		if err != nil {
			return n, err
		}
		http.NewResponseController(w.ResponseWriter).Flush()
		time.Sleep(20 * time.Millisecond)
		p = p[k:]
	}
	return n, nil
}

// TestServePullThroughStreams: Nix 2.8, 2.26 and 2.34 each copy a 20 MiB
// path through a cold casnix pull-through cache whose upstream (a cache
// real Nix wrote, zstd and xz) sends that NAR slowly (3.2 MB/s: seconds).
// casnix answers the narinfo from the upstream's (no FileHash or FileSize;
// Compression and URL of the upstream's compression) and the NAR from its
// download while that still runs (counted as streamed), as the upstream's
// file passed on as it arrives (counted as verbatim: no decoding and
// compressing again); each client verifies the path against casnix's
// signature and the source's path-info, casnix holds the path afterwards,
// and the upstream sent the NAR once per casnix. The upstream's file is
// kept: the narinfo's URL then sends it byte for byte.
func TestServePullThroughStreams(t *testing.T) {
	f := nixtest.PopulateFixture(t)
	bigDir := filepath.Join(t.TempDir(), "big-file")
	if err := os.MkdirAll(bigDir, 0o755); err != nil {
		t.Fatal(err)
	}
	if err := os.WriteFile(filepath.Join(bigDir, "data"), textLike(20<<20), 0o644); err != nil {
		t.Fatal(err)
	}
	big := strings.TrimSpace(string(f.Store.NixStore(t, "--add", bigDir)))
	upKey, upPub := cacheKey(t, f.Store, "upstream-1")
	want := f.PathInfos(t)
	casKey, casPub := cacheKey(t, f.Store, "casnix-1")
	for _, comp := range []string{"zstd", "xz"} {
		t.Run(comp, func(t *testing.T) {
			cache := filepath.Join(t.TempDir(), "cache")
			f.Nix(t, "copy", "--to", "file://"+cache+"?compression="+comp+"&secret-key="+upKey, big)
			var mu sync.Mutex
			nars := 0
			files := http.FileServer(http.Dir(cache))
			up := httptest.NewServer(http.HandlerFunc(func(w http.ResponseWriter, r *http.Request) {
				if strings.HasPrefix(r.URL.Path, "/nar/") {
					mu.Lock()
					nars++
					mu.Unlock()
					w = slowWriter{w}
				}
				files.ServeHTTP(w, r)
			}))
			defer up.Close()
			ran := 0
			for _, suite := range nixtest.ClientSuites {
				t.Run(suite, func(t *testing.T) {
					cl := nixtest.RequireNixClient(t, suite)
					ran++
					pullThroughStream(t, cl, up.URL, upPub, casKey, casPub, cache, comp, big, want[big])
				})
			}
			mu.Lock()
			defer mu.Unlock()
			if nars != ran {
				t.Errorf("upstream sent the NAR %d times for %d cold casnix servers", nars, ran)
			}
		})
	}
}

// pullThroughStream is one client of TestServePullThroughStreams.
func pullThroughStream(t *testing.T, cl *nixtest.NixClient, upURL, upPub, casKey, casPub, cache, comp, big string, want nixtest.PathInfo) {
	cas := nixtest.NewCasnix(t)
	d, url := cas.ServeHTTP(t, "--substituters", upURL, "--trusted-public-keys", upPub, "--sign-key", casKey)
	dest := "local?root=" + filepath.Join(cl.TempDir(t), "dst")
	// The narinfo of the path being pulled (the client asks for it too,
	// and gets the same: the path is valid only once its NAR is here).
	hash := strings.TrimPrefix(big, nixtest.StoreDir+"/")[:32]
	ni := string(nixtest.HTTPGet(t, url+"/"+hash+".narinfo"))
	if r := cl.Cmd(append([]string{"nix", "copy", "--from", url, "--to", dest, big}, requireSigs(casPub)...)...).Try(); !r.OK() {
		t.Fatalf("Nix %s: %s\ncasnix:\n%s", cl.Version(t), r, d.Output())
	}
	cl.Run(t, append([]string{"nix", "store", "verify", "--store", dest, "--sigs-needed", "1", big}, requireSigs(casPub)...)...)
	if strings.Contains(ni, "FileHash") || strings.Contains(ni, "FileSize") {
		t.Errorf("casnix's narinfo names a FileHash or FileSize:\n%s", ni)
	}
	metrics := string(nixtest.HTTPGet(t, url+"/metrics"))
	m := regexp.MustCompile(`(?m)^casnix_http_pull_through_nars_total\{result="(\w+)"\} (\d+)$`).FindAllStringSubmatch(metrics, -1)
	counts := map[string]string{}
	for _, x := range m {
		counts[x[1]] = x[2]
	}
	if counts["streamed"] != "1" || counts["failed"] != "0" {
		t.Errorf("Nix %s: pull-through NARs %v, want 1 streamed", cl.Version(t), counts)
	}
	if v := regexp.MustCompile(`(?m)^casnix_http_pull_through_nars_verbatim_total (\d+)$`).FindStringSubmatch(metrics); v == nil || v[1] != "1" {
		t.Errorf("Nix %s: pull-through NARs sent verbatim: %v, want 1", cl.Version(t), v)
	}
	// The ingest ends once the download checked out, right after the
	// client's copy; wait for it.
	for deadline := time.Now().Add(time.Minute); ; time.Sleep(100 * time.Millisecond) {
		if got := cas.ValidPaths(t, []string{big}); len(got) == 1 {
			sameInfos(t, got, map[string]nixtest.PathInfo{big: want})
			break
		}
		if time.Now().After(deadline) {
			t.Fatalf("casnix does not hold %s a minute after the copy", big)
		}
	}
	// The upstream's file, checked, is kept in the NAR cache (on by
	// default): the URL the client was given (zstd or xz, as upstream)
	// sends the upstream's very bytes from then on, and this Nix takes
	// and verifies them, with the narinfo the client was given or the one
	// casnix gives now that it holds the path.
	upNarinfo, err := os.ReadFile(filepath.Join(cache, hash+".narinfo"))
	if err != nil {
		t.Fatal(err)
	}
	upFile, err := os.ReadFile(filepath.Join(cache, narinfoField(t, string(upNarinfo), "URL")))
	if err != nil {
		t.Fatal(err)
	}
	ext := map[string]string{"zstd": ".nar.zst", "xz": ".nar.xz"}[comp]
	if c := narinfoField(t, ni, "Compression"); c != comp {
		t.Errorf("casnix's narinfo of a path pulled from a %s cache says Compression: %s", comp, c)
	}
	narURL := narinfoField(t, ni, "URL")
	kept := filepath.Join(cas.DataDir, "http-cache", strings.TrimSuffix(narURL[strings.LastIndex(narURL, "-")+1:], ext)+ext)
	for deadline := time.Now().Add(10 * time.Second); ; time.Sleep(50 * time.Millisecond) {
		if _, err := os.Stat(kept); err == nil {
			break
		}
		if time.Now().After(deadline) {
			t.Fatalf("the upstream's file of %s is not kept as %s", big, kept)
		}
	}
	if sent := nixtest.HTTPGet(t, url+"/"+narURL); !bytes.Equal(sent, upFile) {
		t.Errorf("casnix sent %d bytes for %s, not the upstream's %d-byte file", len(sent), narURL, len(upFile))
	}
	again := "local?root=" + filepath.Join(cl.TempDir(t), "again")
	cl.Run(t, append([]string{"nix", "copy", "--from", url, "--to", again, big}, requireSigs(casPub)...)...)
	cl.Run(t, append([]string{"nix", "store", "verify", "--store", again, "--sigs-needed", "1", big}, requireSigs(casPub)...)...)
	t.Logf("Nix %s copied and verified %s, streamed from casnix while its %s upstream sent it, then from the upstream's kept file", cl.Version(t), big, comp)
}

// narinfoField is the value of a narinfo's field.
func narinfoField(t *testing.T, narinfo, field string) string {
	t.Helper()
	for _, l := range strings.Split(narinfo, "\n") {
		if v, ok := strings.CutPrefix(l, field+": "); ok {
			return v
		}
	}
	t.Fatalf("narinfo without %s:\n%s", field, narinfo)
	return ""
}
