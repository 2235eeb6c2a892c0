package backupremote

import (
	"bytes"
	"context"
	"crypto/rand"
	"errors"
	"fmt"
	"io"
	"maps"
	"net/http"
	"net/http/httptest"
	"net/http/httputil"
	"net/url"
	"os"
	"path/filepath"
	"slices"
	"strings"
	"sync/atomic"
	"testing"
	"time"

	"github.com/casnix/casnix/blobs"
	"github.com/casnix/casnix/nar"
	"github.com/casnix/casnix/objstore"
	"github.com/casnix/casnix/store"
	"github.com/casnix/casnix/tests/nixtest"
)

// Small packs, so a few MiB of paths make several and a change touches only some.
var testBlobs = blobs.Options{PackSize: 1 << 20}

func openStore(t testing.TB, dir string) *store.Store {
	t.Helper()
	st, err := store.Open(context.Background(), dir, store.Options{Blobs: testBlobs})
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { st.Close() })
	return st
}

// treeNAR is the NAR of a small tree with size random bytes (no dedup across trees).
func treeNAR(t testing.TB, size int) []byte {
	t.Helper()
	root := filepath.Join(t.TempDir(), "t")
	os.MkdirAll(filepath.Join(root, "sub"), 0o755)
	big := make([]byte, size)
	rand.Read(big)
	os.WriteFile(filepath.Join(root, "big"), big, 0o644)
	os.WriteFile(filepath.Join(root, "sub", "x"), []byte("#!/bin/sh\n"), 0o755)
	os.Symlink("sub/x", filepath.Join(root, "link"))
	var buf bytes.Buffer
	if _, err := nar.DumpPath(&buf, root); err != nil {
		t.Fatal(err)
	}
	return buf.Bytes()
}

func pathName(i int) string { return fmt.Sprintf("%032d-p%d", i, i) }

func add(t testing.TB, st *store.Store, name string, n []byte) {
	t.Helper()
	b := st.NewBatch(context.Background())
	if _, err := b.Add(bytes.NewReader(n), store.PathInfo{Name: name}); err != nil {
		b.Abort()
		t.Fatal(err)
	}
	if _, err := b.Commit(); err != nil {
		t.Fatal(err)
	}
}

// contents is every path's path-info (without registration time) and NAR.
type contents map[string]string

func storeContents(t testing.TB, st *store.Store) contents {
	t.Helper()
	ctx := context.Background()
	names, err := st.All(ctx)
	if err != nil {
		t.Fatal(err)
	}
	out := contents{}
	for _, n := range names {
		pi, err := st.Info(ctx, n)
		if err != nil {
			t.Fatal(err)
		}
		var buf bytes.Buffer
		if _, err := st.NarRender(ctx, n, &buf); err != nil {
			t.Fatalf("render %s: %v", n, err)
		}
		out[n] = fmt.Sprintf("%x %d %v %q %q|%x", pi.NarHash, pi.NarSize, pi.References, pi.Deriver, pi.CA, buf.Bytes())
	}
	return out
}

func dirContents(t testing.TB, dir string) contents {
	t.Helper()
	st, err := store.Open(context.Background(), dir, store.Options{})
	if err != nil {
		t.Fatal(err)
	}
	defer st.Close()
	return storeContents(t, st)
}

func bucket(t testing.TB, srv *nixtest.S3, prefix string) *objstore.Bucket {
	t.Helper()
	loc, err := objstore.ParseURL(srv.URL(prefix))
	if err != nil {
		t.Fatal(err)
	}
	b, err := objstore.Open(context.Background(), loc, objstore.Options{})
	if err != nil {
		t.Fatal(err)
	}
	return b
}

func backup(t testing.TB, st *store.Store, b *objstore.Bucket) *Report {
	t.Helper()
	rep, err := Backup(context.Background(), st, b, Options{Version: "test"})
	if err != nil {
		t.Fatal(err)
	}
	t.Logf("point %s: %d paths, %d packs: uploaded %d (%d bytes), skipped %d (%d bytes), db %d->%d; %d puts",
		rep.Point, rep.Paths, rep.Packs, rep.Uploaded, rep.UploadedBytes, rep.Skipped, rep.SkippedBytes, rep.DBBytes, rep.DBStored, rep.RequestsWritten)
	return rep
}

