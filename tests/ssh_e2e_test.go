package tests

import (
	"maps"
	"path/filepath"
	"slices"
	"strings"
	"sync"
	"testing"
	"time"

	"github.com/casnix/casnix/tests/nixtest"
)

// TestServeSSHNG serves the imported fixture store over ssh-ng:// with `casnix serve
// --stdio` as the remote program of an sshd of the test's own on a loopback port, and with
// each real Nix client (2.8 on the host, 2.26 and 2.34 in roots): `nix copy --from` a few
// closures into a fresh local store, which `nix store verify --all` then finds intact and
// whose path-info equals the source's; `nix path-info --json --recursive` through ssh-ng;
// and `nix store dump-path` of paths of every kind, byte-identical to `nix-store --dump` of
// the source. Unlike unix://, ssh-ng moves file contents through the protocol
// (NarFromPath).
func TestServeSSHNG(t *testing.T) {
	start := time.Now()
	sf := newServedFixture(t)
	sshd := nixtest.StartSSHD(t)
	// Nix appends " --stdio" to remote-program (2.8: one string the remote shell splits;
	// newer: a list of words), so the words below reach casnix as its arguments.
	store := sshd.StoreURL([]string{sf.Cas.Bin, "--data-dir", sf.Cas.DataDir, "serve"})
	t.Logf("fixture imported and sshd on port %d ready in %s; store %s", sshd.Port, time.Since(start).Round(time.Millisecond), store)

	var roots []string
	for _, name := range []string{"diamond-top", "uses-fod", "uses-dev", "uses-text", "tree", "self-ref", "random-copy", "add-dir", "add-fixed-rec-sha512", "symlink"} {
		roots = append(roots, sf.Path(t, name))
	}
	closure := sf.Closure(t, roots...)
	wantClosure := map[string]nixtest.PathInfo{}
	for _, p := range closure {
		wantClosure[p] = sf.Want[p]
	}
	var dumps []string
	for _, name := range []string{"tree", "random", "random-copy", "big-file", "file", "empty-file", "exe", "empty-dir", "symlink", "dangling", "weird-name", "self-ref", "multi.doc", "add-dir", "add-symlink", "add-fixed-exe", "fod-flat-sha1", "text"} {
		dumps = append(dumps, sf.Path(t, name))
	}
	srcDumps := map[string]nixtest.Digest{}
	for _, p := range dumps {
		srcDumps[p] = sf.Dump(t, p)
	}

	for _, suite := range nixtest.ClientSuites {
		t.Run(suite, func(t *testing.T) {
			start := time.Now()
			c := nixtest.RequireNixClient(t, suite)
			c.Bind(sshd.Dir)
			c.Env = append(c.Env, "NIX_SSHOPTS="+sshd.NixSSHOpts())

			// Metadata through ssh-ng.
			r := c.Run(t, append(append(c.PathInfoJSONArgs(t), "--recursive", "--store", store), roots...)...)
			got, err := nixtest.ParsePathInfoJSON(r.Stdout)
			if err != nil {
				t.Fatalf("nix path-info --json through ssh-ng: %v\n%s", err, clipOutput(r.Stdout))
			}
			if d := diffPathInfos(got, wantClosure); len(d) > 0 {
				t.Errorf("nix path-info --json --recursive through ssh-ng differs from the source in %d paths:\n%s", len(d), strings.Join(d, "\n"))
			}

			// nix copy --from into a fresh local store, then verify it there. (Nix 2.26
			// closes the ssh-ng connection after each path it copies and opens a new one,
			// with casnix as with nix-daemon, so this takes a second per path there.)
			dest := filepath.Join(c.TempDir(t), "dest")
			destURL := "local?root=" + dest
			copyStart := time.Now()
			c.Run(t, append([]string{"nix", "copy", "--from", store, "--to", destURL}, roots...)...)
			t.Logf("nix copy --from ssh-ng of %d paths in %s", len(closure), time.Since(copyStart).Round(time.Millisecond))
			all := nixtest.SortedLines(c.Output(t, "nix", "path-info", "--all", "--store", destURL))
			if !slices.Equal(all, closure) {
				t.Errorf("after nix copy the local store holds\n%q\nwant the closure\n%q", all, closure)
			}
			// --no-trust: copied paths are not ultimately trusted there, and most carry no
			// signatures; the contents are what is checked.
			v := c.Run(t, "nix", "store", "verify", "--all", "--no-trust", "--store", destURL)
			for _, l := range strings.Split(strings.TrimSpace(string(v.Stderr)), "\n") {
				if l != "" && !strings.HasPrefix(l, "checking '") {
					t.Errorf("nix store verify --all in the copy complained:\n%s", v.Stderr)
					break
				}
			}
			copied, err := nixtest.ParsePathInfoJSON(c.Output(t, append(c.PathInfoJSONArgs(t), "--all", "--store", destURL)...))
			if err != nil {
				t.Fatal(err)
			}
			for _, p := range closure {
				if d := nixtest.ComparePathInfo(copied[p], sf.Want[p]); len(d) > 0 {
					t.Errorf("%s copied through ssh-ng: %s", p, strings.Join(d, "; "))
				}
			}
			// And the files are there: the NAR of the copy equals the source's.
			for _, p := range []string{sf.Path(t, "tree"), sf.Path(t, "random-copy")} {
				w := nixtest.NewDigestWriter()
				cmd := c.Cmd("nix-store", "--dump", filepath.Join(dest, p))
				cmd.Stdout = w
				if r := cmd.Try(); !r.OK() {
					t.Errorf("dump of the copy of %s failed:\n%s", p, r)
				} else if w.Digest() != srcDumps[p] {
					t.Errorf("copy of %s: NAR %s, source %s", p, w.Digest(), srcDumps[p])
				}
			}

			// nix store dump-path through ssh-ng: the NAR comes from casnix.
			// A few at a time: each is an ssh login and a casnix serve --stdio of its own.
			dumpStart := time.Now()
			var wg sync.WaitGroup
			jobs := make(chan string)
			for range 3 {
				wg.Add(1)
				go func() {
					defer wg.Done()
					for p := range jobs {
						w := nixtest.NewDigestWriter()
						cmd := c.Cmd("nix", "store", "dump-path", "--store", store, p)
						cmd.Stdout = w
						r := cmd.Try()
						if !r.OK() {
							t.Errorf("nix store dump-path %s through ssh-ng failed:\n%s", p, r)
						} else if w.Digest() != srcDumps[p] {
							t.Errorf("nix store dump-path %s through ssh-ng: %s, nix-store --dump of the source: %s", p, w.Digest(), srcDumps[p])
						}
						// casnix serve --stdio's log reaches the client's stderr through ssh.
						for _, bad := range []string{"panic:", "fatal error:", "level=ERROR"} {
							if strings.Contains(string(r.Stderr), bad) {
								t.Errorf("nix store dump-path %s: casnix logged %q:\n%s", p, bad, r.Stderr)
							}
						}
					}
				}()
			}
			for _, p := range slices.Sorted(maps.Keys(srcDumps)) {
				jobs <- p
			}
			close(jobs)
			wg.Wait()
			t.Logf("Nix %s: %d dump-paths in %s; subtest %s", c.Version(t), len(srcDumps), time.Since(dumpStart).Round(time.Millisecond), time.Since(start).Round(time.Millisecond))
		})
	}
	if t.Failed() {
		t.Logf("sshd output:\n%s", sshd.Output())
	}
}
