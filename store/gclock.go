package store

import (
	"context"
	"errors"
	"path/filepath"
	"time"

	"golang.org/x/sys/unix"

	"github.com/casnix/casnix/lockfile"
)

// GCLockFile is the data directory's garbage-collection lock. Everything
// that must not see data vanish under it (a Batch between its first
// deduplicated chunk and its commit, a backup copying packs) holds it
// shared; a collection's sweep holds it exclusive. It is a flock, so it
// works across processes (`casnix gc` next to `casnix serve`) and is
// released by the kernel when a holder dies.
const GCLockFile = "gc.lock"

// GCIntentFile is where a collection waiting for the GC lock says so: it
// holds it exclusive until it has the GC lock, and new shared holders wait
// (up to gcYield) while it does. flock(2) has no queue, so without it a
// collection waits until no shared holder at all is left, which a daemon
// with a few clients copying at once (each Batch holding the lock shared
// while it ingests) or a backup after another never gives it: TestSoak saw
// nix-store --delete and --gc through the daemon wait over 4 minutes.
const GCIntentFile = "gc.intent"

// gcYield bounds how long a new shared holder waits for a pending
// collection. It is a bound, not a queue: a goroutine that already holds the
// lock shared may ask for it again (a Batch's connection adds a temp root
// for its next path), and waiting for a collection that waits for it would
// never end; after gcYield it goes ahead beside the waiting collection.
// Holders that started before the collection asked finish within seconds
// (one path's ingest), so the collection gets in within about that long.
var gcYield = 5 * time.Second

// lockGC takes the GC lock in mode (unix.LOCK_SH or unix.LOCK_EX), waiting
// until ctx is done. The returned func releases it.
func (s *Store) lockGC(ctx context.Context, mode int) (func(), error) {
	if mode == unix.LOCK_EX {
		// Announce the collection, so new shared holders let it in.
		intent, err := s.lockFile(ctx, GCIntentFile, unix.LOCK_EX)
		if err != nil {
			return nil, err
		}
		defer intent()
		return s.lockFile(ctx, GCLockFile, mode)
	}
	if err := s.yieldToCollection(ctx); err != nil {
		return nil, err
	}
	return s.lockFile(ctx, GCLockFile, mode)
}

// yieldToCollection waits while a collection announced itself (holds
// GCIntentFile), at most gcYield.
func (s *Store) yieldToCollection(ctx context.Context) error {
	if ctx == nil {
		return nil // a try-lock (lockfile.Open with no context) never waits
	}
	yctx, cancel := context.WithTimeout(ctx, gcYield)
	defer cancel()
	probe, err := s.lockFile(yctx, GCIntentFile, unix.LOCK_SH)
	if err == nil {
		probe()
		return nil
	}
	if ctx.Err() != nil {
		return err
	}
	if errors.Is(err, context.DeadlineExceeded) {
		return nil // gcYield is over: go ahead (see gcYield)
	}
	return err
}

// lockFile takes a flock on the data directory's file name.
func (s *Store) lockFile(ctx context.Context, name string, mode int) (func(), error) {
	return lockfile.Open(ctx, filepath.Join(s.dir, name), mode)
}

// SharedGCLock keeps garbage collection from sweeping until the returned
// func is called. Holders may overlap each other; a new one first lets a
// waiting collection in (see GCIntentFile).
func (s *Store) SharedGCLock(ctx context.Context) (func(), error) {
	return s.lockGC(ctx, unix.LOCK_SH)
}

// sharedGCLockHeld takes the GC lock shared again for a caller that holds
// it already: no yield to a waiting collection (see TempRoots.AddWithin).
// flock(2) grants a second shared lock beside a waiting exclusive one.
func (s *Store) sharedGCLockHeld(ctx context.Context) (func(), error) {
	return s.lockFile(ctx, GCLockFile, unix.LOCK_SH)
}

// ExclusiveGCLock waits for every shared holder to finish, keeping new ones
// waiting meanwhile (up to gcYield each), and keeps them out until the
// returned func is called.
func (s *Store) ExclusiveGCLock(ctx context.Context) (func(), error) {
	return s.lockGC(ctx, unix.LOCK_EX)
}
