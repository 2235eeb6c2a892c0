package tests

import (
	"os"
	"path/filepath"
	"slices"
	"strings"
	"sync"
	"testing"
	"time"

	"github.com/casnix/casnix/tests/nixtest"
)

// writeRoots are the fixture outputs whose closures the write tests copy: every kind of
// path (input-addressed with references and self-references, fixed-output, text, added,
// signed, derivations).
var writeRoots = []string{"diamond-top", "uses-fod", "uses-dev", "uses-text", "tree", "self-ref", "random-copy",
	"add-dir", "add-fixed-rec-sha512", "add-fixed-exe", "symlink", "weird-name", "big-file", "empty-dir", "dangling"}

// TestCopyToDaemon pushes paths into an empty casnix over the daemon protocol with each
// real Nix client (2.8, 2.26, 2.34): `nix copy --to unix://…` of a real closure, then
// `nix copy --from` into a fresh local store and `nix store verify --all` there, every
// path-info equal to the source's and every `casnix dump` byte-identical to
// `nix-store --dump` of the source; `nix store sign` through the daemon and
// `nix store verify --sigs-needed`; `nix-store --add`, `nix store add-path` and
// `nix store add-file` giving the same paths as a local store; and `nix copy --to
// ssh-ng://` through `casnix serve --stdio`.
func TestCopyToDaemon(t *testing.T) {
	nixtest.CasnixBinary(t) // fail fast when casnix does not build
	f := nixtest.PopulateFixture(t)
	var roots []string
	for _, n := range writeRoots {
		roots = append(roots, f.Path(t, n))
	}
	closure := f.Closure(t, roots...)
	want := f.PathInfos(t, closure...)
	srcDumps := map[string]nixtest.Digest{}
	for _, p := range closure {
		srcDumps[p] = f.Dump(t, p)
	}
	keyDir := t.TempDir()
	os.Chmod(keyDir, 0o755)
	key := filepath.Join(keyDir, "casnix-test-1.sec")
	data, err := os.ReadFile(f.SecretKeys[0])
	if err != nil {
		t.Fatal(err)
	}
	if err := os.WriteFile(key, data, 0o644); err != nil {
		t.Fatal(err)
	}
	sshd := nixtest.StartSSHD(t)

	for _, suite := range nixtest.ClientSuites {
		t.Run(suite, func(t *testing.T) {
			start := time.Now()
			c := nixtest.RequireNixClient(t, suite)
			sockDir := t.TempDir()
			cas := nixtest.NewCasnix(t)
			d := cas.Serve(t, filepath.Join(sockDir, "casnix.sock"), "--trusted-public-keys", strings.Join(f.PublicKeys, " "))
			c.Bind(sockDir, keyDir, sshd.Dir)
			src := f.Root
			if !c.IsHost() {
				// A newer Nix would migrate the source's database: give it a copy.
				src = copyStoreRoot(t, f.Root, filepath.Join(c.TempDir(t), "src")).Root
			}
			from := "local?root=" + src

			// Unsigned paths need --no-check-sigs, as with nix-daemon (root is trusted).
			copyStart := time.Now()
			c.Run(t, append([]string{"nix", "copy", "--no-check-sigs", "--from", from, "--to", d.URL()}, roots...)...)
			t.Logf("Nix %s: nix copy --to unix:// of %d paths in %s", c.Version(t), len(closure), time.Since(copyStart).Round(time.Millisecond))
			got := cas.PathInfos(t, closure...)
			for _, p := range closure {
				if diff := nixtest.ComparePathInfo(got[p], want[p]); len(diff) > 0 {
					t.Errorf("%s after nix copy --to casnix: %s", p, strings.Join(diff, "; "))
				}
				if dg := cas.Dump(t, p); dg != srcDumps[p] {
					t.Errorf("casnix dump %s: %s, source %s", p, dg, srcDumps[p])
				}
			}
			if all := casnixAll(t, cas); !slices.Equal(all, closure) {
				t.Errorf("casnix holds %d paths after the copy, want the %d of the closure", len(all), len(closure))
			}

			// A unix:// client reads NARs from its own store directory, so what went in is
			// read back over ssh-ng:// (casnix serve --stdio on the same data dir, next to
			// the running daemon): into a fresh store, checked by Nix itself.
			c.Env = append(c.Env, "NIX_SSHOPTS="+sshd.NixSSHOpts())
			back := sshd.StoreURL([]string{cas.Bin, "--data-dir", cas.DataDir, "serve"})
			dest := "local?root=" + filepath.Join(c.TempDir(t), "dest")
			c.Run(t, append([]string{"nix", "copy", "--from", back, "--to", dest}, roots...)...)
			checkNixVerify(t, c, dest)
			if all := nixtest.SortedLines(c.Output(t, "nix", "path-info", "--all", "--store", dest)); !slices.Equal(all, closure) {
				t.Errorf("the copy back holds %d paths, want %d", len(all), len(closure))
			}

			// Signatures through the daemon (AddSignatures), checked by the client over
			// ssh-ng (which reads the NARs through casnix too).
			c.Run(t, append([]string{"nix", "store", "sign", "--key-file", key, "--store", d.URL(), "-r"}, roots...)...)
			v := c.Try(append([]string{"nix", "store", "verify", "--store", back, "--sigs-needed", "1",
				"--option", "trusted-public-keys", f.PublicKeys[0], "-r"}, roots...)...)
			if !v.OK() {
				t.Errorf("nix store verify --sigs-needed 1 after signing through casnix:\n%s", v)
			}
			unsigned := c.Try("nix", "store", "verify", "--store", back, "--sigs-needed", "1",
				"--option", "trusted-public-keys", f.PublicKeys[1], f.Path(t, "random-copy"))
			if unsigned.OK() {
				t.Errorf("nix store verify accepted a path without a signature by a trusted key")
			}

			checkAddOps(t, c, d, cas)

			// ssh-ng:// through casnix serve --stdio, into a second data dir.
			cas2 := nixtest.NewCasnix(t)
			ssh := sshd.StoreURL([]string{cas2.Bin, "--data-dir", cas2.DataDir, "serve"})
			sub := roots[:4]
			c.Run(t, append([]string{"nix", "copy", "--no-check-sigs", "--from", from, "--to", ssh}, sub...)...)
			subClosure := f.Closure(t, sub...)
			for _, p := range subClosure {
				if dg := cas2.Dump(t, p); dg != srcDumps[p] {
					t.Errorf("after nix copy --to ssh-ng: casnix dump %s: %s, source %s", p, dg, srcDumps[p])
				}
			}
			dest2 := "local?root=" + filepath.Join(c.TempDir(t), "dest2")
			c.Run(t, append([]string{"nix", "copy", "--from", ssh, "--to", dest2}, sub...)...)
			checkNixVerify(t, c, dest2)
			if r := cas.Try("verify"); !r.OK() {
				t.Errorf("casnix verify after the writes:\n%s", r)
			}
			checkServeLog(t, d)
			t.Logf("Nix %s: subtest in %s", c.Version(t), time.Since(start).Round(time.Millisecond))
		})
	}
}