// packSizes is every pack file of a data dir and its size.
func packSizes(t testing.TB, dir string) map[string]int64 {
	t.Helper()
	files, _ := filepath.Glob(filepath.Join(dir, store.PackDir, "*", "*.pack"))
	out := map[string]int64{}
	for _, f := range files {
		fi, err := os.Stat(f)
		if err != nil {
			t.Fatal(err)
		}
		if fi.Size() > 16 { // a pack of just its header has no frame to back up
			out[filepath.Base(f)] = fi.Size()
		}
	}
	return out
}

// packBytes is every pack file of a data dir and its contents.
func packBytes(t testing.TB, dir string) map[string][]byte {
	t.Helper()
	files, _ := filepath.Glob(filepath.Join(dir, store.PackDir, "*", "*.pack"))
	out := map[string][]byte{}
	for _, f := range files {
		b, err := os.ReadFile(f)
		if err != nil {
			t.Fatal(err)
		}
		out[filepath.Base(f)] = b
	}
	return out
}

func objects(t testing.TB, b *objstore.Bucket, prefix string) map[string]int64 {
	t.Helper()
	out := map[string]int64{}
	if err := b.List(context.Background(), prefix, func(i objstore.Info) error { out[i.Name] = i.Size; return nil }); err != nil {
		t.Fatal(err)
	}
	return out
}

func restore(t testing.TB, b *objstore.Bucket, dst string, o RestoreOptions) *Manifest {
	t.Helper()
	m, _, err := Restore(context.Background(), b, dst, o)
	if err != nil {
		t.Fatal(err)
	}
	return m
}

// TestBackupToBucket: against a real S3 server, a backup restores to a data dir with the
// same path-infos and NARs; a second backup with nothing new uploads no pack, and one
// after an import uploads exactly the bytes appended to packs (one segment object per pack
// that grew or is new); an older point still
// restores (with only its paths) after more imports; --verify-only passes; an incomplete
// point (no manifest), even the newest, is listed as such and never restored.
func TestBackupToBucket(t *testing.T) {
	srv := nixtest.StartS3(t)
	srv.SetEnv(t)
	ctx := context.Background()
	b := bucket(t, srv, "rt")
	dir := t.TempDir()
	st := openStore(t, dir)
	for i := range 3 {
		add(t, st, pathName(i), treeNAR(t, 700<<10))
	}
	first := storeContents(t, st)

	r1 := backup(t, st, b)
	if r1.Paths != 3 || r1.Packs < 2 || r1.Uploaded != r1.Packs || r1.Skipped != 0 {
		t.Fatalf("first backup: %+v, want every one of several packs uploaded", r1)
	}
	r2 := backup(t, st, b)
	if r2.Uploaded != 0 || r2.UploadedBytes != 0 || r2.Skipped != r1.Packs {
		t.Fatalf("backup with nothing new: %+v, want every pack skipped", r2)
	}

	before := packSizes(t, dir)
	add(t, st, pathName(3), treeNAR(t, 300<<10))
	after := packSizes(t, dir)
	changed, appended := 0, int64(0)
	for f, n := range after {
		if before[f] != n {
			changed++
			appended += n - before[f]
		}
	}
	r3 := backup(t, st, b)
	if changed == 0 || r3.Uploaded != changed || r3.Skipped != r3.Packs-changed || r3.UploadedBytes != appended {
		t.Fatalf("backup after an import that changed %d of %d packs, appending %d bytes: %+v", changed, len(after), appended, r3)
	}
	latest := storeContents(t, st)

	m, err := Verify(ctx, b, "")
	if err != nil || m.Point != r3.Point {
		t.Fatalf("verify newest: %v, %v", m, err)
	}

	// An incomplete point newer than all others: listed, not restored.
	fake := "29991231T235959.000Z-ffffff"
	if err := b.Put(ctx, pointKey(fake, StartedName), strings.NewReader("x"), 1); err != nil {
		t.Fatal(err)
	}
	db, _ := os.ReadFile(filepath.Join(dir, store.DBFile))
	if err := b.Put(ctx, pointKey(fake, DBName), bytes.NewReader(db), int64(len(db))); err != nil {
		t.Fatal(err)
	}
	points, err := ListPoints(ctx, b)
	if err != nil {
		t.Fatal(err)
	}
	var ids []string
	for _, p := range points {
		ids = append(ids, fmt.Sprintf("%s:%v", p.ID, p.Complete()))
	}
	if want := []string{r1.Point + ":true", r2.Point + ":true", r3.Point + ":true", fake + ":false"}; !slices.Equal(ids, want) {
		t.Fatalf("points %v, want %v", ids, want)
	}

	dst := filepath.Join(t.TempDir(), "restored")
	if m := restore(t, b, dst, RestoreOptions{}); m.Point != r3.Point {
		t.Fatalf("restored %s, want the newest complete point %s", m.Point, r3.Point)
	}
	if got := dirContents(t, dst); !maps.Equal(got, latest) {
		t.Fatalf("restored data dir holds %d paths, differing from the %d backed up", len(got), len(latest))
	}
	// The older point after more imports, by name and by time.
	add(t, st, pathName(4), treeNAR(t, 300<<10))
	old := filepath.Join(t.TempDir(), "old")
	restore(t, b, old, RestoreOptions{Point: r1.Point})
	if got := dirContents(t, old); !maps.Equal(got, first) {
		t.Fatalf("point %s restored %d paths, want the first 3", r1.Point, len(got))
	}
	at, _ := ParseTime(r2.Point)
	old2 := filepath.Join(t.TempDir(), "old2")
	if m := restore(t, b, old2, RestoreOptions{At: at}); m.Point != r2.Point {
		t.Fatalf("--at %s restored %s, want %s", at, m.Point, r2.Point)
	}
	if _, _, err := Restore(ctx, b, t.TempDir(), RestoreOptions{Point: fake}); !errors.Is(err, ErrNoPoint) {
		t.Fatalf("restore of the incomplete point: %v, want ErrNoPoint", err)
	}
}

