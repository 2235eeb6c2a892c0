package tests

import (
	"bufio"
	"fmt"
	"net/http"
	"os"
	"path/filepath"
	"strconv"
	"strings"
	"syscall"
	"testing"
	"time"

	"github.com/casnix/casnix/proto"
	"github.com/casnix/casnix/tests/nixtest"
)

// killRoots are the roots TestServeS3PacksKill copies, one per cycle.
var killRoots = []string{"big-file", "diamond-top", "tree", "random-copy", "uses-dev", "self-ref"}

// s3Roots are the fixture outputs the S3 pack tests copy: big and small files, references.
var s3Roots = []string{"diamond-top", "uses-dev", "tree", "self-ref", "random-copy", "big-file", "symlink"}

// serveMetrics reads serve --http's /metrics into name → value (unlabelled series).
func serveMetrics(t *testing.T, addr string) map[string]float64 {
	t.Helper()
	resp, err := http.Get("http://" + addr + "/metrics")
	if err != nil {
		t.Fatalf("/metrics: %v", err)
	}
	defer resp.Body.Close()
	out := map[string]float64{}
	sc := bufio.NewScanner(resp.Body)
	for sc.Scan() {
		line := sc.Text()
		if strings.HasPrefix(line, "#") {
			continue
		}
		name, val, ok := strings.Cut(line, " ")
		if !ok {
			continue
		}
		if v, err := strconv.ParseFloat(val, 64); err == nil {
			out[name] = v
		}
	}
	return out
}

// waitAllUploaded polls /metrics until an upload round that started after the call left
// no committed frame waiting for upload.
func waitAllUploaded(t *testing.T, addr string, timeout time.Duration) map[string]float64 {
	t.Helper()
	deadline := time.Now().Add(timeout)
	rounds := serveMetrics(t, addr)["casnix_packs_upload_rounds_total"]
	for {
		m := serveMetrics(t, addr)
		if m["casnix_packs_upload_queue"] == 0 && m["casnix_packs_upload_rounds_total"] >= rounds+2 {
			return m
		}
		if time.Now().After(deadline) {
			t.Fatalf("packs not uploaded after %v: %v", timeout, m)
		}
		time.Sleep(200 * time.Millisecond)
	}
}

// copyDataDirMeta copies a stopped data dir's database (and WAL) to a new data dir,
// without any pack file or cache: a second casnix that can only read the bucket.
func copyDataDirMeta(t *testing.T, from string) string {
	t.Helper()
	to := filepath.Join(t.TempDir(), "copy")
	if err := os.MkdirAll(to, 0o755); err != nil {
		t.Fatal(err)
	}
	for _, name := range []string{"casnix.db", "casnix.db-wal"} {
		b, err := os.ReadFile(filepath.Join(from, name))
		if os.IsNotExist(err) {
			continue
		}
		if err != nil {
			t.Fatal(err)
		}
		if err := os.WriteFile(filepath.Join(to, name), b, 0o644); err != nil {
			t.Fatal(err)
		}
	}
	return to
}

