package binarycache

import (
	"context"
	"fmt"
	"os"
	"strconv"
	"strings"
	"sync"
	"testing"

	"golang.org/x/sys/unix"
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
