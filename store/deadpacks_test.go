package store

import (
	"bytes"
	"context"
	"errors"
	"fmt"
	"os"
	"path/filepath"
	"slices"
	"testing"
	"time"

	"github.com/casnix/casnix/blobs"
	"github.com/casnix/casnix/db"
	"github.com/casnix/casnix/objstore"
	"github.com/casnix/casnix/replicate"
	"github.com/casnix/casnix/tests/nixtest"
)

// bucketEnv is a data dir whose packs are in a real S3 server's bucket.
type bucketEnv struct {
	url    string
	loc    objstore.Location
	bucket *objstore.Bucket
	st     *Store
	nars   map[string][]byte // every path added, by name
}

func newBucketEnv(t *testing.T, prefix string) *bucketEnv {
	t.Helper()
	srv := nixtest.StartS3(t)
	srv.SetEnv(t)
	e := &bucketEnv{url: srv.URL(prefix), nars: map[string][]byte{}}
	var err error
	if e.loc, err = objstore.ParseURL(e.url); err != nil {
		t.Fatal(err)
	}
	if e.bucket, err = objstore.Open(context.Background(), e.loc, objstore.Options{}); err != nil {
		t.Fatal(err)
	}
	e.st, err = Open(context.Background(), t.TempDir(), Options{Packs: e.url})
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { e.st.Close() })
	return e
}

// add adds a path with content of its own and uploads its pack (sealed: the next path
// goes to another pack).
func (e *bucketEnv) add(t *testing.T, name string) {
	t.Helper()
	n := fileNAR("contents of " + name)
	if err := add(t, e.st, name, n); err != nil {
		t.Fatal(err)
	}
	e.nars[name] = n
	if err := e.st.UploadAll(context.Background()); err != nil {
		t.Fatal(err)
	}
}

// drop deletes path name, whose pack holds nothing else, and returns that pack, now
// dead with its object in the bucket.
func (e *bucketEnv) drop(t *testing.T, name string) db.DeadPack {
	t.Helper()
	ctx := context.Background()
	before, err := e.st.db.DeadPackRows(ctx)
	if err != nil {
		t.Fatal(err)
	}
	gc(t, e.st, GCOptions{Action: GCDeleteSpecific, Paths: []string{name}})
	after, err := e.st.db.DeadPackRows(ctx)
	if err != nil {
		t.Fatal(err)
	}
	if len(after) != len(before)+1 {
		t.Fatalf("dead packs %v after deleting %s, %v before: want one more", after, name, before)
	}
	for _, p := range after {
		if !slices.Contains(before, p) {
			e.mustExist(t, p.ID)
			return p
		}
	}
	panic("unreachable")
}

func (e *bucketEnv) objectExists(t *testing.T, id int64) bool {
	t.Helper()
	_, err := e.bucket.Head(context.Background(), blobs.PackObject(id))
	if errors.Is(err, objstore.ErrNotFound) {
		return false
	}
	if err != nil {
		t.Fatal(err)
	}
	return true
}

func (e *bucketEnv) mustExist(t *testing.T, id int64) {
	t.Helper()
	if !e.objectExists(t, id) {
		t.Fatalf("pack %d's object is gone from the bucket", id)
	}
}

func (e *bucketEnv) waiting(t *testing.T) int64 {
	t.Helper()
	n, err := e.st.DeadPacksWaiting(context.Background())
	if err != nil {
		t.Fatal(err)
	}
	return n
}

