package crashfs

import (
	"bytes"
	"errors"
	"os"
	"path/filepath"
	"syscall"
	"testing"

	"github.com/casnix/casnix/tests/nixtest"
	"golang.org/x/sys/unix"
)

// mount mounts a crashfs over backing at a fresh mountpoint; the test cleanup cuts the
// power if the test did not, and unmounts.
func mount(t *testing.T, backing string, opts Options) *FS {
	t.Helper()
	mnt := t.TempDir()
	f, err := Mount(backing, mnt, opts)
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() {
		if err := f.Unmount(); err != nil {
			t.Errorf("cleanup: %v", err)
		}
	})
	return f
}

func must(t *testing.T, err error) {
	t.Helper()
	if err != nil {
		t.Fatal(err)
	}
}

func writeFile(t *testing.T, path string, data []byte, fsync bool) {
	t.Helper()
	fd, err := os.OpenFile(path, os.O_WRONLY|os.O_CREATE, 0o644)
	must(t, err)
	_, err = fd.WriteAt(data, 0)
	must(t, err)
	if fsync {
		must(t, fd.Sync())
	}
	must(t, fd.Close())
}

func fsyncDir(t *testing.T, dir string) {
	t.Helper()
	fd, err := os.Open(dir)
	must(t, err)
	must(t, fd.Sync())
	must(t, fd.Close())
}

// page returns n bytes of the byte b.
func page(b byte, n int) []byte { return bytes.Repeat([]byte{b}, n) }

