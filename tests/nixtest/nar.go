package nixtest

import (
	"bufio"
	"encoding/binary"
	"errors"
	"fmt"
	"io"
)

// NAR node types as NAR spells them.
const (
	TypeRegular   = "regular"
	TypeDirectory = "directory"
	TypeSymlink   = "symlink"
)

// NAREntry is one node of a NAR, as WalkNAR reports it. Path is "" for the root node and
// "/a/b" below it. Contents is valid only during the callback and reads the file's bytes;
// whatever the callback leaves unread is skipped.
type NAREntry struct {
	Path       string
	Type       string
	Executable bool
	Size       int64
	Target     string
	Entries    int // number of directory entries; reported after the directory's children
	Contents   io.Reader
}

// NARStats counts what a NAR holds.
type NARStats struct {
	Regular, Executables, Symlinks, Directories int
	EmptyFiles, EmptyDirs                       int
	FileBytes, MaxFile                          int64
}

func (s NARStats) String() string {
	return fmt.Sprintf("%d files (%d executable, %d empty, %d bytes, largest %d), %d symlinks, %d directories (%d empty)",
		s.Regular, s.Executables, s.EmptyFiles, s.FileBytes, s.MaxFile, s.Symlinks, s.Directories, s.EmptyDirs)
}

// Add counts e.
func (s *NARStats) Add(e NAREntry) {
	switch e.Type {
	case TypeRegular:
		s.Regular++
		if e.Executable {
			s.Executables++
		}
		if e.Size == 0 {
			s.EmptyFiles++
		}
		s.FileBytes += e.Size
		s.MaxFile = max(s.MaxFile, e.Size)
	case TypeSymlink:
		s.Symlinks++
	case TypeDirectory:
		s.Directories++
		if e.Entries == 0 {
			s.EmptyDirs++
		}
	}
}

// Limits of WalkNAR on everything but file contents, so a corrupt NAR cannot make the
// test allocate without bound.
const (
	maxNARToken = 4096
	maxNARDepth = 512
)

// WalkNAR parses the NAR read from r strictly (magic, token order, padding, strictly
// ascending entry names, valid names, nothing after the end) and calls fn for every node:
// files and symlinks when they are read, directories after their children. It consumes r
// to its end. This parser is written from the NAR format description, independently of the
// NAR code under test.
func WalkNAR(r io.Reader, fn func(NAREntry) error) error {
	p := &narParser{r: bufio.NewReaderSize(r, 1<<16), fn: fn}
	if err := p.expect("nix-archive-1"); err != nil {
		return err
	}
	if err := p.node("", 0); err != nil {
		return err
	}
	if _, err := p.r.ReadByte(); err != io.EOF {
		return fmt.Errorf("nar: data after the end of the archive at offset %d", p.off)
	}
	return nil
}

type narParser struct {
	r   *bufio.Reader
	fn  func(NAREntry) error
	off int64
}

func (p *narParser) readFull(b []byte) error {
	n, err := io.ReadFull(p.r, b)
	p.off += int64(n)
	if errors.Is(err, io.EOF) {
		err = io.ErrUnexpectedEOF
	}
	if err != nil {
		return fmt.Errorf("nar: at offset %d: %w", p.off, err)
	}
	return nil
}

func (p *narParser) u64() (uint64, error) {
	var b [8]byte
	if err := p.readFull(b[:]); err != nil {
		return 0, err
	}
	return binary.LittleEndian.Uint64(b[:]), nil
}

func (p *narParser) padding(n uint64) error {
	if n%8 == 0 {
		return nil
	}
	var b [8]byte
	pad := b[:8-n%8]
	if err := p.readFull(pad); err != nil {
		return err
	}
	for _, c := range pad {
		if c != 0 {
			return fmt.Errorf("nar: non-zero padding at offset %d", p.off)
		}
	}
	return nil
}