// TestDeadPacksDeletedAfterRetention: with the database replicated to the bucket
// (retention and margin shortened to seconds), a dead pack's object is kept as long as
// the oldest restorable state of the database was made before its drop plus the margin,
// deleted once it was made after; a restore of the oldest state then still reads and
// verifies every path it has; a replica may not delete; a crash between the deletion of
// the object and that of its row is finished by the next round.
func TestDeadPacksDeletedAfterRetention(t *testing.T) {
	e := newBucketEnv(t, "primary")
	ctx := context.Background()
	p, err := replicate.StartPrimary(ctx, filepath.Join(e.st.Dir(), DBFile), e.loc, replicate.Options{
		SyncInterval: 100 * time.Millisecond, SnapshotInterval: time.Second, Retention: 3 * time.Second,
		L1Interval: time.Second, L2Interval: 2 * time.Second, L0Retention: time.Second,
	})
	if err != nil {
		t.Fatal(err)
	}
	defer p.Close(ctx)
	const margin = 2 * time.Second
	e.add(t, pathB)
	e.add(t, pathA)
	fillers := 0
	// round commits a transaction (so snapshots go on being made), ships it, and runs
	// DeleteDeadPacks, checking its decision against the rule.
	round := func(dead db.DeadPack) *DeadPackResult {
		t.Helper()
		e.add(t, fmt.Sprintf("%032d-filler", fillers))
		fillers++
		if err := p.Sync(ctx); err != nil {
			t.Fatal(err)
		}
		res, err := e.st.DeleteDeadPacks(ctx, DeadPackOptions{Margin: margin})
		if err != nil {
			t.Fatal(err)
		}
		if !res.Replica || res.Oldest.IsZero() {
			t.Fatalf("DeleteDeadPacks found no replica: %+v", res)
		}
		if due := res.Oldest.After(dead.Dropped.Add(margin + time.Second)); due != (res.Deleted > 0) {
			t.Fatalf("pack dropped at %s, margin %s, oldest restorable state %s: %d deleted",
				dead.Dropped.Format(time.TimeOnly), margin, res.Oldest.Format(time.StampMilli), res.Deleted)
		}
		return res
	}
	// waitDeleted runs rounds until dead's object is deleted, checking it is there
	// until then, and that at least the first round kept it.
	waitDeleted := func(dead db.DeadPack) {
		t.Helper()
		kept := 0
		for deadline := time.Now().Add(time.Minute); ; {
			res := round(dead)
			if res.Deleted > 0 {
				break
			}
			e.mustExist(t, dead.ID)
			kept++
			if time.Now().After(deadline) {
				t.Fatalf("pack %d dropped at %s still kept a minute later: %+v", dead.ID, dead.Dropped, res)
			}
			time.Sleep(200 * time.Millisecond)
		}
		if kept == 0 {
			t.Fatalf("pack %d deleted at the first round after its drop", dead.ID)
		}
		t.Logf("pack %d dropped at %s deleted after %d rounds that kept it", dead.ID, dead.Dropped.Format(time.TimeOnly), kept)
	}

	if err := p.Sync(ctx); err != nil {
		t.Fatal(err)
	}
	beforeDrop := time.Now()
	dead := e.drop(t, pathA)
	delete(e.nars, pathA)
	// Why it must wait: a restore to just before the drop, which the bucket can give,
	// has the path, whose data only the dead pack holds.
	before := filepath.Join(t.TempDir(), DBFile)
	if err := replicate.Restore(ctx, e.loc, before, beforeDrop); err != nil {
		t.Fatal(err)
	}
	if d, err := db.OpenReader(ctx, before); err != nil {
		t.Fatal(err)
	} else if ok, err := d.HasPath(ctx, pathA); err != nil || !ok {
		d.Close()
		t.Fatalf("the state restored as of just before the drop does not have %s (%v)", pathA, err)
	} else {
		d.Close()
	}
	waitDeleted(dead)
	if e.objectExists(t, dead.ID) {
		t.Fatalf("pack %d's object still in the bucket after its deletion", dead.ID)
	}
	if n := e.waiting(t); n != 0 {
		t.Fatalf("%d dead packs left", n)
	}
	if st := e.st.DeadPackStats(); st.Deleted != 1 || st.Failures != 0 {
		t.Fatalf("stats %+v, want 1 deleted", st)
	}

	// The oldest state a restore can give reads every path it has from the bucket.
	oldest, err := replicate.OldestRestorable(ctx, e.loc)
	if err != nil || !oldest.Found {
		t.Fatalf("oldest restorable state: %+v, %v", oldest, err)
	}
	restored := func(dir string) {
		t.Helper()
		if err := os.MkdirAll(dir, 0o755); err != nil {
			t.Fatal(err)
		}
		// A restore to a time takes the files made strictly before it.
		if err := replicate.Restore(ctx, e.loc, filepath.Join(dir, DBFile), oldest.Time.Add(time.Millisecond)); err != nil {
			t.Fatal(err)
		}
	}
	rdir := filepath.Join(t.TempDir(), "restored")
	restored(rdir)
	if _, err := DropNotInBucket(ctx, rdir); err != nil {
		t.Fatal(err)
	}
	r, err := Open(ctx, rdir, Options{})
	if err != nil {
		t.Fatal(err)
	}
	defer r.Close()
	if r.Packs() == "" {
		t.Fatal("restored data dir has local packs")
	}
	mustVerify(t, r)
	names, err := r.All(ctx)
	if err != nil {
		t.Fatal(err)
	}
	if !slices.Contains(names, pathB) || slices.Contains(names, pathA) {
		t.Fatalf("restored paths %v: want %s, not %s", names, pathB, pathA)
	}
	for _, n := range names {
		if !bytes.Equal(render(t, r, n), e.nars[n]) {
			t.Errorf("restored path %s reads other bytes", n)
		}
	}
	t.Logf("restored the oldest state (%s, txid %d): %d paths verified from the bucket", oldest.Time.Format(time.StampMilli), oldest.TXID, len(names))

	// A read replica (its data dir made by hand from a restore) refuses.
	repDir := filepath.Join(t.TempDir(), "replica")
	if err := MakeReplica(repDir, e.url); err != nil {
		t.Fatal(err)
	}
	restored(repDir)
	rep, err := Open(ctx, repDir, Options{})
	if err != nil {
		t.Fatal(err)
	}
	defer rep.Close()
	if _, err := rep.DeleteDeadPacks(ctx, DeadPackOptions{}); !errors.Is(err, db.ErrReadOnly) {
		t.Fatalf("DeleteDeadPacks on a replica: %v, want %v", err, db.ErrReadOnly)
	}

	// A crash after the object's deletion, before its row's.
	e.add(t, pathC)
	dead = e.drop(t, pathC)
	delete(e.nars, pathC)
	errCrash := errors.New("crash")
	testHookDeadPacksDeleted = func() error { return errCrash }
	for deadline := time.Now().Add(time.Minute); ; {
		e.add(t, fmt.Sprintf("%032d-filler", fillers))
		fillers++
		if err := p.Sync(ctx); err != nil {
			t.Fatal(err)
		}
		_, err := e.st.DeleteDeadPacks(ctx, DeadPackOptions{Margin: margin})
		if errors.Is(err, errCrash) {
			break
		}
		if err != nil {
			t.Fatal(err)
		}
		if time.Now().After(deadline) {
			t.Fatalf("pack %d dropped at %s not deleted within a minute", dead.ID, dead.Dropped)
		}
		time.Sleep(200 * time.Millisecond)
	}
	testHookDeadPacksDeleted = nil
	if e.objectExists(t, dead.ID) {
		t.Fatalf("pack %d's object still there after the round that crashed", dead.ID)
	}
	if n := e.waiting(t); n != 1 {
		t.Fatalf("%d dead packs after the crash, want its row left", n)
	}
	res, err := e.st.DeleteDeadPacks(ctx, DeadPackOptions{Margin: margin})
	if err != nil {
		t.Fatalf("round after the crash: %v", err)
	}
	if res.Deleted != 1 || res.Waiting != 0 || e.waiting(t) != 0 {
		t.Fatalf("round after the crash: %+v, %d rows left; want the row forgotten", res, e.waiting(t))
	}
	if st := e.st.DeadPackStats(); st.Deleted != 2 || st.Failures != 1 {
		t.Fatalf("stats %+v, want 2 deleted, 1 failure", st)
	}
	for _, n := range []string{pathB} {
		if !bytes.Equal(render(t, e.st, n), e.nars[n]) {
			t.Errorf("path %s reads other bytes", n)
		}
	}
}

