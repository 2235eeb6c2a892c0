package binarycache

import (
	"context"
	"io"
	"net/http"
	"net/http/httptest"
	"os"
	"path/filepath"
	"strings"
	"testing"

	"github.com/casnix/casnix/store"
)

// TestServeRealisation: realisations/<id>.doi answers with the store's
// realisation of id (Nix's JSON, id included), signed by the server's key
// when it has one, the stored signatures kept; an unknown id, a malformed
// one or one with a slash is a 404, and HEAD answers without a body.
func TestServeRealisation(t *testing.T) {
	ctx := context.Background()
	st := openStore(t)
	addTree(t, st, pathA)
	upKey, upPub := keyPair(t)
	id := "sha256:0cf161a1b00aad0ed35781786c0a306b592284cc88e183a568d82f9c48499e3f!out"
	r := &store.Realisation{ID: id, OutPath: pathA}
	if err := upKey.SignRealisation(r); err != nil {
		t.Fatal(err)
	}
	if err := st.RegisterRealisation(ctx, r); err != nil {
		t.Fatal(err)
	}
	for _, signing := range []bool{false, true} {
		srv := &Server{Store: st, StoreDir: "/nix/store"}
		var pub store.PublicKeys
		if signing {
			var key *store.SecretKey
			key, pub = keyPair(t)
			srv.Key = key
		}
		hs := httptest.NewServer(srv)
		for _, tc := range []struct {
			method, path string
			status       int
		}{
			{"GET", "/realisations/" + id + ".doi", 200},
			{"HEAD", "/realisations/" + id + ".doi", 200},
			{"GET", "/realisations/sha256:00!out.doi", 404},
			{"GET", "/realisations/nohash.doi", 404},
			{"GET", "/realisations/sha256:x!.doi", 404},
			{"GET", "/realisations/../" + id + ".doi", 404},
			{"GET", "/realisations/a/sha256:x!out.doi", 404},
		} {
			req, _ := http.NewRequest(tc.method, hs.URL+tc.path, nil)
			resp, err := http.DefaultClient.Do(req)
			if err != nil {
				t.Fatal(err)
			}
			b, _ := io.ReadAll(resp.Body)
			resp.Body.Close()
			if resp.StatusCode != tc.status {
				t.Fatalf("signing %v: %s %s: %s, want %d", signing, tc.method, tc.path, resp.Status, tc.status)
			}
			if tc.status != 200 || tc.method == "HEAD" {
				if tc.method == "HEAD" && len(b) != 0 {
					t.Errorf("HEAD sent a body")
				}
				continue
			}
			got, err := store.ParseRealisation(string(b))
			if err != nil {
				t.Fatalf("%s: %v", b, err)
			}
			if got.ID != id || got.OutPath != pathA {
				t.Errorf("served %s", b)
			}
			if upPub.VerifyFingerprint(got.Fingerprint(), got.Signatures) != 1 {
				t.Errorf("the stored signature is gone: %s", b)
			}
			if n := len(got.Signatures); signing != (n == 2) {
				t.Errorf("signing %v: %d signatures: %s", signing, n, b)
			}
			if signing && pub.VerifyFingerprint(got.Fingerprint(), got.Signatures) != 1 {
				t.Errorf("not signed by the server's key: %s", b)
			}
		}
		hs.Close()
	}
}

// TestExportRealisations: an export writes realisations/<id>.doi for the
// realisations whose output paths are in the exported closure (and only
// those), with their signatures and the exporter's; a second export of the
// same closure writes none, and one registered since is written even though
// its path was exported before.
func TestExportRealisations(t *testing.T) {
	ctx := context.Background()
	st := openStore(t)
	addTree(t, st, pathA)
	addTree(t, st, pathB, pathA)
	addTree(t, st, pathC)
	upKey, upPub := keyPair(t)
	reg := func(id, path string) *store.Realisation {
		t.Helper()
		r := &store.Realisation{ID: id, OutPath: path}
		if err := upKey.SignRealisation(r); err != nil {
			t.Fatal(err)
		}
		if err := st.RegisterRealisation(ctx, r); err != nil {
			t.Fatal(err)
		}
		return r
	}
	idA := "sha256:" + strings.Repeat("a", 64) + "!out"
	idB := "sha256:" + strings.Repeat("b", 64) + "!dev"
	idC := "sha256:" + strings.Repeat("c", 64) + "!out"
	idA2 := "sha256:" + strings.Repeat("d", 64) + "!out"
	reg(idA, pathA)
	reg(idB, pathB)
	reg(idC, pathC) // not in B's closure
	key, pub := keyPair(t)
	dir := t.TempDir()
	ex := &Exporter{Store: st, Dir: dir, StoreDir: "/nix/store", Compression: "zstd", Key: key, Jobs: 2}
	res, err := ex.Export(ctx, []string{pathB})
	if err != nil || res.Realisations != 2 {
		t.Fatalf("export: %+v, %v", res, err)
	}
	read := func(id string) *store.Realisation {
		t.Helper()
		b, err := os.ReadFile(filepath.Join(dir, "realisations", id+".doi"))
		if err != nil {
			return nil
		}
		r, err := store.ParseRealisation(string(b))
		if err != nil {
			t.Fatalf("%s: %v", b, err)
		}
		return r
	}
	for id, path := range map[string]string{idA: pathA, idB: pathB} {
		r := read(id)
		if r == nil || r.ID != id || r.OutPath != path {
			t.Fatalf("%s: %+v", id, r)
		}
		if upPub.VerifyFingerprint(r.Fingerprint(), r.Signatures) != 1 || pub.VerifyFingerprint(r.Fingerprint(), r.Signatures) != 1 || len(r.Signatures) != 2 {
			t.Errorf("%s: signatures %v", id, r.Signatures)
		}
	}
	if read(idC) != nil {
		t.Errorf("the realisation of %s, outside the closure, was exported", pathC)
	}
	if res, err := ex.Export(ctx, []string{pathB}); err != nil || res.Realisations != 0 {
		t.Fatalf("second export: %+v, %v", res, err)
	}
	reg(idA2, pathA)
	if res, err := ex.Export(ctx, []string{pathB}); err != nil || res.Realisations != 1 || read(idA2) == nil {
		t.Fatalf("export after a new realisation: %+v, %v", res, err)
	}
}
