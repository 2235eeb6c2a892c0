package store

import (
	"bytes"
	"context"
	"errors"
	"fmt"
	"os"
	"path/filepath"
	"slices"
	"strings"
	"testing"

	"github.com/casnix/casnix/blobs"
)

// TestBackupRestore: a backup taken while a batch has written frames it has not committed
// holds exactly the committed paths, with each pack cut at its last committed frame;
// restore reproduces it; non-empty targets and damaged backups are refused and leave the
// target as it was.
func TestBackupRestore(t *testing.T) {
	ctx := context.Background()
	st := openStore(t)
	a, b, c := treeNAR(t, 3<<20), treeNAR(t, 1<<20), treeNAR(t, 2<<20)
	for name, n := range map[string][]byte{pathA: a, pathB: b} {
		if err := add(t, st, name, n); err != nil {
			t.Fatal(err)
		}
	}
	// An import in flight: its frames are in the packs, its rows are not.
	batch := st.NewBatch(ctx)
	if _, err := batch.Add(bytes.NewReader(c), PathInfo{Name: pathC}); err != nil {
		t.Fatal(err)
	}
	dst := filepath.Join(t.TempDir(), "backup")
	rep, err := st.Backup(ctx, dst, CopyOptions{})
	if err != nil {
		t.Fatal(err)
	}
	if _, err := batch.Commit(); err != nil {
		t.Fatal(err)
	}
	if rep.Paths != 2 || rep.Packs == 0 || rep.PackBytes == 0 || rep.DBBytes == 0 {
		t.Errorf("report %+v, want 2 paths and some packs", rep)
	}
	ends, err := st.db.PackEnds(ctx)
	if err != nil {
		t.Fatal(err)
	}
	var cut bool
	for id := range ends {
		src, _ := os.Stat(blobs.PackFile(filepath.Join(st.Dir(), PackDir), id))
		bk, err := os.Stat(blobs.PackFile(filepath.Join(dst, PackDir), id))
		if err != nil {
			continue // a pack only pathC's frames are in
		}
		cut = cut || bk.Size() < src.Size()
	}
	if !cut {
		t.Errorf("no backup pack is shorter than its source: the uncommitted frames were copied")
	}

	bst, err := Open(ctx, dst, Options{})
	if err != nil {
		t.Fatal(err)
	}
	names, _ := bst.All(ctx)
	if !slices.Equal(names, []string{pathA, pathB}) {
		t.Errorf("backup holds %q, want A and B", names)
	}
	if !bytes.Equal(render(t, bst, pathA), a) || !bytes.Equal(render(t, bst, pathB), b) {
		t.Errorf("backup renders different NARs")
	}
	bst.Close()

	// Restore, then the refusals.
	target := filepath.Join(t.TempDir(), "restored")
	if _, err := Restore(ctx, dst, target, CopyOptions{Quick: true}); err != nil {
		t.Fatal(err)
	}
	if _, err := Restore(ctx, dst, target, CopyOptions{}); !errors.Is(err, ErrNotEmpty) {
		t.Errorf("restore into a restored data dir: %v, want ErrNotEmpty", err)
	}
	if _, err := Restore(ctx, dst, target, CopyOptions{Force: true}); err != nil {
		t.Errorf("restore --force: %v", err)
	}
	if _, err := st.Backup(ctx, target, CopyOptions{}); !errors.Is(err, ErrNotEmpty) {
		t.Errorf("backup into a non-empty dir: %v, want ErrNotEmpty", err)
	}
	rst, err := Open(ctx, target, Options{})
	if err != nil {
		t.Fatal(err)
	}
	if names, _ := rst.All(ctx); !slices.Equal(names, []string{pathA, pathB}) {
		t.Errorf("restored data dir holds %q", names)
	}
	rst.Close()

	// Damaged backups.
	packs, _ := filepath.Glob(filepath.Join(dst, PackDir, "*", "*.pack"))
	for _, tc := range []struct {
		name   string
		damage func(t *testing.T, dir string)
	}{
		{"truncated pack", func(t *testing.T, dir string) {
			p := filepath.Join(dir, PackDir, filepath.Base(filepath.Dir(packs[0])), filepath.Base(packs[0]))
			fi, _ := os.Stat(p)
			if err := os.Truncate(p, fi.Size()-1); err != nil {
				t.Fatal(err)
			}
		}},
		{"flipped byte in a frame", func(t *testing.T, dir string) {
			p := filepath.Join(dir, PackDir, filepath.Base(filepath.Dir(packs[0])), filepath.Base(packs[0]))
			f, err := os.OpenFile(p, os.O_RDWR, 0)
			if err != nil {
				t.Fatal(err)
			}
			defer f.Close()
			buf := make([]byte, 1)
			f.ReadAt(buf, 100_000)
			buf[0] ^= 0xff
			f.WriteAt(buf, 100_000)
		}},
		{"truncated database", func(t *testing.T, dir string) {
			fi, _ := os.Stat(filepath.Join(dir, DBFile))
			if err := os.Truncate(filepath.Join(dir, DBFile), fi.Size()/2); err != nil {
				t.Fatal(err)
			}
		}},
		{"no database", func(t *testing.T, dir string) {
			os.Remove(filepath.Join(dir, DBFile))
		}},
	} {
		t.Run(tc.name, func(t *testing.T) {
			bad := filepath.Join(t.TempDir(), "bad")
			if _, err := copyTree(dst, bad); err != nil {
				t.Fatal(err)
			}
			tc.damage(t, bad)
			empty := t.TempDir()
			if _, err := Restore(ctx, bad, empty, CopyOptions{Quick: true}); err == nil {
				t.Fatal("restore of a damaged backup succeeded")
			} else {
				t.Logf("%s: %v", tc.name, err)
			}
			if left, _ := os.ReadDir(empty); len(left) != 0 {
				t.Errorf("failed restore left %d entries in the target", len(left))
			}
			absent := filepath.Join(t.TempDir(), "absent")
			Restore(ctx, bad, absent, CopyOptions{Quick: true})
			if _, err := os.Stat(absent); !os.IsNotExist(err) {
				t.Errorf("failed restore left the target it created: %v", err)
			}
		})
	}
}

