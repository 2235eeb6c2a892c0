package tests

import (
	"fmt"
	"maps"
	"math/rand/v2"
	"os"
	"path/filepath"
	"regexp"
	"slices"
	"strings"
	"sync"
	"sync/atomic"
	"testing"
	"time"

	"github.com/casnix/casnix/backupremote"
	"github.com/casnix/casnix/objstore"
	"github.com/casnix/casnix/tests/nixtest"
)

// s3Cmd is a casnix command with the S3 test server's credentials.
func s3Cmd(cas *nixtest.Casnix, srv *nixtest.S3, args ...string) *nixtest.Cmd {
	c := cas.Cmd(args...)
	c.Env = append(c.Env, srv.Env()...)
	c.Timeout = 5 * time.Minute
	return c
}

// TestBackupToBucketWhileServing takes `casnix backup s3://…` (a real SeaweedFS S3
// server) while a real Nix 2.8 client copies paths into `casnix serve` one at a time, then
// a second backup after the copies, which uploads only what was appended to the packs (the
// bucket then holds every pack byte once). The newest
// point restores into a fresh data dir that verifies clean and holds every path with the
// source's path-info and NAR; the first point restores to a data dir holding everything
// valid before that backup began and nothing that was not valid when it ended (picked with
// --at). --list and
// --verify-only work; a backup with --keep 1 leaves one point and only the objects it
// names; with the server down a backup and a restore fail naming the bucket, the restore
// leaving no data dir.
func TestBackupToBucketWhileServing(t *testing.T) {
	srv := nixtest.StartS3(t)
	cas := nixtest.NewCasnix(t)
	client := nixtest.RequireNixClient(t, "bookworm")
	f := nixtest.PopulateFixture(t)
	url := srv.URL("e2e/backups")

	work := t.TempDir()
	rng := rand.New(rand.NewChaCha8([32]byte{'s', '3'}))
	var big []string
	for i := range 10 {
		dir := filepath.Join(work, fmt.Sprintf("big-%02d", i))
		writeRandomTree(t, rng, dir, 4<<20)
		big = append(big, f.Add(t, dir))
	}
	want := f.PathInfos(t)
	var base []string
	for p := range want {
		if !slices.Contains(big, p) {
			base = append(base, p)
		}
	}
	slices.Sort(base)
	cas.ImportFromNixStore(t, f.Store, base...)
	d := cas.Serve(t, filepath.Join(t.TempDir(), "casnix.sock"))
	listAll := func() []string {
		t.Helper()
		return nixtest.SortedLines(client.Run(t, "nix", "path-info", "--all", "--store", d.URL()).Stdout)
	}

	var (
		wg       sync.WaitGroup
		copied   atomic.Int64
		copyErr  atomic.Pointer[string]
		progress = make(chan struct{}, len(big))
	)
	wg.Add(1)
	go func() {
		defer wg.Done()
		for _, p := range big {
			r := client.Try("nix", "copy", "--no-check-sigs", "--from", "local?root="+f.Root, "--to", d.URL(), p)
			if !r.OK() {
				msg := r.String()
				copyErr.Store(&msg)
				return
			}
			copied.Add(1)
			progress <- struct{}{}
		}
	}()
	for range 2 { // the backup starts with copies under way
		select {
		case <-progress:
		case <-time.After(2 * time.Minute):
			t.Fatalf("nix copy did not get going: %v", copyErr.Load())
		}
	}
	before := listAll()
	copiedBefore := copied.Load()
	start := time.Now()
	b1 := s3Cmd(cas, srv, "backup", url).Try()
	took := time.Since(start)
	copiedAfter := copied.Load()
	after := listAll()
	wg.Wait()
	if e := copyErr.Load(); e != nil {
		t.Fatalf("nix copy --to casnix serve:\n%s", *e)
	}
	if !b1.OK() {
		t.Fatalf("casnix backup %s:\n%s", url, b1)
	}
	t.Logf("%s (%s)", strings.TrimSpace(string(b1.Stdout)), took.Round(time.Millisecond))
	t.Logf("copies done: %d when the backup began, %d when it ended, of %d", copiedBefore, copiedAfter, len(big))
	if copiedBefore == int64(len(big)) {
		t.Errorf("every copy had finished before the backup began: the backup ran without writers")
	}

	// The second backup: only what changed.
	b2 := s3Cmd(cas, srv, "backup", url).Run(t)
	t.Logf("%s", strings.TrimSpace(string(b2.Stdout)))
	if !regexp.MustCompile(`uploaded \d+ objects, .* of packs \(\d+ packs unchanged, .* already in the bucket\)`).Match(b2.Stdout) {
		t.Errorf("second backup does not report what it uploaded and skipped:\n%s", b2.Stdout)
	}
	// Incremental: the bucket holds every pack byte once, the second backup having
	// uploaded only what was appended since the first.
	srv.SetEnv(t)
	loc, err := objstore.ParseURL(url)
	if err != nil {
		t.Fatal(err)
	}
	bucket, err := objstore.Open(t.Context(), loc, objstore.Options{})
	if err != nil {
		t.Fatal(err)
	}
	pts, err := backupremote.ListPoints(t.Context(), bucket)
	if err != nil || len(pts) != 2 || !pts[1].Complete() {
		t.Fatalf("points: %v, %v", pts, err)
	}
	var stored int64
	if err := bucket.List(t.Context(), backupremote.PacksDir, func(i objstore.Info) error { stored += i.Size; return nil }); err != nil {
		t.Fatal(err)
	}
	if newest := pts[1].Manifest.PackBytes(); stored != newest {
		t.Errorf("the bucket holds %d bytes of pack objects, the newest point names %d: the second backup uploaded bytes the first had", stored, newest)
	}
	t.Logf("pack bytes: first point %d, second %d, stored %d", pts[0].Manifest.PackBytes(), pts[1].Manifest.PackBytes(), stored)

	list := s3Cmd(cas, srv, "backup", "--list", url).Run(t)
	points := regexp.MustCompile(`(?m)^(\d{8}T\d{6}\.\d{3}Z-[0-9a-f]{6}) `).FindAllStringSubmatch(string(list.Stdout), -1)
	if len(points) != 2 {
		t.Fatalf("backup --list shows %d points, want 2:\n%s", len(points), list.Stdout)
	}
	s3Cmd(cas, srv, "backup", "--verify-only", url).Run(t)

	// The newest point: everything, as the source has it.
	all := slices.Sorted(maps.Keys(want))
	restored := &nixtest.Casnix{Bin: cas.Bin, DataDir: filepath.Join(t.TempDir(), "restored")}
	rs := time.Now()
	r := s3Cmd(restored, srv, "restore", url).Run(t)
	t.Logf("%s (%s)", strings.TrimSpace(string(r.Stdout)), time.Since(rs).Round(time.Millisecond))
	restored.Run(t, "verify")
	got := restored.ValidPaths(t, all)
	if len(got) != len(all) {
		t.Fatalf("restored data dir holds %d paths, want %d", len(got), len(all))
	}
	rd := restored.Serve(t, filepath.Join(t.TempDir(), "restored.sock"))
	if gotAll := nixtest.SortedLines(client.Run(t, "nix", "path-info", "--all", "--store", rd.URL()).Stdout); !slices.Equal(gotAll, listAll()) {
		t.Errorf("nix path-info --all: restored %d paths, source %d", len(gotAll), len(listAll()))
	}
	infos := restored.PathInfos(t, all...)
	for _, p := range all {
		if diffs := nixtest.ComparePathInfo(infos[p], want[p]); len(diffs) > 0 {
			t.Errorf("%s: restored path-info differs from the source: %s", p, strings.Join(diffs, "; "))
		}
		if r, s := restored.Dump(t, p), cas.Dump(t, p); r != s {
			t.Errorf("%s: restored NAR %s, source NAR %s", p, r, s)
		}
	}

	// The first point: consistent with the moment it was taken.
	first := &nixtest.Casnix{Bin: cas.Bin, DataDir: filepath.Join(t.TempDir(), "first")}
	s3Cmd(first, srv, "restore", "--at", points[0][1], "--quick", url).Run(t)
	gotFirst := slices.Sorted(maps.Keys(first.ValidPaths(t, all)))
	for _, p := range before {
		if !slices.Contains(gotFirst, p) {
			t.Errorf("%s was valid before the first backup began but is not in its point", p)
		}
	}
	for _, p := range gotFirst {
		if !slices.Contains(after, p) {
			t.Errorf("%s is in the first point but was not valid when that backup ended", p)
		}
	}
	t.Logf("first point: %d paths valid before, %d restored, %d valid after", len(before), len(gotFirst), len(after))

	// Retention: a backup with --keep 1 leaves one point, and only the pack objects it names.
	k := s3Cmd(cas, srv, "backup", "--keep", "1", url).Run(t)
	t.Logf("%s", strings.TrimSpace(string(k.Stdout)))
	pts, err = backupremote.ListPoints(t.Context(), bucket)
	if err != nil || len(pts) != 1 || !pts[0].Complete() {
		t.Fatalf("after backup --keep 1: %d points, %v", len(pts), err)
	}
	stored = 0
	if err := bucket.List(t.Context(), backupremote.PacksDir, func(i objstore.Info) error { stored += i.Size; return nil }); err != nil {
		t.Fatal(err)
	}
	if newest := pts[0].Manifest.PackBytes(); stored != newest {
		t.Errorf("after backup --keep 1 the bucket holds %d bytes of pack objects, the one point names %d", stored, newest)
	}

	// The server down: a clear error naming the bucket (TestBackupFailureWritesNoManifest
	// checks, after a restart, that no point was added).
	srv.Stop()
	down := s3Cmd(cas, srv, "backup", url)
	down.Timeout = 2 * time.Minute
	dr := down.Try()
	if dr.OK() || !strings.Contains(string(dr.Stderr), "s3://casnix/e2e/backups") {
		t.Errorf("backup with the S3 server down: want a failure naming the bucket:\n%s", dr)
	}
	t.Logf("server down: %s", strings.TrimSpace(string(dr.Stderr)))
	fresh := &nixtest.Casnix{Bin: cas.Bin, DataDir: filepath.Join(t.TempDir(), "fresh")}
	rr := s3Cmd(fresh, srv, "restore", url).Try()
	if rr.OK() || !strings.Contains(string(rr.Stderr), "s3://casnix/e2e/backups") {
		t.Errorf("restore with the S3 server down: want a failure naming the bucket:\n%s", rr)
	}
	if _, err := os.Stat(fresh.DataDir); !os.IsNotExist(err) {
		t.Errorf("restore with the S3 server down left its target: %v", err)
	}
}
