package proto

import (
	"context"
	"crypto/ed25519"
	"crypto/rand"
	"encoding/base64"
	"fmt"
	"os"
	"path/filepath"
	"slices"
	"strings"
	"testing"
	"time"

	"github.com/casnix/casnix/binarycache"
	"github.com/casnix/casnix/nar"
	"github.com/casnix/casnix/store"
	"github.com/casnix/casnix/subst"
)

const (
	upA = "44444444444444444444444444444444-up-a"
	upB = "55555555555555555555555555555555-up-b"
	upC = "66666666666666666666666666666666-up-c" // C → B → A
	upX = "77777777777777777777777777777777-nowhere"
)

// upstreamCache exports C → B → A from a store of its own into a cache
// directory, signed by a new key (unsigned when sign is false); it returns
// the directory and the key's public half.
func upstreamCache(t *testing.T, sign bool) (string, store.PublicKeys) {
	t.Helper()
	ctx := context.Background()
	src, err := store.Open(ctx, t.TempDir(), store.Options{})
	if err != nil {
		t.Fatal(err)
	}
	defer src.Close()
	b := src.NewBatch(ctx)
	for _, p := range []struct {
		name string
		refs []string
	}{{upA, nil}, {upB, []string{upA}}, {upC, []string{upB, upC}}} {
		if _, err := b.Add(strings.NewReader(string(treeNAR(t, p.name+strings.Join(p.refs, " ")))), store.PathInfo{Name: p.name, References: p.refs}); err != nil {
			t.Fatal(err)
		}
	}
	if _, err := b.Commit(); err != nil {
		t.Fatal(err)
	}
	_, priv, _ := ed25519.GenerateKey(rand.Reader)
	kf := filepath.Join(t.TempDir(), "key")
	os.WriteFile(kf, []byte("up-1:"+base64.StdEncoding.EncodeToString(priv)), 0o600)
	key, err := store.LoadSecretKeyFile(kf)
	if err != nil {
		t.Fatal(err)
	}
	pub, _ := store.ParsePublicKeys([]string{key.PublicKey()})
	ex := &binarycache.Exporter{Store: src, Dir: t.TempDir(), StoreDir: "/nix/store", Compression: "xz", Jobs: 2}
	if sign {
		ex.Key = key
	}
	if _, err := ex.Export(ctx, []string{upC}); err != nil {
		t.Fatal(err)
	}
	return ex.Dir, pub
}

// withSubst gives the fixture's server the upstream cache in dir.
func withSubst(t *testing.T, dir string, keys store.PublicKeys, trusted bool) func(*Server) {
	return withSubstituter(t, []string{"file://" + dir}, subst.Options{Keys: keys}, func() bool { return trusted })
}

// withSubstituter gives the fixture's server the substituter of urls and
// opts, requiring signatures by opts.Keys; trusted, unless nil, tells
// whether a client connecting now is trusted.
func withSubstituter(t *testing.T, urls []string, opts subst.Options, trusted func() bool) func(*Server) {
	return func(s *Server) {
		opts.StoreDir = "/nix/store"
		sub, err := subst.New(s.Store, urls, opts)
		if err != nil {
			t.Fatal(err)
		}
		t.Cleanup(sub.Close)
		s.Subst, s.RequireSigs, s.PublicKeys = sub, true, opts.Keys
		if trusted != nil {
			s.Trusted = func(uint32, uint32) bool { return trusted() }
		}
	}
}

// setOptions sends SetOptions with useSubstitutes and overrides.
func (cl *client) setOptions(useSubstitutes bool, overrides ...string) {
	cl.t.Helper()
	cl.w.u64(opSetOptions)
	for i := 0; i < 11; i++ {
		cl.w.u64(0)
	}
	if useSubstitutes {
		cl.w.u64(1)
	} else {
		cl.w.u64(0)
	}
	cl.w.u64(uint64(len(overrides) / 2))
	for _, s := range overrides {
		cl.w.str(s)
	}
	cl.expectLast()
}

