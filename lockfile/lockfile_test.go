package lockfile

import (
	"context"
	"errors"
	"path/filepath"
	"testing"
	"time"

	"golang.org/x/sys/unix"
)

// TestOpen: shared holders overlap, an exclusive one waits for them (and
// gives up when its context ends), Try says busy, and releasing lets the
// waiter in.
func TestOpen(t *testing.T) {
	path := filepath.Join(t.TempDir(), "x.lock")
	ctx := context.Background()
	sh1, err := Open(ctx, path, unix.LOCK_SH)
	if err != nil {
		t.Fatal(err)
	}
	sh2, err := Open(ctx, path, unix.LOCK_SH)
	if err != nil {
		t.Fatalf("second shared holder: %v", err)
	}
	if _, err := Open(nil, path, unix.LOCK_EX); !errors.Is(err, ErrBusy) {
		t.Fatalf("Try exclusive beside shared holders: %v, want ErrBusy", err)
	}
	short, cancel := context.WithTimeout(ctx, 20*time.Millisecond)
	defer cancel()
	if _, err := Open(short, path, unix.LOCK_EX); !errors.Is(err, context.DeadlineExceeded) {
		t.Fatalf("Wait exclusive with a short context: %v, want deadline exceeded", err)
	}
	got := make(chan error, 1)
	go func() {
		unlock, err := Open(ctx, path, unix.LOCK_EX)
		if err == nil {
			unlock()
		}
		got <- err
	}()
	sh1()
	sh2()
	select {
	case err := <-got:
		if err != nil {
			t.Fatalf("exclusive after the shared holders left: %v", err)
		}
	case <-time.After(5 * time.Second):
		t.Fatal("exclusive waiter still waiting after the shared holders left")
	}
}
