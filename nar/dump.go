package nar

import (
	"bufio"
	"fmt"
	"io"
	"os"
	"path/filepath"
)

// DumpPath writes the NAR of a file-system tree, as nix-store --dump does:
// entries sorted by name bytes, a regular file is executable when its owner
// may execute it, other file types are refused.
func DumpPath(w io.Writer, path string) (int64, error) {
	cw := &countWriter{w: w}
	r := &renderer{w: bufio.NewWriterSize(cw, 256<<10)}
	r.tok(Magic)
	if err := r.dump(path); err != nil {
		return cw.n, err
	}
	if err := r.w.Flush(); err != nil {
		return cw.n, fmt.Errorf("nar: write: %w", err)
	}
	return cw.n, nil
}

func (r *renderer) dump(path string) error {
	fi, err := os.Lstat(path)
	if err != nil {
		return fmt.Errorf("nar: %w", err)
	}
	r.tok("(")
	r.tok("type")
	switch mode := fi.Mode(); {
	case mode.IsRegular():
		r.tok("regular")
		if mode&0o100 != 0 {
			r.tok("executable")
			r.tok("")
		}
		r.tok("contents")
		f, err := os.Open(path)
		if err != nil {
			return fmt.Errorf("nar: %w", err)
		}
		defer f.Close()
		size := fi.Size()
		r.u64(uint64(size))
		n, err := r.w.ReadFrom(io.LimitReader(f, size))
		if err != nil {
			return fmt.Errorf("nar: read %s: %w", path, err)
		}
		if n != size {
			return fmt.Errorf("nar: %s changed size while being read (%d of %d bytes)", path, n, size)
		}
		r.w.Write(zeros[:(8-size%8)%8])
	case mode&os.ModeSymlink != 0:
		target, err := os.Readlink(path)
		if err != nil {
			return fmt.Errorf("nar: %w", err)
		}
		r.tok("symlink")
		r.tok("target")
		r.tok(target)
	case mode.IsDir():
		r.tok("directory")
		ents, err := os.ReadDir(path) // sorted by name, bytewise
		if err != nil {
			return fmt.Errorf("nar: %w", err)
		}
		for _, e := range ents {
			r.tok("entry")
			r.tok("(")
			r.tok("name")
			r.tok(e.Name())
			r.tok("node")
			if err := r.dump(filepath.Join(path, e.Name())); err != nil {
				return err
			}
			r.tok(")")
		}
	default:
		return fmt.Errorf("nar: %s: unsupported file type %v", path, fi.Mode().Type())
	}
	r.tok(")")
	return nil
}
