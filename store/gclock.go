package store

import (
	"context"
	"path/filepath"

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

// lockGC takes the GC lock in mode (unix.LOCK_SH or unix.LOCK_EX), waiting
// until ctx is done. The returned func releases it.
func (s *Store) lockGC(ctx context.Context, mode int) (func(), error) {
	return s.lockFile(ctx, GCLockFile, mode)
}

// lockFile takes a flock on the data directory's file name.
func (s *Store) lockFile(ctx context.Context, name string, mode int) (func(), error) {
	return lockfile.Open(ctx, filepath.Join(s.dir, name), mode)
}

// SharedGCLock keeps garbage collection from sweeping until the returned
// func is called. Holders may overlap each other.
func (s *Store) SharedGCLock(ctx context.Context) (func(), error) {
	return s.lockGC(ctx, unix.LOCK_SH)
}

// ExclusiveGCLock waits for every shared holder to finish and keeps new
// ones out until the returned func is called.
func (s *Store) ExclusiveGCLock(ctx context.Context) (func(), error) {
	return s.lockGC(ctx, unix.LOCK_EX)
}
