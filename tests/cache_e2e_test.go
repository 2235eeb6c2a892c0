package tests

import (
	"fmt"
	"io"
	"math/rand/v2"
	"net/http"
	"net/http/httptest"
	"os"
	"path/filepath"
	"regexp"
	"slices"
	"strings"
	"testing"

	"github.com/casnix/casnix/tests/nixtest"
)

// cacheKey makes a Nix signing key pair; it returns the secret key file and the public key.
func cacheKey(t *testing.T, s *nixtest.Store, name string) (string, string) {
	t.Helper()
	secret := s.Nix(t, "key", "generate-secret", "--key-name", name)
	file := filepath.Join(t.TempDir(), name+".sec")
	if err := os.WriteFile(file, secret, 0o600); err != nil {
		t.Fatal(err)
	}
	pub := s.Cmd("nix", "key", "convert-secret-to-public")
	pub.Stdin = strings.NewReader(string(secret))
	return file, strings.TrimSpace(string(pub.Run(t).Stdout))
}

// requireSigs are the options that make Nix accept only paths signed by pub.
func requireSigs(pub string) []string {
	return []string{"--option", "require-sigs", "true", "--option", "trusted-public-keys", pub}
}

// sameInfos checks that every path of want is valid in got with the same NAR hash, size
// and references.
func sameInfos(t *testing.T, got, want map[string]nixtest.PathInfo) {
	t.Helper()
	for p, w := range want {
		g, ok := got[p]
		if !ok {
			t.Errorf("%s: missing", p)
			continue
		}
		if g.NarHash != w.NarHash || g.NarSize != w.NarSize || !slices.Equal(g.References, w.References) || g.CA != w.CA {
			t.Errorf("%s: got %+v, want %+v", p, g, w)
		}
	}
}

