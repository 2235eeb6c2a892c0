package fusefs

import (
	"fmt"
	"os"
	"strconv"

	"golang.org/x/sys/unix"
)

// ReadAheadKB is the kernel read-ahead window set on a mount (when
// permitted). FUSE starts every mount at the kernel default of 128 KiB,
// and the daemon cannot ask for more at INIT: a sequential read then
// reaches casnix as 128 KiB READ requests, at most two in flight, one
// round trip (two context switches) each — 8192 per GiB, a latency-bound
// pipeline. With 4 MiB (one default frame), the kernel sends READs of
// MaxWrite (1 MiB) and keeps several in flight, so frames decode on every
// core while earlier ones are copied out (bench/README.md, "FUSE").
const ReadAheadKB = 4096

// setReadAhead raises the read-ahead window of the FUSE mount at dir to kb
// KiB, through its backing device's sysfs entry. Only root may write it;
// other users keep the kernel's default (an error here is not fatal).
func setReadAhead(dir string, kb int) error {
	var st unix.Stat_t
	if err := unix.Stat(dir, &st); err != nil {
		return fmt.Errorf("stat mount %s: %w", dir, err)
	}
	p := fmt.Sprintf("/sys/class/bdi/%d:%d/read_ahead_kb", unix.Major(st.Dev), unix.Minor(st.Dev))
	if err := os.WriteFile(p, []byte(strconv.Itoa(kb)), 0); err != nil {
		return fmt.Errorf("set read-ahead of %s: %w", dir, err)
	}
	return nil
}

// readAhead returns the read-ahead window of the mount at dir in KiB.
func readAhead(dir string) (int, error) {
	var st unix.Stat_t
	if err := unix.Stat(dir, &st); err != nil {
		return 0, fmt.Errorf("stat mount %s: %w", dir, err)
	}
	b, err := os.ReadFile(fmt.Sprintf("/sys/class/bdi/%d:%d/read_ahead_kb", unix.Major(st.Dev), unix.Minor(st.Dev)))
	if err != nil {
		return 0, err
	}
	return strconv.Atoi(string(b[:len(b)-1]))
}
