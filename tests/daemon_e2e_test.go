package tests

import (
	"bytes"
	"fmt"
	"os"
	"path/filepath"
	"slices"
	"strings"
	"sync"
	"testing"
	"time"

	"github.com/casnix/casnix/tests/nixtest"
)

// TestServeUnixSocket serves the fixture store, imported from a real Nix store, with
// `casnix serve --socket` and queries it through unix://SOCKET with each real Nix client
// (2.8 on the host, 2.26 and 2.34 in roots). Every command also runs against a real
// nix-daemon of the same Nix version serving a copy of the source store, and the two must
// answer the same: store info, path-info --json (recursive and --all), nix-store -q with
// each query flag, path-from-hash-part, realising and building valid paths, and the errors
// for a path that is not there. A unix:// client reads file contents from its own store
// directory, so only metadata goes through the socket here; contents are TestServeSSHNG's.
func TestServeUnixSocket(t *testing.T) {
	start := time.Now()
	sf := newServedFixture(t)
	sockDir := t.TempDir()
	socket := filepath.Join(sockDir, "casnix.sock")
	cas := sf.Cas.Serve(t, socket)
	t.Logf("fixture of %d paths imported and served in %s", len(sf.All), time.Since(start).Round(time.Millisecond))

	for _, suite := range nixtest.ClientSuites {
		t.Run(suite, func(t *testing.T) {
			start := time.Now()
			c := nixtest.RequireNixClient(t, suite)
			c.Bind(sockDir)
			// The real daemon serves a copy, so that a newer Nix never touches (or
			// migrates) the source store's database.
			src := copyStoreRoot(t, sf.Root, filepath.Join(c.TempDir(t), "root"))
			nixd := nixtest.StartNixDaemon(t, c, filepath.Join(sockDir, suite+".sock"), src.Root)
			// The client reads files (.drv files here) from its own store directory,
			// which the real= setting of the store URL names: the copy's for both.
			dc := &daemonCompare{t: t, c: c, cas: cas, nixd: nixd, realDir: src.RealPath(nixtest.StoreDir)}
			t.Logf("Nix %s against %s and %s", c.Version(t), cas.Name, nixd.Name)
			checkStoreInfo(t, dc)
			checkPathInfoJSON(t, dc, sf)
			checkQueries(t, dc, sf)
			checkRealise(t, dc, sf)
			checkMissingPath(t, dc)
			if cas.Exited() {
				t.Fatalf("casnix serve exited: %v\n%s", cas.Stop(0), cas.Output())
			}
			t.Logf("Nix %s: %d commands against each daemon in %s", c.Version(t), dc.count, time.Since(start).Round(time.Millisecond))
		})
	}

	// SIGTERM: a clean exit that removes the socket.
	if err := cas.Stop(30 * time.Second); err != nil {
		t.Errorf("casnix serve after SIGTERM: %v\n%s", err, cas.Output())
	}
	if _, err := os.Lstat(socket); !os.IsNotExist(err) {
		t.Errorf("socket %s still there after casnix serve stopped (%v)", socket, err)
	}
	checkServeLog(t, cas)
}

// daemonCompare runs the same client command against casnix and a real nix-daemon.
type daemonCompare struct {
	t    *testing.T
	c    *nixtest.NixClient
	cas  *nixtest.Daemon
	nixd *nixtest.Daemon
	// realDir is the real= setting of both store URLs: where the client reads files.
	realDir string
	count   int
}

