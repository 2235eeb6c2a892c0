package fusefs

import (
	"bufio"
	"errors"
	"fmt"
	"os"
	"path/filepath"
	"strings"
	"syscall"

	"golang.org/x/sys/unix"
)

// CleanStale detaches a casnix mount at dir left by a process that died
// (its FUSE connection is gone, so every access fails with ENOTCONN). A
// live mount is an error: another casnix is serving there.
func CleanStale(dir string) error {
	abs, err := filepath.Abs(dir)
	if err != nil {
		return err
	}
	mounted, fstype, err := mountAt(abs)
	if err != nil || !mounted {
		return err
	}
	if !strings.HasPrefix(fstype, "fuse") {
		return fmt.Errorf("%s is already a mount point (%s)", abs, fstype)
	}
	// statfs always reaches the FUSE server (stat may be answered from the
	// kernel's attribute cache), so it tells a live mount from a dead one.
	var sfs unix.Statfs_t
	serr := unix.Statfs(abs, &sfs)
	if serr == nil {
		return fmt.Errorf("%s is already mounted by a running casnix (unmount it first)", abs)
	}
	if !errors.Is(serr, syscall.ENOTCONN) && !errors.Is(serr, syscall.ECONNABORTED) {
		return fmt.Errorf("%s: %w", abs, serr)
	}
	if err := unix.Unmount(abs, unix.MNT_DETACH); err != nil {
		return fmt.Errorf("detach stale mount %s: %w", abs, err)
	}
	return nil
}

// mountAt reports whether dir is a mount point and its file-system type.
func mountAt(dir string) (bool, string, error) {
	f, err := os.Open("/proc/self/mountinfo")
	if err != nil {
		return false, "", err
	}
	defer f.Close()
	sc := bufio.NewScanner(f)
	sc.Buffer(make([]byte, 64<<10), 1<<20)
	found, fstype := false, ""
	for sc.Scan() {
		// id parent major:minor root mountpoint options... - fstype source super
		fields := strings.Fields(sc.Text())
		if len(fields) < 10 || unescape(fields[4]) != dir {
			continue
		}
		for i, fld := range fields {
			if fld == "-" && i+1 < len(fields) {
				found, fstype = true, fields[i+1] // the last mount at dir wins
				break
			}
		}
	}
	return found, fstype, sc.Err()
}

// unescape undoes mountinfo's octal escapes (\040 for space...).
func unescape(s string) string {
	if !strings.Contains(s, `\`) {
		return s
	}
	var b strings.Builder
	for i := 0; i < len(s); i++ {
		if s[i] == '\\' && i+3 < len(s) {
			v := (s[i+1]-'0')*64 + (s[i+2]-'0')*8 + (s[i+3] - '0')
			b.WriteByte(v)
			i += 3
			continue
		}
		b.WriteByte(s[i])
	}
	return b.String()
}

// Detach lazily unmounts dir: it disappears from the namespace now and is
// cleaned up when the last user lets go.
func Detach(dir string) error {
	if err := unix.Unmount(dir, unix.MNT_DETACH); err != nil {
		return fmt.Errorf("detach %s: %w", dir, err)
	}
	return nil
}
