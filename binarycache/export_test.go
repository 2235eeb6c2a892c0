package binarycache

import (
	"bytes"
	"context"
	"crypto/sha256"
	"fmt"
	"os"
	"path/filepath"
	"strconv"
	"strings"
	"sync"
	"testing"

	"golang.org/x/sys/unix"

	"github.com/casnix/casnix/store"
)

// TestExportSyncsWritingDescriptor: each NAR file is fdatasynced through
// the descriptor that wrote it. A writeback error is reported (once) on the
// descriptors open when it happens; a descriptor opened afterwards to sync
// would see success and the narinfo would point at lost data.
func TestExportSyncsWritingDescriptor(t *testing.T) {
	ctx := context.Background()
	src := openStore(t)
	addTree(t, src, pathA)
	addTree(t, src, pathB, pathA)
	var (
		mu     sync.Mutex
		synced []string
		bad    []string
	)
	orig := fdatasync
	fdatasync = func(fd int) error {
		flags, name, err := fdInfo(fd)
		mu.Lock()
		defer mu.Unlock()
		switch {
		case err != nil:
			bad = append(bad, err.Error())
		case flags&unix.O_ACCMODE == unix.O_RDONLY:
			bad = append(bad, name+" synced through a read-only descriptor opened for the sync")
		}
		synced = append(synced, name)
		return orig(fd)
	}
	t.Cleanup(func() { fdatasync = orig })
	ex := &Exporter{Store: src, Dir: t.TempDir(), StoreDir: "/nix/store", Compression: "zstd", Jobs: 2}
	if res, err := ex.Export(ctx, []string{pathB}); err != nil || res.Exported != 2 {
		t.Fatalf("export: %+v %v", res, err)
	}
	if len(synced) != 2 {
		t.Errorf("synced %d NAR files, want 2: %q", len(synced), synced)
	}
	for _, b := range bad {
		t.Error(b)
	}
}

// fdInfo reads a descriptor's open flags and path from /proc.
func fdInfo(fd int) (int, string, error) {
	name, err := os.Readlink(fmt.Sprintf("/proc/self/fd/%d", fd))
	if err != nil {
		return 0, "", err
	}
	data, err := os.ReadFile(fmt.Sprintf("/proc/self/fdinfo/%d", fd))
	if err != nil {
		return 0, "", err
	}
	for line := range strings.SplitSeq(string(data), "\n") {
		if v, ok := strings.CutPrefix(line, "flags:"); ok {
			f, err := strconv.ParseInt(strings.TrimSpace(v), 8, 64)
			return int(f), name, err
		}
	}
	return 0, "", fmt.Errorf("fd %d: no flags in fdinfo", fd)
}

// TestExportKeepsSameNARFile: a path whose NAR file name (the hash of its
// compressed NAR) is already taken by an earlier export of another path
// with the same NAR keeps that file, inode and all: renaming a new,
// unsynced file over it would let a power cut before the new file's sync
// take the earlier, acknowledged export's NAR with it. A file there with
// other bytes (a crash's leftover) is replaced.
func TestExportKeepsSameNARFile(t *testing.T) {
	ctx := context.Background()
	for _, tc := range []struct {
		name    string
		damage  bool // truncate the earlier file and drop its narinfo first
		keepIno bool
	}{
		{"intact earlier file is kept", false, true},
		{"damaged earlier file is replaced", true, false},
	} {
		t.Run(tc.name, func(t *testing.T) {
			src := openStore(t)
			addTree(t, src, pathA)
			addSameNAR(t, src, pathA, pathB)
			dir := t.TempDir()
			ex := &Exporter{Store: src, Dir: dir, StoreDir: "/nix/store", Compression: "zstd", Jobs: 1}
			if _, err := ex.Export(ctx, []string{pathA}); err != nil {
				t.Fatal(err)
			}
			infoA := readNarinfo(t, dir, pathA)
			file := filepath.Join(dir, infoA.URL)
			if tc.damage {
				if err := os.Truncate(file, infoA.FileSize/2); err != nil {
					t.Fatal(err)
				}
				if err := os.Remove(filepath.Join(dir, pathA[:32]+".narinfo")); err != nil {
					t.Fatal(err)
				}
			}
			before := inode(t, file)
			if res, err := ex.Export(ctx, []string{pathB}); err != nil || res.Exported != 1 {
				t.Fatalf("export of the path with the same NAR: %+v %v", res, err)
			}
			infoB := readNarinfo(t, dir, pathB)
			if infoB.URL != infoA.URL {
				t.Fatalf("same NAR, NAR files %s and %s", infoA.URL, infoB.URL)
			}
			if same := inode(t, file) == before; same != tc.keepIno {
				t.Errorf("NAR file kept its inode: %v, want %v", same, tc.keepIno)
			}
			b, err := os.ReadFile(file)
			if err != nil {
				t.Fatal(err)
			}
			if h := sha256.Sum256(b); int64(len(b)) != infoB.FileSize || !bytes.Equal(h[:], infoB.FileHash) {
				t.Errorf("NAR file has %d bytes, hash %x; narinfo says %d, %x", len(b), h, infoB.FileSize, infoB.FileHash)
			}
		})
	}
}

// addSameNAR adds name with the NAR of the valid path of.
func addSameNAR(t *testing.T, st *store.Store, of, name string) {
	t.Helper()
	b := st.NewBatch(context.Background())
	if _, err := b.Add(bytes.NewReader(narOf(t, st, of)), store.PathInfo{Name: name}); err != nil {
		t.Fatal(err)
	}
	if _, err := b.Commit(); err != nil {
		t.Fatal(err)
	}
}

func readNarinfo(t *testing.T, dir, name string) *Info {
	t.Helper()
	f, err := os.Open(filepath.Join(dir, name[:32]+".narinfo"))
	if err != nil {
		t.Fatal(err)
	}
	defer f.Close()
	in, err := ParseNarinfo(f, "/nix/store")
	if err != nil {
		t.Fatal(err)
	}
	return in
}

func inode(t *testing.T, path string) uint64 {
	t.Helper()
	var st unix.Stat_t
	if err := unix.Stat(path, &st); err != nil {
		t.Fatal(err)
	}
	return st.Ino
}
