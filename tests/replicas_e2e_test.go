package tests

import (
	"fmt"
	"net/url"
	"os"
	"path/filepath"
	"slices"
	"strings"
	"syscall"
	"testing"
	"time"

	"github.com/casnix/casnix/tests/nixtest"
)

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
	build := func(name, script string) string {
		return strings.TrimSpace(string(r.Output(t, "nix", "build", "--store", "local?root=/tmp/src", "--no-link", "--print-out-paths", "--impure", "--expr",
			`builtins.derivation { name = "`+name+`"; system = builtins.currentSystem; builder = "/bin/busybox"; args = [ "sh" "-c" "`+script+`" ]; }`)))
	}
	// 40 MiB that do not compress: more than a replica's cache budget.
	paths["big"] = build("big", "dd if=/dev/urandom of=$out bs=1048576 count=40")
	closure := []string{paths["dep"], paths["prog"], paths["input"], paths["big"]}
	slices.Sort(closure)

	primaryDir := t.TempDir()
	cas := nixtest.NewCasnix(t)
	primarySock := filepath.Join(primaryDir, "daemon.sock")
	primaryArgs := []string{"--packs", farm, "--upload-within", "1s", "--db-sync-interval", "200ms"}
	primary := cas.Serve(t, primarySock, primaryArgs...)
	// A second primary on the same bucket is refused, naming the first.
	second := &nixtest.Cmd{Name: bin, Args: []string{"-d", t.TempDir(), "serve", "--socket", filepath.Join(t.TempDir(), "s"), "--packs", farm}, Timeout: time.Minute}
	if res := second.Try(); res.OK() ||
		!strings.Contains(string(res.Stderr), "another primary holds") {
		t.Fatalf("a second primary on the bucket:\n%s", res)
	}
	type replica struct {
		srv       *casnixServer
		dir, data string
		http      string
	}
	const cacheBudget = 16 << 20 // under the closure's size: the replicas' caches evict
	var reps []replica
	for range 2 {
		dir, data, addr := t.TempDir(), t.TempDir(), freeAddr(t)
		srv := startCasnixServe(t, bin, data, dir, "", "--replica-of", farm, "--follow-interval", "200ms",
			"--http", addr, "--cache-size", fmt.Sprint(cacheBudget))
		reps = append(reps, replica{srv, dir, data, addr})
	}
	r.Bind(primaryDir, reps[0].dir, reps[1].dir)

	r.Run(t, "nix", "copy", "--no-check-sigs", "--from", "local?root=/tmp/src", "--to", "unix://"+primarySock, paths["prog"], paths["input"], paths["big"])
	copied := time.Now()
	want := r.PathInfos(t, "unix://"+primarySock, closure...)
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
		r.Run(t, append([]string{"nix", "copy", "--no-check-sigs", "--from", "http://" + rep.http, "--to", "local?root=" + dst}, closure...)...)
		r.Run(t, append([]string{"nix", "store", "verify", "--store", "local?root=" + dst, "--no-trust"}, closure...)...)
	}

	// casnix verify on a replica reads every frame from the bucket and renders every NAR
	// through its cache, which stays within its budget (the flag is per process: each
	// process using the data dir keeps its own view of the cache within it).
	if n := duBytes(t, filepath.Join(reps[0].data, "s3cache")); n > cacheBudget+4<<20 {
		t.Errorf("replica cache holds %d bytes after serving the closure, budget %d:\n%s", n, cacheBudget, nixtest.Run(t, "find", filepath.Join(reps[0].data), "-ls"))
	}
	nixtest.Run(t, bin, "-d", reps[0].data, "--cache-size", fmt.Sprint(cacheBudget), "verify")
	if n := duBytes(t, filepath.Join(reps[0].data, "s3cache")); n > cacheBudget+4<<20 {
		t.Errorf("replica cache holds %d bytes after a verify of everything, budget %d", n, cacheBudget)
	}

	// A write to a replica is refused, naming the primary.
	extra := build("extra", "echo extra > $out")
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

	// The primary killed (SIGKILL): the replicas go on serving what they have; the
	// primary restarts on its data dir with no manual step (it takes its own lease
	// back), and what it takes then reaches the replicas.
	if err := syscall.Kill(primary.Pid(), syscall.SIGKILL); err != nil {
		t.Fatal(err)
	}
	for i, rep := range reps {
		r.Run(t, append([]string{"nix", "path-info", "--store", "unix://" + rep.srv.sock}, closure...)...)
		r.Run(t, "nix", "copy", "--no-check-sigs", "--from", "http://"+rep.http, "--to", fmt.Sprintf("local?root=/tmp/killed%d", i), paths["prog"])
	}
	primary = cas.Serve(t, primarySock, primaryArgs...)
	after := build("after-kill", "echo after-kill > $out")
	r.Run(t, "nix", "copy", "--no-check-sigs", "--from", "local?root=/tmp/src", "--to", "unix://"+primarySock, after)
	waitOnReplicas := func(p string, within time.Duration, since string) {
		t.Helper()
		start := time.Now()
		for i, rep := range reps {
			for {
				if res := r.Try("nix", "path-info", "--store", "unix://"+rep.srv.sock, p); res.OK() {
					break
				}
				if time.Since(start) > within {
					t.Fatalf("replica %d: %s not there %s after it was copied", i, p, within)
				}
				time.Sleep(100 * time.Millisecond)
			}
		}
		t.Logf("%s on both replicas %s after %s", filepath.Base(p), time.Since(start).Round(time.Millisecond), since)
	}
	waitOnReplicas(after, 2*time.Minute, "its copy into the restarted primary")

	// The S3 server down for a minute: the primary takes writes (acknowledged once on its
	// disk, the promise of the default mode), replicas answer path-info and serve what
	// their caches hold; once the server is back, everything reaches the replicas.
	r.Run(t, "nix", "copy", "--no-check-sigs", "--from", "http://"+reps[1].http, "--to", "local?root=/tmp/warm", paths["prog"])
	s3.Stop()
	down := time.Now()
	during := build("during-outage", "echo during > $out")
	r.Run(t, "nix", "copy", "--no-check-sigs", "--from", "local?root=/tmp/src", "--to", "unix://"+primarySock, during)
	r.Run(t, append([]string{"nix", "path-info", "--store", "unix://" + reps[1].srv.sock}, closure...)...)
	r.Run(t, "nix", "copy", "--no-check-sigs", "--from", "http://"+reps[1].http, "--to", "local?root=/tmp/cached", paths["prog"])
	if res := r.Try("nix", "path-info", "--store", "unix://"+reps[1].srv.sock, during); res.OK() {
		t.Errorf("a replica shows %s while its data cannot be in the bucket", during)
	}
	time.Sleep(time.Minute - time.Since(down))
	s3.Start(t)
	waitOnReplicas(during, 3*time.Minute, "the S3 server accepted writes again")
	if err := primary.Stop(30 * time.Second); err != nil {
		t.Errorf("primary: %v", err)
	}
}