// TestCacheRoundTrip: real Nix writes xz and zstd caches, casnix imports them, exports a
// signed zstd cache, and real Nix copies from that into a fresh store with require-sigs.
func TestCacheRoundTrip(t *testing.T) {
	f := nixtest.PopulateFixture(t)
	tmp := t.TempDir()
	cacheA, cacheZ, cacheB := filepath.Join(tmp, "a"), filepath.Join(tmp, "z"), filepath.Join(tmp, "b")
	f.Nix(t, "copy", "--to", "file://"+cacheA+"?compression=xz", "--all")
	f.Nix(t, "copy", "--to", "file://"+cacheZ+"?compression=zstd", f.Path(t, "diamond-top"), f.Path(t, "chain4"))
	want := f.PathInfos(t)

	c := nixtest.NewCasnix(t)
	// zstd first: part of the closure; then xz --all fills in the rest.
	c.Run(t, "import", "--from", "file://"+cacheZ, "--no-check-sigs", f.Path(t, "diamond-top"), f.Path(t, "chain4"))
	r := c.Run(t, "import", "--from", "file://"+cacheA, "--no-check-sigs", "--all")
	if !strings.Contains(string(r.Stderr), "already present") {
		t.Errorf("import summary: %s", r.Stderr)
	}
	sameInfos(t, c.ValidPaths(t, f.AllPaths(t)), want)
	// Idempotent: again, nothing to do.
	r = c.Run(t, "import", "--from", "file://"+cacheA, "--no-check-sigs", "--all")
	if !strings.Contains(string(r.Stderr), "imported 0 paths") {
		t.Errorf("second import: %s", r.Stderr)
	}

	key, pub := cacheKey(t, f.Store, "casnix-export-1")
	c.Run(t, "export", "--to", "file://"+cacheB, "--all", "--sign-key", key)
	// Incremental: a second export writes nothing.
	if r := c.Run(t, "export", "--to", "file://"+cacheB, "--all"); !strings.Contains(string(r.Stderr), "exported 0 paths") {
		t.Errorf("second export: %s", r.Stderr)
	}

	dst := nixtest.NewStore(t)
	// Paths by name: Nix 2.8's `copy --all` from a file:// cache names paths "<hash>-x" and
	// then misorders references.
	var drvs, outs []string
	for _, p := range f.AllPaths(t) {
		if strings.HasSuffix(p, ".drv") {
			drvs = append(drvs, p)
		} else {
			outs = append(outs, p)
		}
	}
	dst.Nix(t, append(append([]string{"copy", "--from", "file://" + cacheB}, requireSigs(pub)...), outs...)...)
	dst.Nix(t, append(append([]string{"copy", "--derivation", "--from", "file://" + cacheB}, requireSigs(pub)...), drvs...)...)
	sameInfos(t, dst.PathInfos(t), want)
	// Contents re-hashed, and every path carries a valid signature by casnix's key.
	dst.Nix(t, append([]string{"store", "verify", "--all", "--sigs-needed", "1"}, requireSigs(pub)...)...)

	// With signatures required, Nix's unsigned cache yields only the content-addressed paths
	// (their address proves their name; their contents are checked against it at ingest)
	// whose references are such paths too.
	c3 := nixtest.NewCasnix(t)
	r = c3.Try("import", "--from", "file://"+cacheA, "--trusted-public-keys", pub, "--all", "--keep-going")
	if r.OK() || !strings.Contains(string(r.Stderr), "refused: not signed") {
		t.Errorf("unsigned cache with --trusted-public-keys:\n%s", r)
	}
	caOK := map[string]bool{}
	for changed := true; changed; {
		changed = false
		for p, pi := range want {
			if caOK[p] || pi.CA == "" {
				continue
			}
			ok := true
			for _, ref := range pi.References {
				ok = ok && (ref == p || caOK[ref])
			}
			if ok {
				caOK[p], changed = true, true
			}
		}
	}
	got := c3.ValidPaths(t, f.AllPaths(t))
	if len(caOK) < 3 || len(got) != len(caOK) {
		t.Errorf("imported %d unsigned paths, want the %d verifiable content-addressed ones", len(got), len(caOK))
	}
	for p := range got {
		if !caOK[p] {
			t.Errorf("%s imported without a signature (CA %q)", p, want[p].CA)
		}
	}

	// A plain static HTTP server serving the xz cache: import by path (no listing).
	hs := httptest.NewServer(http.FileServer(http.Dir(cacheA)))
	defer hs.Close()
	c2 := nixtest.NewCasnix(t)
	if r := c2.Try("import", "--from", hs.URL, "--no-check-sigs", "--all"); r.OK() || !strings.Contains(string(r.Stderr), "cannot be listed") {
		t.Errorf("--all over http: %s", r)
	}
	// Signatures are checked unless told otherwise: no key given, none is valid.
	top := f.Path(t, "diamond-top")
	if r := c2.Try("import", "--from", hs.URL, top); r.OK() || !strings.Contains(string(r.Stderr), "refused: ") ||
		!strings.Contains(string(r.Stderr), "--no-check-sigs") || !strings.Contains(string(r.Stderr), nixtest.StoreDir+"/") {
		t.Errorf("import of an unsigned cache without --no-check-sigs:\n%s", r)
	}
	c2.Run(t, "import", "--from", hs.URL, "--no-check-sigs", top, f.Path(t, "uses-fod"))
	sub := map[string]nixtest.PathInfo{}
	for _, p := range f.Closure(t, f.Path(t, "diamond-top"), f.Path(t, "uses-fod")) {
		sub[p] = want[p]
	}
	got = c2.ValidPaths(t, f.AllPaths(t))
	sameInfos(t, got, sub)
	if len(got) != len(sub) {
		t.Errorf("imported %d paths over http, want the %d of the closures", len(got), len(sub))
	}
}

