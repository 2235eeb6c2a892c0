// Package fusefs is a read-only FUSE view of the store: the mount root
// holds one entry per valid store path (its basename), and below each,
// directories, files and symlinks exactly as the path's NAR describes them,
// as the Nix store shows them: owner root, mode 0444 or 0555, mtime 1.
// It is the lowerdir of an overlayfs for Nix's Local Overlay Store.
//
// Content never changes, so the kernel may cache entries, attributes and
// file pages for long; only the root is dynamic: paths imported while
// mounted appear at once (negative lookups are not cached), and paths a
// collection deleted are invalidated in the kernel (Options.Deletions).
package fusefs

import (
	"context"
	"errors"
	"fmt"
	"hash/fnv"
	"io"
	"log/slog"
	"os"
	"sync"
	"sync/atomic"
	"syscall"
	"time"

	"github.com/hanwen/go-fuse/v2/fs"
	"github.com/hanwen/go-fuse/v2/fuse"

	"github.com/casnix/casnix/blobs"
	"github.com/casnix/casnix/castore"
	"github.com/casnix/casnix/digest"
	"github.com/casnix/casnix/store"
)

// Store is what the filesystem reads.
type Store interface {
	Root(ctx context.Context, name string) (castore.Node, error)
	Directory(ctx context.Context, d digest.Digest) (*castore.Directory, error)
	OpenBlob(ctx context.Context, d digest.Digest) (*blobs.BlobReader, error)
	NamesAfter(ctx context.Context, after string, limit int) ([]string, error)
}

// Options configure Mount.
type Options struct {
	// ListRoot makes the root listable (overlayfs and Nix's overlay GC
	// list it). Off, only lookups by name work: for huge stores.
	ListRoot bool
	// AllowOther lets other users (sandboxed builders) read the mount.
	AllowOther bool
	Logger     *slog.Logger
	Debug      bool
	// ReadAheadKB is the kernel's read-ahead window for the mount in KiB
	// (0: ReadAheadKB; negative: leave the kernel's default). Setting it
	// needs root.
	ReadAheadKB int
	// Deletions, if set, returns a counter that grows whenever paths were
	// deleted (store.Store.Deletions, bumped by every collection that
	// deleted paths, in any process). The mount polls it and invalidates
	// the kernel's cached entries of paths that are gone.
	Deletions func() (uint64, error)
	// Fetch, if set, makes a lazy mount: a lookup at the root of a name
	// the store lacks calls it to fetch the path (and its closure) and
	// then looks again. It returns an error wrapping ErrNotFound when
	// nobody has the path (ENOENT); any other error is EIO. A failure is
	// not remembered: the next lookup calls Fetch again.
	Fetch func(ctx context.Context, name string) error
}

// ErrNotFound is what Options.Fetch returns (wrapped) for a path nobody has.
var ErrNotFound = errors.New("no such store path")

// contentTimeout is how long the kernel may cache what never changes.
const contentTimeout = 24 * time.Hour

// mtime is what Nix sets every store file's mtime to.
const mtime = 1

type fsys struct {
	st   Store
	opts Options
	log  *slog.Logger
}

// Mount mounts the store at dir and returns the server; call Unmount (or
// Wait) on it.
func Mount(dir string, st Store, opts Options) (*fuse.Server, error) {
	if opts.Logger == nil {
		opts.Logger = slog.New(slog.DiscardHandler)
	}
	if err := CleanStale(dir); err != nil {
		return nil, err
	}
	f := &fsys{st: st, opts: opts, log: opts.Logger}
	long := contentTimeout
	zero := time.Duration(0)
	mo := fuse.MountOptions{
		FsName: "casnix", Name: "casnix",
		AllowOther:   opts.AllowOther,
		Options:      []string{"ro", "default_permissions"},
		MaxReadAhead: 1 << 20,
		// Large reads: fewer round trips, and whole chunks per request.
		MaxWrite: 1 << 20,
		// Mount with mount(2) as root; fusermount otherwise.
		DirectMount:          os.Geteuid() == 0,
		EnableSymlinkCaching: true,
		Debug:                opts.Debug,
		MaxBackground:        64,
	}
	var deletions uint64
	if opts.Deletions != nil {
		var err error
		if deletions, err = opts.Deletions(); err != nil {
			return nil, fmt.Errorf("read deletions counter: %w", err)
		}
	}
	root := &rootNode{fs: f}
	srv, err := fs.Mount(dir, root, &fs.Options{
		MountOptions: mo, EntryTimeout: &long, AttrTimeout: &long, NegativeTimeout: &zero,
	})
	if err != nil {
		return nil, fmt.Errorf("mount %s: %w", dir, err)
	}
	if opts.Deletions != nil {
		go f.watchDeletions(srv, root, opts.Deletions, deletions)
	}
	if opts.ReadAheadKB == 0 {
		opts.ReadAheadKB = ReadAheadKB
	}
	if opts.ReadAheadKB > 0 {
		// Before anyone opens a file: the kernel copies the window into
		// each open file's read-ahead state.
		if err := setReadAhead(dir, opts.ReadAheadKB); err != nil {
			f.log.Debug("kernel read-ahead left at its default", "err", err)
		}
	}
	return srv, nil
}