// TestDeadPacksWithoutReplica: packs in a bucket that holds no replica of the database
// keep their dead objects unless DeadPackOptions.WithoutReplica says nothing else names
// them; then they go once the margin has passed since the drop.
func TestDeadPacksWithoutReplica(t *testing.T) {
	e := newBucketEnv(t, "alone")
	ctx := context.Background()
	e.add(t, pathB)
	e.add(t, pathA)
	dead := e.drop(t, pathA)
	for _, step := range []struct {
		name        string
		o           DeadPackOptions
		wantDeleted int
	}{
		{"no option: kept", DeadPackOptions{Margin: time.Millisecond, Now: func() time.Time { return time.Now().Add(time.Hour) }}, 0},
		{"without replica, margin not passed: kept", DeadPackOptions{WithoutReplica: true}, 0},
		{"without replica, margin passed: deleted", DeadPackOptions{WithoutReplica: true, Now: func() time.Time { return time.Now().Add(time.Hour + 2*time.Second) }}, 1},
	} {
		res, err := e.st.DeleteDeadPacks(ctx, step.o)
		if err != nil {
			t.Fatalf("%s: %v", step.name, err)
		}
		if res.Replica || res.Deleted != step.wantDeleted || res.Waiting != 1-step.wantDeleted {
			t.Fatalf("%s: %+v, want %d deleted", step.name, res, step.wantDeleted)
		}
		if got := e.objectExists(t, dead.ID); got != (step.wantDeleted == 0) {
			t.Fatalf("%s: object there: %v", step.name, got)
		}
	}
	if n := e.waiting(t); n != 0 {
		t.Fatalf("%d dead packs left", n)
	}
	mustVerify(t, e.st)
	if !bytes.Equal(render(t, e.st, pathB), e.nars[pathB]) {
		t.Errorf("path %s reads other bytes", pathB)
	}
}