// duBytes is the disk space the files under dir take.
func duBytes(t *testing.T, dir string) int64 {
	t.Helper()
	var n int64
	err := filepath.Walk(dir, func(_ string, fi os.FileInfo, err error) error {
		if err != nil {
			return err
		}
		if !fi.IsDir() {
			n += fi.Size()
		}
		return nil
	})
	if err != nil {
		t.Fatal(err)
	}
	return n
}

// TestRestorePrimaryFromBucket: a primary's whole data dir is lost (SIGKILL, then
// deleted). `casnix restore s3://…` of its prefix brings back every path whose data had
// reached the bucket, leaves out (and names) the one written inside the upload window, and
// the restored data dir verifies against the bucket, serves as the primary again (its own
// lease) and takes the lost path anew.
func TestRestorePrimaryFromBucket(t *testing.T) {
	s3 := nixtest.StartS3(t)
	s3.SetEnv(t)
	url := s3.URL("lost")
	r := nixtest.RequireRoot(t, "sid")
	build := func(name string) string {
		return strings.TrimSpace(string(r.Output(t, "nix", "build", "--store", "local?root=/tmp/src", "--no-link", "--print-out-paths", "--impure", "--expr",
			`builtins.derivation { name = "`+name+`"; system = builtins.currentSystem; builder = "/bin/busybox"; args = [ "sh" "-c" "echo `+name+` > $out" ]; }`)))
	}
	uploaded, late := build("uploaded"), build("late")
	dir := t.TempDir()
	r.Bind(dir)
	sock, addr := filepath.Join(dir, "daemon.sock"), freeAddr(t)
	cas := nixtest.NewCasnix(t)
	d := cas.Serve(t, sock, "--packs", url, "--upload-within", "1s", "--db-sync-interval", "200ms", "--http", addr)
	r.Run(t, "nix", "copy", "--no-check-sigs", "--from", "local?root=/tmp/src", "--to", "unix://"+sock, uploaded)
	waitAllUploaded(t, addr, 2*time.Minute)
	if err := d.Stop(30 * time.Second); err != nil {
		t.Fatal(err)
	}
	// Now nothing is uploaded for an hour: the next path stays on the local disk only
	// (acknowledged under the local promise), while its metadata reaches the bucket.
	d = cas.Serve(t, sock, "--upload-within", "1h", "--db-sync-interval", "200ms")
	r.Run(t, "nix", "copy", "--no-check-sigs", "--from", "local?root=/tmp/src", "--to", "unix://"+sock, late)
	time.Sleep(2 * time.Second) // several database syncs
	if err := syscall.Kill(d.Pid(), syscall.SIGKILL); err != nil {
		t.Fatal(err)
	}
	time.Sleep(500 * time.Millisecond)
	if err := os.RemoveAll(cas.DataDir); err != nil {
		t.Fatal(err)
	}

	res := cas.Run(t, "restore", url)
	t.Logf("restore:\n%s", res.Stdout)
	if !strings.Contains(string(res.Stdout), filepath.Base(late)) {
		t.Errorf("restore does not name the path it left out (%s):\n%s", late, res.Stdout)
	}
	cas.Run(t, "verify")
	addr = freeAddr(t)
	d = cas.Serve(t, sock, "--db-sync-interval", "200ms", "--http", addr)
	// nix copy from the HTTP cache checks each NAR against its NarHash (a unix:// client
	// reads NARs from its own store directory, not the daemon).
	checkOut := func(dst string, paths ...string) {
		t.Helper()
		r.Run(t, append([]string{"nix", "copy", "--no-check-sigs", "--from", "http://" + addr, "--to", "local?root=" + dst}, paths...)...)
		r.Run(t, append([]string{"nix", "store", "verify", "--store", "local?root=" + dst, "--no-trust"}, paths...)...)
	}
	checkOut("/tmp/check1", uploaded)
	if res := r.Try("nix", "path-info", "--store", "unix://"+sock, late); res.OK() {
		t.Errorf("%s is valid after the restore, but its data never reached the bucket", late)
	}
	r.Run(t, "nix", "copy", "--no-check-sigs", "--from", "local?root=/tmp/src", "--to", "unix://"+sock, late)
	checkOut("/tmp/check2", uploaded, late)
	if err := d.Stop(30 * time.Second); err != nil {
		t.Errorf("restored primary: %v", err)
	}
}