// ino gives every node a stable inode number for the life of the mount
// (and across mounts): a hash of its path below the mount root.
func ino(path string) uint64 {
	h := fnv.New64a()
	io.WriteString(h, path)
	v := h.Sum64()
	if v <= 1 {
		v += 2 // 1 is the root
	}
	return v
}

func attrFor(n castore.Node, out *fuse.Attr) {
	out.Mtime, out.Atime, out.Ctime = mtime, mtime, mtime
	out.Nlink = 1
	switch n.Kind {
	case castore.KindDirectory:
		out.Mode = syscall.S_IFDIR | 0o555
	case castore.KindFile:
		out.Mode = syscall.S_IFREG | 0o444
		if n.Executable {
			out.Mode = syscall.S_IFREG | 0o555
		}
		out.Size = n.Size
		out.Blocks = (n.Size + 511) / 512
	case castore.KindSymlink:
		out.Mode = syscall.S_IFLNK | 0o777
		out.Size = uint64(len(n.Target))
	}
	out.Blksize = 1 << 16
}

func modeOf(k castore.Kind) uint32 {
	switch k {
	case castore.KindDirectory:
		return syscall.S_IFDIR
	case castore.KindSymlink:
		return syscall.S_IFLNK
	}
	return syscall.S_IFREG
}

func (f *fsys) errno(op string, err error) syscall.Errno {
	if errors.Is(err, store.ErrNotValid) || errors.Is(err, os.ErrNotExist) {
		return syscall.ENOENT
	}
	if errors.Is(err, context.Canceled) {
		return syscall.EINTR
	}
	f.log.Error("fuse "+op, "err", err)
	return syscall.EIO
}

// rootNode lists store paths.
type rootNode struct {
	fs.Inode
	fs *fsys
}

var (
	_ fs.NodeLookuper  = (*rootNode)(nil)
	_ fs.NodeReaddirer = (*rootNode)(nil)
	_ fs.NodeGetattrer = (*rootNode)(nil)
)

func (r *rootNode) Getattr(ctx context.Context, fh fs.FileHandle, out *fuse.AttrOut) syscall.Errno {
	out.Mode = syscall.S_IFDIR | 0o555
	out.Mtime, out.Atime, out.Ctime = mtime, mtime, mtime
	out.Nlink = 2
	out.SetTimeout(0) // the root changes as paths are added
	return 0
}

func (r *rootNode) Lookup(ctx context.Context, name string, out *fuse.EntryOut) (*fs.Inode, syscall.Errno) {
	if store.ValidateName(name) != nil {
		return nil, syscall.ENOENT // "..", "/", over-long or not a store path name
	}
	n, err := r.fs.st.Root(ctx, name)
	if errors.Is(err, store.ErrNotValid) && r.fs.opts.Fetch != nil {
		var errno syscall.Errno
		if n, errno = r.fetch(name); errno != 0 {
			return nil, errno
		}
	} else if err != nil {
		return nil, r.fs.errno("lookup", err)
	}
	return newChild(ctx, &r.Inode, r.fs, name, n, out), 0
}

