package proto

import (
	"bytes"
	"context"
	"encoding/hex"
	"io"
	"net/http"
	"net/http/httptest"
	"os"
	"path/filepath"
	"slices"
	"strings"
	"testing"

	"github.com/casnix/casnix/binarycache"
	"github.com/casnix/casnix/store"
	"github.com/casnix/casnix/subst"
)

// withLazy makes the fixture's server a lazy store over an HTTP upstream
// serving dir (on loopback).
func withLazy(t *testing.T, dir string, keys store.PublicKeys) func(*Server) {
	hs := httptest.NewServer(http.FileServer(http.Dir(dir)))
	t.Cleanup(hs.Close)
	return func(s *Server) {
		sub, err := subst.New(s.Store, []string{hs.URL}, subst.Options{StoreDir: "/nix/store", Keys: keys})
		if err != nil {
			t.Fatal(err)
		}
		t.Cleanup(sub.Close)
		s.Subst, s.RequireSigs, s.PublicKeys = sub, true, keys
		s.Lazy = sub.Lazy(true, 0)
		t.Cleanup(s.Lazy.Close)
	}
}

func readNarinfo(t *testing.T, dir, name string) *binarycache.Info {
	t.Helper()
	fh, err := os.Open(filepath.Join(dir, name[:32]+".narinfo"))
	if err != nil {
		t.Fatal(err)
	}
	defer fh.Close()
	in, err := binarycache.ParseNarinfo(fh, "/nix/store")
	if err != nil {
		t.Fatal(err)
	}
	return in
}

// TestLazyStore: a lazy store answers IsValidPath, QueryValidPaths,
// QueryPathInfo and QueryPathFromHashPart for a path only a signed
// upstream has exactly as its narinfo says, without fetching; NarFromPath
// fetches it. Paths of an unsigned upstream are not valid.
func TestLazyStore(t *testing.T) {
	dir, pub := upstreamCache(t, true)
	f := newFixture(t, withLazy(t, dir, pub))
	want := readNarinfo(t, dir, upB)
	for _, minor := range []uint64{21, 38} {
		cl := f.connect(t, minor)
		cl.w.u64(opIsValidPath)
		cl.w.str(full(upB))
		cl.expectLast()
		if cl.u64() != 1 {
			t.Fatalf("1.%d: upstream path not valid", minor)
		}
		cl.w.u64(opQueryValidPaths)
		cl.w.strings([]string{full(upC), full(upX), full(testA)})
		if minor >= 27 {
			cl.w.u64(0)
		}
		cl.expectLast()
		if v := cl.strs(); strings.Join(v, " ") != full(testA)+" "+full(upC) {
			t.Fatalf("1.%d: valid %v", minor, v)
		}
		cl.w.u64(opQueryPathInfo)
		cl.w.str(full(upB))
		cl.expectLast()
		if cl.u64() != 1 {
			t.Fatalf("1.%d: no path-info", minor)
		}
		if d := cl.str(); d != "" {
			t.Fatalf("deriver %q", d)
		}
		if h := cl.str(); h != hex.EncodeToString(want.NarHash[:]) {
			t.Fatalf("narHash %s", h)
		}
		if refs := cl.strs(); !slices.Equal(refs, []string{full(upA)}) {
			t.Fatalf("refs %v", refs)
		}
		if reg := cl.u64(); reg != 0 {
			t.Fatalf("registration time %d", reg)
		}
		if n := cl.u64(); int64(n) != want.NarSize {
			t.Fatalf("narSize %d, want %d", n, want.NarSize)
		}
		if cl.u64() != 0 {
			t.Fatal("ultimate")
		}
		if sigs := cl.strs(); len(sigs) != 1 || !slices.Equal(sigs, want.Sigs) {
			t.Fatalf("sigs %v, want %v", sigs, want.Sigs)
		}
		if ca := cl.str(); ca != want.CA {
			t.Fatalf("ca %q", ca)
		}
		cl.w.u64(opQueryPathInfo)
		cl.w.str(full(upX))
		cl.expectLast()
		if cl.u64() != 0 {
			t.Fatal("a path nobody has is valid")
		}
		cl.w.u64(opQueryPathFromHashPart)
		cl.w.str(upC[:32])
		cl.expectLast()
		if p := cl.str(); p != full(upC) {
			t.Fatalf("from hash part %q", p)
		}
	}
	if f.valid(t, upA) || f.valid(t, upB) || f.valid(t, upC) {
		t.Fatal("a query fetched")
	}

	// NarFromPath of a path the client was told is valid fetches it.
	cl := f.connect(t, 38)
	cl.w.u64(opNarFromPath)
	cl.w.str(full(upC))
	cl.expectLast()
	want = readNarinfo(t, dir, upC)
	got := make([]byte, want.NarSize)
	if _, err := io.ReadFull(cl.r.r, got); err != nil {
		t.Fatal(err)
	}
	var local bytes.Buffer
	if _, err := f.st.NarRender(context.Background(), upC, &local); err != nil {
		t.Fatal(err)
	}
	if !bytes.Equal(got, local.Bytes()) || !f.valid(t, upA, upB, upC) {
		t.Fatal("NarFromPath did not fetch the closure")
	}
	if pi, err := f.st.Info(context.Background(), upC); err != nil || pi.NarHash != want.NarHash {
		t.Fatalf("fetched %v %v", pi, err)
	}

	// Unsigned: not valid, no path-info.
	udir, _ := upstreamCache(t, false)
	u := newFixture(t, withLazy(t, udir, pub))
	cl = u.connect(t, 38)
	cl.w.u64(opIsValidPath)
	cl.w.str(full(upB))
	cl.expectLast()
	if cl.u64() != 0 {
		t.Fatal("unsigned upstream path valid")
	}
	cl.w.u64(opQueryPathInfo)
	cl.w.str(full(upB))
	cl.expectLast()
	if cl.u64() != 0 {
		t.Fatal("unsigned upstream path has path-info")
	}
}

// TestLazyAddFetchesReferences: a path added over a lazy store may refer
// to paths only the upstream has (the client was told they are valid and
// does not send them): they are fetched before the add.
func TestLazyAddFetchesReferences(t *testing.T) {
	dir, pub := upstreamCache(t, true)
	f := newFixture(t, withLazy(t, dir, pub), func(s *Server) { s.Trusted = func(uint32, uint32) bool { return true } })
	cl := f.connect(t, 38)
	data := treeNAR(t, "refers to up-b")
	if err := cl.addToStoreNar(narInfo{name: testC, refs: []string{upB}, dontCheckSigs: true}, data); err != nil {
		t.Fatal(err)
	}
	if !f.valid(t, testC, upB, upA) {
		t.Fatal("the reference's closure was not fetched")
	}
	// A reference nobody has still fails the add.
	err := cl.addToStoreNar(narInfo{name: "dddddddddddddddddddddddddddddddd-d", refs: []string{upX}, dontCheckSigs: true}, data)
	if err == nil || !strings.Contains(err.Error(), upX) {
		t.Fatalf("add referring to a path nobody has: %v", err)
	}
}