// TestServeS3Packs: real Nix 2.34 copies a closure into `casnix serve --packs s3://…`
// (a real S3 server); the packs are sealed and uploaded within --upload-within and, with a
// 1-byte --cache-size, their local files evicted at once. The same serve then gives the
// paths back over the daemon from the bucket (nix copy --from checks every NAR hash), and
// a second casnix on a copy of the database alone, with no pack file and an empty cache,
// dumps every path byte-identical to the source and verifies clean against the bucket,
// without --packs (the data dir remembers it); a different --packs is refused.
func TestServeS3Packs(t *testing.T) {
	nixtest.CasnixBinary(t)
	srv := nixtest.StartS3(t)
	srv.SetEnv(t)
	f := nixtest.PopulateFixture(t)
	var roots []string
	for _, n := range s3Roots {
		roots = append(roots, f.Path(t, n))
	}
	closure := f.Closure(t, roots...)
	want := f.PathInfos(t, closure...)
	c := nixtest.RequireNixClient(t, "sid")
	t.Logf("client: Nix %s", c.Version(t))
	sockDir := t.TempDir()
	c.Bind(sockDir)
	src := copyStoreRoot(t, f.Root, filepath.Join(c.TempDir(t), "src")).Root

	cas := nixtest.NewCasnix(t)
	url := srv.URL("e2e")
	addr := fmt.Sprintf("127.0.0.1:%d", freePort(t))
	sock := filepath.Join(sockDir, "casnix.sock")
	d := cas.Serve(t, sock, "--packs", url, "--upload-within", "1s", "--cache-size", "1", "--http", addr)
	start := time.Now()
	c.Run(t, append([]string{"nix", "copy", "--no-check-sigs", "--from", "local?root=" + src, "--to", d.URL()}, roots...)...)
	copied := time.Since(start)
	m := waitAllUploaded(t, addr, 60*time.Second)
	if m["casnix_packs_uploaded_total"] == 0 {
		t.Fatalf("nothing uploaded: %v", m)
	}
	t.Logf("nix copy --to of %d paths: %s; all uploaded %s after the copy: %d packs, %.0f bytes in %.0f PUTs",
		len(closure), copied.Round(time.Millisecond), (time.Since(start) - copied).Round(time.Millisecond),
		int(m["casnix_packs_uploaded_total"]), m["casnix_s3_sent_bytes_total"], m["casnix_s3_puts_total"])
	if m["casnix_packs_cache_evicted_packs_total"] == 0 {
		t.Fatalf("no local pack file evicted under a 1-byte --cache-size: %v", m)
	}

	// Out through the daemon: NarFromPath of evicted packs reads the bucket. (A unix://
	// Nix client reads NARs from its own store directory, so the protocol client asks.)
	cl, err := proto.Dial(sock)
	if err != nil {
		t.Fatal(err)
	}
	for _, p := range closure {
		w := nixtest.NewDigestWriter()
		if _, err := cl.NarFromPath(p, w); err != nil {
			t.Fatalf("NarFromPath %s: %v", p, err)
		}
		if got, src := w.Digest(), f.Dump(t, p); got != src {
			t.Errorf("NarFromPath %s: %s, source %s", p, got, src)
		}
	}
	cl.Close()
	m2 := serveMetrics(t, addr)
	if m2["casnix_s3_received_bytes_total"] == 0 {
		t.Fatalf("NarFromPath read nothing from the bucket: %v", m2)
	}
	t.Logf("NarFromPath of %d paths: %.0f bytes in %.0f GETs from the bucket", len(closure), m2["casnix_s3_received_bytes_total"], m2["casnix_s3_gets_total"])
	// And Nix itself: nix copy --from the HTTP binary cache serve renders from the same
	// blocks, into a fresh store that nix store verify checks.
	dst := "local?root=" + filepath.Join(c.TempDir(t), "dst")
	c.Run(t, append([]string{"nix", "copy", "--no-check-sigs", "--from", "http://" + addr, "--to", dst}, roots...)...)
	checkNixVerify(t, c, dst)
	if err := d.Stop(30 * time.Second); err != nil {
		t.Fatalf("stop serve: %v", err)
	}

	// A second casnix: the database alone, no pack file, no cache, no flag.
	cas2 := &nixtest.Casnix{Bin: cas.Bin, DataDir: copyDataDirMeta(t, cas.DataDir)}
	got := cas2.PathInfos(t, closure...)
	for _, p := range closure {
		if diff := nixtest.ComparePathInfo(got[p], want[p]); len(diff) > 0 {
			t.Errorf("%s: %s", p, strings.Join(diff, "; "))
		}
		if dg, srcDg := cas2.Dump(t, p), f.Dump(t, p); dg != srcDg {
			t.Errorf("casnix dump %s from the bucket: %s, source %s", p, dg, srcDg)
		}
	}
	cas2.Run(t, "verify")
	if r := cas2.Try("--packs", srv.URL("elsewhere"), "verify"); r.OK() || !strings.Contains(string(r.Stderr), "cannot change") {
		t.Fatalf("verify with another --packs: want a refusal:\n%s", r)
	}
	entries, _ := os.ReadDir(filepath.Join(cas2.DataDir, "packs"))
	t.Logf("second data dir: %d pack subdirectories (none expected with content)", len(entries))
}