// fetch has a lazy mount's missing path fetched and looks it up again.
// The request's context is not used: the kernel interrupts a request when
// the looking-up thread gets any signal (Go's preemption signals
// included), which must not fail a fetch that is nearly done. Each lookup
// waits in its own goroutine (go-fuse serves requests concurrently), so a
// slow fetch holds up only the lookups of its path.
//
// A failed fetch is EIO whatever went wrong, and is not logged here: any
// user can cause one per lookup, so Fetch logs at the rate it chooses.
func (r *rootNode) fetch(name string) (castore.Node, syscall.Errno) {
	if err := r.fs.opts.Fetch(context.Background(), name); err != nil {
		if errors.Is(err, ErrNotFound) {
			return castore.Node{}, syscall.ENOENT
		}
		return castore.Node{}, syscall.EIO
	}
	n, err := r.fs.st.Root(context.Background(), name)
	if err != nil {
		return castore.Node{}, r.fs.errno("lookup", err)
	}
	return n, 0
}

func newChild(ctx context.Context, parent *fs.Inode, f *fsys, path string, n castore.Node, out *fuse.EntryOut) *fs.Inode {
	attrFor(n, &out.Attr)
	out.SetEntryTimeout(contentTimeout)
	out.SetAttrTimeout(contentTimeout)
	id := fs.StableAttr{Mode: modeOf(n.Kind), Ino: ino(path)}
	out.Ino = id.Ino
	var emb fs.InodeEmbedder
	switch n.Kind {
	case castore.KindDirectory:
		emb = &dirNode{fs: f, path: path, node: n}
	case castore.KindFile:
		emb = &fileNode{fs: f, node: n}
	default:
		emb = &linkNode{node: n}
	}
	return parent.NewInode(ctx, emb, id)
}

func (r *rootNode) Readdir(ctx context.Context) (fs.DirStream, syscall.Errno) {
	if !r.fs.opts.ListRoot {
		return fs.NewListDirStream(nil), 0
	}
	return &rootStream{fs: r.fs}, 0
}

// rootStream pages through the path names in SQLite, so listing a store
// of any size holds one page in memory.
type rootStream struct {
	fs    *fsys
	page  []string
	after string
	done  bool
	err   syscall.Errno
}

const rootPage = 1024

func (s *rootStream) fill() {
	if len(s.page) > 0 || s.done {
		return
	}
	// Not the request's context: the kernel interrupts FUSE requests when
	// the reading thread gets any signal (Go's preemption signals
	// included), and a cancelled query must not end the listing early.
	// After an error the stream stays where it was, so a retried READDIR
	// carries on.
	names, err := s.fs.st.NamesAfter(context.Background(), s.after, rootPage)
	if err != nil {
		s.err = s.fs.errno("readdir", err)
		return
	}
	if len(names) < rootPage {
		s.done = true
	}
	if len(names) > 0 {
		s.after = names[len(names)-1]
	}
	s.page = names
}

func (s *rootStream) HasNext() bool {
	s.fill()
	return len(s.page) > 0 || s.err != 0
}

func (s *rootStream) Next() (fuse.DirEntry, syscall.Errno) {
	if s.err != 0 {
		err := s.err
		s.err = 0
		return fuse.DirEntry{}, err
	}
	name := s.page[0]
	s.page = s.page[1:]
	// The kind of each path is not looked up here: a type of 0 (unknown)
	// makes readers stat when they care, and keeps listing to one query
	// per page.
	return fuse.DirEntry{Name: name, Ino: ino(name)}, 0
}

func (s *rootStream) Close() {}

// dirNode is a directory inside a store path.
type dirNode struct {
	fs.Inode
	fs   *fsys
	path string
	node castore.Node

	mu   sync.Mutex
	dir  *castore.Directory
	list []fuse.DirEntry // shared by all handles: read only
}

var (
	_ fs.NodeLookuper       = (*dirNode)(nil)
	_ fs.NodeReaddirer      = (*dirNode)(nil)
	_ fs.NodeOpendirHandler = (*dirNode)(nil)
	_ fs.NodeGetattrer      = (*dirNode)(nil)
)

