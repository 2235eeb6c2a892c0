package blobs

import (
	"context"
	"errors"
	"fmt"
	"io/fs"
	"os"
	"path/filepath"
	"time"

	"golang.org/x/sys/unix"
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
	return flockWait(ctx, filepath.Join(s.dir, HoldLockFile), unix.LOCK_SH)
}

// flockWait takes a flock on path in mode, polling so ctx can cancel the
// wait. The returned func releases it.
func flockWait(ctx context.Context, path string, mode int) (func(), error) {
	f, err := os.OpenFile(path, os.O_RDWR|os.O_CREATE, 0o644)
	if err != nil {
		return nil, fmt.Errorf("open %s: %w", path, err)
	}
	delay := time.Millisecond
	for {
		err := unix.Flock(int(f.Fd()), mode|unix.LOCK_NB)
		if err == nil {
			return func() { f.Close() }, nil
		}
		if err != unix.EWOULDBLOCK && err != unix.EINTR {
			f.Close()
			return nil, fmt.Errorf("lock %s: %w", path, err)
		}
		if ctx == nil {
			f.Close()
			return nil, nil // non-blocking attempt: busy
		}
		select {
		case <-ctx.Done():
			f.Close()
			return nil, fmt.Errorf("wait for %s: %w", path, ctx.Err())
		case <-time.After(delay):
		}
		delay = min(delay*2, 50*time.Millisecond)
	}
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
	unlock, err := flockWait(lctx, filepath.Join(s.dir, HoldLockFile), unix.LOCK_EX)
	if err != nil {
		return rs, err
	}
	if unlock == nil {
		return rs, nil // a backup holds the packs: later
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
