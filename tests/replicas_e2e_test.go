package tests

import (
	"fmt"
	"net"
	"net/url"
	"os"
	"path/filepath"
	"slices"
	"strings"
	"testing"
	"time"

	"github.com/casnix/casnix/tests/nixtest"
)

// freeAddr is a loopback TCP address free now.
func freeAddr(t *testing.T) string {
	t.Helper()
	ln, err := net.Listen("tcp", "127.0.0.1:0")
	if err != nil {
		t.Fatal(err)
	}
	defer ln.Close()
	return ln.Addr().String()
}

// TestReplicas: a primary whose packs and database are in a real S3 server (SeaweedFS on
// loopback) and two read replicas, each `casnix serve --replica-of` in a process and data
// dir of its own. Real Nix 2.34 copies a closure into the primary; within the measured
// lag both replicas answer nix path-info equal to the primary's; nix copy --from each
// replica's HTTP cache verifies; a write to a replica is refused naming the primary; and
// a Local Overlay Store (Nix 2.26 and 2.34) with a replica's mount as its lower store
// builds on those paths, only the build's output landing in the upper layer.
func TestReplicas(t *testing.T) {
	s3 := nixtest.StartS3(t)
	s3.SetEnv(t) // the casnix processes inherit the credentials
	bin := nixtest.CasnixBinary(t)
	farm := s3.URL("farm")
	r := nixtest.RequireRoot(t, "sid")
	t.Logf("Nix %s", r.NixVersion(t))
	if err := os.WriteFile(r.HostPath("/tmp/l.nix"), []byte(lazyNix), 0o644); err != nil {
		t.Fatal(err)
	}
	paths := map[string]string{}
	for _, a := range []string{"dep", "prog", "input"} {
		paths[a] = strings.TrimSpace(string(r.Output(t, "nix", "build", "--store", "local?root=/tmp/src",
			"--no-link", "--print-out-paths", "-f", "/tmp/l.nix", a)))
	}
	closure := []string{paths["dep"], paths["prog"], paths["input"]}
	slices.Sort(closure)

	primaryDir := t.TempDir()
	primary := startCasnixServe(t, bin, t.TempDir(), primaryDir, "", "--packs", farm,
		"--upload-within", "1s", "--db-sync-interval", "200ms")
	// A second primary on the same bucket is refused, naming the first.
	second := &nixtest.Cmd{Name: bin, Args: []string{"-d", t.TempDir(), "serve", "--socket", filepath.Join(t.TempDir(), "s"), "--packs", farm}, Timeout: time.Minute}
	if res := second.Try(); res.OK() ||
		!strings.Contains(string(res.Stderr), "another primary holds") {
		t.Fatalf("a second primary on the bucket:\n%s", res)
	}
	type replica struct {
		srv  *casnixServer
		dir  string
		http string
	}
	var reps []replica
	for range 2 {
		dir, addr := t.TempDir(), freeAddr(t)
		srv := startCasnixServe(t, bin, t.TempDir(), dir, "", "--replica-of", farm, "--follow-interval", "200ms",
			"--http", addr, "--cache-size", "64MiB")
		reps = append(reps, replica{srv, dir, addr})
	}
	r.Bind(primaryDir, reps[0].dir, reps[1].dir)

	r.Run(t, "nix", "copy", "--no-check-sigs", "--from", "local?root=/tmp/src", "--to", "unix://"+primary.sock, paths["prog"], paths["input"])
	copied := time.Now()
	want := r.PathInfos(t, "unix://"+primary.sock, closure...)
	// Both replicas polled together: the time each first has the whole closure.
	lag := make([]time.Duration, len(reps))
	for left := len(reps); left > 0; {
		for i, rep := range reps {
			if lag[i] > 0 {
				continue
			}
			if res := r.Try(append([]string{"nix", "path-info", "--store", "unix://" + rep.srv.sock}, closure...)...); res.OK() {
				lag[i] = time.Since(copied)
				left--
			} else if time.Since(copied) > 2*time.Minute {
				t.Fatalf("replica %d: the closure is not there 2 minutes after the copy:\n%s", i, res)
			}
		}
		time.Sleep(50 * time.Millisecond)
	}
	t.Logf("the closure is on the replicas %v after nix copy returned (upload window 1s, database sync 200ms, follow 200ms; each poll a nix path-info)", lag)
	for i, rep := range reps {
		store := "unix://" + rep.srv.sock
		got := r.PathInfos(t, store, closure...)
		for _, p := range closure {
			if diff := nixtest.ComparePathInfo(got[p], want[p]); len(diff) > 0 {
				t.Errorf("replica %d, %s: %v", i, p, diff)
			}
		}
		// Its HTTP cache: nix copy checks every NAR against its narinfo's hash.
		dst := fmt.Sprintf("/tmp/dst%d", i)
		r.Run(t, "nix", "copy", "--no-check-sigs", "--from", "http://"+rep.http, "--to", "local?root="+dst, closure[0], closure[1], closure[2])
		r.Run(t, "nix", "store", "verify", "--store", "local?root="+dst, "--no-trust", closure[0], closure[1], closure[2])
	}

	// A write to a replica is refused, naming the primary.
	extra := strings.TrimSpace(string(r.Output(t, "nix", "build", "--store", "local?root=/tmp/src",
		"--no-link", "--print-out-paths", "--impure", "--expr", `builtins.derivation { name = "extra"; system = builtins.currentSystem; builder = "/bin/busybox"; args = [ "sh" "-c" "echo extra > $out" ]; }`)))
	res := r.Try("nix", "copy", "--no-check-sigs", "--from", "local?root=/tmp/src", "--to", "unix://"+reps[1].srv.sock, extra)
	if res.OK() || !strings.Contains(string(res.Stderr), "read replica of") {
		t.Errorf("a write to a replica:\n%s", res)
	}

	// A Local Overlay Store on replica 0, with Nix 2.34 and 2.26.
	for _, suite := range []string{"sid", "trixie"} {
		o := r
		if suite != "sid" {
			o = nixtest.RequireRoot(t, suite)
			o.Bind(reps[0].dir)
			if err := os.WriteFile(o.HostPath("/tmp/l.nix"), []byte(lazyNix), 0o644); err != nil {
				t.Fatal(err)
			}
		}
		o.Run(t, "mkdir", "-p", "/tmp/upper", "/tmp/work")
		mnt := reps[0].srv.mnt
		o.Setup = "mount -t overlay overlay -o lowerdir=" + mnt + ",upperdir=/tmp/upper,workdir=/tmp/work /nix/store"
		lower := "unix://" + reps[0].srv.sock + "?real=" + mnt
		store := "local-overlay://?lower-store=" + url.QueryEscape(lower) + "&upper-layer=/tmp/upper"
		if out := o.Output(t, paths["prog"]+"/bin/prog"); string(out) != "dep-data\n" {
			t.Fatalf("Nix %s: the program from the replica printed %q", o.NixVersion(t), out)
		}
		app := strings.TrimSpace(string(o.Output(t, "nix", "build", "--option", "sandbox", "true", "--store", store,
			"--out-link", "/tmp/result", "--print-out-paths", "-f", "/tmp/l.nix", "app")))
		if out := o.Output(t, "cat", app); string(out) != "input\ndep-data\n"+paths["input"]+"\n" {
			t.Fatalf("Nix %s: %s holds %q", o.NixVersion(t), app, out)
		}
		if _, err := os.Stat(o.HostPath("/tmp/upper/" + filepath.Base(app))); err != nil {
			t.Fatalf("Nix %s: the built path is not in the upper layer: %v", o.NixVersion(t), err)
		}
		for _, p := range closure {
			if _, err := os.Stat(o.HostPath("/tmp/upper/" + filepath.Base(p))); err == nil {
				t.Errorf("Nix %s: the replica's path %s was copied into the upper layer", o.NixVersion(t), p)
			}
		}
		o.Run(t, "nix", "store", "verify", "--store", store, "--all", "--no-trust")
		o.Setup = ""
	}
}
