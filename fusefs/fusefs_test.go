package fusefs

import (
	"bytes"
	"context"
	"crypto/rand"
	"errors"
	"fmt"
	"io/fs"
	"os"
	"path/filepath"
	"strings"
	"syscall"
	"testing"
	"time"

	"github.com/casnix/casnix/nar"
	"github.com/casnix/casnix/store"
	"github.com/casnix/casnix/tests/nixtest"
)

const (
	pathA = "00000000000000000000000000000000-a"
	pathB = "11111111111111111111111111111111-b"
	pathF = "22222222222222222222222222222222-file"
)

// sourceTree makes a tree with every kind of node.
func sourceTree(t *testing.T) string {
	t.Helper()
	root := filepath.Join(t.TempDir(), "src")
	must := func(err error) {
		t.Helper()
		if err != nil {
			t.Fatal(err)
		}
	}
	must(os.MkdirAll(filepath.Join(root, "bin"), 0o755))
	must(os.MkdirAll(filepath.Join(root, "share", "empty"), 0o755))
	big := make([]byte, 5<<20)
	rand.Read(big[:1<<20])
	must(os.WriteFile(filepath.Join(root, "share", "big"), big, 0o644))
	must(os.WriteFile(filepath.Join(root, "bin", "tool"), []byte("#!/bin/sh\necho hi\n"), 0o755))
	must(os.WriteFile(filepath.Join(root, "empty-file"), nil, 0o644))
	must(os.WriteFile(filepath.Join(root, "..data"), []byte("x"), 0o644))
	must(os.Symlink("bin/tool", filepath.Join(root, "link")))
	must(os.Symlink("/nix/store/elsewhere", filepath.Join(root, "abs")))
	return root
}

func addTree(t *testing.T, st *store.Store, name, dir string) {
	t.Helper()
	var buf bytes.Buffer
	if _, err := nar.DumpPath(&buf, dir); err != nil {
		t.Fatal(err)
	}
	b := st.NewBatch(context.Background())
	if _, err := b.Add(&buf, store.PathInfo{Name: name}); err != nil {
		t.Fatal(err)
	}
	if _, err := b.Commit(); err != nil {
		t.Fatal(err)
	}
}

func mountStore(t *testing.T) (*store.Store, string, string) {
	t.Helper()
	nixtest.RequireFUSE(t)
	st, err := store.Open(context.Background(), t.TempDir(), store.Options{})
	if err != nil {
		t.Fatal(err)
	}
	src := sourceTree(t)
	addTree(t, st, pathA, src)
	mnt := t.TempDir()
	srv, err := Mount(mnt, st, Options{ListRoot: true, AllowOther: true})
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() {
		if err := srv.Unmount(); err != nil {
			t.Errorf("unmount: %v", err)
		}
		st.Close()
	})
	return st, mnt, src
}

