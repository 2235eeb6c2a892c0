package tests

import (
	"fmt"
	"net"
	"net/http"
	"net/http/httptest"
	"os"
	"path/filepath"
	"regexp"
	"strconv"
	"strings"
	"testing"
	"time"

	"github.com/casnix/casnix/tests/nixtest"
)

// TestServeMaxSize: casnix serve --substituters --max-size with real Nix 2.8. A path a
// client uploaded (big-file) and a pinned substituted closure (tree) stay; substituting
// random-5m takes the packs past the budget, and once the client that fetched it is gone
// (its temp root with it) the daemon evicts it: nix path-info no longer finds it, the rest
// renders through the daemon to its NAR hash, a new nix-store -r fetches it again, and
// /metrics counts the substitutions and the eviction.
func TestServeMaxSize(t *testing.T) {
	f := nixtest.PopulateFixture(t)
	key, pub := cacheKey(t, f.Store, "upstream-1")
	cache := filepath.Join(t.TempDir(), "cache")
	uploaded, pinned, big := f.Path(t, "big-file"), f.Path(t, "tree"), f.Path(t, "random")
	f.Nix(t, "copy", "--to", "file://"+cache+"?compression=zstd&secret-key="+key, pinned, big)
	up := httptest.NewServer(http.FileServer(http.Dir(cache)))
	defer up.Close()

	ln, err := net.Listen("tcp", "127.0.0.1:0")
	if err != nil {
		t.Fatal(err)
	}
	httpAddr := ln.Addr().String()
	ln.Close()
	const budget = 3 << 20 // random-5m alone is over it
	cas := nixtest.NewCasnix(t)
	sockDir := t.TempDir()
	d := cas.Serve(t, filepath.Join(sockDir, "casnix.sock"), "--substituters", up.URL,
		"--trusted-public-keys", pub, "--max-size", strconv.Itoa(budget), "--pin", pinned,
		"--evict-interval", "200ms", "--http", httpAddr)
	c := nixtest.RequireNixClient(t, "bookworm").UseSubstituters(up.URL)
	c.Bind(sockDir, f.Root)

	c.Run(t, "nix", "copy", "--no-check-sigs", "--from", "local?root="+f.Root, "--to", d.URL(), uploaded)
	for _, p := range []string{pinned, big} {
		if r := c.Try("nix-store", "--store", d.URL(), "-r", p); !r.OK() {
			t.Fatalf("nix-store -r %s:\n%s\ncasnix:\n%s", p, r, d.Output())
		}
	}
	metric := func(name string) int64 {
		t.Helper()
		m := regexp.MustCompile(`(?m)^` + regexp.QuoteMeta(name) + ` (\d+)$`).FindSubmatch(nixtest.HTTPGet(t, "http://"+httpAddr+"/metrics"))
		if m == nil {
			t.Fatalf("no %s in /metrics", name)
		}
		n, _ := strconv.ParseInt(string(m[1]), 10, 64)
		return n
	}
	waitEvicted := func(want int64) {
		t.Helper()
		for start := time.Now(); metric("casnix_evicted_paths_total") < want; time.Sleep(100 * time.Millisecond) {
			if time.Since(start) > 30*time.Second {
				t.Fatalf("no eviction after 30 s; casnix:\n%s", d.Output())
			}
		}
	}
	waitEvicted(1)
	if r := c.Try("nix", "path-info", "--store", d.URL(), "--offline", big); r.OK() {
		t.Errorf("nix path-info %s after its eviction:\n%s", big, r)
	}
	if n := metric("casnix_store_pack_bytes"); n > budget {
		t.Errorf("packs take %d bytes after eviction, budget %d", n, budget)
	}
	closure := f.Closure(t, pinned, uploaded)
	r := c.Try(append([]string{"nix", "path-info", "--store", d.URL(), "--offline"}, closure...)...)
	if !r.OK() || len(nixtest.SortedLines(r.Stdout)) != len(closure) {
		t.Fatalf("nix path-info of the kept paths:\n%s", r)
	}
	// The kept paths' NARs through the daemon (NarFromPath) are the source's: copied out
	// uncompressed, each file's hash (computed by Nix from the bytes) is the NAR hash.
	// (Nix 2.8's nix store verify and dump-path read the client's file system instead.)
	want := f.PathInfos(t)
	out := t.TempDir()
	// (real=: the client resolves its arguments in the fixture's store directory.)
	from := d.URL() + "?real=" + f.RealPath(nixtest.StoreDir)
	c.Run(t, append([]string{"nix", "copy", "--no-check-sigs", "--from", from, "--to", "file://" + out + "?compression=none"}, closure...)...)
	for _, p := range closure {
		hash := strings.SplitN(strings.TrimPrefix(p, nixtest.StoreDir+"/"), "-", 2)[0]
		ni, err := os.ReadFile(filepath.Join(out, hash+".narinfo"))
		if err != nil {
			t.Fatal(err)
		}
		fileHash := regexp.MustCompile(`(?m)^FileHash: (\S+)$`).FindSubmatch(ni)
		wantHash, _ := nixtest.NormalizeSHA256(want[p].NarHash)
		if fileHash == nil || string(fileHash[1]) != wantHash {
			t.Errorf("%s: NAR through the daemon:\n%s\nwant NarHash %s", p, ni, wantHash)
		}
	}
	// Evicted is not lost: the next client fetches it again.
	if r := c.Try("nix-store", "--store", d.URL(), "-r", big); !r.OK() {
		t.Fatalf("nix-store -r %s after eviction:\n%s", big, r)
	}
	m := string(nixtest.HTTPGet(t, "http://"+httpAddr+"/metrics"))
	for _, want := range []string{
		// The pinned closure, random-5m, random-5m again.
		fmt.Sprintf("casnix_substituter_nars_total{upstream=%q} %d", up.URL, len(f.Closure(t, pinned))+2),
		fmt.Sprintf("casnix_substituter_up{upstream=%q} 1", up.URL),
		fmt.Sprintf("casnix_store_max_size_bytes %d", budget),
	} {
		if !strings.Contains(m, want) {
			t.Errorf("/metrics lacks %q:\n%s", want, m)
		}
	}
	waitEvicted(2)
	if err := d.Stop(30 * time.Second); err != nil {
		t.Errorf("casnix serve: %v\n%s", err, d.Output())
	}
	if r := cas.Try("verify"); !r.OK() {
		t.Errorf("casnix verify:\n%s", r)
	}
}
