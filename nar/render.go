package nar

import (
	"bufio"
	"bytes"
	"context"
	"encoding/binary"
	"fmt"
	"io"
	"strings"

	"github.com/casnix/casnix/castore"
	"github.com/casnix/casnix/digest"
)

// Blob is an open file's contents.
type Blob interface {
	io.Reader
	Size() int64
}

// Source is where Render finds directories and file contents.
type Source interface {
	Directory(ctx context.Context, d digest.Digest) (*castore.Directory, error)
	OpenBlob(ctx context.Context, d digest.Digest) (Blob, error)
}

// BatchSource is a Source that opens several blobs with one lookup. Render
// uses it for the files of the tree in NAR order, BlobBatch at a time
// whichever directories they are in: a tree of thousands of small files
// then costs a lookup per BlobBatch files, not one per file, and a NAR
// holds the index's readers that much less. Render also walks ahead with
// it, to have the next files decoding (see Prefetcher).
type BatchSource interface {
	Source
	// OpenBlobs opens ds: blobs[i] reads ds[i] unless errs[i] says why
	// not; err fails them all.
	OpenBlobs(ctx context.Context, ds []digest.Digest) (blobs []Blob, errs []error, err error)
}

// FrameWriter is a writer that can take a whole stored frame of a file's
// contents at once (see blobs.FrameWriter, the same type): WriteFrame(raw,
// stored) writes raw, and a zstd writer may send stored, raw compressed as
// a complete zstd frame, instead of compressing raw again. When the writer
// given to Render is one, Render hands it the frames of blobs that are
// FramedBlobs.
type FrameWriter = interface {
	Write(p []byte) (int, error)
	WriteFrame(raw, stored []byte) (int, error)
}

// FramedBlob is a Blob that can write itself as whole stored frames where
// its contents are exactly a frame's (blobs.BlobReader).
type FramedBlob interface {
	Blob
	WriteFramesTo(w FrameWriter) (int64, error)
}

// framedMin is the smallest file whose stored frames Render hands to a
// FrameWriter: a smaller one saves little compression, and each file so
// handled costs a flush of Render's buffer (small writes downstream).
const framedMin = 128 << 10

// BlobBatch is how many files Render opens per OpenBlobs call.
const BlobBatch = 32

// Render writes the NAR of the tree rooted at root to w and returns the
// number of bytes written.
func Render(ctx context.Context, w io.Writer, root castore.Node, src Source) (int64, error) {
	cw := &countWriter{w: w}
	cw.fw, _ = w.(FrameWriter)
	r := &renderer{ctx: ctx, w: bufio.NewWriterSize(cw, 256<<10), src: src, cw: cw}
	if bs, ok := src.(BatchSource); ok {
		r.walk = newWalker(ctx, bs, root)
		defer r.walk.stop()
	}
	r.str([]byte(Magic))
	if err := r.node(root, "/"); err != nil {
		return cw.n, err
	}
	if err := r.w.Flush(); err != nil {
		return cw.n, fmt.Errorf("nar: write: %w", err)
	}
	return cw.n, nil
}

type countWriter struct {
	w  io.Writer
	fw FrameWriter // w, if it takes frames
	n  int64
}

func (c *countWriter) WriteFrame(raw, stored []byte) (int, error) {
	n, err := c.fw.WriteFrame(raw, stored)
	c.n += int64(n)
	return n, err
}

func (c *countWriter) Write(p []byte) (int, error) {
	n, err := c.w.Write(p)
	c.n += int64(n)
	return n, err
}

type renderer struct {
	ctx context.Context
	w   *bufio.Writer
	src Source
	num [8]byte
	cw  *countWriter // under w

	// walk loads directories and opens blobs ahead of the render, for a
	// BatchSource.
	walk *walker
}

var zeros [8]byte

func (r *renderer) u64(n uint64) {
	binary.LittleEndian.PutUint64(r.num[:], n)
	r.w.Write(r.num[:])
}

// str writes a NAR string. Write errors stick in the bufio.Writer and are
// reported by the next Flush or blob copy.
func (r *renderer) str(b []byte) {
	r.u64(uint64(len(b)))
	r.w.Write(b)
	r.w.Write(zeros[:(8-len(b)%8)%8])
}