// run runs args, in which "{store}" stands for the store URL (unix://SOCKET?real=…),
// against both daemons at once. Each result's Stdout and Stderr have the daemon's socket
// replaced by SOCKET.
func (dc *daemonCompare) run(args ...string) (cas, nixd *nixtest.Result) {
	dc.t.Helper()
	dc.count++
	var wg sync.WaitGroup
	res := make([]*nixtest.Result, 2)
	for i, d := range []*nixtest.Daemon{dc.cas, dc.nixd} {
		a := make([]string, len(args))
		for j, s := range args {
			a[j] = strings.ReplaceAll(s, "{store}", dc.url(d))
		}
		cmd := dc.c.Cmd(a...)
		cmd.Timeout = 2 * time.Minute
		wg.Add(1)
		go func() {
			defer wg.Done()
			r := cmd.Try()
			r.Stdout = bytes.ReplaceAll(r.Stdout, []byte(d.Socket), []byte("SOCKET"))
			r.Stderr = bytes.ReplaceAll(r.Stderr, []byte(d.Socket), []byte("SOCKET"))
			res[i] = r
		}()
	}
	wg.Wait()
	for _, r := range res {
		if r.Err != nil {
			dc.t.Fatalf("%s", r)
		}
	}
	return res[0], res[1]
}

// url is the store URL of daemon d for the client.
func (dc *daemonCompare) url(d *nixtest.Daemon) string { return d.URL() + "?real=" + dc.realDir }

// same runs args against both daemons and requires the same exit status and stdout, and
// for failures the same message (stderr without run-dependent warnings). It returns
// casnix's result.
func (dc *daemonCompare) same(args ...string) *nixtest.Result {
	dc.t.Helper()
	cas, nixd := dc.run(args...)
	switch {
	case cas.ExitCode != nixd.ExitCode:
		dc.t.Errorf("Nix %s: exit status %d through casnix, %d through nix-daemon\ncasnix: %s\nnix-daemon: %s",
			dc.c.Version(dc.t), cas.ExitCode, nixd.ExitCode, cas, nixd)
	case !bytes.Equal(cas.Stdout, nixd.Stdout):
		dc.t.Errorf("Nix %s: %s\nprints through casnix:\n%s\nthrough nix-daemon:\n%s",
			dc.c.Version(dc.t), cas.Cmd.CommandLine(), clipOutput(cas.Stdout), clipOutput(nixd.Stdout))
	case !cas.OK() && nixtest.StripNixNoise(cas.Stderr) != nixtest.StripNixNoise(nixd.Stderr):
		dc.t.Errorf("Nix %s: %s\nfails through casnix with:\n%s\nthrough nix-daemon with:\n%s",
			dc.c.Version(dc.t), cas.Cmd.CommandLine(), cas.Stderr, nixd.Stderr)
	}
	return cas
}

// checkStoreInfo: `nix store info` (`nix store ping` before Nix 2.19) prints the same
// through both daemons apart from the daemon's version, which names casnix.
func checkStoreInfo(t *testing.T, dc *daemonCompare) {
	sub := "info"
	if !dc.c.AtLeast(t, 2, 19) {
		sub = "ping"
	}
	cas, nixd := dc.run("nix", "store", sub, "--store", "{store}")
	if !cas.OK() || !nixd.OK() {
		t.Fatalf("nix store %s failed:\ncasnix: %s\nnix-daemon: %s", sub, cas, nixd)
	}
	// Depending on the version the lines go to stdout or stderr.
	info := func(r *nixtest.Result) (version string, rest []string) {
		for _, l := range nixtest.SortedLines(append(append([]byte{}, r.Stdout...), r.Stderr...)) {
			if v, ok := strings.CutPrefix(l, "Version: "); ok {
				version = v
			} else {
				rest = append(rest, l)
			}
		}
		return version, rest
	}
	cv, crest := info(cas)
	rv, rrest := info(nixd)
	t.Logf("nix store %s through casnix: version %q, %q", sub, cv, crest)
	if !strings.Contains(cv, "casnix") {
		t.Errorf("nix store %s: daemon version %q through casnix, want it to name casnix", sub, cv)
	}
	if rv != dc.c.Version(t) {
		t.Errorf("nix store %s: daemon version %q through nix-daemon, want %q", sub, rv, dc.c.Version(t))
	}
	if !slices.Equal(crest, rrest) {
		t.Errorf("nix store %s prints %q through casnix, %q through nix-daemon", sub, crest, rrest)
	}
}