// TestModel runs each scenario under many seeds and checks every outcome is one POSIX
// allows, and that the outcomes a strict file system may produce do occur.
func TestModel(t *testing.T) {
	nixtest.RequireFUSE(t)
	const seeds = 24
	old := page('o', 3*pageSize)
	newer := page('n', 3*pageSize)
	tests := []struct {
		name string
		// setup runs on the mount (mnt) before the cut.
		setup func(t *testing.T, mnt string)
		// classify checks the backing dir after the cut and names the outcome; an
		// empty name with a non-nil error is a state POSIX forbids.
		classify func(backing string) (string, error)
		// want lists outcomes that must each appear under some seed.
		want []string
	}{
		{
			name: "write+fsync survives",
			setup: func(t *testing.T, mnt string) {
				writeFile(t, filepath.Join(mnt, "f"), newer, true)
				fsyncDir(t, mnt)
			},
			classify: func(b string) (string, error) {
				got, err := os.ReadFile(filepath.Join(b, "f"))
				if err != nil || !bytes.Equal(got, newer) {
					return "", errors.New("fsynced file lost or changed")
				}
				return "kept", nil
			},
			want: []string{"kept"},
		},
		{
			name: "write without fsync may be lost or torn",
			setup: func(t *testing.T, mnt string) {
				writeFile(t, filepath.Join(mnt, "f"), old, true)
				fsyncDir(t, mnt)
				writeFile(t, filepath.Join(mnt, "f"), newer, false)
			},
			classify: func(b string) (string, error) {
				got, err := os.ReadFile(filepath.Join(b, "f"))
				if err != nil || len(got) != len(old) {
					return "", errors.New("durable file lost or resized")
				}
				var o, n int
				for i := 0; i < len(got); i += pageSize {
					switch {
					case bytes.Equal(got[i:i+pageSize], old[i:i+pageSize]):
						o++
					case bytes.Equal(got[i:i+pageSize], newer[i:i+pageSize]):
						n++
					default:
						return "", errors.New("a page is neither old nor new")
					}
				}
				switch {
				case n == 0:
					return "lost", nil
				case o == 0:
					return "kept", nil
				}
				return "torn", nil
			},
			want: []string{"lost", "kept", "torn"},
		},
		{
			name: "create without dir fsync can vanish",
			setup: func(t *testing.T, mnt string) {
				writeFile(t, filepath.Join(mnt, "f"), newer, true)
			},
			classify: func(b string) (string, error) {
				got, err := os.ReadFile(filepath.Join(b, "f"))
				switch {
				case errors.Is(err, os.ErrNotExist):
					return "vanished", nil
				case err == nil && bytes.Equal(got, newer):
					return "kept", nil
				}
				return "", errors.New("file present with wrong data")
			},
			want: []string{"vanished", "kept"},
		},
		{
			name: "rename without dir fsync may revert",
			setup: func(t *testing.T, mnt string) {
				writeFile(t, filepath.Join(mnt, "a"), old, true)
				fsyncDir(t, mnt)
				writeFile(t, filepath.Join(mnt, "tmp"), newer, true)
				must(t, os.Rename(filepath.Join(mnt, "tmp"), filepath.Join(mnt, "a")))
			},
			classify: func(b string) (string, error) {
				got, err := os.ReadFile(filepath.Join(b, "a"))
				switch {
				case err == nil && bytes.Equal(got, old):
					return "reverted", nil
				case err == nil && bytes.Equal(got, newer):
					if _, err := os.Stat(filepath.Join(b, "tmp")); err == nil {
						return "", errors.New("rename kept only half inside one directory")
					}
					return "renamed", nil
				}
				return "", errors.New("durable name lost or holds neither version")
			},
			want: []string{"reverted", "renamed"},
		},
		{
			name: "rename after dir fsync sticks",
			setup: func(t *testing.T, mnt string) {
				writeFile(t, filepath.Join(mnt, "a"), old, true)
				fsyncDir(t, mnt)
				writeFile(t, filepath.Join(mnt, "tmp"), newer, true)
				must(t, os.Rename(filepath.Join(mnt, "tmp"), filepath.Join(mnt, "a")))
				fsyncDir(t, mnt)
			},
			classify: func(b string) (string, error) {
				got, err := os.ReadFile(filepath.Join(b, "a"))
				if err != nil || !bytes.Equal(got, newer) {
					return "", errors.New("fsynced rename reverted")
				}
				if _, err := os.Stat(filepath.Join(b, "tmp")); err == nil {
					return "", errors.New("fsynced rename left the old name")
				}
				return "renamed", nil
			},
			want: []string{"renamed"},
		},
		{
			name: "fsynced data never changes under an unsynced append",
			setup: func(t *testing.T, mnt string) {
				writeFile(t, filepath.Join(mnt, "f"), old, true)
				fsyncDir(t, mnt)
				fd, err := os.OpenFile(filepath.Join(mnt, "f"), os.O_WRONLY|os.O_APPEND, 0)
				must(t, err)
				_, err = fd.Write(newer)
				must(t, err)
				must(t, fd.Close())
			},
			classify: func(b string) (string, error) {
				got, err := os.ReadFile(filepath.Join(b, "f"))
				if err != nil || len(got) < len(old) || !bytes.Equal(got[:len(old)], old) {
					return "", errors.New("fsynced prefix changed")
				}
				if len(got) == len(old) {
					return "short", nil
				}
				return "grown", nil
			},
			want: []string{"short", "grown"},
		},
		{
			name: "new directory needs its parent fsynced",
			setup: func(t *testing.T, mnt string) {
				must(t, os.Mkdir(filepath.Join(mnt, "d"), 0o755))
				writeFile(t, filepath.Join(mnt, "d", "f"), newer, true)
				fsyncDir(t, filepath.Join(mnt, "d"))
			},
			classify: func(b string) (string, error) {
				got, err := os.ReadFile(filepath.Join(b, "d", "f"))
				if errors.Is(err, os.ErrNotExist) {
					if _, err := os.Stat(filepath.Join(b, "d")); err == nil {
						return "", errors.New("fsynced entry in a surviving directory lost")
					}
					return "vanished", nil
				}
				if err != nil || !bytes.Equal(got, newer) {
					return "", errors.New("file in new directory has wrong data")
				}
				return "kept", nil
			},
			want: []string{"vanished", "kept"},
		},
		{
			name: "unlink without dir fsync may be undone",
			setup: func(t *testing.T, mnt string) {
				writeFile(t, filepath.Join(mnt, "f"), old, true)
				fsyncDir(t, mnt)
				must(t, os.Remove(filepath.Join(mnt, "f")))
			},
			classify: func(b string) (string, error) {
				got, err := os.ReadFile(filepath.Join(b, "f"))
				switch {
				case errors.Is(err, os.ErrNotExist):
					return "gone", nil
				case err == nil && bytes.Equal(got, old):
					return "back", nil
				}
				return "", errors.New("unlinked file back with wrong data")
			},
			want: []string{"gone", "back"},
		},
		{
			name: "fsynced hard link and symlink survive",
			setup: func(t *testing.T, mnt string) {
				writeFile(t, filepath.Join(mnt, "f"), newer, true)
				must(t, os.Link(filepath.Join(mnt, "f"), filepath.Join(mnt, "g")))
				must(t, os.Symlink("f", filepath.Join(mnt, "s")))
				fsyncDir(t, mnt)
			},
			classify: func(b string) (string, error) {
				fi, err1 := os.Stat(filepath.Join(b, "f"))
				gi, err2 := os.Stat(filepath.Join(b, "g"))
				target, err3 := os.Readlink(filepath.Join(b, "s"))
				got, err4 := os.ReadFile(filepath.Join(b, "g"))
				if err := errors.Join(err1, err2, err3, err4); err != nil {
					return "", err
				}
				if !os.SameFile(fi, gi) || target != "f" || !bytes.Equal(got, newer) {
					return "", errors.New("hard link or symlink not preserved")
				}
				return "kept", nil
			},
			want: []string{"kept"},
		},
	}
	for _, tc := range tests {
		t.Run(tc.name, func(t *testing.T) {
			seen := map[string]int{}
			for seed := int64(0); seed < seeds; seed++ {
				backing := t.TempDir()
				f := mount(t, backing, Options{Seed: seed})
				tc.setup(t, f.Mountpoint())
				if _, err := f.PowerCut(); err != nil {
					t.Fatal(err)
				}
				outcome, err := tc.classify(backing)
				if err != nil {
					t.Fatalf("seed %d: %v", seed, err)
				}
				seen[outcome]++
			}
			for _, w := range tc.want {
				if seen[w] == 0 {
					t.Errorf("outcome %q never seen in %d seeds (saw %v)", w, seeds, seen)
				}
			}
			t.Logf("outcomes over %d seeds: %v", seeds, seen)
		})
	}
}