// setOptionsWarned is setOptions (substituting) that fails unless the
// warnings the client got contain want ("": it got none).
func (cl *client) setOptionsWarned(want string, overrides ...string) {
	cl.t.Helper()
	cl.lines = nil
	cl.setOptions(true, overrides...)
	warned := strings.Join(cl.lines, "")
	if want == "" && warned != "" || !strings.Contains(warned, want) {
		cl.t.Fatalf("warnings %q, want %q", warned, want)
	}
}

// ensureUpC asks EnsurePath of upC and fails unless it substituted the
// closure (all of it valid after) when subst says so, or else was refused
// with an error containing refusal (none of it valid).
func (f *fixture) ensureUpC(t *testing.T, cl *client, subst bool, refusal string) {
	t.Helper()
	cl.w.u64(opEnsurePath)
	cl.w.str(full(upC))
	err := cl.result()
	if err == nil {
		cl.u64()
	}
	if (err == nil) != subst || f.valid(t, upA, upB, upC) != subst {
		t.Fatalf("EnsurePath: %v; closure valid: %v", err, f.valid(t, upA, upB, upC))
	}
	if !subst && !strings.Contains(err.Error(), refusal) {
		t.Fatalf("EnsurePath: %v, want an error containing %q", err, refusal)
	}
}

func (f *fixture) valid(t *testing.T, names ...string) bool {
	t.Helper()
	for _, n := range names {
		if ok, err := f.st.IsValid(context.Background(), n); err != nil || !ok {
			return false
		}
	}
	return true
}

// TestSubstitutionQueries: HasSubstitutes, QuerySubstitutablePaths,
// QuerySubstitutablePathInfo(s) and QueryMissing answer from the upstream
// without fetching anything, in each protocol version's format.
func TestSubstitutionQueries(t *testing.T) {
	dir, pub := upstreamCache(t, true)
	f := newFixture(t, withSubst(t, dir, pub, false))
	want := func(cl *client) {
		t.Helper()
		if d := cl.str(); d != "" {
			t.Fatalf("deriver %q", d)
		}
		if refs := cl.strs(); strings.Join(refs, " ") != full(upB)+" "+full(upC) {
			t.Fatalf("refs %v", refs)
		}
		if dl, ns := cl.u64(), cl.u64(); dl == 0 || ns == 0 {
			t.Fatalf("sizes %d %d", dl, ns)
		}
	}
	for _, minor := range []uint64{21, 22, 27, 38} {
		cl := f.connect(t, minor)
		cl.setOptions(true)

		for p, exp := range map[string]uint64{upC: 1, upX: 0} {
			cl.w.u64(opHasSubstitutes)
			cl.w.str(full(p))
			cl.expectLast()
			if got := cl.u64(); got != exp {
				t.Fatalf("1.%d HasSubstitutes(%s) = %d", minor, p, got)
			}
		}

		cl.w.u64(opQuerySubstitutablePaths)
		cl.w.strings([]string{full(upX), full(upC), full(upA)})
		cl.expectLast()
		if got := cl.strs(); strings.Join(got, " ") != full(upA)+" "+full(upC) {
			t.Fatalf("1.%d QuerySubstitutablePaths: %v", minor, got)
		}

		cl.w.u64(opQuerySubstitutablePathInfo)
		cl.w.str(full(upC))
		cl.expectLast()
		if cl.u64() != 1 {
			t.Fatalf("1.%d QuerySubstitutablePathInfo: not found", minor)
		}
		want(cl)

		cl.w.u64(opQuerySubstitutablePathInfos)
		if minor < 22 {
			cl.w.strings([]string{full(upC), full(upX)})
		} else {
			cl.w.u64(2)
			cl.w.str(full(upC))
			cl.w.str("")
			cl.w.str(full(upX))
			cl.w.str("")
		}
		cl.expectLast()
		if n := cl.u64(); n != 1 {
			t.Fatalf("1.%d QuerySubstitutablePathInfos: %d entries", minor, n)
		}
		if p := cl.str(); p != full(upC) {
			t.Fatalf("path %q", p)
		}
		want(cl)

		cl.w.u64(opQueryMissing)
		cl.w.strings([]string{full(upC), full(upX), full(testA)})
		cl.expectLast()
		if wb := cl.strs(); len(wb) != 0 {
			t.Fatalf("willBuild %v", wb)
		}
		if ws := cl.strs(); strings.Join(ws, " ") != full(upA)+" "+full(upB)+" "+full(upC) {
			t.Fatalf("1.%d willSubstitute %v", minor, ws)
		}
		if un := cl.strs(); strings.Join(un, " ") != full(upX) {
			t.Fatalf("unknown %v", un)
		}
		if dl, ns := cl.u64(), cl.u64(); dl == 0 || ns == 0 {
			t.Fatalf("sizes %d %d", dl, ns)
		}
	}
	if f.valid(t, upA) {
		t.Fatal("a query substituted")
	}
	// Without useSubstitutes, QueryMissing does not offer substitutes.
	cl := f.connect(t, 38)
	cl.w.u64(opQueryMissing)
	cl.w.strings([]string{full(upC)})
	cl.expectLast()
	cl.strs()
	if ws := cl.strs(); len(ws) != 0 {
		t.Fatalf("willSubstitute %v without useSubstitutes", ws)
	}
}

