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

// maxAhead bounds the directories and the files a batch of the walk holds
// (loaded, opened, not rendered yet), and how many of each the render
// takes from the walk before it needs them.
const maxAhead = 2 * BlobBatch

// walker goes through the tree in NAR order ahead of the render, for a
// BatchSource. A goroutine of its own (walk) loads the directories and
// opens the files' blobs, BlobBatch per lookup whichever directories they
// are in, one batch ahead of the render: the index lookups, about half of
// what a NAR of many small files costs besides its bytes, run on another
// core than the writes. The render side takes the batches in order, so the
// walk never loads or opens anything twice, and has the files decoding up
// to ReadAheadBytes past the start of the file being written. Whatever
// the walk found wrong is reported by the render when it gets there, as
// without the walk.
type walker struct {
	batches <-chan []walkItem // the walk's, in NAR order; closed when it ends
	cancel  context.CancelFunc
	exited  chan struct{} // closed when the walk's goroutine has returned
	dirs    []walkDir     // taken from the walk, not rendered yet, in NAR order
	files   []walkFile    // likewise
	ended   bool          // batches is closed and drained
}

// walkItem is a directory (dir set) or a file with contents.
type walkItem struct {
	dir  *walkDir
	file walkFile
}

type walkDir struct {
	digest digest.Digest
	ents   []castore.NamedNode
	err    error
}

type walkFile struct {
	node castore.Node
	blob Blob
	err  error
}

// newWalker starts the walk of the tree under root. stop must be called
// once the render is over.
func newWalker(ctx context.Context, src BatchSource, root castore.Node) *walker {
	ctx, cancel := context.WithCancel(ctx)
	ch := make(chan []walkItem) // unbuffered: the walk keeps one batch ready
	w := &walker{batches: ch, cancel: cancel, exited: make(chan struct{})}
	g := &walk{ctx: ctx, src: src, out: ch}
	go func() {
		defer close(w.exited)
		defer close(ch)
		g.run(root)
	}()
	return w
}

// stop ends the walk and waits for its goroutine, so that nothing of it
// (an index lookup, a blob it opened) outlives the render.
func (w *walker) stop() {
	w.cancel()
	<-w.exited
}

// take adds the walk's next batch to the render's queues, waiting for it;
// false when the walk is over.
func (w *walker) take() bool {
	if w.ended {
		return false
	}
	b, ok := <-w.batches
	if !ok {
		w.ended = true
		return false
	}
	for _, it := range b {
		if it.dir != nil {
			w.dirs = append(w.dirs, *it.dir)
		} else {
			w.files = append(w.files, it.file)
		}
	}
	return true
}

// directory hands over the entries of the directory the render has
// reached, d.
func (w *walker) directory(d digest.Digest) ([]castore.NamedNode, error) {
	for len(w.dirs) == 0 && w.take() {
	}
	if len(w.dirs) == 0 || w.dirs[0].digest != d {
		return nil, fmt.Errorf("directory %s: render and read-ahead disagree on the tree", d)
	}
	wd := w.dirs[0]
	w.dirs[0] = walkDir{}
	w.dirs = w.dirs[1:]
	return wd.ents, wd.err
}

// blob hands over the blob of the file the render has reached, n, and
// has the files after it decoding.
func (w *walker) blob(n castore.Node) (Blob, error) {
	for len(w.files) == 0 && w.take() {
	}
	if len(w.files) == 0 || w.files[0].node.Digest != n.Digest {
		return nil, fmt.Errorf("render and read-ahead disagree on the tree")
	}
	f := w.files[0]
	w.files[0] = walkFile{}
	w.files = w.files[1:]
	if f.err == nil {
		w.readAhead(f)
	}
	return f.blob, f.err
}