// checkPathInfoJSON: `nix path-info --json --recursive` of a few roots and `--all` print
// the same through both daemons and equal the source store's path-info on every field.
func checkPathInfoJSON(t *testing.T, dc *daemonCompare, sf *servedFixture) {
	var roots []string
	for _, name := range []string{"diamond-top", "chain4", "uses-dev", "uses-fod", "uses-text", "tree", "self-ref", "random-copy", "add-dir", "add-fixed-rec-sha512", "weird-name"} {
		roots = append(roots, sf.Path(t, name))
	}
	pathInfo := dc.c.PathInfoJSONArgs(t)
	for _, tc := range []struct {
		name string
		args []string
		want []string
	}{
		{"--recursive", append(append(slices.Clone(pathInfo), "--recursive", "--store", "{store}"), roots...), sf.Closure(t, roots...)},
		{"--all", append(slices.Clone(pathInfo), "--all", "--store", "{store}"), sf.All},
	} {
		r := dc.same(tc.args...)
		if !r.OK() {
			t.Errorf("nix path-info --json %s through casnix failed:\n%s", tc.name, r)
			continue
		}
		got, err := nixtest.ParsePathInfoJSON(r.Stdout)
		if err != nil {
			t.Errorf("nix path-info --json %s: %v\n%s", tc.name, err, clipOutput(r.Stdout))
			continue
		}
		want := map[string]nixtest.PathInfo{}
		for _, p := range tc.want {
			want[p] = sf.Want[p]
		}
		if d := diffPathInfos(got, want); len(d) > 0 {
			t.Errorf("nix path-info --json %s through casnix differs from the source store in %d paths:\n%s",
				tc.name, len(d), strings.Join(d, "\n"))
		}
	}
	// The plain listing, whose order may depend on the daemon's answer.
	cas, nixd := dc.run("nix", "path-info", "--all", "--store", "{store}")
	if !cas.OK() || !sameLineSet(cas.Stdout, nixd.Stdout) || !slices.Equal(nixtest.SortedLines(cas.Stdout), sf.All) {
		t.Errorf("nix path-info --all: through casnix\n%s\nthrough nix-daemon\n%s", cas, nixd)
	}
}