// TestCacheServeHTTP: real Nix substitutes from `casnix serve --http`, signatures checked.
func TestCacheServeHTTP(t *testing.T) {
	f := nixtest.PopulateFixture(t)
	// A path with one 20 MiB file: ingest stores it in 4 MiB frames that
	// hold nothing else, which the server sends as they are stored, the
	// NAR's framing compressed around them (a stream of several frames).
	// Compressed frames (--ingest zstd): frames stored uncompressed, as the
	// default writes them until the repack, are compressed on the fly
	// (blobs.TestStoreMode).
	bigDir := filepath.Join(t.TempDir(), "big-file")
	if err := os.MkdirAll(bigDir, 0o755); err != nil {
		t.Fatal(err)
	}
	if err := os.WriteFile(filepath.Join(bigDir, "data"), textLike(20<<20), 0o644); err != nil {
		t.Fatal(err)
	}
	big := strings.TrimSpace(string(f.Store.NixStore(t, "--add", bigDir)))
	c := nixtest.NewCasnix(t)
	c.Run(t, "--ingest", "zstd", "import", "--from-nix-store", f.Store.Root)
	key, pub := cacheKey(t, f.Store, "casnix-serve-1")
	narCache := filepath.Join(t.TempDir(), "nar-cache")
	_, url := c.ServeHTTP(t, "--sign-key", key, "--http-cache", narCache)
	want := f.PathInfos(t)

	top, fod := f.Path(t, "diamond-top"), f.Path(t, "uses-fod")
	dst := nixtest.NewStore(t)
	dst.Nix(t, append([]string{"copy", "--from", url, top, fod}, requireSigs(pub)...)...)
	closure := f.Closure(t, top, fod)
	got := dst.PathInfos(t)
	for _, p := range closure {
		if _, ok := got[p]; !ok {
			t.Errorf("nix copy --from %s: %s not copied", url, p)
		}
	}
	sameInfos(t, got, map[string]nixtest.PathInfo{top: want[top], fod: want[fod]})
	dst.Nix(t, append([]string{"store", "verify", "--all", "--sigs-needed", "1"}, requireSigs(pub)...)...)

	// The path with a large file, through every Nix version: libzstd's
	// streaming decoder (through libarchive in 2.8) continues across the
	// stored frames. A second server on the same data dir, without
	// a NAR cache (--http-cache-size 0), renders the NAR for each of them (the cache would send
	// the later ones the same bytes from its file).
	_, coldURL := c.ServeHTTP(t, "--sign-key", key, "--http-cache-size", "0")
	for _, suite := range nixtest.ClientSuites {
		t.Run("large file/"+suite, func(t *testing.T) {
			cl := nixtest.RequireNixClient(t, suite)
			dest := "local?root=" + filepath.Join(cl.TempDir(t), "dst")
			cl.Run(t, append([]string{"nix", "copy", "--from", coldURL, "--to", dest, big}, requireSigs(pub)...)...)
			cl.Run(t, append([]string{"nix", "store", "verify", "--store", dest, "--sigs-needed", "1", big}, requireSigs(pub)...)...)
			t.Logf("Nix %s copied and verified %s", cl.Version(t), big)
		})
	}
	sameInfos(t, c.ValidPaths(t, []string{big}), map[string]nixtest.PathInfo{big: want[big]})
	m := regexp.MustCompile(`(?m)^casnix_http_verbatim_frames_total (\d+)$`).FindStringSubmatch(string(nixtest.HTTPGet(t, coldURL+"/metrics")))
	if n := 0; m == nil {
		t.Error("/metrics lacks casnix_http_verbatim_frames_total")
	} else if fmt.Sscan(m[1], &n); n < 5*len(nixtest.ClientSuites) {
		t.Errorf("%d stored frames sent verbatim, want at least the 5 of the 20 MiB file per client", n)
	}

	// The NARs are cached now: a second copy is served from the cache files.
	if ents, _ := os.ReadDir(narCache); len(ents) < len(closure) {
		t.Errorf("--http-cache holds %d files after %d NARs were served", len(ents), len(closure))
	}
	again := nixtest.NewStore(t)
	again.Nix(t, append([]string{"copy", "--from", url, top, fod}, requireSigs(pub)...)...)
	again.Nix(t, append([]string{"store", "verify", "--all", "--sigs-needed", "1"}, requireSigs(pub)...)...)
	sameInfos(t, again.PathInfos(t), map[string]nixtest.PathInfo{top: want[top], fod: want[fod]})

	// nix-store -r through the substituter.
	dst2 := nixtest.NewStore(t)
	tree := f.Path(t, "tree")
	dst2.NixStore(t, append([]string{"-r", tree, "--option", "substituters", url}, requireSigs(pub)...)...)
	if _, ok := dst2.PathInfos(t)[tree]; !ok {
		t.Errorf("nix-store -r %s: not valid afterwards", tree)
	}
	dst2.Nix(t, append([]string{"store", "verify", "--all", "--sigs-needed", "1"}, requireSigs(pub)...)...)

	// A wrong key: Nix refuses what casnix signed.
	_, otherPub := cacheKey(t, f.Store, "casnix-other")
	dst3 := nixtest.NewStore(t)
	if r := dst3.Cmd("nix", append([]string{"copy", "--from", url, tree}, requireSigs(otherPub)...)...).Try(); r.OK() {
		t.Errorf("nix copy with an untrusted key succeeded:\n%s", r)
	}

	// A server capping each client address at 2 connections: Nix 2.8, copying every path
	// with up to 16 connections, gets 503s for the connections over the cap, retries them
	// and copies everything.
	_, capped := c.ServeHTTP(t, "--sign-key", key, "--http-max-connections-per-client", "2")
	var all []string // every path but the .drv files (nix copy takes one for its outputs)
	for _, p := range f.AllPaths(t) {
		if !strings.HasSuffix(p, ".drv") {
			all = append(all, p)
		}
	}
	dst4 := nixtest.NewStore(t)
	r := dst4.Cmd("nix", append([]string{"copy", "--from", capped, "--option", "http-connections", "16"}, append(requireSigs(pub), all...)...)...).Try()
	if !r.OK() {
		t.Fatalf("nix copy from a server with a per-client cap:\n%s", r)
	}
	if !strings.Contains(string(r.Stderr), "HTTP error 503") {
		t.Errorf("nix copy of %d paths with 16 connections met no 503 from a cap of 2:\n%s", len(all), r.Stderr)
	}
	dst4.Nix(t, append([]string{"store", "verify", "--all", "--sigs-needed", "1"}, requireSigs(pub)...)...)
	if r := dst4.Cmd("nix", append([]string{"path-info"}, all...)...).Try(); !r.OK() {
		t.Errorf("nix copy from the capped server left paths out:\n%s", r)
	}
	m = regexp.MustCompile(`(?m)^casnix_http_refused_connections_total (\d+)$`).FindStringSubmatch(string(nixtest.HTTPGet(t, capped+"/metrics")))
	if n := 0; m == nil {
		t.Error("/metrics lacks casnix_http_refused_connections_total")
	} else if fmt.Sscan(m[1], &n); n == 0 {
		t.Error("casnix_http_refused_connections_total is 0 after Nix met 503s")
	}

	// casnix imports from casnix.
	c2 := nixtest.NewCasnix(t)
	c2.Run(t, "import", "--from", url, "--trusted-public-keys", pub, top)
	sameInfos(t, c2.ValidPaths(t, f.AllPaths(t)), map[string]nixtest.PathInfo{top: want[top]})

	// HEAD, 404, Range on the raw NAR, metrics.
	resp, err := http.Head(url + "/nix-cache-info")
	if err != nil || resp.StatusCode != 200 {
		t.Errorf("HEAD /nix-cache-info: %v %v", resp, err)
	}
	if resp, err := http.Get(url + "/00000000000000000000000000000000.narinfo"); err != nil || resp.StatusCode != 404 {
		t.Errorf("unknown narinfo: %v %v", resp, err)
	}
	// The uncompressed NAR, whole and by Range, is what `casnix dump` writes.
	ni := string(nixtest.HTTPGet(t, url+"/"+strings.TrimPrefix(tree, nixtest.StoreDir+"/")[:32]+".narinfo"))
	narURL := ""
	for _, l := range strings.Split(ni, "\n") {
		if u, ok := strings.CutPrefix(l, "URL: "); ok {
			narURL = url + "/" + strings.TrimSuffix(u, ".zst")
		}
	}
	nar := c.Run(t, "dump", tree).Stdout
	if got := nixtest.HTTPGet(t, narURL); string(got) != string(nar) {
		t.Errorf("GET %s: %d bytes differ from casnix dump's %d", narURL, len(got), len(nar))
	}
	req, _ := http.NewRequest(http.MethodGet, narURL, nil)
	req.Header.Set("Range", "bytes=100-199")
	if resp, err := http.DefaultClient.Do(req); err != nil || resp.StatusCode != http.StatusPartialContent {
		t.Errorf("Range request: %v %v", resp, err)
	} else {
		got, _ := io.ReadAll(resp.Body)
		resp.Body.Close()
		if string(got) != string(nar[100:200]) {
			t.Errorf("Range bytes=100-199: got %q, want %q", got, nar[100:200])
		}
	}
	metrics := string(nixtest.HTTPGet(t, url+"/metrics"))
	for _, want := range []string{`casnix_http_requests_total{route="narinfo",status="200"}`, `route="nar",status="200"`,
		"casnix_http_sent_bytes_total", "casnix_store_paths"} {
		if !strings.Contains(metrics, want) {
			t.Errorf("/metrics lacks %s:\n%s", want, metrics)
		}
	}
}

// textLike returns n bytes of seeded random-ish but compressible data (mostly
// 8 to 16 letters, some newlines): zstd halves it, so its frames hold real
// compressed blocks.
func textLike(n int) []byte {
	r := rand.New(rand.NewPCG(1, 2))
	b := make([]byte, n)
	for i := range b {
		if v := r.IntN(64); v < 16 {
			b[i] = byte('a' + v)
		} else if v == 63 {
			b[i] = '\n'
		} else {
			b[i] = byte('a' + v%8)
		}
	}
	return b
}