// TestBackupAfterTailRewrite: a collection that drops a pack's last frames lets the next
// writer trim the pack and write other frames where they were, so a pack is not
// append-only byte for byte. The point taken before still restores intact, and the one
// after too: pack objects are named by their tail frame, never replaced by other bytes.
func TestBackupAfterTailRewrite(t *testing.T) {
	srv := nixtest.StartS3(t)
	srv.SetEnv(t)
	ctx := context.Background()
	b := bucket(t, srv, "tail")
	dir := t.TempDir()
	st, err := store.Open(ctx, dir, store.Options{})
	if err != nil {
		t.Fatal(err)
	}
	add(t, st, pathName(0), treeNAR(t, 2<<20))
	add(t, st, pathName(1), treeNAR(t, 300<<10))
	r1 := backup(t, st, b)
	want1 := storeContents(t, st)
	packs1 := packBytes(t, dir)
	if _, err := st.GC(ctx, store.GCOptions{Action: store.GCDeleteSpecific, Paths: []string{pathName(1)}}); err != nil {
		t.Fatal(err)
	}
	st.Close()
	// A new process's writer reopens the pack and trims it to its last live frame.
	st, err = store.Open(ctx, dir, store.Options{})
	if err != nil {
		t.Fatal(err)
	}
	defer st.Close()
	add(t, st, pathName(2), treeNAR(t, 400<<10))
	rewritten := false
	for f, now := range packBytes(t, dir) {
		if old, ok := packs1[f]; ok && len(now) >= len(old) && !bytes.Equal(now[:len(old)], old) {
			rewritten = true
		}
	}
	if !rewritten {
		sizes := map[string]int{}
		for f, b := range packs1 {
			sizes[f] = len(b)
		}
		t.Fatalf("no pack of the first point changed: the scenario did not happen (before %v, after %v)", sizes, packSizes(t, dir))
	}
	r2 := backup(t, st, b)
	if r2.SkippedBytes != 0 || r2.Uploaded != 1 {
		t.Fatalf("backup after a tail rewrite: %+v, want the pack uploaded whole", r2)
	}
	want2 := storeContents(t, st)
	for _, tc := range []struct {
		point string
		want  contents
	}{{r1.Point, want1}, {r2.Point, want2}} {
		dst := filepath.Join(t.TempDir(), "r")
		restore(t, b, dst, RestoreOptions{Point: tc.point})
		if got := dirContents(t, dst); !maps.Equal(got, tc.want) {
			t.Fatalf("point %s restored %d paths, differing from the %d backed up", tc.point, len(got), len(tc.want))
		}
	}
}

