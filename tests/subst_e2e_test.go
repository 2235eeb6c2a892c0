package tests

import (
	"bytes"
	"encoding/base64"
	"net"
	"net/http"
	"net/http/httptest"
	"path/filepath"
	"slices"
	"strconv"
	"strings"
	"testing"
	"time"

	"github.com/casnix/casnix/tests/nixtest"
)

// TestServeSubstituters: real Nix 2.8 writes two signed binary caches, served by plain
// static HTTP servers on loopback; `casnix serve --substituters` with an empty store (and
// a third upstream on a closed port, which must not keep it from starting or serving)
// substitutes through them for real Nix clients. nix-store -r fetches a closure, path-info
// and nix-store -q --size then answer from it with the source store's metadata, QueryMissing
// (nix-store -r --dry-run) announces what would be fetched, and a path signed only by a key
// casnix does not trust is refused, naming the path; realising a derivation casnix holds
// substitutes its outputs. Every command runs against a real
// nix-daemon of the client's Nix (2.8, 2.26, 2.34) with the same upstreams too, and must
// exit and print the same.
func TestServeSubstituters(t *testing.T) {
	start := time.Now()
	f := nixtest.PopulateFixture(t)
	key, pub := cacheKey(t, f.Store, "upstream-1")
	stranger, _ := cacheKey(t, f.Store, "stranger-1")
	tmp := t.TempDir()
	good, bad := filepath.Join(tmp, "good"), filepath.Join(tmp, "bad")
	top, dry, refused := f.Path(t, "diamond-top"), f.Path(t, "chain2"), f.Path(t, "chain4")
	drv := f.Drvs["multi"]
	var outs []string
	for _, o := range []string{"multi.out", "multi.dev", "multi.doc"} {
		outs = append(outs, f.Path(t, o))
	}
	slices.Sort(outs)
	f.Nix(t, append([]string{"copy", "--to", "file://" + good + "?compression=xz&secret-key=" + key, top, dry}, outs...)...)
	f.Nix(t, "copy", "--to", "file://"+bad+"?compression=zstd&secret-key="+stranger, refused)
	goodSrv := httptest.NewServer(http.FileServer(http.Dir(good)))
	defer goodSrv.Close()
	badSrv := httptest.NewServer(http.FileServer(http.Dir(bad)))
	defer badSrv.Close()
	ln, err := net.Listen("tcp", "127.0.0.1:0")
	if err != nil {
		t.Fatal(err)
	}
	down := "http://" + ln.Addr().String()
	ln.Close()
	want := f.PathInfos(t)

	t.Logf("fixture and caches ready in %s", time.Since(start).Round(time.Millisecond))
	for _, suite := range nixtest.ClientSuites {
		t.Run(suite, func(t *testing.T) {
			testSubstituters(t, suite, f, want, pub, down, goodSrv.URL, badSrv.URL, top, dry, refused, drv, outs)
		})
	}
}