func (r *renderer) tok(s string) { r.str([]byte(s)) }

// node renders n, found at path inside the archive (for error messages).
func (r *renderer) node(n castore.Node, path string) error {
	if err := r.ctx.Err(); err != nil {
		return err
	}
	r.tok("(")
	r.tok("type")
	switch n.Kind {
	case castore.KindFile:
		r.tok("regular")
		if n.Executable {
			r.tok("executable")
			r.tok("")
		}
		r.tok("contents")
		if err := r.contents(n); err != nil {
			return fmt.Errorf("nar: %s: %w", path, err)
		}
	case castore.KindSymlink:
		r.tok("symlink")
		r.tok("target")
		r.str(n.Target)
	case castore.KindDirectory:
		r.tok("directory")
		var ents []castore.NamedNode
		var err error
		if r.walk != nil {
			ents, err = r.walk.directory(n.Digest)
		} else {
			var dir *castore.Directory
			if dir, err = r.src.Directory(r.ctx, n.Digest); err == nil {
				ents = dir.Entries()
			}
		}
		if err != nil {
			return fmt.Errorf("nar: %s: directory %s: %w", path, n.Digest, err)
		}
		for _, e := range ents {
			r.tok("entry")
			r.tok("(")
			r.tok("name")
			r.str(e.Name)
			r.tok("node")
			sub := strings.TrimSuffix(path, "/") + "/" + string(e.Name)
			if err := r.node(e.Node, sub); err != nil {
				return err
			}
			r.tok(")")
		}
	default:
		return fmt.Errorf("nar: %s: cannot render node kind %v", path, n.Kind)
	}
	r.tok(")")
	return nil
}

func (r *renderer) contents(n castore.Node) error {
	r.u64(n.Size)
	if n.Size > 0 {
		var b Blob
		var err error
		if r.walk != nil {
			b, err = r.walk.blob(n)
		} else {
			b, err = r.src.OpenBlob(r.ctx, n.Digest)
		}
		if err != nil {
			return fmt.Errorf("blob %s: %w", n.Digest, err)
		}
		if b.Size() != int64(n.Size) {
			return fmt.Errorf("blob %s has %d bytes, tree says %d", n.Digest, b.Size(), n.Size)
		}
		var got int64
		if fb, ok := b.(FramedBlob); ok && r.cw.fw != nil && n.Size >= framedMin {
			// The contents go past the buffer, whole frames as stored:
			// what is buffered goes first.
			if err := r.w.Flush(); err != nil {
				return fmt.Errorf("write: %w", err)
			}
			got, err = fb.WriteFramesTo(r.cw)
		} else if wt, ok := b.(io.WriterTo); ok {
			// Hands chunk slices straight to the writer (no copy through
			// a read buffer).
			got, err = wt.WriteTo(r.w)
		} else {
			got, err = r.w.ReadFrom(b)
		}
		if err != nil {
			return fmt.Errorf("blob %s: %w", n.Digest, err)
		}
		if got != int64(n.Size) {
			return fmt.Errorf("blob %s: read %d of %d bytes", n.Digest, got, n.Size)
		}
	}
	r.w.Write(zeros[:(8-n.Size%8)%8])
	return nil
}

// File returns the NAR of one regular file whose size bytes of contents r
// yields, streaming them: how flat contents (a flat or text content-address
// add) become a NAR to ingest.
func File(r io.Reader, size int64, executable bool) io.Reader {
	var head, tail bytes.Buffer
	h := &renderer{w: bufio.NewWriter(&head)}
	h.str([]byte(Magic))
	for _, t := range []string{"(", "type", "regular"} {
		h.tok(t)
	}
	if executable {
		h.tok("executable")
		h.tok("")
	}
	h.tok("contents")
	h.u64(uint64(size))
	h.w.Flush() // to a bytes.Buffer: cannot fail
	t := &renderer{w: bufio.NewWriter(&tail)}
	t.w.Write(zeros[:(8-size%8)%8])
	t.tok(")")
	t.w.Flush()
	return io.MultiReader(&head, io.LimitReader(r, size), &tail)
}