// copyTree copies the files of a data dir (two levels of pack directories).
func copyTree(from, to string) (int64, error) {
	var n int64
	err := filepath.WalkDir(from, func(p string, d os.DirEntry, err error) error {
		if err != nil {
			return err
		}
		rel, _ := filepath.Rel(from, p)
		if d.IsDir() {
			return os.MkdirAll(filepath.Join(to, rel), 0o755)
		}
		m, err := copyFile(p, filepath.Join(to, rel), -1)
		n += m
		return err
	})
	return n, err
}

// TestBackupBesideCompaction: backups taken while another Store on the same
// data dir (as `casnix gc` beside `casnix backup`) collects and compacts
// packs all complete and verify: a compaction never removes a pack file a
// running backup's snapshot still names.
func TestBackupBesideCompaction(t *testing.T) {
	ctx := context.Background()
	dir := t.TempDir()
	open := func() *Store {
		st, err := Open(ctx, dir, Options{Blobs: blobs.Options{PackSize: 2 << 20}})
		if err != nil {
			t.Fatal(err)
		}
		t.Cleanup(func() { st.Close() })
		return st
	}
	collector, backer := open(), open()
	want := map[string][]byte{}
	compacted := 0
	for round := 0; round < 20; round++ {
		// A kept path and garbage beside it, in the same packs, so the
		// collection leaves packs dead enough to compact.
		// The importer exits each round: a writer's own free packs are not
		// compacted while it holds them.
		importer, err := Open(ctx, dir, Options{Blobs: blobs.Options{PackSize: 2 << 20}})
		if err != nil {
			t.Fatal(err)
		}
		keep := fmt.Sprintf("%031dk-keep", round)
		n := treeNAR(t, 600<<10)
		if err := add(t, importer, keep, n); err != nil {
			t.Fatal(err)
		}
		permRoot(t, importer, keep)
		want[keep] = n
		for j := 0; j < 3; j++ {
			if err := add(t, importer, fmt.Sprintf("%030d%dg-junk", round, j), treeNAR(t, 500<<10)); err != nil {
				t.Fatal(err)
			}
		}
		importer.Close()
		gcDone := make(chan *GCResult, 1)
		go func() {
			res, err := collector.GC(ctx, GCOptions{Action: GCDeleteDead, MinDead: 0.05})
			if err != nil {
				t.Error(err)
			}
			gcDone <- res
		}()
		// Back up until the collection is over, so backups overlap its
		// compaction, not only its sweep (which the GC lock holds off).
		var res *GCResult
		for i := 0; res == nil; i++ {
			select {
			case res = <-gcDone:
			default:
			}
			dst := filepath.Join(t.TempDir(), "b")
			rep, err := backer.Backup(ctx, dst, CopyOptions{Quick: true})
			if err != nil {
				t.Fatalf("round %d backup %d: %v", round, i, err)
			}
			if rep.Paths < len(want) {
				t.Fatalf("round %d backup %d holds %d paths, want at least %d", round, i, rep.Paths, len(want))
			}
		}
		compacted += res.Compact.PacksRemoved
	}
	if compacted == 0 {
		t.Fatal("no collection compacted a pack: the test shows nothing")
	}
	for name, n := range want {
		if !bytes.Equal(render(t, backer, name), n) {
			t.Fatalf("%s lost", name)
		}
	}
	mustVerify(t, backer)
}