// testSubstituters is TestServeSubstituters with the Nix client of suite, against a new
// casnix and a new nix-daemon of that Nix.
func testSubstituters(t *testing.T, suite string, f *nixtest.Fixture, want map[string]nixtest.PathInfo,
	pub, down, goodURL, badURL, top, dry, refused, drv string, outs []string) {
	cas := nixtest.NewCasnix(t)
	sockDir := t.TempDir()
	d := cas.Serve(t, filepath.Join(sockDir, "casnix.sock"),
		"--substituters", down+"?priority=1", "--substituters", goodURL+"?priority=10", "--substituters", badURL,
		"--trusted-public-keys", pub)
	c := nixtest.RequireNixClient(t, suite)
	c.Bind(sockDir, f.Root)
	// The reference: a real nix-daemon of the same Nix over an empty store, with the same
	// two upstreams (not the closed port: Nix would spend its retries on it). The client
	// has them too, since a trusted client's settings override the daemon's (casnix takes
	// only its own).
	c.Env = []string{"NIX_CONFIG=substituters = " + goodURL + "?priority=10 " + badURL +
		"\ntrusted-public-keys = " + pub + "\nrequire-sigs = true"}
	nixd := nixtest.StartNixDaemon(t, c, filepath.Join(sockDir, "nixd.sock"), filepath.Join(c.TempDir(t), "root"))
	t.Logf("Nix %s: daemons ready", c.Version(t))

	// same runs a client command against casnix and nix-daemon ("{store}" is the store
	// URL) and requires the same exit status and stdout; it returns casnix's result.
	same := func(args ...string) *nixtest.Result {
		t.Helper()
		var res [2]*nixtest.Result
		for i, dm := range []*nixtest.Daemon{d, nixd} {
			a := make([]string, len(args))
			for j, s := range args {
				a[j] = strings.ReplaceAll(s, "{store}", dm.URL())
			}
			res[i] = c.Try(a...)
		}
		if res[0].ExitCode != res[1].ExitCode || !bytes.Equal(res[0].Stdout, res[1].Stdout) {
			t.Errorf("%s\nthrough casnix:\n%s\nthrough nix-daemon:\n%s", strings.Join(args, " "), res[0], res[1])
		}
		return res[0]
	}

	// QueryMissing: the dry run lists the closure as "will be fetched", nothing is fetched.
	r := same("nix-store", "--store", "{store}", "-r", "--dry-run", dry)
	if !r.OK() || !strings.Contains(string(r.Stderr), "will be fetched") || !strings.Contains(string(r.Stderr), dry) {
		t.Errorf("nix-store -r --dry-run %s:\n%s", dry, r)
	}
	// nix path-info of a path the store lacks: Nix 2.8 prints what would be fetched and
	// fails, through nix-daemon as through casnix.
	r = same("nix", "path-info", "--store", "{store}", dry)
	if !strings.Contains(string(r.Stderr), "will be fetched") {
		t.Errorf("nix path-info %s:\n%s", dry, r)
	}
	if r := same("nix-store", "--store", "{store}", "-q", "--size", dry); r.OK() {
		t.Errorf("a dry run substituted %s:\n%s", dry, r)
	}

	// A client whose substituters setting is empty gets nothing substituted by either
	// daemon; one naming a cache casnix does not substitute from is told so.
	env := c.Env
	c.Env = []string{"NIX_CONFIG=substituters =\ntrusted-public-keys = " + pub + "\nrequire-sigs = true"}
	if r := same("nix-store", "--store", "{store}", "-r", dry); r.OK() {
		t.Errorf("nix-store -r %s substituted for a client without substituters:\n%s", dry, r)
	}
	// A trusted client (root) trusting only another key: its substitutions are checked
	// against that key, by casnix as by nix-daemon, so the upstream's paths are refused.
	c.Env = []string{"NIX_CONFIG=substituters = " + goodURL + "?priority=10\ntrusted-public-keys = other-1:" +
		base64.StdEncoding.EncodeToString(make([]byte, 32)) + "\nrequire-sigs = true"}
	if r := same("nix-store", "--store", "{store}", "-r", dry); r.OK() {
		t.Errorf("nix-store -r %s substituted for a client trusting another key:\n%s", dry, r)
	}
	c.Env = env

	// nix-store -r substitutes the closure.
	r = same("nix-store", "--store", "{store}", "-r", top, dry)
	if !r.OK() || strings.Join(nixtest.SortedLines(r.Stdout), " ") != strings.Join(nixtest.SortedLines([]byte(top+"\n"+dry+"\n")), " ") {
		t.Fatalf("nix-store -r %s %s:\n%s\ncasnix:\n%s", top, dry, r, d.Output())
	}
	closure := f.Closure(t, top, dry)
	for _, p := range closure {
		r := same("nix-store", "--store", "{store}", "-q", "--size", p)
		if !r.OK() || strings.TrimSpace(string(r.Stdout)) != strconv.FormatInt(want[p].NarSize, 10) {
			t.Errorf("nix-store -q --size %s: want %d\n%s", p, want[p].NarSize, r)
		}
	}
	r = same("nix", "path-info", "--store", "{store}", dry)
	if !r.OK() || strings.TrimSpace(string(r.Stdout)) != dry {
		t.Errorf("nix path-info %s after substitution:\n%s", dry, r)
	}
	got, err := nixtest.ParsePathInfoJSON(c.Run(t, append(append(c.PathInfoJSONArgs(t), "--store", d.URL()), closure...)...).Stdout)
	if err != nil {
		t.Fatal(err)
	}
	wantClosure := map[string]nixtest.PathInfo{}
	for _, p := range closure {
		wantClosure[p] = want[p]
	}
	sameInfos(t, got, wantClosure)

	// Signed by a key neither daemon trusts: refused, and casnix's error names the path.
	r = same("nix-store", "--store", "{store}", "-r", refused)
	if r.OK() || !strings.Contains(string(r.Stderr), strings.TrimPrefix(refused, nixtest.StoreDir+"/")) {
		t.Errorf("nix-store -r of a path signed by an untrusted key:\n%s", r)
	}
	t.Logf("refused: %s", bytes.TrimSpace(r.Stderr))
	if r := same("nix-store", "--store", "{store}", "-q", "--size", refused); r.OK() {
		t.Errorf("%s is valid after the refusal", refused)
	}
	// A derivation casnix holds (uploaded) whose outputs an upstream has: realising it
	// substitutes the outputs, as nix-daemon does instead of building.
	for _, dm := range []*nixtest.Daemon{d, nixd} {
		c.Run(t, "nix", "copy", "--no-check-sigs", "--derivation", "--from", "local?root="+f.Root, "--to", dm.URL(), drv)
	}
	// The client reads the .drv file from its store directory: the fixture's (real=).
	drvStore := "{store}?real=" + f.RealPath(nixtest.StoreDir)
	r = same("nix-store", "--store", drvStore, "-r", "--dry-run", drv)
	if !r.OK() || !strings.Contains(string(r.Stderr), "will be fetched") || !strings.Contains(string(r.Stderr), outs[0]) {
		t.Errorf("nix-store -r --dry-run %s:\n%s", drv, r)
	}
	// nix-build --dry-run of the derivation (a .drv argument, as nix-build takes one) lists
	// the outputs it would fetch.
	r = same("nix-build", "--store", drvStore, "--dry-run", "--no-out-link", drv)
	if !r.OK() || !strings.Contains(string(r.Stderr), "will be fetched") || !strings.Contains(string(r.Stderr), outs[0]) {
		t.Errorf("nix-build --dry-run %s:\n%s", drv, r)
	}
	r = same("nix-store", "--store", drvStore, "-r", drv)
	if got := nixtest.SortedLines(r.Stdout); !r.OK() || !slices.Equal(got, outs) {
		t.Errorf("nix-store -r %s: %q, want %q\n%s", drv, got, outs, r)
	}

	// An upstream casnix has as --trusted-substituters only: a client that does not name
	// it gets nothing from it, one that names it (extra-substituters, folded into its
	// substituters setting) gets the closure.
	optDir := t.TempDir()
	od := nixtest.NewCasnix(t).Serve(t, filepath.Join(optDir, "casnix.sock"), "--trusted-substituters", goodURL, "--trusted-public-keys", pub)
	c.Bind(optDir)
	c.Env = []string{"NIX_CONFIG=substituters =\ntrusted-public-keys = " + pub}
	if r := c.Try("nix-store", "--store", od.URL(), "-r", dry); r.OK() {
		t.Errorf("nix-store -r %s through an opt-in upstream the client did not name:\n%s", dry, r)
	}
	c.Env = []string{"NIX_CONFIG=extra-substituters = " + goodURL + "/\ntrusted-public-keys = " + pub}
	if r := c.Try("nix-store", "--store", od.URL(), "-r", dry); !r.OK() || strings.TrimSpace(string(r.Stdout)) != dry {
		t.Errorf("nix-store -r %s through an opt-in upstream the client named:\n%s\ncasnix:\n%s", dry, r, od.Output())
	}
	c.Env = env
	if err := od.Stop(30 * time.Second); err != nil {
		t.Errorf("casnix serve (opt-in upstream): %v\n%s", err, od.Output())
	}

	// A casnix started without upstreams, beside a nix-daemon without any: a trusted client
	// (root) naming its own cache gets the closure through both, as nix-daemon uses any
	// cache a trusted client names; without it, through neither.
	bareDir := t.TempDir()
	bd := nixtest.NewCasnix(t).Serve(t, filepath.Join(bareDir, "casnix.sock"), "--trusted-public-keys", pub)
	c.Bind(bareDir)
	c.Env = []string{"NIX_CONFIG=substituters =\ntrusted-public-keys = " + pub + "\nrequire-sigs = true"}
	bnixd := nixtest.StartNixDaemon(t, c, filepath.Join(bareDir, "nixd.sock"), filepath.Join(c.TempDir(t), "root"))
	bare := func(env string, args ...string) *nixtest.Result {
		t.Helper()
		c.Env = []string{env}
		var res [2]*nixtest.Result
		for i, dm := range []*nixtest.Daemon{bd, bnixd} {
			res[i] = c.Try(append([]string{"nix-store", "--store", dm.URL()}, args...)...)
		}
		if res[0].ExitCode != res[1].ExitCode || !bytes.Equal(res[0].Stdout, res[1].Stdout) {
			t.Errorf("%s, %s\nthrough casnix:\n%s\nthrough nix-daemon:\n%s\ncasnix:\n%s", env, strings.Join(args, " "), res[0], res[1], bd.Output())
		}
		return res[0]
	}
	if r := bare("NIX_CONFIG=trusted-public-keys = "+pub, "-r", dry); r.OK() {
		t.Errorf("nix-store -r %s through a casnix without upstreams, the client naming none:\n%s", dry, r)
	}
	own := "NIX_CONFIG=substituters = " + goodURL + "/\ntrusted-public-keys = " + pub
	if r := bare(own, "-r", dry); !r.OK() || strings.TrimSpace(string(r.Stdout)) != dry {
		t.Errorf("nix-store -r %s through a casnix without upstreams, the trusted client naming its cache:\n%s", dry, r)
	}
	// Its caches' paths are checked against the keys as any upstream's.
	if r := bare("NIX_CONFIG=substituters = "+goodURL+" "+badURL+"\ntrusted-public-keys = "+pub, "-r", refused); r.OK() {
		t.Errorf("nix-store -r %s (signed by a key neither trusts) from the client's cache:\n%s", refused, r)
	}
	if r := bare(own, "-r", "--dry-run", top); !r.OK() || !strings.Contains(string(r.Stderr), "will be fetched") {
		t.Errorf("nix-store -r --dry-run %s from the client's cache:\n%s", top, r)
	}
	c.Env = env
	if err := bd.Stop(30 * time.Second); err != nil {
		t.Errorf("casnix serve (no upstreams): %v\n%s", err, bd.Output())
	}

	if d.Exited() {
		t.Fatalf("casnix serve exited:\n%s", d.Output())
	}
	if err := d.Stop(30 * time.Second); err != nil {
		t.Errorf("casnix serve: %v\n%s", err, d.Output())
	}
	// What casnix holds: the closures fetched, nothing of the refused path.
	valid := cas.ValidPaths(t, f.AllPaths(t))
	var names []string
	for p := range valid {
		names = append(names, p)
	}
	slices.Sort(names)
	wantValid := slices.Concat(closure, f.Closure(t, drv), f.Closure(t, outs...))
	slices.Sort(wantValid)
	wantValid = slices.Compact(wantValid)
	if !slices.Equal(names, wantValid) {
		t.Errorf("casnix holds %v, want %v", names, wantValid)
	}
}