// TestOperationsAfterCutFail checks that a cut through the control file, written from a
// separate process, refuses every later operation and leaves the durable state.
func TestOperationsAfterCutFail(t *testing.T) {
	nixtest.RequireFUSE(t)
	backing := t.TempDir()
	must(t, os.WriteFile(filepath.Join(backing, "pre"), []byte("pre"), 0o644))
	f := mount(t, backing, Options{Seed: 1})
	mnt := f.Mountpoint()
	fd, err := os.Create(filepath.Join(mnt, "open"))
	must(t, err)
	defer fd.Close()
	must(t, runShell(t, "echo cut > "+filepath.Join(mnt, DefaultControlName)))
	<-f.Done()
	// EIO from the dead file system, or ENOTCONN where the connection was aborted.
	if _, err := fd.Write([]byte("x")); !errors.Is(err, syscall.EIO) && !errors.Is(err, syscall.ENOTCONN) {
		t.Errorf("write after cut: %v, want EIO or ENOTCONN", err)
	}
	if got, err := os.ReadFile(filepath.Join(backing, "pre")); err != nil || string(got) != "pre" {
		t.Errorf("durable file after cut: %q, %v", got, err)
	}
	if _, err := os.Stat(filepath.Join(backing, DefaultControlName)); err == nil {
		t.Error("control file written to the backing dir")
	}
}

