package nar

import (
	"bufio"
	"bytes"
	"crypto/sha256"
	"encoding/binary"
	"errors"
	"fmt"
	"io"

	"github.com/casnix/casnix/castore"
	"github.com/casnix/casnix/digest"
	"github.com/casnix/casnix/hashbehind"
)

// Magic is the NAR version string every archive starts with.
const Magic = "nix-archive-1"

// MaxDepth bounds directory nesting: Linux's PATH_MAX allows at most 2048
// levels of one-byte names, and the limit keeps recursion bounded.
const MaxDepth = 2048

// ErrInvalid is wrapped by every error about malformed NAR input.
var ErrInvalid = errors.New("invalid NAR")

// Sink receives what Ingest extracts. It is implemented by the store's
// ingest transaction.
type Sink interface {
	// WriteBlob stores exactly size bytes read from r and returns the BLAKE3
	// digest of the whole contents.
	WriteBlob(r io.Reader, size int64) (digest.Digest, error)
	// PutDirectory stores a finished, validated directory.
	PutDirectory(d *castore.Directory) (digest.Digest, error)
}

// Result describes an ingested NAR.
type Result struct {
	Root    castore.Node
	NarHash [sha256.Size]byte
	NarSize int64
}

// Ingest parses one NAR from r into sink. It reads exactly the NAR's bytes
// from r when r is a *bufio.Reader (so a NAR embedded in a longer stream can
// be followed by other data); otherwise it buffers r itself.
func Ingest(r io.Reader, sink Sink) (*Result, error) {
	br, ok := r.(*bufio.Reader)
	if !ok {
		br = bufio.NewReaderSize(r, 256<<10)
	}
	// The NAR hash runs behind the parse: every byte of an upload passes
	// through this goroutine (parse, chunking, BLAKE3), and SHA-256 was an
	// eighth of it.
	h := hashbehind.New(sha256.New())
	defer h.Close()
	size, root, err := parse(br, h, sink)
	if err != nil {
		return nil, err
	}
	res := &Result{Root: root, NarSize: size}
	h.Sum(res.NarHash[:0])
	return res, nil
}

// Copy copies exactly one NAR from r to w, checking it as strictly as
// Ingest does but storing nothing, and returns its size. It is how a
// NAR embedded in a protocol stream is passed on or skipped.
func Copy(w io.Writer, r *bufio.Reader) (int64, error) {
	size, _, err := parse(r, w, discard{})
	return size, err
}

// parse reads one NAR from r into sink, copying exactly the bytes it
// consumes to w.
func parse(r *bufio.Reader, w io.Writer, sink Sink) (int64, castore.Node, error) {
	in := &ingester{sink: sink}
	in.r = &teeReader{r: r, w: w, n: &in.n}
	if err := in.expect(Magic); err != nil {
		return in.n, castore.Node{}, err
	}
	root, err := in.node(0)
	return in.n, root, err
}

// teeReader passes on (to a hash, or a destination) and counts exactly
// what the parser consumes. It keeps the first error of its own, so a
// sink that fails while reading file contents can be told apart from
// input that ended early.
type teeReader struct {
	r   *bufio.Reader
	w   io.Writer
	n   *int64
	err error
}

func (t *teeReader) Read(p []byte) (int, error) {
	n, err := t.r.Read(p)
	if _, werr := t.w.Write(p[:n]); werr != nil && err == nil {
		err = fmt.Errorf("nar: copy: %w", werr)
	}
	*t.n += int64(n)
	if err != nil && t.err == nil {
		t.err = err
	}
	return n, err
}

// discard is the Sink of Copy.
type discard struct{}

func (discard) WriteBlob(r io.Reader, size int64) (digest.Digest, error) {
	_, err := io.CopyN(io.Discard, r, size)
	return digest.Digest{}, err
}

func (discard) PutDirectory(*castore.Directory) (digest.Digest, error) {
	return digest.Digest{}, nil
}

type ingester struct {
	r    *teeReader
	n    int64
	sink Sink
	buf  [8]byte
	tok  []byte
}

func (in *ingester) errorf(format string, args ...any) error {
	return fmt.Errorf("%w at byte %d: %s", ErrInvalid, in.n, fmt.Sprintf(format, args...))
}

func (in *ingester) readErr(what string, err error) error {
	if errors.Is(err, io.EOF) {
		err = io.ErrUnexpectedEOF
	}
	if errors.Is(err, io.ErrUnexpectedEOF) {
		return fmt.Errorf("%w at byte %d: truncated reading %s: %w", ErrInvalid, in.n, what, err)
	}
	return fmt.Errorf("nar: reading %s at byte %d: %w", what, in.n, err)
}

func (in *ingester) u64(what string) (uint64, error) {
	if _, err := io.ReadFull(in.r, in.buf[:]); err != nil {
		return 0, in.readErr(what, err)
	}
	return binary.LittleEndian.Uint64(in.buf[:]), nil
}

func (in *ingester) padding(n uint64, what string) error {
	pad := (8 - n%8) % 8
	if pad == 0 {
		return nil
	}
	if _, err := io.ReadFull(in.r, in.buf[:pad]); err != nil {
		return in.readErr(what+" padding", err)
	}
	for _, b := range in.buf[:pad] {
		if b != 0 {
			return in.errorf("non-zero padding after %s", what)
		}
	}
	return nil
}