// TestSubstitutingOps: EnsurePath, BuildPaths, BuildPathsWithResults and
// QueryValidPaths(substitute) fetch what is missing; without
// useSubstitutes they do not.
func TestSubstitutingOps(t *testing.T) {
	dir, pub := upstreamCache(t, true)
	for _, tc := range []struct {
		name  string
		minor uint64
		op    func(cl *client) error
	}{
		{"EnsurePath", 38, func(cl *client) error {
			cl.w.u64(opEnsurePath)
			cl.w.str(full(upC))
			if err := cl.result(); err != nil {
				return err
			}
			cl.u64()
			return nil
		}},
		{"BuildPaths", 21, func(cl *client) error {
			cl.w.u64(opBuildPaths)
			cl.w.strings([]string{full(upC)})
			cl.w.u64(0)
			if err := cl.result(); err != nil {
				return err
			}
			cl.u64()
			return nil
		}},
		{"BuildPathsWithResults", 34, func(cl *client) error {
			cl.w.u64(opBuildPathsWithResults)
			cl.w.strings([]string{full(upC)})
			cl.w.u64(0)
			if err := cl.result(); err != nil {
				return err
			}
			if n := cl.u64(); n != 1 {
				t.Fatalf("%d results", n)
			}
			cl.str()
			if status := cl.u64(); status != 2 {
				msg := cl.str()
				// The rest of a 1.34 result: timesBuilt, isNonDeterministic,
				// start and stop time, and no outputs.
				for range 5 {
					cl.u64()
				}
				return fmt.Errorf("status %d: %s", status, msg)
			}
			return nil
		}},
		{"QueryValidPaths", 27, func(cl *client) error {
			cl.w.u64(opQueryValidPaths)
			cl.w.strings([]string{full(upC), full(upX)})
			cl.w.u64(1)
			if err := cl.result(); err != nil {
				return err
			}
			if v := cl.strs(); !slices.Equal(v, []string{full(upC)}) {
				t.Fatalf("valid %v", v)
			}
			return nil
		}},
	} {
		t.Run(tc.name, func(t *testing.T) {
			f := newFixture(t, withSubst(t, dir, pub, false))
			cl := f.connect(t, tc.minor)
			if tc.name != "QueryValidPaths" {
				// useSubstitutes off (connect's SetOptions): refused.
				if err := tc.op(cl); err == nil || f.valid(t, upA) {
					t.Fatalf("substituted without useSubstitutes: %v", err)
				}
			}
			cl.setOptions(true)
			if err := tc.op(cl); err != nil {
				t.Fatal(err)
			}
			if !f.valid(t, upA, upB, upC) {
				t.Fatal("closure not substituted")
			}
		})
	}
}