// TestBackupAfterRestoreFork: a data dir restored from an older point, which then takes
// other imports, backs up into the same bucket beside the original's newer points; both
// lines restore intact (a restored copy draws a new lineage, so its new packs never take
// the original's keys), and the restored copy re-uploads none of the packs it restored,
// unless a prune removed them since.
func TestBackupAfterRestoreFork(t *testing.T) {
	srv := nixtest.StartS3(t)
	srv.SetEnv(t)
	b := bucket(t, srv, "fork")
	dir := t.TempDir()
	st := openStore(t, dir)
	add(t, st, pathName(0), treeNAR(t, 600<<10))
	r1 := backup(t, st, b)
	add(t, st, pathName(1), treeNAR(t, 600<<10))
	r2 := backup(t, st, b)
	want2 := storeContents(t, st)

	fork := filepath.Join(t.TempDir(), "fork")
	restore(t, b, fork, RestoreOptions{Point: r1.Point})
	fst := openStore(t, fork)
	rf := backup(t, fst, b)
	if rf.Uploaded != 0 {
		t.Fatalf("backup of an unchanged restored data dir uploaded %d packs, want none", rf.Uploaded)
	}
	add(t, fst, pathName(2), treeNAR(t, 600<<10))
	rf2 := backup(t, fst, b)
	if rf2.Uploaded == 0 || rf2.SkippedBytes == 0 {
		t.Fatalf("backup after an import: %+v, want a segment after the restored pack's bytes", rf2)
	}
	wantF := storeContents(t, fst)
	for _, tc := range []struct {
		point string
		want  contents
	}{{r2.Point, want2}, {rf2.Point, wantF}} {
		dst := filepath.Join(t.TempDir(), "r")
		restore(t, b, dst, RestoreOptions{Point: tc.point})
		if got := dirContents(t, dst); !maps.Equal(got, tc.want) {
			t.Fatalf("point %s restored %d paths, differing from the %d backed up", tc.point, len(got), len(tc.want))
		}
	}

	// A copy restored from r2, whose objects a prune then removes (only the fork's newest
	// point is kept): its next backup uploads what is gone instead of naming it.
	fork2 := filepath.Join(t.TempDir(), "fork2")
	restore(t, b, fork2, RestoreOptions{Point: r2.Point})
	if _, err := Prune(context.Background(), b, PruneOptions{Keep: 1}); err != nil {
		t.Fatal(err)
	}
	f2 := openStore(t, fork2)
	r := backup(t, f2, b)
	if r.Uploaded == 0 {
		t.Fatalf("backup of a copy whose objects were pruned uploaded nothing: %+v", r)
	}
	dst := filepath.Join(t.TempDir(), "r")
	restore(t, b, dst, RestoreOptions{Point: r.Point})
	if got := dirContents(t, dst); !maps.Equal(got, want2) {
		t.Fatalf("point %s restored %d paths, want %d", r.Point, len(got), len(want2))
	}
}

