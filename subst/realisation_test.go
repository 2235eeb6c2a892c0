package subst

import (
	"context"
	"errors"
	"os"
	"path/filepath"
	"strings"
	"testing"
	"time"

	"github.com/casnix/casnix/binarycache"
	"github.com/casnix/casnix/store"
)

const realID = "sha256:0cf161a1b00aad0ed35781786c0a306b592284cc88e183a568d82f9c48499e3f!out"

// writeDOI writes realisations/<id>.doi into a new cache directory (with a
// nix-cache-info) and returns the directory.
func writeDOI(t *testing.T, id, body string) string {
	t.Helper()
	dir := t.TempDir()
	if err := os.WriteFile(filepath.Join(dir, "nix-cache-info"), []byte("StoreDir: /nix/store\n"), 0o644); err != nil {
		t.Fatal(err)
	}
	if body == "" {
		return dir
	}
	if err := os.MkdirAll(filepath.Join(dir, "realisations"), 0o755); err != nil {
		t.Fatal(err)
	}
	if err := os.WriteFile(filepath.Join(dir, "realisations", id+".doi"), []byte(body), 0o644); err != nil {
		t.Fatal(err)
	}
	return dir
}

// TestQueryRealisation: an upstream's realisation is taken when signed by
// a trusted key, when signatures are not required, or from a ?trusted=1
// upstream; refused (an UntrustedError naming it) when unsigned or signed
// by another key; an upstream without it is a miss (nil, no error), and a
// file that lies about its id or is not a realisation is an error. Nix
// 2.34's form (no id) and the older one (with the id) both read.
func TestQueryRealisation(t *testing.T) {
	key, pub := keyPair(t, "up-1")
	other, _ := keyPair(t, "other-1")
	r := &store.Realisation{ID: realID, OutPath: "nanhw6h76gragmswg2hzd74ag83w3cjc-ca-top"}
	signed, byOther := *r, *r
	if err := key.SignRealisation(&signed); err != nil {
		t.Fatal(err)
	}
	if err := other.SignRealisation(&byOther); err != nil {
		t.Fatal(err)
	}
	// Nix 2.34 writes outPath, signatures and an empty dependentRealisations.
	unkeyed := func(sigs []string) string {
		return `{"dependentRealisations":{},"outPath":"nanhw6h76gragmswg2hzd74ag83w3cjc-ca-top","signatures":["` + strings.Join(sigs, `","`) + `"]}`
	}
	for _, tc := range []struct {
		name      string
		body      string // "" = no file
		query     string
		trusted   bool // ?trusted=1
		checkSigs bool
		want      bool   // a realisation comes back
		err       string // the error says this ("" = none)
		untrusted bool   // the error is an UntrustedError
	}{
		{name: "signed, Nix 2.34 form", body: unkeyed(signed.Signatures), checkSigs: true, want: true},
		{name: "signed, with its id", body: signed.JSON(), checkSigs: true, want: true},
		{name: "unsigned", body: r.JSON(), checkSigs: true, err: "realisation " + realID, untrusted: true},
		{name: "another key", body: byOther.JSON(), checkSigs: true, err: "no valid signature by a trusted key", untrusted: true},
		{name: "unsigned, signatures not required", body: r.JSON(), want: true},
		{name: "unsigned, trusted upstream", body: r.JSON(), trusted: true, checkSigs: true, want: true},
		{name: "absent", checkSigs: true},
		{name: "another id in the file", body: strings.Replace(signed.JSON(), "!out", "!dev", 1), checkSigs: true, err: "the file describes"},
		{name: "no outPath", body: `{"signatures":[]}`, checkSigs: true, err: "no outPath"},
		{name: "hostile outPath", body: `{"outPath":"../../etc/passwd"}`, err: "out path"},
		{name: "not JSON", body: "Hello", err: "realisation"},
		{name: "id with a slash", query: "sha256:../../x!out", err: "is not"},
	} {
		t.Run(tc.name, func(t *testing.T) {
			dir := writeDOI(t, realID, tc.body)
			url := "file://" + dir
			if tc.trusted {
				url += "?trusted=1"
			}
			s := newSubst(t, openStore(t), []string{url}, Options{Keys: pub})
			id := realID
			if tc.query != "" {
				id = tc.query
			}
			got, err := s.QueryRealisation(context.Background(), id, tc.checkSigs)
			if tc.err != "" {
				if err == nil || !strings.Contains(err.Error(), tc.err) {
					t.Fatalf("got %v, %v; want an error with %q", got, err, tc.err)
				}
				var ue *binarycache.UntrustedError
				if errors.As(err, &ue) != tc.untrusted {
					t.Errorf("error %v: untrusted %v, want %v", err, !tc.untrusted, tc.untrusted)
				}
				return
			}
			if err != nil {
				t.Fatal(err)
			}
			if (got != nil) != tc.want {
				t.Fatalf("got %v, want one: %v", got, tc.want)
			}
			if got != nil && (got.ID != realID || got.OutPath != r.OutPath) {
				t.Errorf("got %+v", got)
			}
		})
	}
}

