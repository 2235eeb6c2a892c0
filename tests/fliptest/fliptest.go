// Package fliptest is what the bit-flip tests share (store's
// TestVerifyNamesFlippedBytes and TestRepairAfterFlippedBytes, and the
// end-to-end TestFlippedBytesReadPaths): picking a random byte across a data
// dir's files, flipping it in a copy, and copying data dirs.
package fliptest

import (
	"fmt"
	"io"
	"math/rand/v2"
	"os"
	"path/filepath"
	"strconv"
	"testing"
)

// EnvInt returns the integer in environment variable name, or def when it
// is unset.
func EnvInt(t testing.TB, name string, def int) int {
	t.Helper()
	s := os.Getenv(name)
	if s == "" {
		return def
	}
	n, err := strconv.Atoi(s)
	if err != nil {
		t.Fatalf("%s: %v", name, err)
	}
	return n
}

// Targets are the files flips land in, relative to a data dir, and their sizes.
type Targets struct {
	Files []string
	Sizes []int64
	Total int64
}

// NewTargets stats files (relative to dir).
func NewTargets(t testing.TB, dir string, files []string) *Targets {
	t.Helper()
	tg := &Targets{Files: files}
	for _, f := range files {
		fi, err := os.Stat(filepath.Join(dir, f))
		if err != nil {
			t.Fatal(err)
		}
		tg.Sizes = append(tg.Sizes, fi.Size())
		tg.Total += fi.Size()
	}
	return tg
}

// Flip is one change: byte Off of File (relative to a data dir) XOR Mask.
type Flip struct {
	File string
	Off  int64
	Mask byte
}

func (f Flip) String() string { return fmt.Sprintf("%s byte %d ^ %#02x", f.File, f.Off, f.Mask) }

// PickIn picks a random bit of file i.
func (tg *Targets) PickIn(rng *rand.Rand, i int) Flip {
	return Flip{tg.Files[i], rng.Int64N(tg.Sizes[i]), 1 << rng.IntN(8)}
}

// PickExcept picks a random bit, uniformly over the bytes of every file but
// file i (-1: of all files).
func (tg *Targets) PickExcept(rng *rand.Rand, i int) Flip {
	total := tg.Total
	if i >= 0 {
		total -= tg.Sizes[i]
	}
	o := rng.Int64N(total)
	for j, n := range tg.Sizes {
		if j == i {
			continue
		}
		if o < n {
			return Flip{tg.Files[j], o, 1 << rng.IntN(8)}
		}
		o -= n
	}
	panic("unreachable")
}

// Apply flips the byte in the copy of the data dir at dir.
func (f Flip) Apply(dir string) error {
	return XorByte(filepath.Join(dir, f.File), f.Off, f.Mask)
}

// XorByte XORs byte off of the file at path with x.
func XorByte(path string, off int64, x byte) error {
	fl, err := os.OpenFile(path, os.O_RDWR, 0)
	if err != nil {
		return err
	}
	defer fl.Close()
	b := []byte{0}
	if _, err := fl.ReadAt(b, off); err != nil {
		return fmt.Errorf("read %s at %d: %w", path, off, err)
	}
	b[0] ^= x
	if _, err := fl.WriteAt(b, off); err != nil {
		return fmt.Errorf("write %s at %d: %w", path, off, err)
	}
	return fl.Close()
}

// CopyDir copies the tree at from (regular files, directories, symlinks)
// to to, which must not exist.
func CopyDir(from, to string) error {
	return filepath.WalkDir(from, func(p string, d os.DirEntry, err error) error {
		if err != nil {
			return err
		}
		rel, _ := filepath.Rel(from, p)
		dst := filepath.Join(to, rel)
		switch {
		case d.IsDir():
			return os.MkdirAll(dst, 0o755)
		case d.Type()&os.ModeSymlink != 0:
			target, err := os.Readlink(p)
			if err != nil {
				return err
			}
			return os.Symlink(target, dst)
		case d.Type().IsRegular():
			return copyFile(p, dst)
		}
		return nil // sockets, locks' FIFOs: nothing a flip test needs
	})
}

func copyFile(from, to string) error {
	src, err := os.Open(from)
	if err != nil {
		return err
	}
	defer src.Close()
	fi, err := src.Stat()
	if err != nil {
		return err
	}
	dst, err := os.OpenFile(to, os.O_WRONLY|os.O_CREATE|os.O_EXCL, fi.Mode().Perm())
	if err != nil {
		return err
	}
	if _, err := io.Copy(dst, src); err != nil {
		dst.Close()
		return err
	}
	return dst.Close()
}