// TestServeS3PacksKill: `casnix serve --packs s3://…` is killed with SIGKILL at a few
// points while Nix copies into it and its uploader seals and uploads; each restart
// resumes with no manual step. At the end every path a copy acknowledged is valid,
// everything is uploaded, and a casnix on a copy of the database alone (no pack file)
// verifies clean against the bucket and dumps every acknowledged path right.
func TestServeS3PacksKill(t *testing.T) {
	nixtest.CasnixBinary(t)
	srv := nixtest.StartS3(t)
	srv.SetEnv(t)
	f := nixtest.PopulateFixture(t)
	c := nixtest.RequireNixClient(t, "bookworm")
	sockDir := t.TempDir()
	sock := filepath.Join(sockDir, "casnix.sock")
	cas := nixtest.NewCasnix(t)
	url := srv.URL("kill")
	acked := map[string]bool{}
	start := time.Now()
	// Kill points: while the copy runs (a fixed delay after it started), and after it
	// ended: inside the --upload-within window, as soon as /metrics shows a pack sealed
	// (mid-upload, or just after), as soon as it shows one uploaded (its local file being
	// evicted under the 1-byte --cache-size).
	type point struct {
		delay time.Duration // after the copy started; 0: after it ended
		after string        // with delay 0: a metric to wait for first ("" : 150ms)
	}
	points := []point{{100 * time.Millisecond, ""}, {0, ""}, {0, "casnix_packs_sealed_total"},
		{40 * time.Millisecond, ""}, {0, "casnix_packs_uploaded_total"}, {0, "casnix_packs_sealed_total"}}
	for i, pt := range points {
		addr := fmt.Sprintf("127.0.0.1:%d", freePort(t))
		d := cas.Serve(t, sock, "--packs", url, "--upload-within", "200ms", "--cache-size", "1", "--http", addr)
		// What the killed runs left is sealed and uploaded first: let that settle, so the
		// metric kill points see this cycle's packs.
		waitAllUploaded(t, addr, 60*time.Second)
		// A root per cycle not copied before, so that every cycle writes and seals.
		root := f.Path(t, killRoots[i])
		base := serveMetrics(t, addr)[pt.after]
		cmd := c.Cmd("nix", "copy", "--no-check-sigs", "--from", "local?root="+f.Root, "--to", d.URL(), root)
		done := make(chan *nixtest.Result, 1)
		go func() { done <- cmd.Try() }()
		var r *nixtest.Result
		switch {
		case pt.delay > 0:
			time.Sleep(pt.delay)
		case pt.after == "":
			r = <-done
			time.Sleep(150 * time.Millisecond)
		default:
			r = <-done
			deadline := time.Now().Add(30 * time.Second)
			for serveMetrics(t, addr)[pt.after] == base {
				if time.Now().After(deadline) {
					t.Fatalf("cycle %d: %s did not rise in 30s after the copy", i, pt.after)
				}
				time.Sleep(2 * time.Millisecond)
			}
		}
		if err := syscall.Kill(d.Pid(), syscall.SIGKILL); err != nil {
			t.Fatal(err)
		}
		if r == nil {
			r = <-done
		}
		if r.OK() {
			for _, p := range f.Closure(t, root) {
				acked[p] = true
			}
		}
		d.Stop(10 * time.Second)
		t.Logf("cycle %d (at %s): kill %+v; copy ok=%v", i, time.Since(start).Round(time.Millisecond), pt, r.OK())
	}
	// A last, clean run uploads what the killed ones left.
	addr := fmt.Sprintf("127.0.0.1:%d", freePort(t))
	d := cas.Serve(t, sock, "--packs", url, "--upload-within", "200ms", "--cache-size", "1", "--http", addr)
	waitAllUploaded(t, addr, 60*time.Second)
	if err := d.Stop(30 * time.Second); err != nil {
		t.Fatal(err)
	}
	if len(acked) == 0 {
		t.Fatal("no copy was acknowledged: the kills came too early to test anything")
	}
	cas2 := &nixtest.Casnix{Bin: cas.Bin, DataDir: copyDataDirMeta(t, cas.DataDir)}
	cas2.Run(t, "verify")
	for p := range acked {
		if dg, srcDg := cas2.Dump(t, p), f.Dump(t, p); dg != srcDg {
			t.Errorf("acknowledged %s: dump from the bucket %s, source %s", p, dg, srcDg)
		}
	}
	t.Logf("%d acknowledged paths intact from the bucket (at %s)", len(acked), time.Since(start).Round(time.Millisecond))
}