// TestPrune: --keep N keeps the newest N points and removes exactly the pack objects no
// kept point names (here: after a tail rewrite made the newest point upload its pack whole); while a younger incomplete point exists (a backup under way) it
// removes no pack, and it removes a stale incomplete point.
func TestPrune(t *testing.T) {
	srv := nixtest.StartS3(t)
	srv.SetEnv(t)
	ctx := context.Background()
	b := bucket(t, srv, "prune")
	dir := t.TempDir()
	st, err := store.Open(ctx, dir, store.Options{})
	if err != nil {
		t.Fatal(err)
	}
	var reps []*Report
	add(t, st, pathName(0), treeNAR(t, 1<<20))
	reps = append(reps, backup(t, st, b))
	add(t, st, pathName(1), treeNAR(t, 300<<10))
	reps = append(reps, backup(t, st, b))
	// The second point's segment ends with a frame a collection then drops; the next
	// writer rewrites the pack's tail, so the third point uploads the pack whole and
	// names none of the first two points' objects.
	if _, err := st.GC(ctx, store.GCOptions{Action: store.GCDeleteSpecific, Paths: []string{pathName(1)}}); err != nil {
		t.Fatal(err)
	}
	st.Close()
	st, err = store.Open(ctx, dir, store.Options{})
	if err != nil {
		t.Fatal(err)
	}
	defer st.Close()
	add(t, st, pathName(2), treeNAR(t, 400<<10))
	reps = append(reps, backup(t, st, b))
	if reps[1].Uploaded != 1 || reps[1].SkippedBytes == 0 || reps[2].Uploaded != 1 || reps[2].SkippedBytes != 0 {
		t.Fatalf("want the second point to add a segment and the third to upload the pack whole: %+v, %+v", reps[1], reps[2])
	}
	m3, err := readManifest(ctx, b, reps[2].Point)
	if err != nil {
		t.Fatal(err)
	}
	keep := map[string]bool{}
	for _, r := range m3.Packs {
		for _, sg := range r.Segments {
			keep[sg.Key] = true
		}
	}
	all := objects(t, b, PacksDir)
	var wantGone []string
	for k := range all {
		if !keep[k] {
			wantGone = append(wantGone, k)
		}
	}
	if len(wantGone) != 2 {
		t.Fatalf("%d objects only older points name, want the first two points' 2 (of %d)", len(wantGone), len(all))
	}

	// A backup under way: the points go, the packs stay.
	busy := "29991231T235959.000Z-aaaaaa"
	if err := b.Put(ctx, pointKey(busy, StartedName), strings.NewReader("x"), 1); err != nil {
		t.Fatal(err)
	}
	pr, err := Prune(ctx, b, PruneOptions{Keep: 2})
	if err != nil {
		t.Fatal(err)
	}
	if pr.Points != 1 || pr.Packs != 0 || !pr.PacksHeldBy || len(objects(t, b, PacksDir)) != len(all) {
		t.Fatalf("prune beside a backup under way: %+v", pr)
	}
	// Once stale, the incomplete point goes, and the packs only point 1 named.
	time.Sleep(2100 * time.Millisecond)
	pr, err = Prune(ctx, b, PruneOptions{Keep: 1, StaleAfter: time.Second})
	if err != nil {
		t.Fatal(err)
	}
	left := objects(t, b, PacksDir)
	if pr.Points != 1 || pr.Incomplete != 1 || pr.Packs != len(wantGone) || len(left) != len(keep) {
		t.Fatalf("prune to 1: %+v; %d pack objects left, want the newest point's %d", pr, len(left), len(keep))
	}
	for k := range keep {
		if _, ok := left[k]; !ok {
			t.Fatalf("prune removed %s, which the kept point names", k)
		}
	}
	points, err := ListPoints(ctx, b)
	if err != nil || len(points) != 1 || points[0].ID != reps[2].Point {
		t.Fatalf("points after prune: %v, %v", points, err)
	}
	dst := filepath.Join(t.TempDir(), "r")
	restore(t, b, dst, RestoreOptions{})
	if got, want := dirContents(t, dst), storeContents(t, st); !maps.Equal(got, want) {
		t.Fatalf("restore after prune: %d paths, want %d", len(got), len(want))
	}
}

