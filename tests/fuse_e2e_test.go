package tests

import (
	"bytes"
	"crypto/sha256"
	"errors"
	"io"
	"io/fs"
	"os"
	"os/exec"
	"path/filepath"
	"syscall"
	"testing"
	"time"

	"github.com/casnix/casnix/tests/nixtest"
)

// TestMountEqualsSourceStore: the FUSE view of a store imported from a real
// Nix store equals that store: the same file list, types, permissions,
// symlink targets, and every file's contents (hashed).
func TestMountEqualsSourceStore(t *testing.T) {
	nixtest.RequireHostNix(t)
	fx := nixtest.PopulateFixture(t)
	c := nixtest.NewCasnix(t)
	c.ImportFromNixStore(t, fx.Store)
	dir := t.TempDir()
	paths := fx.AllPaths(t)
	srv := startCasnixServe(t, c.Bin, c.DataDir, dir, filepath.Base(paths[0]))

	ents, err := os.ReadDir(srv.mnt)
	if err != nil {
		t.Fatal(err)
	}
	if len(ents) != len(paths) {
		t.Fatalf("mount root lists %d entries, the store has %d paths", len(ents), len(paths))
	}
	files := 0
	for _, p := range paths {
		src := fx.RealPath(p)
		mnt := filepath.Join(srv.mnt, filepath.Base(p))
		err := filepath.WalkDir(src, func(sp string, d fs.DirEntry, err error) error {
			if err != nil {
				return err
			}
			rel, _ := filepath.Rel(src, sp)
			mp := filepath.Join(mnt, rel)
			si, err := os.Lstat(sp)
			if err != nil {
				return err
			}
			mi, err := os.Lstat(mp)
			if err != nil {
				return err
			}
			if si.Mode().Type() != mi.Mode().Type() {
				t.Errorf("%s: type %v, source %v", mp, mi.Mode().Type(), si.Mode().Type())
				return nil
			}
			switch {
			case si.Mode().IsRegular():
				files++
				exec := si.Mode()&0o100 != 0
				if (mi.Mode()&0o111 != 0) != exec || mi.Mode()&0o222 != 0 {
					t.Errorf("%s: mode %v, source %v", mp, mi.Mode(), si.Mode())
				}
				if hashFile(t, sp) != hashFile(t, mp) {
					t.Errorf("%s: contents differ", mp)
				}
			case si.Mode()&os.ModeSymlink != 0:
				a, _ := os.Readlink(sp)
				b, _ := os.Readlink(mp)
				if a != b {
					t.Errorf("%s: -> %q, source -> %q", mp, b, a)
				}
			}
			return nil
		})
		if err != nil {
			t.Fatal(err)
		}
		// And the mount's NAR is the store's NAR.
		got := nixtest.Run(t, "nix-store", "--dump", mnt)
		want := nixtest.Run(t, "nix-store", "--dump", fx.RealPath(p))
		if !bytes.Equal(got, want) {
			t.Errorf("%s: NAR of the mount differs from nix-store --dump", p)
		}
	}
	if files < 5 {
		t.Fatalf("compared only %d files", files)
	}
}

func hashFile(t *testing.T, p string) [32]byte {
	t.Helper()
	f, err := os.Open(p)
	if err != nil {
		t.Fatal(err)
	}
	defer f.Close()
	h := sha256.New()
	if _, err := io.Copy(h, f); err != nil {
		t.Fatal(err)
	}
	var s [32]byte
	h.Sum(s[:0])
	return s
}

// TestMountSurvivesKill: a reader of a mount whose daemon is SIGKILLed gets
// an error, not a hang; the stale mount is detected and replaced by the
// next casnix mount at the same place.
func TestMountSurvivesKill(t *testing.T) {
	nixtest.RequireHostNix(t)
	fx := nixtest.PopulateFixture(t)
	c := nixtest.NewCasnix(t)
	c.ImportFromNixStore(t, fx.Store)
	big := fx.Path(t, "big-file")
	mnt := filepath.Join(t.TempDir(), "m")
	start := func() *exec.Cmd {
		cmd := exec.Command(c.Bin, "-d", c.DataDir, "mount", mnt)
		cmd.Stderr = os.Stderr
		if err := cmd.Start(); err != nil {
			t.Fatal(err)
		}
		deadline := time.Now().Add(20 * time.Second)
		for {
			// The root is never cached, so this asks the new daemon.
			if ents, err := os.ReadDir(mnt); err == nil && len(ents) > 0 {
				return cmd
			}
			if time.Now().After(deadline) {
				cmd.Process.Kill()
				t.Fatal("mount not ready")
			}
			time.Sleep(50 * time.Millisecond)
		}
	}
	t.Cleanup(func() { syscall.Unmount(mnt, syscall.MNT_DETACH) })
	first := start()
	// A reader loops over a big file while the daemon is killed. Once the
	// file is in the page cache, cat alone never asks the daemon (no OPEN,
	// no FLUSH: the contents are immutable, so cached pages stay readable
	// after the daemon died); listing the root, which is never cached,
	// does, and fails.
	reader := exec.Command("sh", "-c", `while cat "$1" > /dev/null && ls "$2" > /dev/null; do :; done; exit 0`,
		"sh", filepath.Join(mnt, filepath.Base(big)), mnt)
	if err := reader.Start(); err != nil {
		t.Fatal(err)
	}
	time.Sleep(300 * time.Millisecond)
	first.Process.Kill()
	first.Wait()
	done := make(chan error, 1)
	go func() { done <- reader.Wait() }()
	select {
	case <-done:
	case <-time.After(20 * time.Second):
		reader.Process.Kill()
		t.Fatal("reader hung after the daemon was killed")
	}
	// The root is never cached (new paths must appear), so it shows the
	// dead connection.
	if _, err := os.ReadDir(mnt); !errors.Is(err, syscall.ENOTCONN) {
		t.Fatalf("dead mount: readdir = %v, want ENOTCONN", err)
	}
	second := start() // cleans the stale mount and mounts again
	defer func() {
		second.Process.Signal(syscall.SIGTERM)
		if err := second.Wait(); err != nil {
			t.Errorf("casnix mount: %v", err)
		}
		if _, err := os.Stat(filepath.Join(mnt, filepath.Base(big))); err == nil {
			t.Error("still mounted after SIGTERM")
		}
	}()
	if hashFile(t, filepath.Join(mnt, filepath.Base(big))) != hashFile(t, fx.RealPath(big)) {
		t.Fatal("contents differ after remount")
	}
}
