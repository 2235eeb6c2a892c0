package binarycache

import (
	"bytes"
	"context"
	"crypto/ed25519"
	"crypto/rand"
	"encoding/base64"
	"fmt"
	"io"
	"net/http"
	"net/http/httptest"
	"os"
	"path/filepath"
	"regexp"
	"strings"
	"testing"
	"time"

	"github.com/ulikunitz/xz"

	"github.com/casnix/casnix/nar"
	"github.com/casnix/casnix/store"
)

const (
	pathA = "00000000000000000000000000000000-a"
	pathB = "11111111111111111111111111111111-b"
	pathC = "22222222222222222222222222222222-c"
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

// addTree imports a small tree with random content as name.
func addTree(t *testing.T, st *store.Store, name string, refs ...string) {
	t.Helper()
	root := filepath.Join(t.TempDir(), "t")
	os.MkdirAll(filepath.Join(root, "sub"), 0o755)
	big := make([]byte, 300<<10)
	rand.Read(big)
	os.WriteFile(filepath.Join(root, "big"), big, 0o644)
	os.WriteFile(filepath.Join(root, "sub", "x"), []byte("#!/bin/sh\n"+strings.Join(refs, "\n")), 0o755)
	os.Symlink("sub/x", filepath.Join(root, "link"))
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

func keyPair(t *testing.T) (*store.SecretKey, store.PublicKeys) {
	t.Helper()
	// Nix's secret key format: name:base64(ed25519 private key).
	_, priv, err := ed25519.GenerateKey(rand.Reader)
	if err != nil {
		t.Fatal(err)
	}
	f := filepath.Join(t.TempDir(), "key")
	os.WriteFile(f, []byte("test-1:"+base64.StdEncoding.EncodeToString(priv)+"\n"), 0o600)
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

// TestExportImport: export with each compression, import into a new store
// with signatures required: same NARs, same references.
func TestExportImport(t *testing.T) {
	ctx := context.Background()
	src := openStore(t)
	addTree(t, src, pathA)
	addTree(t, src, pathB, pathA)
	addTree(t, src, pathC, pathB, pathC)
	key, pub := keyPair(t)
	for _, comp := range []string{"zstd", "xz", "none"} {
		t.Run(comp, func(t *testing.T) {
			dir := t.TempDir()
			ex := &Exporter{Store: src, Dir: dir, StoreDir: "/nix/store", Compression: comp, Key: key, Jobs: 2}
			res, err := ex.Export(ctx, []string{pathC})
			if err != nil || res.Exported != 3 {
				t.Fatalf("export: %+v %v", res, err)
			}
			if res, err := ex.Export(ctx, []string{pathC}); err != nil || res.Exported != 0 || res.Present != 3 {
				t.Fatalf("second export: %+v %v", res, err)
			}
			srcURL, _ := OpenSource("file://" + dir)
			dst := openStore(t)
			im := &Importer{Store: dst, Src: srcURL, StoreDir: "/nix/store", Keys: pub, Jobs: 2}
			got, err := im.Import(ctx, nil, []string{store.HashPart(pathA), store.HashPart(pathC)})
			if err != nil || got.Imported != 3 {
				t.Fatalf("import: %+v %v", got, err)
			}
			for _, n := range []string{pathA, pathB, pathC} {
				if !bytes.Equal(narOf(t, src, n), narOf(t, dst, n)) {
					t.Errorf("%s: NAR differs after the round trip", n)
				}
				pi, err := dst.Info(ctx, n)
				if err != nil || pub.Verify("/nix/store", pi) != 1 {
					t.Errorf("%s: %v, signature not kept", n, err)
				}
			}
			if info, _ := dst.Info(ctx, pathC); len(info.References) != 2 {
				t.Errorf("references of c: %v", info.References)
			}
		})
	}
}

// TestServer: the HTTP routes, with and without the NAR cache.
func TestServer(t *testing.T) {
	st := openStore(t)
	addTree(t, st, pathA)
	addTree(t, st, pathB, pathA)
	key, pub := keyPair(t)
	srv := &Server{Store: st, StoreDir: "/nix/store", Key: key, Priority: 30, CacheDir: filepath.Join(t.TempDir(), "c"), CacheBytes: 1 << 30}
	hs := httptest.NewServer(srv)
	defer hs.Close()
	get := func(method, path string, wantStatus int) []byte {
		t.Helper()
		req, _ := http.NewRequest(method, hs.URL+path, nil)
		resp, err := http.DefaultClient.Do(req)
		if err != nil {
			t.Fatal(err)
		}
		defer resp.Body.Close()
		b, _ := io.ReadAll(resp.Body)
		if resp.StatusCode != wantStatus {
			t.Fatalf("%s %s: %s, want %d", method, path, resp.Status, wantStatus)
		}
		return b
	}
	if ci := string(get("GET", "/nix-cache-info", 200)); !strings.Contains(ci, "StoreDir: /nix/store") || !strings.Contains(ci, "Priority: 30") {
		t.Errorf("nix-cache-info: %q", ci)
	}
	get("HEAD", "/"+store.HashPart(pathB)+".narinfo", 200)
	get("GET", "/"+store.HashPart(pathC)+".narinfo", 404)
	get("GET", "/nar/x.nar.zst", 404)
	get("GET", "/elsewhere", 404)
	get("POST", "/nix-cache-info", 405)
	in, err := ParseNarinfo(bytes.NewReader(get("GET", "/"+store.HashPart(pathB)+".narinfo", 200)), "/nix/store")
	if err != nil {
		t.Fatal(err)
	}
	pi := in.PathInfo()
	if pub.Verify("/nix/store", &pi) != 1 || in.References[0] != pathA || in.FileHash != nil {
		t.Errorf("narinfo %+v", in)
	}
	want := narOf(t, st, pathB)
	for range 2 { // rendered, then from the cache
		z := get("GET", "/"+in.URL, 200)
		r, _, err := decompress(bytes.NewReader(z), "zstd")
		if err != nil {
			t.Fatal(err)
		}
		got, err := io.ReadAll(r)
		if err != nil || !bytes.Equal(got, want) {
			t.Fatalf("NAR via %s: %d bytes, %v", in.URL, len(got), err)
		}
	}
	if ents, _ := os.ReadDir(srv.CacheDir); len(ents) != 1 {
		t.Errorf("NAR cache holds %d files, want 1", len(ents))
	}
	raw := strings.TrimSuffix(in.URL, ".zst")
	if got := get("GET", "/"+raw, 200); !bytes.Equal(got, want) {
		t.Errorf("raw NAR differs")
	}
	req, _ := http.NewRequest("GET", hs.URL+"/"+raw, nil)
	req.Header.Set("Range", "bytes=-10")
	resp, err := http.DefaultClient.Do(req)
	if err != nil {
		t.Fatal(err)
	}
	tail, _ := io.ReadAll(resp.Body)
	resp.Body.Close()
	if resp.StatusCode != 206 || !bytes.Equal(tail, want[len(want)-10:]) {
		t.Errorf("Range: %s %q", resp.Status, tail)
	}
	m := string(get("GET", "/metrics", 200))
	for _, s := range []string{`casnix_http_requests_total{route="nar",status="200"} 3`, `route="narinfo",status="404"} 1`, "casnix_store_paths 2"} {
		if !strings.Contains(m, s) {
			t.Errorf("metrics lack %q:\n%s", s, m)
		}
	}
	for _, re := range []string{`(?m)^go_goroutines [1-9][0-9]*$`, `(?m)^process_open_fds [1-9][0-9]*$`, `(?m)^go_gc_heap_live_bytes [1-9][0-9]*$`} {
		if !regexp.MustCompile(re).MatchString(m) {
			t.Errorf("metrics lack %s:\n%s", re, m)
		}
	}
}

// TestMetricsScanHoldsNoRequest: while /metrics scans the store totals
// (held here by taking the scan's lock), other requests, which count
// themselves in the metrics, still complete. Under one lock, a scan slowed
// by SQLite readers busy elsewhere stalled every request behind it.
func TestMetricsScanHoldsNoRequest(t *testing.T) {
	st := openStore(t)
	addTree(t, st, pathA)
	srv := &Server{Store: st, StoreDir: "/nix/store"}
	hs := httptest.NewServer(srv)
	defer hs.Close()
	get := func(path string) error {
		resp, err := http.Get(hs.URL + path)
		if err != nil {
			return err
		}
		defer resp.Body.Close()
		io.Copy(io.Discard, resp.Body)
		if resp.StatusCode != 200 {
			return fmt.Errorf("%s: %s", path, resp.Status)
		}
		return nil
	}
	srv.metrics.statsMu.Lock()
	scrape := make(chan error, 1)
	go func() { scrape <- get("/metrics") }()
	time.Sleep(100 * time.Millisecond) // the scrape is waiting on the scan
	for i := range 3 {
		done := make(chan error, 1)
		go func() { done <- get("/" + store.HashPart(pathA) + ".narinfo") }()
		select {
		case err := <-done:
			if err != nil {
				t.Fatal(err)
			}
		case <-time.After(10 * time.Second):
			t.Fatalf("request %d waited for the metrics scan", i)
		}
	}
	select {
	case err := <-scrape:
		t.Fatalf("/metrics answered during its scan: %v", err)
	default:
	}
	srv.metrics.statsMu.Unlock()
	if err := <-scrape; err != nil {
		t.Fatal(err)
	}
}

// TestServeXzURL: the .nar.xz URL a narinfo gave while the path was pulled
// from an xz upstream still answers once the path is stored, whether or not
// a NAR cache holds the upstream's file: without it the NAR is compressed
// with xz again (and then kept), and it decodes to the stored NAR.
func TestServeXzURL(t *testing.T) {
	st := openStore(t)
	addTree(t, st, pathA)
	want := narOf(t, st, pathA)
	pi, err := st.Info(context.Background(), pathA)
	if err != nil {
		t.Fatal(err)
	}
	url := "/nar/" + store.HashPart(pathA) + "-" + store.NixBase32(pi.NarHash[:]) + ".nar.xz"
	for _, cacheDir := range []string{"", filepath.Join(t.TempDir(), "c")} {
		hs := httptest.NewServer(&Server{Store: st, StoreDir: "/nix/store", CacheDir: cacheDir, CacheBytes: 1 << 30})
		for i := range 2 {
			resp, err := http.Get(hs.URL + url)
			if err != nil {
				t.Fatal(err)
			}
			body, _ := io.ReadAll(resp.Body)
			resp.Body.Close()
			if resp.StatusCode != 200 || resp.Header.Get("Content-Type") != "application/x-xz" {
				t.Fatalf("cache %q, request %d: %s, %s", cacheDir, i, resp.Status, resp.Header.Get("Content-Type"))
			}
			r, err := xz.NewReader(bytes.NewReader(body))
			if err != nil {
				t.Fatal(err)
			}
			got, err := io.ReadAll(r)
			if err != nil || !bytes.Equal(got, want) {
				t.Fatalf("cache %q, request %d: decoded %d bytes, %v; want the %d-byte NAR", cacheDir, i, len(got), err, len(want))
			}
		}
		hs.Close()
		if cacheDir != "" {
			if _, err := os.Stat(filepath.Join(cacheDir, store.NixBase32(pi.NarHash[:])+".nar.xz")); err != nil {
				t.Errorf("the xz NAR was not kept: %v", err)
			}
		}
	}
}