// checkNixVerify runs nix store verify --all on a store and fails on any complaint.
func checkNixVerify(t *testing.T, c *nixtest.NixClient, store string) {
	t.Helper()
	v := c.Run(t, "nix", "store", "verify", "--all", "--no-trust", "--store", store)
	for _, l := range strings.Split(strings.TrimSpace(nixtest.StripNixNoise(v.Stderr)), "\n") {
		if l != "" && !strings.HasPrefix(l, "checking '") {
			t.Errorf("nix store verify --all --store %s complained:\n%s", store, v.Stderr)
			break
		}
	}
}

// checkAddOps adds files and directories through the daemon with nix-store --add, nix
// store add-path and nix store add-file, and checks each path equals what the same Nix
// computes in a local store, and casnix's NAR equals nix-store --dump of the source.
func checkAddOps(t *testing.T, c *nixtest.NixClient, d *nixtest.Daemon, cas *nixtest.Casnix) {
	t.Helper()
	work := c.TempDir(t)
	dir := filepath.Join(work, "tree-"+c.Suite)
	os.MkdirAll(filepath.Join(dir, "sub"), 0o755)
	os.WriteFile(filepath.Join(dir, "sub", "x"), []byte("x of "+c.Suite+"\n"), 0o755)
	os.WriteFile(filepath.Join(dir, "y"), []byte(strings.Repeat("y", 100000)), 0o644)
	os.Symlink("sub/x", filepath.Join(dir, "link"))
	file := filepath.Join(work, "file-"+c.Suite+".txt")
	os.WriteFile(file, []byte("a file of "+c.Suite+"\n"), 0o644)
	local := "local?root=" + filepath.Join(work, "local")
	for _, args := range [][]string{
		{"nix-store", "--add", dir},
		{"nix-store", "--add-fixed", "sha1", file},
		{"nix", "store", "add-path", dir, "--name", "renamed"},
		{"nix", "store", "add-file", file},
	} {
		viaCasnix := c.Run(t, append(args[:1:1], append([]string{"--store", d.URL()}, args[1:]...)...)...)
		viaLocal := c.Run(t, append(args[:1:1], append([]string{"--store", local}, args[1:]...)...)...)
		p := strings.TrimSpace(string(viaCasnix.Stdout))
		if lp := strings.TrimSpace(string(viaLocal.Stdout)); p != lp || p == "" {
			t.Errorf("%s: casnix made %q, a local store %q", strings.Join(args, " "), p, lp)
			continue
		}
		src := dir
		if strings.Contains(strings.Join(args, " "), "file") {
			src = file
		}
		w := nixtest.NewDigestWriter()
		dump := c.Cmd("nix-store", "--dump", src)
		dump.Stdout = w
		dump.Run(t)
		if dg := cas.Dump(t, p); dg != w.Digest() {
			t.Errorf("%s: casnix dump %s, nix-store --dump of the source %s", strings.Join(args, " "), dg, w.Digest())
		}
	}
}