// readAhead has the files after cur (the one the render is about to write)
// decoding, up to ReadAheadBytes past cur's start and BlobBatch files on,
// taking the walk's next batch when the window reaches it. cur reads ahead
// within its own blob as it is written. Each call moves the window on; a
// blob only starts what it has not started yet, so no frame is decoded
// twice. A file the walk could not open is left for the render to meet
// when it gets there.
func (w *walker) readAhead(cur walkFile) {
	if _, ok := cur.blob.(Prefetcher); !ok {
		return // nothing to gain by opening early
	}
	budget := ReadAheadBytes - int64(cur.node.Size)
	for j := 0; budget > 0 && j < BlobBatch; j++ {
		for j == len(w.files) { // the walk may pass directories without files first
			if len(w.dirs) >= maxAhead || !w.take() {
				return
			}
		}
		f := w.files[j]
		if p, ok := f.blob.(Prefetcher); ok && f.err == nil {
			p.Prefetch(min(budget, int64(f.node.Size)))
		}
		budget -= int64(f.node.Size)
	}
}

// walk is the walker's goroutine: it goes through the tree in NAR order
// and sends it in batches, each with its files' blobs opened by one
// OpenBlobs call.
type walk struct {
	ctx     context.Context
	src     BatchSource
	out     chan<- []walkItem
	stack   []walkLevel // the position: each open directory's entries
	pending []walkItem  // visited, not sent yet
	files   int         // how many of pending are files
	done    bool        // nothing left to visit (or a directory failed to load)
}

type walkLevel struct {
	ents []castore.NamedNode
	next int
}

func (g *walk) run(root castore.Node) {
	g.visit(root)
	for {
		more := g.step()
		if !more || g.files == BlobBatch || len(g.pending) >= maxAhead {
			if !g.flush() || !more {
				return
			}
		}
	}
}

// visit queues what the render will need for n.
func (g *walk) visit(n castore.Node) {
	switch n.Kind {
	case castore.KindDirectory:
		dir, err := g.src.Directory(g.ctx, n.Digest)
		wd := &walkDir{digest: n.Digest, err: err}
		if err == nil {
			wd.ents = dir.Entries()
			g.stack = append(g.stack, walkLevel{ents: wd.ents})
		} else {
			g.done = true // the render stops there
		}
		g.pending = append(g.pending, walkItem{dir: wd})
	case castore.KindFile:
		if n.Size > 0 {
			g.pending = append(g.pending, walkItem{file: walkFile{node: n}})
			g.files++
		}
	}
}

// step visits the next node; false when the walk is over.
func (g *walk) step() bool {
	for !g.done && len(g.stack) > 0 {
		top := &g.stack[len(g.stack)-1]
		if top.next == len(top.ents) {
			g.stack = g.stack[:len(g.stack)-1]
			continue
		}
		n := top.ents[top.next].Node
		top.next++
		g.visit(n)
		return true
	}
	g.done = true
	return false
}

// flush opens the pending files' blobs with one lookup and sends the
// pending batch; false when the render has stopped or the lookup failed
// (its error is each of the batch's files', for the render to report).
func (g *walk) flush() bool {
	if len(g.pending) == 0 {
		return true
	}
	ok := true
	if g.files > 0 {
		ds := make([]digest.Digest, 0, g.files)
		for _, it := range g.pending {
			if it.dir == nil {
				ds = append(ds, it.file.node.Digest)
			}
		}
		blobs, errs, err := g.src.OpenBlobs(g.ctx, ds)
		if err == nil && (len(blobs) != len(ds) || len(errs) != len(ds)) {
			err = fmt.Errorf("%d answers", len(blobs))
		}
		if err != nil {
			err = fmt.Errorf("open %d blobs: %w", len(ds), err)
			ok = false
		}
		k := 0
		for i := range g.pending {
			f := &g.pending[i].file
			if g.pending[i].dir != nil {
				continue
			}
			if err != nil {
				f.err = err
			} else {
				f.blob, f.err = blobs[k], errs[k]
			}
			k++
		}
	}
	select {
	case g.out <- g.pending:
	case <-g.ctx.Done():
		return false
	}
	g.pending, g.files = nil, 0
	return ok
}
