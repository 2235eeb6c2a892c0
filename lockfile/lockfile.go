// Package lockfile takes flock(2) locks that a context can stop waiting
// for. flock itself blocks with no timeout, so a waiter polls with
// non-blocking attempts, backing off up to 50 ms: casnix's locks (the GC
// lock, the data-dir lock, the pack hold) are held across processes, and a
// daemon connection that hangs up or a command interrupted by a signal
// must stop waiting at once.
package lockfile

import (
	"context"
	"errors"
	"fmt"
	"os"
	"time"

	"golang.org/x/sys/unix"
)

// ErrBusy is what Try returns when another holder has the lock.
var ErrBusy = errors.New("lock held by another")

// Wait locks f in mode (unix.LOCK_SH or unix.LOCK_EX) once no conflicting
// holder is left, or fails when ctx is done.
func Wait(ctx context.Context, f *os.File, mode int) error {
	delay := time.Millisecond
	for {
		err := Try(f, mode)
		if !errors.Is(err, ErrBusy) {
			return err
		}
		select {
		case <-ctx.Done():
			return fmt.Errorf("wait for %s: %w", f.Name(), ctx.Err())
		case <-time.After(delay):
		}
		delay = min(delay*2, 50*time.Millisecond)
	}
}

// Try locks f in mode if it can without waiting; ErrBusy if not.
func Try(f *os.File, mode int) error {
	for {
		err := unix.Flock(int(f.Fd()), mode|unix.LOCK_NB)
		switch {
		case err == nil:
			return nil
		case err == unix.EINTR:
			continue
		case err == unix.EWOULDBLOCK:
			return fmt.Errorf("%s: %w", f.Name(), ErrBusy)
		default:
			return fmt.Errorf("lock %s: %w", f.Name(), err)
		}
	}
}

// Open opens (creating it if needed) the lock file at path and locks it
// with Wait, or with Try when ctx is nil. The returned func releases it.
func Open(ctx context.Context, path string, mode int) (func(), error) {
	f, err := os.OpenFile(path, os.O_RDWR|os.O_CREATE, 0o644)
	if err != nil {
		return nil, fmt.Errorf("open %s: %w", path, err)
	}
	if ctx == nil {
		err = Try(f, mode)
	} else {
		err = Wait(ctx, f, mode)
	}
	if err != nil {
		f.Close()
		return nil, err
	}
	return func() { f.Close() }, nil
}