// str reads a string of at most max bytes into a reused buffer.
func (in *ingester) str(max uint64, what string) ([]byte, error) {
	n, err := in.u64(what + " length")
	if err != nil {
		return nil, err
	}
	if n > max {
		return nil, in.errorf("%s length %d exceeds %d", what, n, max)
	}
	if uint64(cap(in.tok)) < n {
		in.tok = make([]byte, n)
	}
	in.tok = in.tok[:n]
	if _, err := io.ReadFull(in.r, in.tok); err != nil {
		return nil, in.readErr(what, err)
	}
	if err := in.padding(n, what); err != nil {
		return nil, err
	}
	return in.tok, nil
}

// maxToken is the longest keyword in the grammar ("nix-archive-1").
const maxToken = 16

func (in *ingester) expect(want string) error {
	got, err := in.str(maxToken, fmt.Sprintf("%q", want))
	if err != nil {
		return err
	}
	if string(got) != want {
		return in.errorf("expected %q, got %q", want, got)
	}
	return nil
}

func (in *ingester) node(depth int) (castore.Node, error) {
	if depth > MaxDepth {
		return castore.Node{}, in.errorf("directories nested deeper than %d", MaxDepth)
	}
	if err := in.expect("("); err != nil {
		return castore.Node{}, err
	}
	if err := in.expect("type"); err != nil {
		return castore.Node{}, err
	}
	typ, err := in.str(maxToken, "node type")
	if err != nil {
		return castore.Node{}, err
	}
	var n castore.Node
	switch string(typ) {
	case "regular":
		n, err = in.regular()
	case "symlink":
		n, err = in.symlink()
	case "directory":
		n, err = in.directory(depth)
	default:
		return n, in.errorf("unknown node type %q", typ)
	}
	if err != nil {
		return n, err
	}
	return n, nil
}

func (in *ingester) regular() (castore.Node, error) {
	n := castore.Node{Kind: castore.KindFile}
	tok, err := in.str(maxToken, "\"executable\" or \"contents\"")
	if err != nil {
		return n, err
	}
	if string(tok) == "executable" {
		n.Executable = true
		if err := in.expect(""); err != nil {
			return n, err
		}
		if tok, err = in.str(maxToken, "\"contents\""); err != nil {
			return n, err
		}
	}
	if string(tok) != "contents" {
		return n, in.errorf("expected \"contents\", got %q", tok)
	}
	size, err := in.u64("file size")
	if err != nil {
		return n, err
	}
	if size > 1<<62 {
		return n, in.errorf("file size %d is implausible", size)
	}
	start := in.n
	in.r.err = nil
	d, err := in.sink.WriteBlob(in.r, int64(size))
	if err != nil {
		got := in.n - start
		// Only input that ended early is the NAR's fault; a sink that
		// failed (disk, database, a cancelled context) or a broken
		// connection is not, whatever the sink returned.
		if rerr := in.r.err; rerr != nil && uint64(got) < size {
			if errors.Is(rerr, io.EOF) || errors.Is(rerr, io.ErrUnexpectedEOF) {
				return n, fmt.Errorf("%w at byte %d: truncated file contents (%d of %d bytes): %w", ErrInvalid, in.n, got, size, io.ErrUnexpectedEOF)
			}
			return n, fmt.Errorf("nar: reading file contents at byte %d: %w", in.n, rerr)
		}
		return n, fmt.Errorf("nar: storing file contents (%d of %d bytes read): %w", got, size, err)
	}
	if err := in.padding(size, "file contents"); err != nil {
		return n, err
	}
	n.Digest, n.Size = d, size
	return n, in.expect(")")
}

func (in *ingester) symlink() (castore.Node, error) {
	n := castore.Node{Kind: castore.KindSymlink}
	if err := in.expect("target"); err != nil {
		return n, err
	}
	t, err := in.str(castore.MaxTargetLen, "symlink target")
	if err != nil {
		return n, err
	}
	if err := castore.ValidateTarget(t); err != nil {
		return n, in.errorf("%v", err)
	}
	n.Target = bytes.Clone(t)
	return n, in.expect(")")
}

func (in *ingester) directory(depth int) (castore.Node, error) {
	var dir castore.Directory
	var prev []byte
	for {
		tok, err := in.str(maxToken, "\"entry\" or \")\"")
		if err != nil {
			return castore.Node{}, err
		}
		if string(tok) == ")" {
			break
		}
		if string(tok) != "entry" {
			return castore.Node{}, in.errorf("expected \"entry\" or \")\", got %q", tok)
		}
		if err := in.expect("("); err != nil {
			return castore.Node{}, err
		}
		if err := in.expect("name"); err != nil {
			return castore.Node{}, err
		}
		nb, err := in.str(castore.MaxNameLen, "entry name")
		if err != nil {
			return castore.Node{}, err
		}
		// Check the name before descending, so hostile input is refused
		// before anything below it is stored.
		if err := castore.ValidateName(nb); err != nil {
			return castore.Node{}, in.errorf("%v", err)
		}
		if prev != nil && bytes.Compare(prev, nb) >= 0 {
			return castore.Node{}, in.errorf("entry %q does not sort after %q (unsorted or duplicate)", nb, prev)
		}
		name := bytes.Clone(nb)
		prev = name
		if err := in.expect("node"); err != nil {
			return castore.Node{}, err
		}
		child, err := in.node(depth + 1)
		if err != nil {
			return castore.Node{}, err
		}
		if err := dir.Add(name, child); err != nil {
			return castore.Node{}, in.errorf("%v", err)
		}
		if err := in.expect(")"); err != nil {
			return castore.Node{}, err
		}
	}
	d, err := in.sink.PutDirectory(&dir)
	if err != nil {
		return castore.Node{}, fmt.Errorf("nar: storing directory: %w", err)
	}
	return castore.Node{Kind: castore.KindDirectory, Digest: d, Size: dir.Size()}, nil
}