// TestUntrustedWrites connects as a second, untrusted user (nobody) with host Nix 2.8: an
// unsigned input-addressed path is refused with Nix's error, the same path signed by a
// key casnix trusts is accepted, a content-addressed path needs no signature, and adding
// signatures or deleting paths is refused.
func TestUntrustedWrites(t *testing.T) {
	nixtest.RequireHostNix(t)
	f := nixtest.PopulateFixture(t)
	sockDir := t.TempDir()
	cas := nixtest.NewCasnix(t)
	d := cas.Serve(t, filepath.Join(sockDir, "casnix.sock"), "--trusted-public-keys", f.PublicKeys[0])
	// nobody's own copy of the source store, and a home.
	work := t.TempDir()
	for _, p := range []string{sockDir, work, filepath.Dir(work), filepath.Dir(sockDir)} {
		os.Chmod(p, 0o755)
	}
	src := filepath.Join(work, "src")
	nixtest.Run(t, "cp", "-a", f.Root, src)
	key := filepath.Join(work, "key.sec")
	nixtest.Run(t, "cp", f.SecretKeys[0], key)
	home := filepath.Join(work, "home")
	os.MkdirAll(home, 0o755)
	nixtest.Run(t, "chown", "-R", "65534:65534", src, key, home)
	nobody := func(args ...string) *nixtest.Result {
		cmd := &nixtest.Cmd{Name: "setpriv", Args: append([]string{"--reuid=65534", "--regid=65534", "--clear-groups", "--"}, args...),
			Env: append(nixtest.NixEnv(t), "HOME="+home, "XDG_CACHE_HOME="+filepath.Join(home, ".cache"), "USER=nobody",
				"NIX_CONFIG=extra-experimental-features = nix-command")}
		return cmd.Try()
	}
	from := "local?root=" + src
	ia := f.Path(t, "diamond-top")    // input-addressed, signed below
	iaUnsigned := f.Path(t, "random") // input-addressed, never signed
	r := nobody("nix", "copy", "--from", from, "--to", d.URL(), iaUnsigned)
	if r.OK() || !strings.Contains(string(r.Stderr), "lacks a signature by a trusted key") {
		t.Errorf("untrusted copy of an unsigned input-addressed path:\n%s", r)
	}
	if ok := cas.Try("path-info", iaUnsigned); ok.OK() {
		t.Errorf("%s became valid from a refused copy", iaUnsigned)
	}
	r = nobody("nix", "copy", "--no-check-sigs", "--from", from, "--to", d.URL(), iaUnsigned)
	if r.OK() {
		t.Errorf("an untrusted client waived the signature check:\n%s", r)
	}
	// Signed (with its closure) by the key casnix trusts: accepted.
	r = nobody("nix", "store", "sign", "--store", from, "--key-file", key, "-r", ia)
	if !r.OK() {
		t.Fatalf("nix store sign in nobody's store:\n%s", r)
	}
	r = nobody("nix", "copy", "--from", from, "--to", d.URL(), ia)
	if !r.OK() {
		t.Errorf("untrusted copy of signed paths refused:\n%s", r)
	} else if dg := cas.Dump(t, ia); dg != f.Dump(t, ia) {
		t.Errorf("casnix dump %s differs from the source", ia)
	}
	// Content-addressed: no signature needed.
	file := filepath.Join(home, "ca.txt")
	os.WriteFile(file, []byte("content-addressed by nobody\n"), 0o644)
	r = nobody("nix", "store", "add-file", "--store", d.URL(), file)
	if !r.OK() {
		t.Errorf("untrusted add-file refused:\n%s", r)
	}
	caPath := strings.TrimSpace(string(r.Stdout))
	caSrc := f.Path(t, "add-dir")
	r = nobody("nix", "copy", "--from", from, "--to", d.URL(), caSrc)
	if !r.OK() {
		t.Errorf("untrusted copy of a content-addressed path refused:\n%s", r)
	}
	// No signatures, no deletions.
	key2 := filepath.Join(work, "key2.sec")
	nixtest.Run(t, "cp", f.SecretKeys[1], key2)
	nixtest.Run(t, "chown", "65534:65534", key2)
	r = nobody("nix", "store", "sign", "--store", d.URL(), "--key-file", key2, caPath)
	if r.OK() || !strings.Contains(string(r.Stderr), "not privileged") {
		t.Errorf("untrusted nix store sign through casnix:\n%s", r)
	}
	r = nobody("nix-store", "--store", d.URL(), "--delete", caPath)
	if r.OK() {
		t.Errorf("untrusted delete allowed:\n%s", r)
	}
	if !cas.Try("path-info", caPath).OK() {
		t.Errorf("%s deleted by an untrusted client", caPath)
	}
	// The handshake tells the client it is not trusted.
	r = nobody("nix", "store", "ping", "--store", d.URL())
	if !r.OK() {
		t.Errorf("nix store ping as nobody:\n%s", r)
	}
	checkServeLog(t, d)

	// With allowed-users narrowed to root, nobody cannot connect at all, and is told why.
	d2 := cas.Serve(t, filepath.Join(sockDir, "root-only.sock"), "--allowed-users", "root")
	r = nobody("nix", "store", "ping", "--store", d2.URL())
	if r.OK() || !strings.Contains(string(r.Stderr), "not allowed to connect") {
		t.Errorf("nix store ping as nobody with --allowed-users root:\n%s", r)
	}
	if r := (&nixtest.Cmd{Name: "nix", Args: []string{"store", "ping", "--store", d2.URL()}, Env: nixtest.NixEnv(t)}).Try(); !r.OK() {
		t.Errorf("root refused with --allowed-users root:\n%s", r)
	}
}