// TestQueryRealisationFailover: the first upstream by priority that has a
// usable realisation answers; one with only an unsigned copy is passed
// over for the next, and a miss is cached (asked once).
func TestQueryRealisationFailover(t *testing.T) {
	key, pub := keyPair(t, "up-1")
	r := &store.Realisation{ID: realID, OutPath: "nanhw6h76gragmswg2hzd74ag83w3cjc-ca-top"}
	signed := *r
	if err := key.SignRealisation(&signed); err != nil {
		t.Fatal(err)
	}
	bad := serve(t, writeDOI(t, realID, r.JSON()))
	empty := serve(t, writeDOI(t, realID, ""))
	good := serve(t, writeDOI(t, realID, signed.JSON()))
	s := newSubst(t, openStore(t), []string{bad.URL + "?priority=1", empty.URL + "?priority=2", good.URL + "?priority=3"}, Options{Keys: pub})
	for range 2 {
		got, err := s.QueryRealisation(context.Background(), realID, true)
		if err != nil || got == nil || got.OutPath != r.OutPath {
			t.Fatalf("got %v, %v", got, err)
		}
	}
	doi := "/realisations/" + realID + ".doi"
	for _, srv := range []*server{bad, empty, good} {
		if n := srv.n(doi); n != 1 {
			t.Errorf("%s asked %d times for the realisation, want once", srv.URL, n)
		}
	}
}

// FuzzParseDOI: any bytes give a valid realisation of the id asked for,
// or an error; never a panic.
func FuzzParseDOI(f *testing.F) {
	f.Add([]byte(`{"dependentRealisations":{},"outPath":"nanhw6h76gragmswg2hzd74ag83w3cjc-ca-top","signatures":[]}`))
	f.Add([]byte(`{"id":"` + realID + `","outPath":"/nix/store/nanhw6h76gragmswg2hzd74ag83w3cjc-ca-top","dependentRealisations":{"x!y":"zz"}}`))
	f.Add([]byte(`{"outPath":"../x"}`))
	f.Add([]byte(`[]`))
	f.Fuzz(func(t *testing.T, b []byte) {
		r, err := parseDOI(b, realID, "/nix/store")
		if err != nil {
			return
		}
		if r.ID != realID || r.Validate() != nil {
			t.Fatalf("parseDOI(%q) = %+v", b, r)
		}
	})
}

