package cli

import (
	"os"
	"syscall"
)

// allocated is the disk space a file occupies (st_blocks), as du counts it.
func allocated(fi os.FileInfo) int64 {
	if st, ok := fi.Sys().(*syscall.Stat_t); ok {
		return st.Blocks * 512
	}
	return fi.Size()
}