// TestSubstituteSignatures: paths without a trusted signature are refused
// (the error names the path), whatever a client, trusted or not, says in
// require-sigs, as nix-daemon; a server that does not require signatures
// takes them.
func TestSubstituteSignatures(t *testing.T) {
	dir, pub := upstreamCache(t, false)
	for _, trusted := range []bool{false, true} {
		f := newFixture(t, withSubst(t, dir, pub, trusted))
		cl := f.connect(t, 38)
		cl.setOptions(true, "require-sigs", "false")
		cl.w.u64(opEnsurePath)
		cl.w.str(full(upC))
		err := cl.result()
		if err == nil || !strings.Contains(err.Error(), upC) || !strings.Contains(err.Error(), "signature") || f.valid(t, upC) {
			t.Fatalf("trusted=%v: unsigned path: %v", trusted, err)
		}
	}
	f := newFixture(t, withSubst(t, dir, pub, false), func(s *Server) { s.RequireSigs = false })
	cl := f.connect(t, 38)
	cl.setOptions(true)
	cl.w.u64(opEnsurePath)
	cl.w.str(full(upC))
	cl.expectLast()
	cl.u64()
	if !f.valid(t, upA, upB, upC) {
		t.Fatal("not substituted without require-sigs")
	}
}

// TestSubstitutedPathsRooted: what a connection substituted is a temp root
// of it until it closes: a collection meanwhile keeps the closure.
func TestSubstitutedPathsRooted(t *testing.T) {
	dir, pub := upstreamCache(t, true)
	f := newFixture(t, withSubst(t, dir, pub, false))
	// A root for the fixture's own paths, so the collection has some.
	keep := f.connect(t, 38)
	for _, n := range []string{testA, testB} {
		keep.w.u64(opAddTempRoot)
		keep.w.str(full(n))
		keep.expectLast()
		keep.u64()
	}
	cl := f.connect(t, 38)
	cl.setOptions(true)
	cl.w.u64(opEnsurePath)
	cl.w.str(full(upC))
	cl.expectLast()
	cl.u64()
	gc := func() {
		t.Helper()
		if _, err := f.st.GC(context.Background(), store.GCOptions{Action: store.GCDeleteDead}); err != nil {
			t.Fatal(err)
		}
	}
	gc()
	if !f.valid(t, upA, upB, upC) {
		t.Fatal("a collection deleted paths the connection substituted")
	}
	cl.c.Close()
	// The roots go with the connection (closed by the server shortly after).
	deadline := time.Now().Add(5 * time.Second)
	for f.valid(t, upC) && time.Now().Before(deadline) {
		time.Sleep(50 * time.Millisecond)
		gc()
	}
	if f.valid(t, upC) {
		t.Fatal("substituted paths still rooted after the connection closed")
	}
}

// TestBuildDerivationOnlyUpstream: BuildPaths of drv^out where the store lacks the
// derivation itself and an upstream has it and its output: the derivation is fetched
// first, as nix-daemon's DerivationGoal does, then its output; both end up valid and
// the result is a success.
func TestBuildDerivationOnlyUpstream(t *testing.T) {
	const drvName = "0hm2f1psjpcwg8fijsmr4wwxrx59s092-bar.drv"
	const outName = "4q0pg5zpfmznxscq3avycvf9xdvx50n3-bar"
	contents, err := os.ReadFile(filepath.Join("..", "store", "testdata", "drv", drvName))
	if err != nil {
		t.Fatal(err)
	}
	ctx := context.Background()
	src, err := store.Open(ctx, t.TempDir(), store.Options{})
	if err != nil {
		t.Fatal(err)
	}
	defer src.Close()
	b := src.NewBatch(ctx)
	drvFile := filepath.Join(t.TempDir(), "drv")
	if err := os.WriteFile(drvFile, contents, 0o644); err != nil {
		t.Fatal(err)
	}
	var drvNAR strings.Builder
	if _, err := nar.DumpPath(&drvNAR, drvFile); err != nil {
		t.Fatal(err)
	}
	if _, err := b.Add(strings.NewReader(drvNAR.String()), store.PathInfo{Name: drvName}); err != nil {
		t.Fatal(err)
	}
	if _, err := b.Add(strings.NewReader(string(treeNAR(t, "bar"))), store.PathInfo{Name: outName}); err != nil {
		t.Fatal(err)
	}
	if _, err := b.Commit(); err != nil {
		t.Fatal(err)
	}
	ex := &binarycache.Exporter{Store: src, Dir: t.TempDir(), StoreDir: "/nix/store", Compression: "zstd", Jobs: 2}
	if _, err := ex.Export(ctx, []string{drvName, outName}); err != nil {
		t.Fatal(err)
	}
	f := newFixture(t, withSubst(t, ex.Dir, nil, false), func(s *Server) { s.RequireSigs = false })
	cl := f.connect(t, 34)
	cl.setOptions(true)
	cl.w.u64(opBuildPathsWithResults)
	cl.w.strings([]string{full(drvName) + "!out"})
	cl.w.u64(0)
	if err := cl.result(); err != nil {
		t.Fatal(err)
	}
	if n := cl.u64(); n != 1 {
		t.Fatalf("%d results", n)
	}
	cl.str()
	if status := cl.u64(); status != 2 {
		t.Fatalf("status %d: %s", status, cl.str())
	}
	if !f.valid(t, drvName, outName) {
		t.Fatalf("after BuildPathsWithResults of %s!out: derivation and output not both valid", drvName)
	}
}