// OpendirHandle lets the kernel cache the listing: a directory's entries
// never change.
func (d *dirNode) OpendirHandle(ctx context.Context, flags uint32) (fs.FileHandle, uint32, syscall.Errno) {
	list, errno := d.entries(ctx)
	if errno != 0 {
		return nil, 0, errno
	}
	return &dirHandle{list: list}, fuse.FOPEN_CACHE_DIR | fuse.FOPEN_KEEP_CACHE, 0
}

// dirHandle serves a listing from memory.
type dirHandle struct {
	list []fuse.DirEntry
	pos  int
}

var (
	_ fs.FileReaddirenter = (*dirHandle)(nil)
	_ fs.FileSeekdirer    = (*dirHandle)(nil)
)

func (h *dirHandle) Readdirent(ctx context.Context) (*fuse.DirEntry, syscall.Errno) {
	if h.pos >= len(h.list) {
		return nil, 0
	}
	e := h.list[h.pos]
	h.pos++
	return &e, 0
}

func (h *dirHandle) Seekdir(ctx context.Context, off uint64) syscall.Errno {
	h.pos = int(min(off, uint64(len(h.list))))
	return 0
}

// load reads the directory once it succeeds; a failure is not kept, so a
// retry (after an interrupted request, say) reads it again. The request's
// context is not used: an interrupt must not poison the node.
func (d *dirNode) load(context.Context) (*castore.Directory, error) {
	d.mu.Lock()
	defer d.mu.Unlock()
	if d.dir == nil {
		dir, err := d.fs.st.Directory(context.Background(), d.node.Digest)
		if err != nil {
			return nil, err
		}
		d.dir = dir
	}
	return d.dir, nil
}

func (d *dirNode) Getattr(ctx context.Context, fh fs.FileHandle, out *fuse.AttrOut) syscall.Errno {
	attrFor(d.node, &out.Attr)
	out.SetTimeout(contentTimeout)
	return 0
}

func (d *dirNode) Lookup(ctx context.Context, name string, out *fuse.EntryOut) (*fs.Inode, syscall.Errno) {
	dir, err := d.load(ctx)
	if err != nil {
		return nil, d.fs.errno("lookup", err)
	}
	n, ok := dir.Lookup([]byte(name))
	if !ok {
		return nil, syscall.ENOENT
	}
	return newChild(ctx, &d.Inode, d.fs, d.path+"/"+name, n, out), 0
}

func (d *dirNode) Readdir(ctx context.Context) (fs.DirStream, syscall.Errno) {
	list, errno := d.entries(ctx)
	if errno != 0 {
		return nil, errno
	}
	return fs.NewListDirStream(list), 0
}

// entries is the directory's listing, built once: the kernel sends
// OPENDIR on every opendir(3) even when it serves the entries from its
// own cache, and a tree walk opens every directory.
func (d *dirNode) entries(ctx context.Context) ([]fuse.DirEntry, syscall.Errno) {
	dir, err := d.load(ctx)
	if err != nil {
		return nil, d.fs.errno("readdir", err)
	}
	d.mu.Lock()
	defer d.mu.Unlock()
	if d.list == nil {
		ents := dir.Entries()
		list := make([]fuse.DirEntry, len(ents))
		for i, e := range ents {
			list[i] = fuse.DirEntry{Name: string(e.Name), Mode: modeOf(e.Kind), Ino: ino(d.path + "/" + string(e.Name))}
		}
		d.list = list
	}
	return d.list, 0
}

// linkNode is a symlink.
type linkNode struct {
	fs.Inode
	node castore.Node
}

var (
	_ fs.NodeReadlinker = (*linkNode)(nil)
	_ fs.NodeGetattrer  = (*linkNode)(nil)
)

func (l *linkNode) Readlink(ctx context.Context) ([]byte, syscall.Errno) {
	return l.node.Target, 0
}

func (l *linkNode) Getattr(ctx context.Context, fh fs.FileHandle, out *fuse.AttrOut) syscall.Errno {
	attrFor(l.node, &out.Attr)
	out.SetTimeout(contentTimeout)
	return 0
}

type fileNode struct {
	fs.Inode
	fs   *fsys
	node castore.Node

	mu   sync.Mutex
	br   *blobs.BlobReader
	next int64 // where a sequential reader reads next
}

