package blobs

import (
	"os"

	"golang.org/x/sys/unix"
)

// fdatasync flushes file data (and the size, which is metadata needed to
// read it back) without forcing unrelated inode metadata out.
func fdatasync(f *os.File) error {
	return unix.Fdatasync(int(f.Fd()))
}