// TestClientSubstituters: a client's substituters setting chooses among
// casnix's upstreams for its connection, as nix-daemon applies it: an
// empty list turns substitution off, a list naming an upstream (however
// the client writes its URL) turns it on, URLs casnix does not substitute
// from are ignored with a warning, and extra-substituters adds to the
// daemon's list instead of replacing it.
func TestClientSubstituters(t *testing.T) {
	dir, pub := upstreamCache(t, true)
	for _, tc := range []struct {
		name      string
		overrides []string
		subst     bool
		warning   string // a warning the client must get, if any
		optIn     bool   // the upstream is serve --trusted-substituters' (subst.Options.OptIn)
		// bare: casnix has no upstream of its own, and the client is
		// trusted (nix-daemon uses any cache a trusted client names).
		bare, trusted bool
	}{
		{"none sent", nil, true, "", false, false, false},
		{"empty", []string{"substituters", ""}, false, "", false, false, false},
		{"the upstream", []string{"substituters", "file://" + dir}, true, "", false, false, false},
		{"trailing slash and query", []string{"substituters", "file://" + dir + "/?priority=99"}, true, "", false, false, false},
		{"alias", []string{"binary-caches", "file://" + dir}, true, "", false, false, false},
		{"another cache", []string{"substituters", "https://cache.example.org/"}, false, "ignoring untrusted substituter 'https://cache.example.org/'", false, false, false},
		{"both", []string{"substituters", "https://cache.example.org/ file://" + dir}, true, "ignoring untrusted substituter 'https://cache.example.org/'", false, false, false},
		{"extra only", []string{"extra-substituters", "https://cache.example.org/"}, true, "ignoring untrusted substituter 'https://cache.example.org/'", false, false, false},
		{"empty plus extra", []string{"substituters", "", "extra-substituters", "file://" + dir}, true, "", false, false, false},
		{"other settings", []string{"max-jobs", "4", "trusted-public-keys", "x:y"}, true, "", false, false, false},
		// An opt-in upstream serves only clients that name it.
		{"opt-in, none sent", nil, false, "", true, false, false},
		{"opt-in, named", []string{"substituters", "file://" + dir + "/"}, true, "", true, false, false},
		{"opt-in, named as extra", []string{"extra-substituters", "file://" + dir}, true, "", true, false, false},
		// A trusted client's cache casnix was not started with is added for it.
		{"trusted, its own cache", []string{"substituters", "file://" + dir}, true, "", false, true, true},
		{"trusted, its own as extra", []string{"extra-substituters", "file://" + dir}, true, "", false, true, true},
		{"trusted, none sent", nil, false, "", false, true, true},
		{"trusted, empty", []string{"substituters", ""}, false, "", false, true, true},
		{"trusted, a scheme casnix lacks", []string{"substituters", "s3://bucket"}, false, "ignoring substituter 's3://bucket': casnix substitutes only from http", false, true, true},
		// Untrusted, with no upstream to choose from: nothing, and no warning (its
		// nix.conf's usual substituters line is no news).
		{"untrusted, its own cache", []string{"substituters", "file://" + dir}, false, "", false, true, false},
	} {
		t.Run(tc.name, func(t *testing.T) {
			opt := withSubst(t, dir, pub, false)
			switch {
			case tc.bare:
				opt = withSubstituter(t, nil, subst.Options{Keys: pub}, func() bool { return tc.trusted })
			case tc.optIn:
				opt = withSubstituter(t, nil, subst.Options{Keys: pub, OptIn: []string{"file://" + dir}}, nil)
			}
			f := newFixture(t, opt)
			cl := f.connect(t, 38)
			cl.setOptionsWarned(tc.warning, tc.overrides...)

			cl.w.u64(opHasSubstitutes)
			cl.w.str(full(upC))
			cl.expectLast()
			if has := cl.u64() == 1; has != tc.subst {
				t.Fatalf("HasSubstitutes %v", has)
			}
			f.ensureUpC(t, cl, tc.subst, "cannot substitute")
		})
	}
}

