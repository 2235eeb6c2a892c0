package store

import (
	"bufio"
	"errors"
	"io"
	"io/fs"
	"os"
	"path/filepath"
	"slices"
	"strconv"
	"strings"
	"syscall"
)

// Runtime roots, as nix-daemon's findRuntimeRoots finds them on Linux:
// store paths that running processes use are kept even when nothing else
// roots them — an executable (/proc/PID/exe), a working directory (cwd),
// an open file (fd/*), a mapped library (maps), a path named in the
// environment (environ), and the kernel's helper programs
// (/proc/sys/kernel/{modprobe,fbsplash,poweroff_cmd}). Processes we may not
// look at (EACCES) or that exit meanwhile (ENOENT, ESRCH) are skipped.

// procDir is /proc; a variable for tests.
var procDir = "/proc"

// maxProcFile bounds how much of one maps or environ file is read.
const maxProcFile = 16 << 20

// RuntimeRoots returns the store path basenames that running processes use,
// keyed by where they were seen ("/proc/PID/fd/3"). Store paths are looked
// for under the store directory, every casnix FUSE mount point (mountinfo
// type fuse.casnix: a process reading through a mount uses the path as
// much as one reading the store directory; a mount of another data dir
// only keeps more) and the extra directories given.
func (s *Store) RuntimeRoots(extra []string) map[string][]string {
	dirs := append(append([]string{s.StoreDir}, casnixMounts()...), extra...)
	out := map[string][]string{}
	add := func(where, text string) {
		for _, n := range storeNamesIn(text, dirs) {
			if !slices.Contains(out[where], n) {
				out[where] = append(out[where], n)
			}
		}
	}
	for _, f := range []string{"sys/kernel/modprobe", "sys/kernel/fbsplash", "sys/kernel/poweroff_cmd"} {
		if b, err := readCapped(filepath.Join(procDir, f)); err == nil {
			add(filepath.Join(procDir, f), string(b))
		}
	}
	ents, err := os.ReadDir(procDir)
	if err != nil {
		s.log.Debug("no runtime roots", "err", err)
		return out
	}
	for _, e := range ents {
		if !isPID(e.Name()) {
			continue
		}
		dir := filepath.Join(procDir, e.Name())
		for _, l := range []string{"exe", "cwd"} {
			if t, err := os.Readlink(filepath.Join(dir, l)); err == nil {
				add(filepath.Join(dir, l), t)
			} else if !ignorable(err) {
				s.log.Debug("reading runtime root", "link", filepath.Join(dir, l), "err", err)
			}
		}
		if fds, err := os.ReadDir(filepath.Join(dir, "fd")); err == nil {
			for _, fd := range fds {
				p := filepath.Join(dir, "fd", fd.Name())
				if t, err := os.Readlink(p); err == nil {
					add(p, t)
				}
			}
		}
		for _, f := range []string{"maps", "environ"} {
			if b, err := readCapped(filepath.Join(dir, f)); err == nil {
				add(filepath.Join(dir, f), string(b))
			}
		}
	}
	return out
}

func isPID(s string) bool {
	if s == "" {
		return false
	}
	for _, c := range s {
		if c < '0' || c > '9' {
			return false
		}
	}
	return true
}

func ignorable(err error) bool {
	return errors.Is(err, fs.ErrNotExist) || errors.Is(err, fs.ErrPermission) || errors.Is(err, syscall.ESRCH)
}

func readCapped(path string) ([]byte, error) {
	f, err := os.Open(path)
	if err != nil {
		return nil, err
	}
	defer f.Close()
	return io.ReadAll(io.LimitReader(bufio.NewReader(f), maxProcFile))
}

// storeNamesIn finds the store paths named in text under any of dirs: each
// "<dir>/" followed by the longest run of store-path name characters (Nix's
// regex <storeDir>/[0-9a-z]+[0-9a-zA-Z+\-._?=]*), kept if it is a valid
// basename.
func storeNamesIn(text string, dirs []string) []string {
	var out []string
	for _, d := range dirs {
		prefix := strings.TrimSuffix(d, "/") + "/"
		rest := text
		for {
			i := strings.Index(rest, prefix)
			if i < 0 {
				break
			}
			rest = rest[i+len(prefix):]
			j := 0
			for j < len(rest) && isNameChar(rest[j]) {
				j++
			}
			if ValidateName(rest[:j]) == nil {
				out = append(out, rest[:j])
			}
			rest = rest[j:]
		}
	}
	return out
}

func isNameChar(c byte) bool {
	return c >= '0' && c <= '9' || c >= 'a' && c <= 'z' || c >= 'A' && c <= 'Z' || strings.IndexByte("+-._?=", c) >= 0
}

// casnixMounts lists the mount points of casnix FUSE mounts
// (/proc/self/mountinfo entries of type fuse.casnix).
func casnixMounts() []string {
	b, err := readCapped(filepath.Join(procDir, "self", "mountinfo"))
	if err != nil {
		return nil
	}
	var out []string
	for _, line := range strings.Split(string(b), "\n") {
		pre, post, ok := strings.Cut(line, " - ")
		f, g := strings.Fields(pre), strings.Fields(post)
		if !ok || len(f) < 5 || len(g) < 1 || g[0] != "fuse.casnix" {
			continue
		}
		out = append(out, unescapeMount(f[4]))
	}
	return out
}

// unescapeMount undoes mountinfo's octal escapes (\040 for a space).
func unescapeMount(s string) string {
	var b strings.Builder
	for i := 0; i < len(s); i++ {
		if s[i] == '\\' && i+3 < len(s) {
			if n, err := strconv.ParseUint(s[i+1:i+4], 8, 8); err == nil {
				b.WriteByte(byte(n))
				i += 3
				continue
			}
		}
		b.WriteByte(s[i])
	}
	return b.String()
}