var (
	_ fs.NodeOpener    = (*fileNode)(nil)
	_ fs.NodeReader    = (*fileNode)(nil)
	_ fs.NodeGetattrer = (*fileNode)(nil)
)

func (f *fileNode) Getattr(ctx context.Context, fh fs.FileHandle, out *fuse.AttrOut) syscall.Errno {
	attrFor(f.node, &out.Attr)
	out.SetTimeout(contentTimeout)
	return 0
}

// largestRead is the largest READ request served, for tests of the
// read-ahead window.
var largestRead atomic.Int64

// nearby is how far from the previous read a read may start and still
// count as sequential.
const nearby = 4 << 20

// fileNode is a regular file. There are no per-open handles: Open answers
// ENOSYS, which tells the kernel (FUSE no_open) never to send OPEN, FLUSH
// or RELEASE again and to keep file pages cached across opens. That makes a
// warm read of a small file cost no round trip at all; the blob reader and
// read-ahead state live in the node, shared by all readers of the file.
func (f *fileNode) Open(ctx context.Context, flags uint32) (fs.FileHandle, uint32, syscall.Errno) {
	if flags&(syscall.O_WRONLY|syscall.O_RDWR|syscall.O_TRUNC|syscall.O_APPEND) != 0 {
		return nil, 0, syscall.EROFS
	}
	return nil, 0, syscall.ENOSYS
}

// reader returns the node's blob reader, opening it on first use.
func (f *fileNode) reader() (*blobs.BlobReader, error) {
	f.mu.Lock()
	defer f.mu.Unlock()
	if f.br == nil {
		br, err := f.fs.st.OpenBlob(context.Background(), f.node.Digest)
		if err != nil {
			return nil, err
		}
		// A root file's size comes from its path row, which has no
		// checksum: reads bounded by a wrong size would return a
		// truncated file.
		if br.Size() != int64(f.node.Size) {
			return nil, fmt.Errorf("%w: blob %s has %d bytes, the tree says %d", blobs.ErrCorrupt, f.node.Digest, br.Size(), f.node.Size)
		}
		f.br = br
	}
	return f.br, nil
}

func (f *fileNode) Read(ctx context.Context, fh fs.FileHandle, dest []byte, off int64) (fuse.ReadResult, syscall.Errno) {
	if off >= int64(f.node.Size) {
		return fuse.ReadResultData(nil), 0
	}
	br, err := f.reader()
	if err != nil {
		return nil, f.fs.errno("open", err)
	}
	if n := int64(len(dest)); n > largestRead.Load() {
		largestRead.Store(n) // racy max: only tests look, after the reads
	}
	f.mu.Lock()
	// The kernel's own read-ahead sends several requests at once, so
	// "sequential" means near where the last one ended, not exactly there.
	sequential := off >= f.next-nearby && off <= f.next+nearby
	f.next = off + int64(len(dest))
	f.mu.Unlock()
	if sequential {
		br.ReadAhead(off + int64(len(dest)))
	}
	v, err := br.View(off, len(dest))
	if err != nil {
		return nil, f.fs.errno("read", err)
	}
	return viewResult{v}, 0
}

// viewResult hands the kernel the bytes of a read straight from the frame
// cache: go-fuse writes its slices with one writev (it takes them through
// Slices, a method of its unexported vectored-result interface) and calls
// Done after the write, which gives the frames back to the cache.
type viewResult struct{ v *blobs.View }

func (r viewResult) Slices() ([][]byte, fuse.Status) { return r.v.Slices(), fuse.OK }

func (r viewResult) Bytes(buf []byte) ([]byte, fuse.Status) {
	if len(buf) < r.v.Len() {
		buf = make([]byte, r.v.Len())
	}
	return buf[:r.v.CopyTo(buf)], fuse.OK
}

func (r viewResult) Size() int { return r.v.Len() }

func (r viewResult) Done() { r.v.Release() }

var _ fs.NodeFlusher = (*fileNode)(nil)

// Flush answers ENOSYS: nothing is ever written, and the kernel takes
// ENOSYS to mean "never send FLUSH again" (no_flush), which saves a round
// trip on every close(2) of every file.
func (f *fileNode) Flush(ctx context.Context, fh fs.FileHandle) syscall.Errno {
	return syscall.ENOSYS
}