// TestPullThroughRealisation: the HTTP pull-through answers
// realisations/<id>.doi it does not hold with the upstream's realisation,
// signed by casnix's key beside the upstream's, once the signature rule
// accepts it; an unsigned one, or none upstream, is a 404 (the client then
// builds or asks its next cache), asked upstream once.
func TestPullThroughRealisation(t *testing.T) {
	key, pub := keyPair(t, "up-1")
	r := &store.Realisation{ID: realID, OutPath: "nanhw6h76gragmswg2hzd74ag83w3cjc-ca-top"}
	signed := *r
	if err := key.SignRealisation(&signed); err != nil {
		t.Fatal(err)
	}
	for _, tc := range []struct {
		name   string
		body   string
		status int
	}{
		{"signed", signed.JSON(), 200},
		{"unsigned", r.JSON(), 404},
		{"absent", "", 404},
	} {
		t.Run(tc.name, func(t *testing.T) {
			up := serve(t, writeDOI(t, realID, tc.body))
			dst := openStore(t)
			hs, _, casnixPub := pullServer(t, newSubst(t, dst, []string{up.URL}, Options{Keys: pub}), dst)
			for range 2 {
				status, body := httpGet(t, hs.URL+"/realisations/"+realID+".doi")
				if status != tc.status {
					t.Fatalf("status %d, want %d: %s", status, tc.status, body)
				}
				if status != 200 {
					continue
				}
				got, err := store.ParseRealisation(body)
				if err != nil {
					t.Fatal(err)
				}
				if got.OutPath != r.OutPath || pub.VerifyFingerprint(got.Fingerprint(), got.Signatures) != 1 ||
					casnixPub.VerifyFingerprint(got.Fingerprint(), got.Signatures) != 1 {
					t.Errorf("served %s", body)
				}
			}
			if n := up.n("/realisations/" + realID + ".doi"); n != 1 {
				t.Errorf("asked upstream %d times, want once", n)
			}
		})
	}
}

// TestPullThroughRegistersRealisation: a realisation the pull-through
// answered from upstream is registered in the store once a client's fetch
// of its output path (here C, whose closure the upstream has) made it
// valid, so the store answers for it from then on; one whose path is
// never fetched is not.
func TestPullThroughRegistersRealisation(t *testing.T) {
	f := newFixture(t)
	dir := f.cache(t, f.key)
	signed := store.Realisation{ID: realID, OutPath: pathC}
	if err := f.key.SignRealisation(&signed); err != nil {
		t.Fatal(err)
	}
	other := store.Realisation{ID: strings.Replace(realID, "!out", "!dev", 1), OutPath: pathX}
	if err := f.key.SignRealisation(&other); err != nil {
		t.Fatal(err)
	}
	os.MkdirAll(filepath.Join(dir, "realisations"), 0o755)
	for _, r := range []store.Realisation{signed, other} {
		if err := os.WriteFile(filepath.Join(dir, "realisations", r.ID+".doi"), []byte(r.JSON()), 0o644); err != nil {
			t.Fatal(err)
		}
	}
	up := serve(t, dir)
	dst := openStore(t)
	hs, _, _ := pullServer(t, newSubst(t, dst, []string{up.URL}, Options{Keys: f.pub}), dst)
	for _, id := range []string{signed.ID, other.ID} {
		if status, body := httpGet(t, hs.URL+"/realisations/"+id+".doi"); status != 200 {
			t.Fatalf("%s: %d %s", id, status, body)
		}
	}
	if r, err := dst.Realisation(context.Background(), realID); err != nil || r != nil {
		t.Fatalf("registered before its path was fetched: %v, %v", r, err)
	}
	if status, body := httpGet(t, hs.URL+"/"+store.HashPart(pathC)+".narinfo"); status != 200 {
		t.Fatalf("narinfo of C: %d %s", status, body)
	}
	deadline := time.Now().Add(30 * time.Second)
	for {
		r, err := dst.Realisation(context.Background(), realID)
		if err != nil {
			t.Fatal(err)
		}
		if r != nil {
			if r.OutPath != pathC || f.pub.VerifyFingerprint(r.Fingerprint(), r.Signatures) != 1 {
				t.Errorf("registered %+v", r)
			}
			break
		}
		if time.Now().After(deadline) {
			t.Fatal("the realisation was not registered after C was pulled")
		}
		time.Sleep(20 * time.Millisecond)
	}
	if r, err := dst.Realisation(context.Background(), other.ID); err != nil || r != nil {
		t.Errorf("a realisation whose path was never fetched was registered: %v, %v", r, err)
	}
}