// checkQueries: nix-store -q with each query flag, one flag per invocation, on paths of
// every kind (built, multi-output, self-referencing, content-addressed, signed, a .drv,
// the builder everything refers to), and nix store path-from-hash-part.
func checkQueries(t *testing.T, dc *daemonCompare, sf *servedFixture) {
	var paths []string
	for _, name := range []string{"file", "diamond-base", "diamond-top", "multi.dev", "self-ref", "fod-flat", "add-dir", "busybox-src"} {
		paths = append(paths, sf.Path(t, name))
	}
	paths = append(paths, sf.Drvs["multi"])
	refs := referrersOf(sf.Want)
	q := func(flag string, ps ...string) *nixtest.Result {
		return dc.same(append([]string{"nix-store", "--store", "{store}", "-q", flag}, ps...)...)
	}
	for _, p := range paths {
		w := sf.Want[p]
		if r := q("--references", p); !slices.Equal(nixtest.SortedLines(r.Stdout), w.References) {
			t.Errorf("nix-store -q --references %s: %q, want %q", p, nixtest.SortedLines(r.Stdout), w.References)
		}
		if r := q("--requisites", p); !slices.Equal(nixtest.SortedLines(r.Stdout), sf.Closure(t, p)) {
			t.Errorf("nix-store -q --requisites %s: %q, want %q", p, nixtest.SortedLines(r.Stdout), sf.Closure(t, p))
		}
		if r := q("--referrers", p); !slices.Equal(nixtest.SortedLines(r.Stdout), refs[p]) {
			t.Errorf("nix-store -q --referrers %s: %q, want %q", p, nixtest.SortedLines(r.Stdout), refs[p])
		}
		if dc.c.AtLeast(t, 2, 19) {
			// Only newer nix-store knows the flag; the answer comes from QueryValidDerivers.
			r := q("--valid-derivers", p)
			var want []string
			if w.Deriver != "" {
				if _, ok := sf.Want[w.Deriver]; ok {
					want = []string{w.Deriver}
				}
			}
			if got := nixtest.SortedLines(r.Stdout); !r.OK() || !slices.Equal(got, want) {
				t.Errorf("nix-store -q --valid-derivers %s: %q, want %q\n%s", p, got, want, r)
			}
		}
	}
	// One line per path, in order: all paths at once.
	var wantHash, wantSize, wantDeriver []string
	for _, p := range paths {
		w := sf.Want[p]
		wantHash = append(wantHash, w.NarHash)
		wantSize = append(wantSize, fmt.Sprint(w.NarSize))
		d := w.Deriver
		if d == "" {
			d = "unknown-deriver"
		}
		wantDeriver = append(wantDeriver, d)
	}
	for flag, want := range map[string][]string{"--hash": wantHash, "--size": wantSize, "--deriver": wantDeriver} {
		r := q(flag, paths...)
		got := strings.Fields(string(r.Stdout))
		if flag == "--hash" {
			for i := range got {
				if h, err := nixtest.NormalizeSHA256(got[i]); err == nil {
					got[i] = h
				}
			}
		}
		if !r.OK() || !slices.Equal(got, want) {
			t.Errorf("nix-store -q %s: %q, want %q\n%s", flag, got, want, r)
		}
	}

	if dc.c.AtLeast(t, 2, 19) { // no path-from-hash-part in Nix 2.8
		for _, p := range append(paths[:3:3], nixtest.StoreDir+"/"+missingHash+"-x") {
			hash := strings.SplitN(strings.TrimPrefix(p, nixtest.StoreDir+"/"), "-", 2)[0]
			r := dc.same("nix", "store", "path-from-hash-part", "--store", "{store}", hash)
			if hash == missingHash {
				if r.OK() {
					t.Errorf("nix store path-from-hash-part of an unknown hash succeeded:\n%s", r)
				}
			} else if got := strings.TrimSpace(string(r.Stdout)); !r.OK() || got != p {
				t.Errorf("nix store path-from-hash-part %s: %q, want %q\n%s", hash, got, p, r)
			}
		}
	}
}

// missingHash is the hash part of a store path that no store here holds.
const missingHash = "0000000000000000000000000000000a"

