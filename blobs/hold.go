package blobs

import (
	"context"
	"errors"
	"fmt"
	"io/fs"
	"os"
	"path/filepath"

	"golang.org/x/sys/unix"

	"github.com/casnix/casnix/lockfile"
)

// HoldLockFile, in the pack directory, keeps pack files from being removed.
// A backup holds it shared from before its database snapshot until it has
// copied the packs that snapshot names; a compaction unlinks a pack file
// only while it holds it exclusively, and otherwise defers the unlink to
// its end, where it waits. The index moves on meanwhile (chunks are moved
// and pack rows dropped as usual); only the files stay, so a snapshot taken
// before the move still finds every byte it names. It is a flock, so it
// works across processes and a dead holder releases it.
const HoldLockFile = "hold.lock"

// HoldPacks keeps every pack file that exists now in place until the
// returned func is called (waiting for a compaction's pending unlinks to
// finish first is not needed: a file already unlinked has no row in any
// later snapshot).
func (s *Store) HoldPacks(ctx context.Context) (func(), error) {
	return lockfile.Open(ctx, filepath.Join(s.dir, HoldLockFile), unix.LOCK_SH)
}

// removal is a pack file a compaction dropped from the index.
type removal struct {
	id    int64
	path  string
	usage int64
}

// removePacks unlinks dropped pack files if no backup holds them. With
// wait it waits for the hold lock (until ctx is done); without, it returns
// the files it could not remove yet. A file left behind by a crash or a
// cancelled wait has no row, and the next Compact removes it as an orphan.
func (s *Store) removePacks(ctx context.Context, rs []removal, wait bool, st *CompactStats) ([]removal, error) {
	if len(rs) == 0 {
		return nil, nil
	}
	var lctx context.Context
	if wait {
		lctx = ctx
	}
	unlock, err := lockfile.Open(lctx, filepath.Join(s.dir, HoldLockFile), unix.LOCK_EX)
	if errors.Is(err, lockfile.ErrBusy) {
		return rs, nil // a backup holds the packs: later
	}
	if err != nil {
		return rs, err
	}
	defer unlock()
	for i, r := range rs {
		if err := os.Remove(r.path); err != nil && !errors.Is(err, fs.ErrNotExist) {
			return rs[i:], fmt.Errorf("remove pack %d: %w", r.id, err)
		}
		s.forgetReaders(r.id)
		st.PacksRemoved++
		st.DiskRemoved += r.usage
	}
	return nil, nil
}

// tryHold takes the hold lock exclusively without waiting, as a
// compaction's unlink does: an eviction of an uploaded pack's local file
// is an unlink a backup copying that file must not see.
func (s *Store) tryHold() (func(), error) { return s.tryLockEx(HoldLockFile) }

// tryLockEx takes the lock file name of the pack directory exclusively if
// it is free now (lockfile.ErrBusy if not), without waiting.
func (s *Store) tryLockEx(name string) (func(), error) {
	var noWait context.Context // nil: lockfile.Open tries once
	return lockfile.Open(noWait, filepath.Join(s.dir, name), unix.LOCK_EX)
}