// TestRestoreDamagedBucket: a pack object truncated or missing fails the restore with an
// error naming the bucket and object, and leaves the target as it was (absent, or a data
// dir with its old contents); --verify-only reports the same damage.
func TestRestoreDamagedBucket(t *testing.T) {
	srv := nixtest.StartS3(t)
	srv.SetEnv(t)
	ctx := context.Background()
	dir := t.TempDir()
	st := openStore(t, dir)
	add(t, st, pathName(0), treeNAR(t, 1<<20))
	add(t, st, pathName(1), treeNAR(t, 500<<10))
	// An existing data dir a failed restore with --force must leave alone.
	existing := filepath.Join(t.TempDir(), "existing")
	est, err := store.Open(ctx, existing, store.Options{})
	if err != nil {
		t.Fatal(err)
	}
	add(t, est, pathName(9), treeNAR(t, 100<<10))
	wantExisting := storeContents(t, est)
	est.Close()

	for _, tc := range []struct {
		name   string
		damage func(b *objstore.Bucket, key string, size int64) error
		want   string
	}{
		{"truncated", func(b *objstore.Bucket, key string, size int64) error {
			rc, err := b.GetRange(ctx, key, 0, size-100)
			if err != nil {
				return err
			}
			data, err := io.ReadAll(rc)
			rc.Close()
			if err != nil {
				return err
			}
			return b.Put(ctx, key, bytes.NewReader(data), int64(len(data)))
		}, "truncated"},
		{"missing", func(b *objstore.Bucket, key string, _ int64) error { return b.Delete(ctx, key) }, objstore.ErrNotFound.Error()},
	} {
		t.Run(tc.name, func(t *testing.T) {
			b := bucket(t, srv, "damaged-"+tc.name)
			r := backup(t, st, b)
			m, err := readManifest(ctx, b, r.Point)
			if err != nil {
				t.Fatal(err)
			}
			victim := m.Packs[0].Segments[0]
			if err := tc.damage(b, victim.Key, victim.Len); err != nil {
				t.Fatal(err)
			}
			if _, err := Verify(ctx, b, ""); err == nil || !strings.Contains(err.Error(), victim.Key) {
				t.Fatalf("verify-only of the damaged point: %v, want an error naming %s", err, victim.Key)
			}
			absent := filepath.Join(t.TempDir(), "absent")
			_, _, err = Restore(ctx, b, absent, RestoreOptions{})
			if err == nil || !strings.Contains(err.Error(), victim.Key) || !strings.Contains(err.Error(), "casnix") || !strings.Contains(err.Error(), tc.want) {
				t.Fatalf("restore: %v, want an error naming bucket casnix, %s and %q", err, victim.Key, tc.want)
			}
			t.Logf("%s: %v", tc.name, err)
			if _, err := os.Stat(absent); !os.IsNotExist(err) {
				t.Fatalf("failed restore left the target it created: %v", err)
			}
			if _, _, err := Restore(ctx, b, existing, RestoreOptions{CopyOptions: store.CopyOptions{Force: true}}); err == nil {
				t.Fatal("restore --force of the damaged point succeeded")
			}
			if got := dirContents(t, existing); !maps.Equal(got, wantExisting) {
				t.Fatalf("failed restore changed the existing data dir: %d paths", len(got))
			}
		})
	}
}

// faultProxy forwards requests to the S3 server and, once armed, answers those whose path
// contains match with a server error instead.
type faultProxy struct {
	match string
	armed atomic.Bool
	hits  atomic.Int64
	next  http.Handler
}

func (f *faultProxy) ServeHTTP(w http.ResponseWriter, r *http.Request) {
	if f.armed.Load() && strings.Contains(r.URL.Path, f.match) {
		f.hits.Add(1)
		http.Error(w, "injected failure", http.StatusServiceUnavailable)
		return
	}
	f.next.ServeHTTP(w, r)
}

