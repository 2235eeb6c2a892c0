package replicate_test

import (
	"context"
	"errors"
	"path/filepath"
	"slices"
	"testing"
	"time"

	"github.com/casnix/casnix/db"
	"github.com/casnix/casnix/objstore"
	"github.com/casnix/casnix/replicate"
	"github.com/casnix/casnix/store"
	"github.com/casnix/casnix/tests/nixtest"
)

// TestOldestRestorable: OldestRestorable names exactly the oldest state a restore can
// give, both while the database's first transactions are still in the bucket and after
// retention (shortened to seconds) removed them: a restore to a time just after it gives
// the paths committed by then, one to the time itself (a restore takes the files made
// strictly before its time) finds nothing.
func TestOldestRestorable(t *testing.T) {
	srv := nixtest.StartS3(t)
	srv.SetEnv(t)
	ctx := context.Background()
	loc, err := objstore.ParseURL(srv.URL("oldest"))
	if err != nil {
		t.Fatal(err)
	}
	if r, err := replicate.OldestRestorable(ctx, loc); err != nil || r.Replica || r.Found {
		t.Fatalf("empty prefix: %+v, %v; want no replica", r, err)
	}
	dir := t.TempDir()
	st, err := store.Open(ctx, dir, store.Options{})
	if err != nil {
		t.Fatal(err)
	}
	defer st.Close()
	p, err := replicate.StartPrimary(ctx, filepath.Join(dir, store.DBFile), loc, replicate.Options{
		SyncInterval: 100 * time.Millisecond, SnapshotInterval: time.Second, Retention: 3 * time.Second,
		L1Interval: time.Second, L2Interval: 2 * time.Second, L0Retention: time.Second,
	})
	if err != nil {
		t.Fatal(err)
	}
	defer p.Close(ctx)

	// committed[i] is when path i was committed and shipped.
	var added []string
	var committed []time.Time
	add := func() {
		added = append(added, addPath(t, st, len(added)))
		if err := p.Sync(ctx); err != nil {
			t.Fatal(err)
		}
		committed = append(committed, time.Now())
	}
	check := func(when string) replicate.Restorable {
		t.Helper()
		r, err := replicate.OldestRestorable(ctx, loc)
		if err != nil {
			t.Fatal(err)
		}
		if !r.Replica || !r.Found {
			t.Fatalf("%s: %+v, want a restorable state", when, r)
		}
		out := filepath.Join(t.TempDir(), "at.db")
		err = replicate.Restore(ctx, loc, out, r.Time)
		if !errors.Is(err, replicate.ErrNoReplica) {
			t.Errorf("%s: restore to %s, the oldest state's time (exclusive): %v, want %v", when, r.Time.Format(time.RFC3339Nano), err, replicate.ErrNoReplica)
		}
		out = filepath.Join(t.TempDir(), "after.db")
		if err := replicate.Restore(ctx, loc, out, r.Time.Add(time.Millisecond)); err != nil {
			t.Fatalf("%s: restore to just after the oldest state %s: %v", when, r.Time.Format(time.RFC3339Nano), err)
		}
		// Not as a replica: its view hides the paths of packs not in a bucket (this
		// store's packs are local).
		d, err := db.OpenReader(ctx, out)
		if err != nil {
			t.Fatal(err)
		}
		defer d.Close()
		got := names(t, d)
		t.Logf("%s: oldest %+v: %d paths restored", when, r, len(got))
		// The state holds a prefix of the paths: every one committed well before it,
		// none committed after it.
		if !slices.Equal(got, added[:len(got)]) {
			t.Fatalf("%s: restored paths %v, not a prefix of %v", when, got, added)
		}
		for i, c := range committed {
			if i >= len(got) && c.Before(r.Time.Add(-time.Second)) {
				t.Errorf("%s: path %d committed at %s is not in the state of %s", when, i, c.Format(time.RFC3339Nano), r.Time.Format(time.RFC3339Nano))
			}
			if i < len(got) && c.After(r.Time.Add(time.Second)) {
				t.Errorf("%s: path %d committed at %s is in the state of %s", when, i, c.Format(time.RFC3339Nano), r.Time.Format(time.RFC3339Nano))
			}
		}
		return r
	}

	start := time.Now()
	add()
	first := check("at start")
	if first.Time.After(time.Now()) || first.Time.Before(start.Add(-time.Minute)) {
		t.Fatalf("oldest state at %s, started %s", first.Time, start)
	}
	// Writes for a while: snapshots every second, kept 3 s; the first transactions' files
	// are compacted and removed.
	deadline := time.Now().Add(time.Minute)
	for {
		add()
		time.Sleep(200 * time.Millisecond)
		r, err := replicate.OldestRestorable(ctx, loc)
		if err != nil {
			t.Fatal(err)
		}
		if r.Found && r.Time.After(first.Time.Add(4*time.Second)) && r.TXID > first.TXID {
			break
		}
		if time.Now().After(deadline) {
			t.Fatalf("oldest restorable state still %+v after a minute (first %+v):\n%s", r, first, listing(t, loc.Sub(replicate.Dir)))
		}
	}
	later := check("after retention")
	t.Logf("oldest restorable: at start %s (txid %d), later %s (txid %d), %d paths added",
		first.Time.Format(time.StampMilli), first.TXID, later.Time.Format(time.StampMilli), later.TXID, len(added))
}