// TestConcurrentCopies runs 8 nix copy --to unix:// at once, of overlapping closures, into
// one casnix: every path arrives once, with the source's path-info, and verify is clean.
func TestConcurrentCopies(t *testing.T) {
	nixtest.RequireHostNix(t)
	f := nixtest.PopulateFixture(t)
	cas := nixtest.NewCasnix(t)
	d := cas.Serve(t, filepath.Join(t.TempDir(), "casnix.sock"))
	var roots []string
	for _, n := range writeRoots {
		roots = append(roots, f.Path(t, n))
	}
	from := "local?root=" + f.Root
	var wg sync.WaitGroup
	errs := make([]*nixtest.Result, 8)
	for i := range 8 {
		// Client i copies a window of roots overlapping its neighbours'.
		sub := []string{roots[i%len(roots)], roots[(i+1)%len(roots)], roots[(i+5)%len(roots)], roots[0]}
		wg.Add(1)
		go func() {
			defer wg.Done()
			cmd := &nixtest.Cmd{Name: "nix", Args: append([]string{"copy", "--no-check-sigs", "--from", from, "--to", d.URL()}, sub...), Env: nixtest.NixEnv(t)}
			if r := cmd.Try(); !r.OK() {
				errs[i] = r
			}
		}()
	}
	wg.Wait()
	for i, r := range errs {
		if r != nil {
			t.Errorf("copy %d failed:\n%s", i, r)
		}
	}
	var copied []string
	for i := range 8 {
		copied = append(copied, roots[i%len(roots)], roots[(i+1)%len(roots)], roots[(i+5)%len(roots)])
	}
	closure := f.Closure(t, copied...)
	want := f.PathInfos(t, closure...)
	all := casnixAll(t, cas)
	if !slices.Equal(all, closure) {
		t.Fatalf("casnix holds %d paths, want the %d of the union of the closures", len(all), len(closure))
	}
	got := cas.PathInfos(t, closure...)
	for _, p := range closure {
		if diff := nixtest.ComparePathInfo(got[p], want[p]); len(diff) > 0 {
			t.Errorf("%s: %s", p, strings.Join(diff, "; "))
		}
	}
	if r := cas.Try("verify"); !r.OK() {
		t.Errorf("casnix verify:\n%s", r)
	}
	checkServeLog(t, d)
}

