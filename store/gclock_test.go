package store

import (
	"bytes"
	"context"
	"sync"
	"sync/atomic"
	"testing"
	"time"
)

// TestExclusiveGCLockNotStarved: shared holders that overlap without pause (clients
// copying at once, each Batch holding the GC lock shared) must not keep a collection out
// for long: the exclusive lock is taken within a few hold times.
func TestExclusiveGCLockNotStarved(t *testing.T) {
	s := &Store{dir: t.TempDir()}
	ctx, cancel := context.WithTimeout(context.Background(), 30*time.Second)
	defer cancel()
	const hold = 50 * time.Millisecond
	var stop atomic.Bool
	var wg sync.WaitGroup
	for i := range 4 {
		wg.Add(1)
		go func() {
			defer wg.Done()
			time.Sleep(time.Duration(i) * hold / 4) // staggered: some holder always holds it
			for !stop.Load() {
				unlock, err := s.SharedGCLock(ctx)
				if err != nil {
					t.Error(err)
					return
				}
				time.Sleep(hold)
				unlock()
			}
		}()
	}
	defer func() { stop.Store(true); wg.Wait() }()
	time.Sleep(3 * hold)
	start := time.Now()
	ectx, ecancel := context.WithTimeout(ctx, 10*time.Second)
	defer ecancel()
	unlock, err := s.ExclusiveGCLock(ectx)
	if err != nil {
		t.Fatalf("exclusive GC lock beside a stream of shared holders: %v after %s", err, time.Since(start).Round(time.Millisecond))
	}
	unlock()
	if took := time.Since(start); took > 2*time.Second {
		t.Errorf("exclusive GC lock took %s beside shared holders of %s each", took, hold)
	}
}

// TestSharedGCLockAgainWhileCollectionWaits: a goroutine that holds the lock shared and
// asks for it again while a collection waits (a connection's Batch, then its next temp
// root) gets it after at most gcYield instead of waiting for the collection, which waits
// for it; the collection gets the lock once both are released.
func TestSharedGCLockAgainWhileCollectionWaits(t *testing.T) {
	old := gcYield
	gcYield = 200 * time.Millisecond
	defer func() { gcYield = old }()
	s := &Store{dir: t.TempDir()}
	ctx, cancel := context.WithTimeout(context.Background(), 30*time.Second)
	defer cancel()
	first, err := s.SharedGCLock(ctx)
	if err != nil {
		t.Fatal(err)
	}
	got := make(chan error, 1)
	go func() {
		unlock, err := s.ExclusiveGCLock(ctx)
		if err == nil {
			unlock()
		}
		got <- err
	}()
	time.Sleep(100 * time.Millisecond) // the collection waits, announced
	start := time.Now()
	second, err := s.SharedGCLock(ctx)
	if err != nil {
		t.Fatalf("shared GC lock again while a collection waits: %v", err)
	}
	if took := time.Since(start); took < gcYield/2 || took > gcYield+2*time.Second {
		t.Errorf("shared GC lock again took %s, want about gcYield (%s): it first lets the collection in", took, gcYield)
	}
	select {
	case err := <-got:
		t.Fatalf("collection got the lock while it was held shared: %v", err)
	default:
	}
	second()
	first()
	select {
	case err := <-got:
		if err != nil {
			t.Fatalf("collection after the shared holders left: %v", err)
		}
	case <-time.After(5 * time.Second):
		t.Fatal("collection still waiting after the shared holders left")
	}
}

// TestTempRootWithinBatchWhileCollectionWaits: the temp root of each next path of an
// AddMultipleToStore is added while the connection's Batch holds the GC lock shared. With
// a collection waiting for the lock, Add yields to it for gcYield, which is wasted (the
// collection waits for the Batch): AddWithin the Batch must not wait. (Before AddWithin,
// a collection pending beside an AddMultipleToStore of n paths held that upload up to
// n×gcYield, and the collection with it: TestClientDisconnects saw both time out.)
func TestTempRootWithinBatchWhileCollectionWaits(t *testing.T) {
	old := gcYield
	gcYield = 20 * time.Second // long enough that a yield cannot pass for no yield
	defer func() { gcYield = old }()
	s := openStore(t)
	ctx, cancel := context.WithTimeout(context.Background(), 60*time.Second)
	defer cancel()
	b := s.NewBatch(ctx)
	defer b.Abort()
	if _, err := b.Add(bytes.NewReader(fileNAR("x")), PathInfo{Name: pathA}); err != nil {
		t.Fatal(err)
	}
	if !b.HoldsGCLock() {
		t.Fatal("a Batch with a path added does not hold the GC lock")
	}
	roots, err := s.NewTempRoots()
	if err != nil {
		t.Fatal(err)
	}
	defer roots.Close()
	collected := make(chan error, 1)
	go func() {
		unlock, err := s.ExclusiveGCLock(ctx)
		if err == nil {
			unlock()
		}
		collected <- err
	}()
	time.Sleep(200 * time.Millisecond) // the collection waits, announced
	start := time.Now()
	if err := roots.AddWithin(ctx, b, pathB); err != nil {
		t.Fatal(err)
	}
	if took := time.Since(start); took > 5*time.Second {
		t.Errorf("temp root within a Batch took %s while a collection waited: it yielded", took)
	}
	select {
	case err := <-collected:
		t.Fatalf("collection got the GC lock while a Batch held it: %v", err)
	default:
	}
	b.Abort()
	if err := <-collected; err != nil {
		t.Fatalf("collection after the Batch ended: %v", err)
	}
}