// TestRestoreRefusesOpenDataDir: restore --force refuses a data dir a
// Store has open (as a running `casnix serve` has), which keeps working;
// nothing opens a data dir while a restore replaces it; once the Store is
// closed the restore goes through and leaves the GC lock file alone.
func TestRestoreRefusesOpenDataDir(t *testing.T) {
	ctx := context.Background()
	src := openStore(t)
	nA, nB := treeNAR(t, 300<<10), treeNAR(t, 200<<10)
	if err := add(t, src, pathA, nA); err != nil {
		t.Fatal(err)
	}
	bk := filepath.Join(t.TempDir(), "bk")
	if _, err := src.Backup(ctx, bk, CopyOptions{Quick: true}); err != nil {
		t.Fatal(err)
	}
	dir := t.TempDir()
	live, err := Open(ctx, dir, Options{})
	if err != nil {
		t.Fatal(err)
	}
	if err := add(t, live, pathB, nB); err != nil {
		t.Fatal(err)
	}
	unlock, err := live.SharedGCLock(ctx) // creates gc.lock
	if err != nil {
		t.Fatal(err)
	}
	unlock()
	gcLock, err := os.Stat(filepath.Join(dir, GCLockFile))
	if err != nil {
		t.Fatal(err)
	}
	if _, err := Restore(ctx, bk, dir, CopyOptions{Force: true, Quick: true}); !errors.Is(err, ErrInUse) {
		t.Fatalf("restore --force of an open data dir: %v, want ErrInUse", err)
	}
	if !bytes.Equal(render(t, live, pathB), nB) {
		t.Fatal("the open store lost a path to a refused restore")
	}
	live.Close()

	var during error
	_, err = Restore(ctx, bk, dir, CopyOptions{Force: true, Quick: true, Step: func(name string) {
		if name == "verified" {
			if s, err := Open(ctx, dir, Options{}); err == nil {
				s.Close()
				during = errors.New("opened while the restore held it")
			} else if !errors.Is(err, ErrInUse) {
				during = err
			}
		}
	}})
	if err != nil {
		t.Fatal(err)
	}
	if during != nil {
		t.Errorf("open during restore: %v", during)
	}
	rst, err := Open(ctx, dir, Options{})
	if err != nil {
		t.Fatal(err)
	}
	defer rst.Close()
	if names, _ := rst.All(ctx); !slices.Equal(names, []string{pathA}) {
		t.Errorf("restored data dir holds %q, want only A", names)
	}
	if fi, err := os.Stat(filepath.Join(dir, GCLockFile)); err != nil || !os.SameFile(fi, gcLock) {
		t.Errorf("restore replaced the GC lock file (%v): GC and a daemon would lock different files", err)
	}
	ents, _ := os.ReadDir(dir)
	for _, e := range ents {
		if strings.HasPrefix(e.Name(), stagePrefix) || e.Name() == restoreJournal {
			t.Errorf("left behind: %s", e.Name())
		}
	}
}