// TestTreeMatches: the mounted path equals its source: names, kinds,
// modes, symlink targets and contents; and its NAR is the source's NAR.
func TestTreeMatches(t *testing.T) {
	_, mnt, src := mountStore(t)
	root := filepath.Join(mnt, pathA)
	var seen int
	err := filepath.WalkDir(src, func(p string, d fs.DirEntry, err error) error {
		if err != nil {
			return err
		}
		rel, _ := filepath.Rel(src, p)
		m := filepath.Join(root, rel)
		si, err := os.Lstat(p)
		if err != nil {
			return err
		}
		mi, err := os.Lstat(m)
		if err != nil {
			return err
		}
		seen++
		if si.Mode().Type() != mi.Mode().Type() {
			t.Errorf("%s: type %v, source %v", rel, mi.Mode().Type(), si.Mode().Type())
		}
		st := mi.Sys().(*syscall.Stat_t)
		if st.Uid != 0 || st.Mtim.Sec != 1 {
			t.Errorf("%s: uid %d mtime %d", rel, st.Uid, st.Mtim.Sec)
		}
		switch {
		case si.Mode().IsRegular():
			want := os.FileMode(0o444)
			if si.Mode()&0o100 != 0 {
				want = 0o555
			}
			if mi.Mode().Perm() != want {
				t.Errorf("%s: mode %v, want %v", rel, mi.Mode().Perm(), want)
			}
			a, _ := os.ReadFile(p)
			b, err := os.ReadFile(m)
			if err != nil || !bytes.Equal(a, b) {
				t.Errorf("%s: contents differ (%v)", rel, err)
			}
		case si.Mode()&os.ModeSymlink != 0:
			a, _ := os.Readlink(p)
			b, _ := os.Readlink(m)
			if a != b {
				t.Errorf("%s: target %q, want %q", rel, b, a)
			}
		case si.IsDir():
			if mi.Mode().Perm() != 0o555 {
				t.Errorf("%s: dir mode %v", rel, mi.Mode().Perm())
			}
		}
		return nil
	})
	if err != nil {
		t.Fatal(err)
	}
	if seen < 9 {
		t.Fatalf("walked %d nodes", seen)
	}
	var a, b bytes.Buffer
	nar.DumpPath(&a, src)
	if _, err := nar.DumpPath(&b, root); err != nil || !bytes.Equal(a.Bytes(), b.Bytes()) {
		t.Fatalf("NAR of the mount differs from the source's (%v)", err)
	}
	// Stable inode numbers.
	s1, _ := os.Stat(filepath.Join(root, "bin", "tool"))
	s2, _ := os.Stat(filepath.Join(root, "bin", "tool"))
	if s1.Sys().(*syscall.Stat_t).Ino != s2.Sys().(*syscall.Stat_t).Ino {
		t.Fatal("inode number changed")
	}
}

func TestHostileLookups(t *testing.T) {
	_, mnt, _ := mountStore(t)
	for _, name := range []string{
		"..", ".", "x/..", strings.Repeat("a", 255), strings.Repeat("a", 300),
		"33333333333333333333333333333333-missing", pathA + "/nope", pathA + "/bin/tool/under-a-file",
		pathA + "/../" + pathA + "/../../etc", "not-a-store-path",
	} {
		_, err := os.Lstat(filepath.Join(mnt, name))
		if name == "." || name == "x/.." || name == ".." || name == pathA+"/../"+pathA+"/../../etc" {
			continue // resolved by the kernel, never reach us as names
		}
		if err == nil {
			t.Errorf("%q exists", name)
		} else if !errors.Is(err, fs.ErrNotExist) && !errors.Is(err, syscall.ENAMETOOLONG) && !errors.Is(err, syscall.ENOTDIR) {
			t.Errorf("%q: %v", name, err)
		}
	}
	if err := os.WriteFile(filepath.Join(mnt, pathA, "new"), []byte("x"), 0o644); err == nil {
		t.Error("write succeeded on a read-only mount")
	}
	f, err := os.OpenFile(filepath.Join(mnt, pathA, "bin", "tool"), os.O_RDWR, 0)
	if err == nil {
		f.Close()
		t.Error("opened for writing")
	}
}

// TestNewPathsAppear: a path imported while mounted shows up at once, in
// lookups and in the root listing; the root lists only store path names.
func TestNewPathsAppear(t *testing.T) {
	st, mnt, src := mountStore(t)
	if _, err := os.Stat(filepath.Join(mnt, pathB)); err == nil {
		t.Fatal("B exists before import")
	}
	addTree(t, st, pathB, src)
	deadline := time.Now().Add(5 * time.Second)
	for {
		if _, err := os.Stat(filepath.Join(mnt, pathB, "bin", "tool")); err == nil {
			break
		} else if time.Now().After(deadline) {
			t.Fatalf("B did not appear: %v", err)
		}
		time.Sleep(50 * time.Millisecond)
	}
	ents, err := os.ReadDir(mnt)
	if err != nil {
		t.Fatal(err)
	}
	var names []string
	for _, e := range ents {
		names = append(names, e.Name())
	}
	if strings.Join(names, ",") != pathA+","+pathB {
		t.Fatalf("root lists %v", names)
	}
}