// checkRealise: nix-store -r and nix build of paths that are already valid succeed
// without building anything, through casnix as through nix-daemon.
func checkRealise(t *testing.T, dc *daemonCompare, sf *servedFixture) {
	paths := []string{sf.Path(t, "diamond-top"), sf.Path(t, "multi.dev"), sf.Path(t, "fod-rec"), sf.Path(t, "add-file")}
	drv := sf.Drvs["multi"]
	var outs []string
	for _, o := range []string{"multi.out", "multi.dev", "multi.doc"} {
		outs = append(outs, sf.Path(t, o))
	}
	slices.Sort(outs)

	r := dc.same(append([]string{"nix-store", "--store", "{store}", "-r"}, paths...)...)
	if got := nixtest.SortedLines(r.Stdout); !r.OK() || !slices.Equal(got, slices.Sorted(slices.Values(paths))) {
		t.Errorf("nix-store -r of valid paths: %q\n%s", got, r)
	}
	r = dc.same("nix-store", "--store", "{store}", "-r", drv)
	if got := nixtest.SortedLines(r.Stdout); !r.OK() || !slices.Equal(got, outs) {
		t.Errorf("nix-store -r %s (all outputs valid): %q, want %q\n%s", drv, got, outs, r)
	}
	r = dc.same(append([]string{"nix", "build", "--no-link", "--store", "{store}"}, paths...)...)
	if !r.OK() {
		t.Errorf("nix build of valid paths failed:\n%s", r)
	}
	if dc.c.AtLeast(t, 2, 19) { // DRV^* installables
		r = dc.same("nix", "build", "--no-link", "--print-out-paths", "--store", "{store}", drv+"^*")
		if got := nixtest.SortedLines(r.Stdout); !r.OK() || !slices.Equal(got, outs) {
			t.Errorf("nix build %s^*: %q, want %q\n%s", drv, got, outs, r)
		}
	}
	// With result links, which the client registers as GC roots with the daemon: one for
	// a path, one per output for DRV^* (made from the outputs the build results name).
	for _, d := range []*nixtest.Daemon{dc.cas, dc.nixd} {
		dir := dc.c.TempDir(t)
		link := filepath.Join(dir, "result")
		r := dc.c.Try("nix", "build", "--out-link", link, "--store", dc.url(d), paths[0])
		target, err := os.Readlink(dc.c.HostPath(link))
		if !r.OK() || err != nil || target != paths[0] {
			t.Errorf("nix build --out-link through %s: link to %q (%v), want %s\n%s", d.Name, target, err, paths[0], r)
		}
		if !dc.c.AtLeast(t, 2, 19) {
			continue
		}
		link = filepath.Join(dir, "multi")
		r = dc.c.Try("nix", "build", "--out-link", link, "--store", dc.url(d), drv+"^*")
		var got []string
		for _, l := range []string{link, link + "-dev", link + "-doc"} {
			if target, err := os.Readlink(dc.c.HostPath(l)); err == nil {
				got = append(got, target)
			}
		}
		slices.Sort(got)
		if !r.OK() || !slices.Equal(got, outs) {
			t.Errorf("nix build --out-link %s %s^* through %s: links to %q, want %q\n%s", link, drv, d.Name, got, outs, r)
		}
	}
}

// checkMissingPath: queries of a path that is not in the store fail with exactly the
// message a real nix-daemon causes; realising or building it fails too, naming the path.
func checkMissingPath(t *testing.T, dc *daemonCompare) {
	missing := nixtest.StoreDir + "/" + missingHash + "-not-there"
	for _, args := range [][]string{
		append(dc.c.PathInfoJSONArgs(t), "--store", "{store}", missing),
		{"nix", "path-info", "--store", "{store}", missing},
		{"nix-store", "--store", "{store}", "-q", "--references", missing},
		{"nix-store", "--store", "{store}", "-q", "--hash", missing},
	} {
		r := dc.same(args...)
		// Newer nix path-info --json prints null (or "valid": false) for it and exits 0.
		if r.OK() && !bytes.Contains(r.Stdout, []byte(`"valid":false`)) && !bytes.Contains(r.Stdout, []byte(missing+`":null`)) {
			t.Errorf("%s succeeded for a missing path:\n%s", r.Cmd.CommandLine(), r)
		}
		t.Logf("%s → exit %d: %s", strings.Join(args[:2], " "), r.ExitCode, bytes.TrimSpace(r.Stderr))
	}
	// Building: nix-daemon tries substituters and says so; casnix neither builds nor
	// substitutes. Both must fail, and casnix's message must name the path.
	for _, args := range [][]string{
		{"nix-store", "--store", "{store}", "-r", missing},
		{"nix", "build", "--no-link", "--store", "{store}", missing},
	} {
		cas, nixd := dc.run(args...)
		if cas.OK() || nixd.OK() {
			t.Errorf("%s of a missing path: casnix %s\nnix-daemon %s", args[0], cas, nixd)
			continue
		}
		cmsg, rmsg := nixtest.StripNixNoise(cas.Stderr), nixtest.StripNixNoise(nixd.Stderr)
		t.Logf("%s %s of a missing path fails\n  through casnix: %s\n  through nix-daemon: %s", args[0], args[1], strings.TrimSpace(cmsg), strings.TrimSpace(rmsg))
		if !strings.Contains(cmsg, missing) {
			t.Errorf("%s of a missing path: casnix's message does not name the path:\n%s", args[0], cmsg)
		}
	}
}
