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
// uses it for the files of a directory, BlobBatch at a time: a tree of
// thousands of small files then costs a lookup per BlobBatch files, not
// one per file, and a NAR holds the index's readers that much less.
type BatchSource interface {
	Source
	// OpenBlobs opens ds: blobs[i] reads ds[i] unless errs[i] says why
	// not; err fails them all.
	OpenBlobs(ctx context.Context, ds []digest.Digest) (blobs []Blob, errs []error, err error)
}

// BlobBatch is how many files Render opens per OpenBlobs call.
const BlobBatch = 32

// Render writes the NAR of the tree rooted at root to w and returns the
// number of bytes written.
func Render(ctx context.Context, w io.Writer, root castore.Node, src Source) (int64, error) {
	cw := &countWriter{w: w}
	r := &renderer{ctx: ctx, w: bufio.NewWriterSize(cw, 256<<10), src: src}
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
	w io.Writer
	n int64
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

	// The next file's blob, opened with its directory's batch.
	pre    Blob
	preErr error
	hasPre bool
}

// Prefetcher is a Blob that can start decoding its first n bytes in the
// background. Render has the files after the one it writes decoding, up to
// ReadAheadBytes past the start of that one: a path of many small files
// then keeps the other cores decoding while one renders, as a big file does
// with its own read-ahead, instead of decoding frame after frame on the
// rendering goroutine as each file is reached.
type Prefetcher interface {
	Prefetch(n int64)
}

// ReadAheadBytes is how far past the start of the file it writes Render
// has the following files of its directory decoding.
const ReadAheadBytes = 16 << 20

// openedBlobs are the blobs of a run of a directory's file entries, opened
// BlobBatch at a time, the next batch as read-ahead reaches it. A run ends
// at a subdirectory, so no level of the tree holds open blobs while a level
// below renders: at most 2*BlobBatch are open.
type openedBlobs struct {
	at map[int]openedBlob // entry index → its blob, not taken yet
}

type openedBlob struct {
	b   Blob
	err error
}

// open opens, unless already open, entry i's blob and those of the file
// entries after it up to the next subdirectory, BlobBatch at most.
func (o *openedBlobs) open(r *renderer, ents []castore.NamedNode, i int) error {
	if _, ok := o.at[i]; ok {
		return nil
	}
	bs, ok := r.src.(BatchSource)
	if !ok {
		return nil // contents opens it
	}
	var idx []int
	var ds []digest.Digest
	for j := i; j < len(ents) && len(ds) < BlobBatch; j++ {
		n := ents[j].Node
		if n.Kind == castore.KindDirectory {
			break
		}
		if n.Kind == castore.KindFile && n.Size > 0 {
			idx = append(idx, j)
			ds = append(ds, n.Digest)
		}
	}
	blobs, errs, err := bs.OpenBlobs(r.ctx, ds)
	if err != nil {
		return fmt.Errorf("open %d blobs: %w", len(ds), err)
	}
	if len(blobs) != len(ds) || len(errs) != len(ds) {
		return fmt.Errorf("open %d blobs: %d answers", len(ds), len(blobs))
	}
	if o.at == nil {
		o.at = make(map[int]openedBlob, 2*BlobBatch)
	}
	for k, j := range idx {
		o.at[j] = openedBlob{blobs[k], errs[k]}
	}
	return nil
}

// readAhead has the files after entry i (which is about to render) start
// decoding, up to ReadAheadBytes past i's start and BlobBatch files on,
// opening the next batch when the window reaches it. The file itself reads
// ahead within its blob as it is written. Calls as the render moves on
// extend the window; a blob only starts what it has not started yet, so no
// frame is decoded twice. A failure to open is left for the render to meet
// when it gets there.
func (o *openedBlobs) readAhead(r *renderer, ents []castore.NamedNode, i int) {
	if ob, ok := o.at[i]; !ok || ob.err != nil {
		return
	} else if _, ok := ob.b.(Prefetcher); !ok {
		return // nothing to gain by opening early
	}
	budget := ReadAheadBytes - int64(ents[i].Node.Size)
	for j := i + 1; budget > 0 && j < len(ents) && j <= i+BlobBatch; j++ {
		n := ents[j].Node
		if n.Kind == castore.KindDirectory {
			return
		}
		if n.Kind != castore.KindFile || n.Size == 0 {
			continue
		}
		if o.open(r, ents, j) != nil {
			return
		}
		if ob := o.at[j]; ob.err == nil {
			if p, ok := ob.b.(Prefetcher); ok {
				p.Prefetch(min(budget, int64(n.Size)))
			}
		}
		budget -= int64(n.Size)
	}
}

// take hands over entry i's opened blob.
func (o *openedBlobs) take(i int) (Blob, bool, error) {
	ob, ok := o.at[i]
	if !ok {
		return nil, false, nil
	}
	delete(o.at, i)
	return ob.b, true, ob.err
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
		dir, err := r.src.Directory(r.ctx, n.Digest)
		if err != nil {
			return fmt.Errorf("nar: %s: directory %s: %w", path, n.Digest, err)
		}
		ents := dir.Entries()
		var opened openedBlobs
		for i, e := range ents {
			r.tok("entry")
			r.tok("(")
			r.tok("name")
			r.str(e.Name)
			r.tok("node")
			sub := strings.TrimSuffix(path, "/") + "/" + string(e.Name)
			if e.Node.Kind == castore.KindFile && e.Node.Size > 0 {
				if err := opened.open(r, ents, i); err != nil {
					return fmt.Errorf("nar: %s: %w", sub, err)
				}
				opened.readAhead(r, ents, i)
				r.pre, r.hasPre, r.preErr = opened.take(i)
			}
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
		b, err := r.pre, r.preErr
		if !r.hasPre {
			b, err = r.src.OpenBlob(r.ctx, n.Digest)
		}
		r.pre, r.preErr, r.hasPre = nil, nil, false
		if err != nil {
			return fmt.Errorf("blob %s: %w", n.Digest, err)
		}
		if b.Size() != int64(n.Size) {
			return fmt.Errorf("blob %s has %d bytes, tree says %d", n.Digest, b.Size(), n.Size)
		}
		var got int64
		if wt, ok := b.(io.WriterTo); ok {
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