func runShell(t *testing.T, script string) error {
	t.Helper()
	c := execCmd{"sh", "-c", script}
	return c.run()
}

// TestCutAtFsync checks that the Nth fsync fails and cuts, and that the counters count.
func TestCutAtFsync(t *testing.T) {
	nixtest.RequireFUSE(t)
	backing := t.TempDir()
	f := mount(t, backing, Options{Seed: 3, CutAtFsync: 3})
	mnt := f.Mountpoint()
	fd, err := os.Create(filepath.Join(mnt, "f"))
	must(t, err)
	defer fd.Close()
	for i := 1; i <= 3; i++ {
		_, err := fd.Write([]byte("abc"))
		must(t, err)
		err = fd.Sync()
		if i < 3 && err != nil {
			t.Fatalf("fsync %d: %v", i, err)
		}
		if i == 3 && !errors.Is(err, syscall.EIO) {
			t.Fatalf("fsync 3: %v, want EIO", err)
		}
	}
	<-f.Done()
	st := f.Stats()
	if st.Fsyncs != 3 || st.FileFsyncs != 3 || st.Writes != 3 || st.BytesWritten != 9 {
		t.Errorf("stats %+v, want 3 fsyncs, 3 writes, 9 bytes", st)
	}
}

// TestMmapShared checks MAP_SHARED writes reach a second mapping and read(2), and
// survive an fsync and a cut, as SQLite's -shm needs (its content need not survive a cut,
// but mmap must work). The mapping is made by a helper process: see helperEnv.
func TestMmapShared(t *testing.T) {
	nixtest.RequireFUSE(t)
	backing := t.TempDir()
	f := mount(t, backing, Options{Seed: 5})
	cmd, out := startHelper(t, "mmap", "CRASHFS_DIR="+f.Mountpoint())
	for out.Scan() {
	}
	if err := cmd.Wait(); err != nil {
		t.Fatalf("mmap client: %v", err)
	}
	if _, err := f.PowerCut(); err != nil {
		t.Fatal(err)
	}
	got, err := os.ReadFile(filepath.Join(backing, "shm"))
	if err != nil || len(got) != 2*pageSize || string(got[pageSize:pageSize+12]) != "through mmap" {
		t.Errorf("fsynced mmap write after cut: len %d, %v", len(got), err)
	}
}

// TestLocks checks flock and open-file-description fcntl locks conflict across
// descriptors on the mount (the kernel handles them locally).
func TestLocks(t *testing.T) {
	nixtest.RequireFUSE(t)
	f := mount(t, t.TempDir(), Options{})
	p := filepath.Join(f.Mountpoint(), "lock")
	a, err := os.Create(p)
	must(t, err)
	defer a.Close()
	b, err := os.Open(p)
	must(t, err)
	defer b.Close()
	must(t, unix.Flock(int(a.Fd()), unix.LOCK_EX|unix.LOCK_NB))
	if err := unix.Flock(int(b.Fd()), unix.LOCK_SH|unix.LOCK_NB); !errors.Is(err, unix.EWOULDBLOCK) {
		t.Errorf("second flock: %v, want EWOULDBLOCK", err)
	}
	must(t, unix.Flock(int(a.Fd()), unix.LOCK_UN))
	must(t, unix.Flock(int(b.Fd()), unix.LOCK_SH|unix.LOCK_NB))

	lk := unix.Flock_t{Type: unix.F_WRLCK, Whence: 0, Start: 0, Len: 10}
	must(t, unix.FcntlFlock(a.Fd(), unix.F_OFD_SETLK, &lk))
	rd := unix.Flock_t{Type: unix.F_RDLCK, Whence: 0, Start: 5, Len: 1}
	if err := unix.FcntlFlock(b.Fd(), unix.F_OFD_SETLK, &rd); !errors.Is(err, unix.EAGAIN) && !errors.Is(err, unix.EACCES) {
		t.Errorf("conflicting fcntl lock: %v, want EAGAIN", err)
	}
}