func (p *narParser) token() (string, error) {
	n, err := p.u64()
	if err != nil {
		return "", err
	}
	if n > maxNARToken {
		return "", fmt.Errorf("nar: token of %d bytes at offset %d", n, p.off)
	}
	b := make([]byte, n)
	if err := p.readFull(b); err != nil {
		return "", err
	}
	return string(b), p.padding(n)
}

func (p *narParser) expect(want string) error {
	got, err := p.token()
	if err != nil {
		return err
	}
	if got != want {
		return fmt.Errorf("nar: at offset %d: got %q, want %q", p.off, got, want)
	}
	return nil
}

func (p *narParser) node(path string, depth int) error {
	if depth > maxNARDepth {
		return fmt.Errorf("nar: deeper than %d at %q", maxNARDepth, path)
	}
	if err := p.expect("("); err != nil {
		return err
	}
	if err := p.expect("type"); err != nil {
		return err
	}
	typ, err := p.token()
	if err != nil {
		return err
	}
	e := NAREntry{Path: path, Type: typ}
	switch typ {
	case TypeRegular:
		tok, err := p.token()
		if err != nil {
			return err
		}
		if tok == "executable" {
			e.Executable = true
			if err := p.expect(""); err != nil {
				return err
			}
			if tok, err = p.token(); err != nil {
				return err
			}
		}
		if tok != "contents" {
			return fmt.Errorf("nar: %q: got %q, want contents", path, tok)
		}
		size, err := p.u64()
		if err != nil {
			return err
		}
		if size > 1<<62 {
			return fmt.Errorf("nar: %q: file size %d", path, size)
		}
		e.Size = int64(size)
		lr := &io.LimitedReader{R: p.r, N: e.Size}
		e.Contents = lr
		if err := p.fn(e); err != nil {
			return err
		}
		if _, err := io.Copy(io.Discard, lr); err != nil {
			return fmt.Errorf("nar: %q: %w", path, err)
		}
		if lr.N != 0 {
			return fmt.Errorf("nar: %q: %w", path, io.ErrUnexpectedEOF)
		}
		p.off += e.Size
		if err := p.padding(size); err != nil {
			return err
		}
	case TypeSymlink:
		if err := p.expect("target"); err != nil {
			return err
		}
		if e.Target, err = p.token(); err != nil {
			return err
		}
		if e.Target == "" {
			return fmt.Errorf("nar: %q: empty symlink target", path)
		}
		if err := p.fn(e); err != nil {
			return err
		}
	case TypeDirectory:
		prev := ""
		for {
			tok, err := p.token()
			if err != nil {
				return err
			}
			if tok == ")" {
				if err := p.fn(e); err != nil {
					return err
				}
				return nil
			}
			if tok != "entry" {
				return fmt.Errorf("nar: %q: got %q, want entry or )", path, tok)
			}
			if err := p.expect("("); err != nil {
				return err
			}
			if err := p.expect("name"); err != nil {
				return err
			}
			name, err := p.token()
			if err != nil {
				return err
			}
			if name == "" || name == "." || name == ".." || containsAny(name, "/\x00") {
				return fmt.Errorf("nar: %q: invalid entry name %q", path, name)
			}
			if e.Entries > 0 && name <= prev {
				return fmt.Errorf("nar: %q: entry %q not after %q", path, name, prev)
			}
			prev = name
			e.Entries++
			if err := p.expect("node"); err != nil {
				return err
			}
			if err := p.node(path+"/"+name, depth+1); err != nil {
				return err
			}
			if err := p.expect(")"); err != nil {
				return err
			}
		}
	default:
		return fmt.Errorf("nar: %q: unknown node type %q", path, typ)
	}
	return p.expect(")")
}

func containsAny(s, chars string) bool {
	for i := 0; i < len(s); i++ {
		for j := 0; j < len(chars); j++ {
			if s[i] == chars[j] {
				return true
			}
		}
	}
	return false
}