func TestRootListingStreams(t *testing.T) {
	nixtest.RequireFUSE(t)
	st, err := store.Open(context.Background(), t.TempDir(), store.Options{})
	if err != nil {
		t.Fatal(err)
	}
	defer st.Close()
	// More paths than one page of the root stream.
	b := st.NewBatch(context.Background())
	file := (&bytes.Buffer{})
	nar.DumpPath(file, sourceTree(t)+"/bin/tool")
	const n = rootPage*2 + 7
	want := map[string]bool{}
	for i := 0; i < n; i++ {
		name := fmt.Sprintf("%032d-p", i) // digits are nixbase32
		want[name] = true
		if _, err := b.Add(bytes.NewReader(file.Bytes()), store.PathInfo{Name: name}); err != nil {
			t.Fatal(err)
		}
	}
	if _, err := b.Commit(); err != nil {
		t.Fatal(err)
	}
	mnt := t.TempDir()
	srv, err := Mount(mnt, st, Options{ListRoot: true})
	if err != nil {
		t.Fatal(err)
	}
	defer srv.Unmount()
	ents, err := os.ReadDir(mnt)
	if err != nil {
		t.Fatal(err)
	}
	if len(ents) != len(want) {
		t.Fatalf("listed %d of %d", len(ents), len(want))
	}
	for _, e := range ents {
		if !want[e.Name()] {
			t.Fatalf("unexpected %q", e.Name())
		}
	}
}

// TestDeletedPathsInvalidated: a path the kernel has looked up (its entry
// cached for a day) stops resolving within seconds of a collection that
// deleted it, whichever process ran it (here a second Store on the data
// dir, as `casnix gc` beside `casnix serve --mount`); kept paths stay.
func TestDeletedPathsInvalidated(t *testing.T) {
	nixtest.RequireFUSE(t)
	ctx := context.Background()
	dir := t.TempDir()
	st, err := store.Open(ctx, dir, store.Options{})
	if err != nil {
		t.Fatal(err)
	}
	defer st.Close()
	src := sourceTree(t)
	addTree(t, st, pathA, src)
	addTree(t, st, pathB, filepath.Join(src, "bin"))
	mnt := t.TempDir()
	srv, err := Mount(mnt, st, Options{ListRoot: true, Deletions: st.Deletions})
	if err != nil {
		t.Fatal(err)
	}
	defer srv.Unmount()
	for _, p := range []string{pathA, pathB} {
		if _, err := os.Stat(filepath.Join(mnt, p, "tool")); err != nil && p == pathB {
			t.Fatal(err)
		}
	}
	collector, err := store.Open(ctx, dir, store.Options{})
	if err != nil {
		t.Fatal(err)
	}
	res, err := collector.GC(ctx, store.GCOptions{Action: store.GCDeleteDead, Keep: []string{pathA}})
	collector.Close()
	if err != nil || len(res.Paths) != 1 || res.Paths[0] != pathB {
		t.Fatalf("gc: %+v %v", res, err)
	}
	deadline := time.Now().Add(5 * time.Second)
	for {
		_, err := os.Lstat(filepath.Join(mnt, pathB))
		if errors.Is(err, fs.ErrNotExist) {
			break
		}
		if time.Now().After(deadline) {
			t.Fatalf("deleted path still resolves 5 s after the collection: %v", err)
		}
		time.Sleep(100 * time.Millisecond)
	}
	ents, err := os.ReadDir(mnt)
	if err != nil {
		t.Fatal(err)
	}
	if len(ents) != 1 || ents[0].Name() != pathA {
		t.Errorf("root lists %v, want only A", ents)
	}
	if _, err := os.Stat(filepath.Join(mnt, pathA, "bin", "tool")); err != nil {
		t.Errorf("kept path: %v", err)
	}
}
