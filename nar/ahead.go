package nar

import (
	"context"
	"fmt"

	"github.com/casnix/casnix/castore"
	"github.com/casnix/casnix/digest"
)

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
// has the following files decoding.
const ReadAheadBytes = 16 << 20

// maxAhead bounds the directories and the files the walk holds ahead of
// the render (loaded, opened, not rendered yet).
const maxAhead = 2 * BlobBatch

// walker goes through the tree in NAR order ahead of the render, for a
// BatchSource: it loads the directories and opens the files' blobs,
// BlobBatch per lookup whichever directories they are in, and has the
// files decoding up to ReadAheadBytes past the start of the file being
// written. The render takes directories and blobs from its queues in the
// same order it meets them, so the walk never loads or opens anything
// twice, and whatever it found wrong is reported by the render when it
// gets there, as without the walk.
type walker struct {
	ctx   context.Context
	src   BatchSource
	stack []walkLevel // the walk's position: each open directory's entries
	dirs  []walkDir   // loaded, not rendered yet, in NAR order
	files []walkFile  // reached, not rendered yet, in NAR order
	// opened is how many of files have their blob opened (or its error).
	opened int
	done   bool // nothing left to walk (or a directory failed to load)
}

type walkLevel struct {
	ents []castore.NamedNode
	next int
}

type walkDir struct {
	digest digest.Digest
	dir    *castore.Directory
	err    error
}

type walkFile struct {
	node castore.Node
	blob Blob
	err  error
}

func newWalker(ctx context.Context, src BatchSource, root castore.Node) *walker {
	w := &walker{ctx: ctx, src: src}
	w.visit(root)
	return w
}

// visit queues what the render will need for n.
func (w *walker) visit(n castore.Node) {
	switch n.Kind {
	case castore.KindDirectory:
		dir, err := w.src.Directory(w.ctx, n.Digest)
		w.dirs = append(w.dirs, walkDir{n.Digest, dir, err})
		if err != nil {
			w.done = true // the render stops there
			return
		}
		w.stack = append(w.stack, walkLevel{ents: dir.Entries()})
	case castore.KindFile:
		if n.Size > 0 {
			w.files = append(w.files, walkFile{node: n})
		}
	}
}

// step visits the next node; false when the walk is over.
func (w *walker) step() bool {
	for !w.done && len(w.stack) > 0 {
		top := &w.stack[len(w.stack)-1]
		if top.next == len(top.ents) {
			w.stack = w.stack[:len(w.stack)-1]
			continue
		}
		n := top.ents[top.next].Node
		top.next++
		w.visit(n)
		return true
	}
	w.done = true
	return false
}

// more walks on, within maxAhead; false when it cannot.
func (w *walker) more() bool {
	return len(w.dirs) < maxAhead && len(w.files) < maxAhead && w.step()
}

// directory hands over the directory the render has reached, d.
func (w *walker) directory(d digest.Digest) (*castore.Directory, error) {
	for len(w.dirs) == 0 && w.step() {
	}
	if len(w.dirs) == 0 || w.dirs[0].digest != d {
		return nil, fmt.Errorf("directory %s: render and read-ahead disagree on the tree", d)
	}
	wd := w.dirs[0]
	w.dirs = w.dirs[1:]
	return wd.dir, wd.err
}

// blob hands over the blob of the file the render has reached, n, and
// has the files after it decoding.
func (w *walker) blob(n castore.Node) (Blob, error) {
	for len(w.files) == 0 && w.step() {
	}
	if len(w.files) == 0 || w.files[0].node.Digest != n.Digest {
		return nil, fmt.Errorf("render and read-ahead disagree on the tree")
	}
	if w.opened == 0 {
		if err := w.open(); err != nil {
			return nil, err
		}
	}
	f := w.files[0]
	w.files[0] = walkFile{}
	w.files = w.files[1:]
	w.opened--
	if f.err == nil {
		w.readAhead(f)
	}
	return f.blob, f.err
}

// open opens the next BlobBatch files' blobs with one lookup, walking on
// to find them.
func (w *walker) open() error {
	for len(w.files) < w.opened+BlobBatch && w.more() {
	}
	end := min(len(w.files), w.opened+BlobBatch)
	if end == w.opened {
		return nil // the walk stopped short (maxAhead directories): nothing to open yet
	}
	ds := make([]digest.Digest, 0, end-w.opened)
	for _, f := range w.files[w.opened:end] {
		ds = append(ds, f.node.Digest)
	}
	blobs, errs, err := w.src.OpenBlobs(w.ctx, ds)
	if err != nil {
		return fmt.Errorf("open %d blobs: %w", len(ds), err)
	}
	if len(blobs) != len(ds) || len(errs) != len(ds) {
		return fmt.Errorf("open %d blobs: %d answers", len(ds), len(blobs))
	}
	for k := range ds {
		f := &w.files[w.opened+k]
		f.blob, f.err = blobs[k], errs[k]
	}
	w.opened = end
	return nil
}

// readAhead has the files after cur (the one the render is about to write)
// decoding, up to ReadAheadBytes past cur's start and BlobBatch files on,
// opening the next batch when the window reaches it. cur reads ahead within
// its own blob as it is written. Each call moves the window on; a blob
// only starts what it has not started yet, so no frame is decoded twice. A
// failure to open is left for the render to meet when it gets there.
func (w *walker) readAhead(cur walkFile) {
	if _, ok := cur.blob.(Prefetcher); !ok {
		return // nothing to gain by opening early
	}
	budget := ReadAheadBytes - int64(cur.node.Size)
	for j := 0; budget > 0 && j < BlobBatch; j++ {
		for j == len(w.files) { // the walk may pass directories without files first
			if !w.more() {
				return
			}
		}
		if j == w.opened && w.open() != nil {
			return
		}
		f := w.files[j]
		if p, ok := f.blob.(Prefetcher); ok && f.err == nil {
			p.Prefetch(min(budget, int64(f.node.Size)))
		}
		budget -= int64(f.node.Size)
	}
}