// TestClientKeys: a trusted client's trusted-public-keys are what its
// substitutions are checked against, as nix-daemon applies them (an empty
// list or another key refuses the upstream's signed paths, extra keys add
// to the daemon's); an untrusted client's are ignored.
func TestClientKeys(t *testing.T) {
	dir, pub := upstreamCache(t, true)
	var pubText string
	for _, k := range pub {
		pubText = k.String()
	}
	other := "other-1:" + base64.StdEncoding.EncodeToString(make([]byte, 32))
	for _, tc := range []struct {
		name      string
		trusted   bool
		overrides []string
		subst     bool
		warning   string
	}{
		{"trusted, none sent", true, nil, true, ""},
		{"trusted, the upstream's key", true, []string{"trusted-public-keys", other + " " + pubText}, true, ""},
		{"trusted, another key", true, []string{"trusted-public-keys", other}, false, ""},
		{"trusted, no keys", true, []string{"trusted-public-keys", ""}, false, ""},
		{"trusted, old name", true, []string{"binary-cache-public-keys", other}, false, ""},
		{"trusted, extra key", true, []string{"extra-trusted-public-keys", other}, true, ""},
		{"trusted, bad key", true, []string{"trusted-public-keys", "garbage"}, false, "ignoring trusted public key"},
		{"untrusted, another key", false, []string{"trusted-public-keys", other}, true, ""},
	} {
		t.Run(tc.name, func(t *testing.T) {
			f := newFixture(t, withSubst(t, dir, pub, tc.trusted))
			cl := f.connect(t, 38)
			cl.setOptionsWarned(tc.warning, tc.overrides...)
			f.ensureUpC(t, cl, tc.subst, "signature")
		})
	}
}

// TestClientAddedNotForUntrusted: a cache a trusted client added to a
// casnix without upstreams is not an upstream for an untrusted client
// naming the same URL: nothing is substituted for it, and, since casnix
// still has none of its own, its substituters line draws no warning.
func TestClientAddedNotForUntrusted(t *testing.T) {
	dir, pub := upstreamCache(t, true)
	trusted := true
	var sub *subst.Substituter
	opt := withSubstituter(t, nil, subst.Options{Keys: pub}, func() bool { return trusted })
	f := newFixture(t, func(s *Server) {
		opt(s)
		sub = s.Subst
	})
	root := f.connect(t, 38)
	root.setOptionsWarned("", "substituters", "file://"+dir)
	if n := sub.Len(); n != 1 {
		t.Fatalf("%d upstreams after the trusted client's options, want 1", n)
	}
	trusted = false
	cl := f.connect(t, 38)
	cl.setOptionsWarned("", "substituters", "file://"+dir)
	f.ensureUpC(t, cl, false, "cannot substitute")
}