// casnixAll lists casnix's valid paths, sorted.
func casnixAll(t *testing.T, cas *nixtest.Casnix) []string {
	t.Helper()
	var out []string
	for _, l := range nixtest.SortedLines(cas.Run(t, "path-info", "--all").Stdout) {
		out = append(out, strings.Fields(l)[0])
	}
	return out
}

// TestGCThroughDaemon collects garbage through the daemon with each real Nix client:
// nix-store --gc --print-dead/--print-roots, a root made with nix-store --realise
// --add-root (a client-side symlink registered as an indirect root), nix-store --gc
// deleting everything else, nix-store --delete refused for a live path and done once its
// root is gone; casnix verify stays clean and the kept closure dumps byte-identical.
func TestGCThroughDaemon(t *testing.T) {
	nixtest.CasnixBinary(t)
	f := nixtest.PopulateFixture(t)
	var roots []string
	for _, n := range writeRoots {
		roots = append(roots, f.Path(t, n))
	}
	closure := f.Closure(t, roots...)
	keep := f.Path(t, "diamond-top")
	kept := f.Closure(t, keep)
	for _, suite := range nixtest.ClientSuites {
		t.Run(suite, func(t *testing.T) {
			c := nixtest.RequireNixClient(t, suite)
			sockDir := t.TempDir()
			cas := nixtest.NewCasnix(t)
			d := cas.Serve(t, filepath.Join(sockDir, "casnix.sock"))
			linkDir := t.TempDir()
			c.Bind(sockDir, linkDir)
			src := f.Root
			if !c.IsHost() {
				src = copyStoreRoot(t, f.Root, filepath.Join(c.TempDir(t), "src")).Root
			}
			c.Run(t, append([]string{"nix", "copy", "--no-check-sigs", "--from", "local?root=" + src, "--to", d.URL()}, roots...)...)
			dead := nixtest.SortedLines(c.Run(t, "nix-store", "--store", d.URL(), "--gc", "--print-dead").Stdout)
			if !slices.Equal(dead, closure) {
				t.Errorf("--print-dead with no roots lists %d paths, want all %d", len(dead), len(closure))
			}
			link := filepath.Join(linkDir, "result")
			c.Run(t, "nix-store", "--store", d.URL(), "--realise", keep, "--add-root", link, "--indirect")
			if target, err := os.Readlink(link); err != nil || target != keep {
				t.Fatalf("root link %s -> %q (%v), want %s", link, target, err, keep)
			}
			printed := string(c.Run(t, "nix-store", "--store", d.URL(), "--gc", "--print-roots").Stdout)
			if !strings.Contains(printed, link) || !strings.Contains(printed, keep) {
				t.Errorf("--print-roots does not show %s -> %s:\n%s", link, keep, printed)
			}
			r := c.Try("nix-store", "--store", d.URL(), "--delete", keep)
			if r.OK() || !strings.Contains(string(r.Stderr), "alive") {
				t.Errorf("nix-store --delete of a rooted path:\n%s", r)
			}
			gc := c.Run(t, "nix-store", "--store", d.URL(), "--gc")
			if !strings.Contains(string(gc.Stdout)+string(gc.Stderr), "store paths deleted") {
				t.Errorf("nix-store --gc printed no summary:\n%s", gc)
			}
			if all := casnixAll(t, cas); !slices.Equal(all, kept) {
				t.Errorf("after nix-store --gc casnix holds %q, want the root's closure %q", all, kept)
			}
			for _, p := range kept {
				if got, want := cas.Dump(t, p), f.Dump(t, p); got != want {
					t.Errorf("%s after GC: dump %s, source %s", p, got, want)
				}
			}
			os.Remove(link)
			c.Run(t, "nix-store", "--store", d.URL(), "--delete", keep)
			if cas.Try("path-info", keep).OK() {
				t.Errorf("%s still valid after nix-store --delete", keep)
			}
			if r := cas.Try("verify"); !r.OK() {
				t.Errorf("casnix verify after GC through the daemon:\n%s", r)
			}
			checkServeLog(t, d)
		})
	}
}