// TestBackupFailureWritesNoManifest: a backup whose upload of a pack or of the database
// fails (a proxy in front of the server answers them with errors), or whose server is down, returns an error naming the bucket and leaves no
// manifest: the bucket's complete points are the ones before.
func TestBackupFailureWritesNoManifest(t *testing.T) {
	srv := nixtest.StartS3(t)
	srv.SetEnv(t)
	ctx := context.Background()
	dir := t.TempDir()
	st := openStore(t, dir)
	add(t, st, pathName(0), treeNAR(t, 600<<10))
	for i, match := range []string{"/" + PacksDir, "/" + DBName} {
		t.Run(strings.Trim(match, "/"), func(t *testing.T) {
			target, err := url.Parse(srv.Endpoint)
			if err != nil {
				t.Fatal(err)
			}
			ft := &faultProxy{match: match, next: httputil.NewSingleHostReverseProxy(target)}
			proxy := httptest.NewServer(ft)
			defer proxy.Close()
			prefix := "fail-" + strings.Trim(strings.ReplaceAll(match, ".", "-"), "/")
			loc, err := objstore.ParseURL(fmt.Sprintf("s3://%s/%s?endpoint=%s&region=us-east-1", srv.Bucket, prefix, proxy.URL))
			if err != nil {
				t.Fatal(err)
			}
			b, err := objstore.Open(ctx, loc, objstore.Options{})
			if err != nil {
				t.Fatal(err)
			}
			backup(t, st, b)
			add(t, st, pathName(10+i), treeNAR(t, 300<<10))
			ft.armed.Store(true)
			_, err = Backup(ctx, st, b, Options{Version: "test", Parallel: 1})
			if err == nil || ft.hits.Load() == 0 || !strings.Contains(err.Error(), "s3://casnix/"+prefix) {
				t.Fatalf("backup with failing %s uploads: %v (%d failed requests), want an error naming the bucket", match, err, ft.hits.Load())
			}
			t.Logf("%v", err)
			ft.armed.Store(false)
			points, err := ListPoints(ctx, b)
			if err != nil {
				t.Fatal(err)
			}
			complete := 0
			for _, p := range points {
				if p.Complete() {
					complete++
				}
			}
			if complete != 1 {
				t.Fatalf("%d complete points after a failed backup, want the 1 before", complete)
			}
		})
	}
	t.Run("server down", func(t *testing.T) {
		b := bucket(t, srv, "down")
		backup(t, st, b)
		srv.Stop()
		dctx, cancel := context.WithTimeout(ctx, 90*time.Second)
		defer cancel()
		_, err := Backup(dctx, st, b, Options{Version: "test"})
		if err == nil || !strings.Contains(err.Error(), "s3://casnix/down") {
			t.Fatalf("backup to a server that is down: %v, want an error naming the bucket", err)
		}
		t.Logf("%v", err)
		if _, err := Verify(dctx, b, ""); err == nil {
			t.Fatal("verify against a server that is down succeeded")
		}
		srv.Start(t)
		points, err := ListPoints(ctx, b)
		if err != nil {
			t.Fatal(err)
		}
		if len(points) != 1 || !points[0].Complete() {
			t.Fatalf("points after the failed backup: %d", len(points))
		}
	})
}

// TestPruneLeavesPrimaryPacks: a prune of backup points under the prefix of a primary
// (`serve --packs` on the same bucket prefix) leaves the primary's pack objects alone: no
// backup point names them, and they are not a backup's to delete.
func TestPruneLeavesPrimaryPacks(t *testing.T) {
	srv := nixtest.StartS3(t)
	srv.SetEnv(t)
	ctx := context.Background()
	b := bucket(t, srv, "shared")
	st := openStore(t, t.TempDir())
	add(t, st, pathName(0), treeNAR(t, 100<<10))
	primary := blobs.PackObject(1)
	if err := b.Put(ctx, primary, strings.NewReader("a primary's pack"), 16); err != nil {
		t.Fatal(err)
	}
	backup(t, st, b)
	add(t, st, pathName(1), treeNAR(t, 100<<10))
	backup(t, st, b)
	if _, err := Prune(ctx, b, PruneOptions{Keep: 1}); err != nil {
		t.Fatal(err)
	}
	if _, err := b.Head(ctx, primary); err != nil {
		t.Fatalf("prune removed the primary's pack object %s: %v", primary, err)
	}
	if left := objects(t, b, PacksDir); len(left) < 2 {
		t.Fatalf("pack objects left: %v", left)
	}
}
