package replicate_test

import (
	"bytes"
	"context"
	"encoding/json"
	"errors"
	"io"
	"strings"
	"testing"
	"time"

	"github.com/casnix/casnix/objstore"
	"github.com/casnix/casnix/replicate"
	"github.com/casnix/casnix/tests/nixtest"
)

// TestLease: one writer per bucket prefix. A second owner is refused while the lease is
// renewed, with an error naming the holder; the same owner (a primary restarted after a
// crash) takes its lease back at once; an expired lease is taken over, and its old holder
// learns it lost it; a released lease is free.
func TestLease(t *testing.T) {
	srv := nixtest.StartS3(t)
	srv.SetEnv(t)
	ctx := context.Background()
	loc, err := objstore.ParseURL(srv.URL("leased"))
	if err != nil {
		t.Fatal(err)
	}
	const ttl = 3 * time.Second
	a, err := replicate.AcquireLease(ctx, loc, "dir-a", ttl)
	if err != nil {
		t.Fatal(err)
	}
	if _, err := replicate.AcquireLease(ctx, loc, "dir-b", ttl); !errors.Is(err, replicate.ErrLeaseHeld) || !strings.Contains(err.Error(), "dir-a") {
		t.Fatalf("second primary: %v, want ErrLeaseHeld naming dir-a", err)
	}
	time.Sleep(ttl + time.Second) // a renews meanwhile
	if _, err := replicate.AcquireLease(ctx, loc, "dir-b", ttl); !errors.Is(err, replicate.ErrLeaseHeld) {
		t.Fatalf("second primary after a renewal: %v, want ErrLeaseHeld", err)
	}
	// dir-a "crashes" (its renewals stop without a release) and restarts.
	a2, err := replicate.AcquireLease(ctx, loc, "dir-a", ttl)
	if err != nil {
		t.Fatalf("the same data dir again: %v", err)
	}
	select {
	case <-a.Lost():
	case <-time.After(2 * ttl):
		t.Fatal("the first holder did not learn that its lease was taken over")
	}
	if !errors.Is(a.Err(), replicate.ErrLeaseLost) {
		t.Fatalf("lost lease: %v", a.Err())
	}
	if err := a2.Release(ctx); err != nil {
		t.Fatal(err)
	}
	b, err := replicate.AcquireLease(ctx, loc, "dir-b", ttl)
	if err != nil {
		t.Fatalf("after release: %v", err)
	}
	if err := b.Release(ctx); err != nil {
		t.Fatal(err)
	}
	bucket, err := objstore.Open(ctx, loc, objstore.Options{})
	if err != nil {
		t.Fatal(err)
	}
	// A renewal whose answer was lost (the server went away after storing it): the object
	// changed under the holder, but it is still its own, so it keeps the lease.
	d, err := replicate.AcquireLease(ctx, loc, "dir-d", ttl)
	if err != nil {
		t.Fatal(err)
	}
	rc, err := bucket.Get(ctx, replicate.LeaseName)
	if err != nil {
		t.Fatal(err)
	}
	own, err := io.ReadAll(rc)
	rc.Close()
	if err != nil {
		t.Fatal(err)
	}
	var body map[string]any
	if err := json.Unmarshal(own, &body); err != nil {
		t.Fatal(err)
	}
	body["renewed"] = time.Now().UTC().Format(time.RFC3339Nano)
	own, _ = json.Marshal(body)
	if err := bucket.Put(ctx, replicate.LeaseName, bytes.NewReader(own), int64(len(own))); err != nil {
		t.Fatal(err)
	}
	select {
	case <-d.Lost():
		t.Fatalf("its own renewal, seen late, made the holder give the lease up: %v", d.Err())
	case <-time.After(2 * ttl): // several renewals
	}
	if _, err := replicate.AcquireLease(ctx, loc, "dir-b", ttl); !errors.Is(err, replicate.ErrLeaseHeld) {
		t.Fatalf("second primary while dir-d holds the lease: %v, want ErrLeaseHeld", err)
	}
	if err := d.Release(ctx); err != nil {
		t.Fatal(err)
	}
	// A holder whose host died an hour ago: its lease has expired and is taken over.
	stale := `{"owner":"dir-dead","host":"gone","pid":1,"renewed":"` + time.Now().Add(-time.Hour).UTC().Format(time.RFC3339) + `","ttl":"30s"}`
	if err := bucket.PutIfAbsent(ctx, replicate.LeaseName, []byte(stale)); err != nil {
		t.Fatal(err)
	}
	c, err := replicate.AcquireLease(ctx, loc, "dir-c", ttl)
	if err != nil {
		t.Fatalf("taking over an expired lease: %v", err)
	}
	if err := c.Release(ctx); err != nil {
		t.Fatal(err)
	}
}
