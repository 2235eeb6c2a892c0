package tests

import (
	"fmt"
	"math/rand"
	"os"
	"path/filepath"
	"strings"
	"syscall"
	"testing"
	"time"

	"github.com/casnix/casnix/tests/nixtest"
)

// TestServeS3DurableBucket is the bucket promise of `serve --durability bucket`: a write
// is acknowledged only once its packs and the metadata naming them are in the bucket.
//
// Twenty cycles each start the primary, add small trees one after another with host Nix
// 2.8 (`nix-store --add` over the daemon socket) and SIGKILL it at a point spread over the
// cycle (while a tree streams in, while its commit waits for the upload or the database
// sync, between adds). --upload-within is an hour, so nothing reaches the bucket but what
// a write's acknowledgement waits for. A read replica follows throughout: after each kill,
// with the primary down, it answers for every path acknowledged so far, and at the end
// `casnix verify` on it checks the bucket's data. Then the primary's whole data dir is
// deleted and `casnix restore s3://…` must bring back every path a client saw
// acknowledged, byte for byte, and verify. Last, with the S3 server stopped, writes fail clearly and leave no path
// behind, and once it is back a write is acknowledged and survives another loss.
func TestServeS3DurableBucket(t *testing.T) {
	nixtest.CasnixBinary(t)
	srv := nixtest.StartS3(t)
	srv.SetEnv(t)
	c := nixtest.RequireNixClient(t, "bookworm")
	sock := filepath.Join(t.TempDir(), "casnix.sock")
	cas := nixtest.NewCasnix(t)
	url := srv.URL("durable")
	src := c.TempDir(t)
	rnd := rand.New(rand.NewSource(16))
	// tree makes a directory of a few files, distinct from every other, 0.3–2.3 MB.
	tree := func(name string) string {
		dir := filepath.Join(src, name)
		if err := os.MkdirAll(filepath.Join(dir, "sub"), 0o755); err != nil {
			t.Fatal(err)
		}
		big := make([]byte, 300<<10+rnd.Intn(2<<20))
		rnd.Read(big)
		files := map[string][]byte{"big": big, "sub/small": []byte(name + "\n"), "README": []byte(strings.Repeat(name+" ", 500))}
		for n, b := range files {
			if err := os.WriteFile(filepath.Join(dir, n), b, 0o644); err != nil {
				t.Fatal(err)
			}
		}
		return dir
	}
	serve := func(extra ...string) *nixtest.Daemon {
		args := append([]string{"--packs", url, "--durability", "bucket", "--upload-within", "1h", "--db-sync-interval", "1s"}, extra...)
		return cas.Serve(t, sock, args...)
	}
	type added struct{ path, dir string }
	var acked []added
	start := time.Now()
	rep := &nixtest.Casnix{Bin: cas.Bin, DataDir: filepath.Join(t.TempDir(), "replica")}
	repSock := filepath.Join(t.TempDir(), "replica.sock")
	var repd *nixtest.Daemon
	// replicaHas waits until the replica answers for every acknowledged path.
	replicaHas := func(i int) {
		t.Helper()
		if len(acked) == 0 {
			return
		}
		args := []string{"nix-store", "--store", "unix://" + repSock, "--check-validity"}
		for _, a := range acked {
			args = append(args, a.path)
		}
		deadline := time.Now().Add(time.Minute)
		for {
			r := c.Try(args...)
			if r.OK() {
				return
			}
			if time.Now().After(deadline) {
				t.Fatalf("cycle %d: the replica lacks acknowledged paths a minute after the kill:\n%s", i, r)
			}
			time.Sleep(100 * time.Millisecond)
		}
	}
	const cycles, perCycle = 20, 40
	for i := range cycles {
		d := serve("--bucket-timeout", "30s")
		results := make(chan added, perCycle)
		var failed *nixtest.Result
		var failedAt time.Time
		go func() {
			defer close(results)
			for k := range perCycle {
				dir := tree(fmt.Sprintf("c%02d-%d", i, k))
				r := c.Try("nix-store", "--store", d.URL(), "--add", dir)
				if !r.OK() {
					failed, failedAt = r, time.Now()
					return
				}
				results <- added{strings.TrimSpace(string(r.Stdout)), dir}
			}
		}()
		// Kill points spread over a cycle, from 50 ms (the first tree streaming in) to
		// 2.9 s (about ten adds done, one under way: adds take 0.2–0.4 s each, so
		// the points fall at varying phases of an add).
		time.Sleep(50*time.Millisecond + time.Duration(i)*150*time.Millisecond)
		killedAt := time.Now()
		if err := syscall.Kill(d.Pid(), syscall.SIGKILL); err != nil {
			t.Fatal(err)
		}
		n := 0
		for a := range results {
			acked = append(acked, a)
			n++
		}
		if failed != nil && failedAt.Before(killedAt) {
			t.Fatalf("cycle %d: an add failed before the kill:\n%s", i, failed)
		}
		d.Stop(10 * time.Second)
		if repd == nil && len(acked) > 0 {
			// An acknowledged write put the primary's database in the bucket: the
			// replica can start (before that it would wait for a primary that is down).
			repd = rep.Serve(t, repSock, "--replica-of", url, "--follow-interval", "200ms", "--cache-size", "4MiB")
		}
		if repd != nil {
			replicaHas(i)
		}
		t.Logf("cycle %d (at %s): killed after %d acknowledged adds; the replica has all %d", i, time.Since(start).Round(time.Millisecond), n, len(acked))
	}
	if len(acked) < 2*cycles {
		t.Fatalf("only %d adds acknowledged in %d cycles: the kills came too early to test much", len(acked), cycles)
	}

	if repd == nil {
		t.Fatal("no add was acknowledged: no replica started")
	}
	if err := repd.Stop(30 * time.Second); err != nil {
		t.Errorf("replica: %v", err)
	}
	rep.Run(t, "verify")

	// The host is lost: nothing of its disk is left. What was acknowledged is in the bucket.
	checkRestored := func(acked []added) {
		t.Helper()
		if err := os.RemoveAll(cas.DataDir); err != nil {
			t.Fatal(err)
		}
		res := cas.Run(t, "restore", url)
		t.Logf("restore:\n%s", res.Stdout)
		cas.Run(t, "verify")
		for _, a := range acked {
			w := nixtest.NewDigestWriter()
			dump := c.Cmd("nix-store", "--dump", a.dir)
			dump.Stdout = w
			dump.Run(t)
			dg, r := cas.TryDump(a.path)
			if r != nil && !r.OK() {
				t.Errorf("acknowledged %s is gone after the restore:\n%s", a.path, r)
				continue
			}
			if dg != w.Digest() {
				t.Errorf("acknowledged %s: restored NAR %s, source %s", a.path, dg, w.Digest())
			}
		}
	}
	checkRestored(acked)
	t.Logf("%d acknowledged paths restored from the bucket after %d SIGKILLs and the data dir's loss (at %s)",
		len(acked), cycles, time.Since(start).Round(time.Millisecond))

	// The bucket goes away: writes fail, clearly, and leave nothing valid behind.
	d := serve("--bucket-timeout", "5s")
	srv.Stop()
	for k := range 2 {
		dir := tree(fmt.Sprintf("down-%d", k))
		r := c.Try("nix-store", "--store", d.URL(), "--add", dir)
		if r.OK() {
			t.Fatalf("add %d acknowledged with the S3 server down: %s", k, r.Stdout)
		}
		if !strings.Contains(string(r.Stderr), "not in the bucket") {
			t.Errorf("add %d with the S3 server down: the error does not say why:\n%s", k, r.Stderr)
		}
		p := strings.TrimSpace(string(c.Output(t, "nix-store", "--store", "local?root="+c.TempDir(t), "--add", dir)))
		if r := c.Try("nix-store", "--store", d.URL(), "--check-validity", p); r.OK() {
			t.Errorf("add %d failed, yet %s is valid", k, p)
		}
	}
	srv.Start(t)
	dir := tree("back")
	var r *nixtest.Result
	deadline := time.Now().Add(2 * time.Minute)
	for {
		// The first writes after the server's return may still be refused (uploads were
		// failing when they came in); the refusal is immediate.
		if r = c.Try("nix-store", "--store", d.URL(), "--add", dir); r.OK() || time.Now().After(deadline) {
			break
		}
		time.Sleep(time.Second)
	}
	if !r.OK() {
		t.Fatalf("add after the S3 server came back:\n%s", r)
	}
	back := added{strings.TrimSpace(string(r.Stdout)), dir}
	if err := syscall.Kill(d.Pid(), syscall.SIGKILL); err != nil {
		t.Fatal(err)
	}
	d.Stop(10 * time.Second)
	checkRestored(append(acked, back))
}
