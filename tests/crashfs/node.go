package crashfs

import (
	"context"
	"sort"
	"syscall"
	"time"

	"github.com/hanwen/go-fuse/v2/fs"
	"github.com/hanwen/go-fuse/v2/fuse"
)

// node is the FUSE face of one inode. All state is in the inode, guarded by FS.mu.
type node struct {
	fs.Inode
	f  *FS
	in *inode
}

var (
	_ fs.NodeLookuper   = (*node)(nil)
	_ fs.NodeGetattrer  = (*node)(nil)
	_ fs.NodeSetattrer  = (*node)(nil)
	_ fs.NodeOpener     = (*node)(nil)
	_ fs.NodeReader     = (*node)(nil)
	_ fs.NodeWriter     = (*node)(nil)
	_ fs.NodeFsyncer    = (*node)(nil)
	_ fs.NodeFlusher    = (*node)(nil)
	_ fs.NodeAllocater  = (*node)(nil)
	_ fs.NodeCreater    = (*node)(nil)
	_ fs.NodeMkdirer    = (*node)(nil)
	_ fs.NodeUnlinker   = (*node)(nil)
	_ fs.NodeRmdirer    = (*node)(nil)
	_ fs.NodeRenamer    = (*node)(nil)
	_ fs.NodeLinker     = (*node)(nil)
	_ fs.NodeSymlinker  = (*node)(nil)
	_ fs.NodeReadlinker = (*node)(nil)
	_ fs.NodeReaddirer  = (*node)(nil)
	_ fs.NodeStatfser   = (*node)(nil)
)

// begin takes the lock for one operation; it fails with EIO once the power is cut.
func (n *node) begin() syscall.Errno {
	n.f.mu.Lock()
	if n.f.dead {
		n.f.mu.Unlock()
		return syscall.EIO
	}
	n.f.stats.Ops++
	return 0
}

func (n *node) end() { n.f.mu.Unlock() }

// fillAttr describes in (f.mu held).
func fillAttr(in *inode, a *fuse.Attr) {
	a.Ino = in.ino
	a.Mode = in.mode
	a.Owner = fuse.Owner{Uid: in.uid, Gid: in.gid}
	a.Nlink = uint32(in.links)
	switch {
	case in.isDir():
		a.Nlink = 2
		a.Size = 4096
	case in.isReg():
		a.Size = uint64(len(in.data))
	case in.isSymlink():
		a.Size = uint64(len(in.target))
	}
	a.Blocks = (a.Size + 511) / 512
	a.Blksize = pageSize
	a.SetTimes(&in.atime, &in.mtime, &in.ctime)
}

// child wraps in as a kernel inode under n (called without f.mu).
func (n *node) child(ctx context.Context, in *inode) *fs.Inode {
	return n.NewInode(ctx, &node{f: n.f, in: in}, fs.StableAttr{Mode: in.mode & syscall.S_IFMT, Ino: in.ino})
}

func (n *node) Lookup(ctx context.Context, name string, out *fuse.EntryOut) (*fs.Inode, syscall.Errno) {
	if n.in == n.f.root && name == n.f.opts.ControlName {
		out.Attr.Mode = syscall.S_IFREG | 0o200
		out.Attr.Ino = ctlIno
		out.Attr.Nlink = 1
		return n.NewInode(ctx, &ctlNode{f: n.f}, fs.StableAttr{Mode: syscall.S_IFREG, Ino: ctlIno}), 0
	}
	if e := n.begin(); e != 0 {
		return nil, e
	}
	c, ok := n.in.entries[name]
	if ok {
		fillAttr(c, &out.Attr)
	}
	n.end()
	if !ok {
		return nil, syscall.ENOENT
	}
	return n.child(ctx, c), 0
}

func (n *node) Getattr(ctx context.Context, fh fs.FileHandle, out *fuse.AttrOut) syscall.Errno {
	if e := n.begin(); e != 0 {
		return e
	}
	defer n.end()
	fillAttr(n.in, &out.Attr)
	return 0
}

func (n *node) Setattr(ctx context.Context, fh fs.FileHandle, in *fuse.SetAttrIn, out *fuse.AttrOut) syscall.Errno {
	if e := n.begin(); e != 0 {
		return e
	}
	defer n.end()
	now := time.Now()
	if size, ok := in.GetSize(); ok {
		if !n.in.isReg() {
			return syscall.EINVAL
		}
		n.truncateLocked(int64(size))
		n.in.mtime = now
	}
	if mode, ok := in.GetMode(); ok {
		n.in.mode = n.in.mode&syscall.S_IFMT | mode&0o7777
	}
	if uid, ok := in.GetUID(); ok {
		n.in.uid = uid
	}
	if gid, ok := in.GetGID(); ok {
		n.in.gid = gid
	}
	if t, ok := in.GetATime(); ok {
		n.in.atime = t
	}
	if t, ok := in.GetMTime(); ok {
		n.in.mtime = t
	}
	n.in.ctime = now
	fillAttr(n.in, &out.Attr)
	return 0
}

func (n *node) truncateLocked(size int64) {
	n.in.data = resize(n.in.data, size)
	n.in.pending = append(n.in.pending, dataOp{truncate: true, off: size})
}

func (n *node) Open(ctx context.Context, flags uint32) (fs.FileHandle, uint32, syscall.Errno) {
	if e := n.begin(); e != 0 {
		return nil, 0, e
	}
	defer n.end()
	if n.in.isDir() && flags&syscall.O_ACCMODE != syscall.O_RDONLY {
		return nil, 0, syscall.EISDIR
	}
	// O_TRUNC arrives as a separate SETATTR: the mount does not ask for atomic_o_trunc.
	return nil, fuse.FOPEN_KEEP_CACHE, 0
}

func (n *node) Read(ctx context.Context, fh fs.FileHandle, dest []byte, off int64) (fuse.ReadResult, syscall.Errno) {
	if e := n.begin(); e != 0 {
		return nil, e
	}
	defer n.end()
	if off >= int64(len(n.in.data)) {
		return fuse.ReadResultData(nil), 0
	}
	c := copy(dest, n.in.data[off:])
	return fuse.ReadResultData(dest[:c]), 0
}

func (n *node) Write(ctx context.Context, fh fs.FileHandle, data []byte, off int64) (uint32, syscall.Errno) {
	if e := n.begin(); e != 0 {
		return 0, e
	}
	defer n.end()
	if !n.in.isReg() {
		return 0, syscall.EINVAL
	}
	n.in.data = writeAt(n.in.data, data, off)
	n.in.pending = append(n.in.pending, dataOp{off: off, data: append([]byte(nil), data...)})
	n.in.mtime = time.Now()
	n.f.stats.Writes++
	n.f.stats.BytesWritten += int64(len(data))
	return uint32(len(data)), 0
}

func (n *node) Allocate(ctx context.Context, fh fs.FileHandle, off uint64, size uint64, mode uint32) syscall.Errno {
	if e := n.begin(); e != 0 {
		return e
	}
	defer n.end()
	if mode != 0 {
		return syscall.EOPNOTSUPP
	}
	if end := int64(off + size); end > int64(len(n.in.data)) {
		n.truncateLocked(end)
	}
	return 0
}

func (n *node) Flush(ctx context.Context, fh fs.FileHandle) syscall.Errno { return 0 }

// Fsync makes the inode durable: file data for a file, entries for a directory. The
// CutAtFsync-th one cuts the power instead of answering, taking effect or not.
func (n *node) Fsync(ctx context.Context, fh fs.FileHandle, flags uint32) syscall.Errno {
	if e := n.begin(); e != 0 {
		return e
	}
	defer n.end()
	f := n.f
	f.stats.Fsyncs++
	if n.in.isDir() {
		f.stats.DirFsyncs++
	} else {
		f.stats.FileFsyncs++
	}
	if f.opts.CutAtFsync > 0 && f.stats.Fsyncs == f.opts.CutAtFsync {
		if f.rng.Intn(2) == 0 {
			f.syncLocked(n.in)
		}
		f.cutLocked()
		return syscall.EIO
	}
	f.syncLocked(n.in)
	return 0
}

// addEntry links c as name in directory n (f.mu held), recording the change.
func (n *node) addEntry(name string, c *inode, ft *fate) {
	if old, ok := n.in.entries[name]; ok {
		old.links--
	}
	n.in.entries[name] = c
	c.links++
	n.in.dirOps = append(n.in.dirOps, dirOp{name: name, target: c, fate: ft})
	n.in.mtime = time.Now()
}

// removeEntry unlinks name from directory n (f.mu held), recording the change.
func (n *node) removeEntry(name string, ft *fate) {
	if old, ok := n.in.entries[name]; ok {
		old.links--
	}
	delete(n.in.entries, name)
	n.in.dirOps = append(n.in.dirOps, dirOp{name: name, fate: ft})
	n.in.mtime = time.Now()
}

// newChild creates a new inode named name in directory n.
func (n *node) newChild(ctx context.Context, name string, mode uint32, out *fuse.EntryOut) (*inode, syscall.Errno) {
	if e := n.begin(); e != 0 {
		return nil, e
	}
	defer n.end()
	if !n.in.isDir() {
		return nil, syscall.ENOTDIR
	}
	if _, ok := n.in.entries[name]; ok {
		return nil, syscall.EEXIST
	}
	var uid, gid uint32
	if c, ok := fuse.FromContext(ctx); ok {
		uid, gid = c.Uid, c.Gid
	}
	c := n.f.newInode(mode, uid, gid)
	n.addEntry(name, c, &fate{})
	fillAttr(c, &out.Attr)
	return c, 0
}

func (n *node) Create(ctx context.Context, name string, flags uint32, mode uint32, out *fuse.EntryOut) (*fs.Inode, fs.FileHandle, uint32, syscall.Errno) {
	c, e := n.newChild(ctx, name, syscall.S_IFREG|mode&0o7777, out)
	if e == syscall.EEXIST && flags&syscall.O_EXCL == 0 {
		// Raced with another creator: open the existing file, as open(2) would.
		if e = n.begin(); e != 0 {
			return nil, nil, 0, e
		}
		c = n.in.entries[name]
		switch {
		case c == nil:
			e = syscall.ENOENT
		case c.isDir():
			e = syscall.EISDIR
		default:
			if flags&syscall.O_TRUNC != 0 && c.isReg() {
				(&node{f: n.f, in: c}).truncateLocked(0)
			}
			fillAttr(c, &out.Attr)
		}
		n.end()
	}
	if e != 0 {
		return nil, nil, 0, e
	}
	return n.child(ctx, c), nil, fuse.FOPEN_KEEP_CACHE, 0
}

func (n *node) Mkdir(ctx context.Context, name string, mode uint32, out *fuse.EntryOut) (*fs.Inode, syscall.Errno) {
	c, e := n.newChild(ctx, name, syscall.S_IFDIR|mode&0o7777, out)
	if e != 0 {
		return nil, e
	}
	return n.child(ctx, c), 0
}

func (n *node) Symlink(ctx context.Context, target, name string, out *fuse.EntryOut) (*fs.Inode, syscall.Errno) {
	if e := n.begin(); e != 0 {
		return nil, e
	}
	if _, ok := n.in.entries[name]; ok {
		n.end()
		return nil, syscall.EEXIST
	}
	var uid, gid uint32
	if c, ok := fuse.FromContext(ctx); ok {
		uid, gid = c.Uid, c.Gid
	}
	c := n.f.newInode(syscall.S_IFLNK|0o777, uid, gid)
	c.target = target
	n.addEntry(name, c, &fate{})
	fillAttr(c, &out.Attr)
	n.end()
	return n.child(ctx, c), 0
}

func (n *node) Readlink(ctx context.Context) ([]byte, syscall.Errno) {
	if e := n.begin(); e != 0 {
		return nil, e
	}
	defer n.end()
	if !n.in.isSymlink() {
		return nil, syscall.EINVAL
	}
	return []byte(n.in.target), 0
}

func (n *node) Link(ctx context.Context, target fs.InodeEmbedder, name string, out *fuse.EntryOut) (*fs.Inode, syscall.Errno) {
	t, ok := target.(*node)
	if !ok {
		return nil, syscall.EPERM
	}
	if e := n.begin(); e != 0 {
		return nil, e
	}
	if _, ok := n.in.entries[name]; ok {
		n.end()
		return nil, syscall.EEXIST
	}
	if t.in.isDir() {
		n.end()
		return nil, syscall.EPERM
	}
	n.addEntry(name, t.in, &fate{})
	t.in.ctime = time.Now()
	fillAttr(t.in, &out.Attr)
	n.end()
	return n.child(ctx, t.in), 0
}

func (n *node) Unlink(ctx context.Context, name string) syscall.Errno {
	if e := n.begin(); e != 0 {
		return e
	}
	defer n.end()
	c, ok := n.in.entries[name]
	if !ok {
		return syscall.ENOENT
	}
	if c.isDir() {
		return syscall.EISDIR
	}
	n.removeEntry(name, &fate{})
	c.ctime = time.Now()
	return 0
}

func (n *node) Rmdir(ctx context.Context, name string) syscall.Errno {
	if e := n.begin(); e != 0 {
		return e
	}
	defer n.end()
	c, ok := n.in.entries[name]
	if !ok {
		return syscall.ENOENT
	}
	if !c.isDir() {
		return syscall.ENOTDIR
	}
	if len(c.entries) > 0 {
		return syscall.ENOTEMPTY
	}
	n.removeEntry(name, &fate{})
	return 0
}

// Rename records the removal and the addition with one shared fate.
func (n *node) Rename(ctx context.Context, name string, newParent fs.InodeEmbedder, newName string, flags uint32) syscall.Errno {
	np, ok := newParent.(*node)
	if !ok {
		return syscall.EXDEV
	}
	if flags&^uint32(1) != 0 { // only RENAME_NOREPLACE
		return syscall.EINVAL
	}
	if e := n.begin(); e != 0 {
		return e
	}
	defer n.end()
	c, ok := n.in.entries[name]
	if !ok {
		return syscall.ENOENT
	}
	if old, ok := np.in.entries[newName]; ok {
		switch {
		case old == c:
			return 0
		case flags&1 != 0:
			return syscall.EEXIST
		case old.isDir() && !c.isDir():
			return syscall.EISDIR
		case !old.isDir() && c.isDir():
			return syscall.ENOTDIR
		case old.isDir() && len(old.entries) > 0:
			return syscall.ENOTEMPTY
		}
	}
	ft := &fate{}
	n.removeEntry(name, ft)
	np.addEntry(newName, c, ft)
	c.ctime = time.Now()
	return 0
}

func (n *node) Readdir(ctx context.Context) (fs.DirStream, syscall.Errno) {
	if e := n.begin(); e != 0 {
		return nil, e
	}
	defer n.end()
	if !n.in.isDir() {
		return nil, syscall.ENOTDIR
	}
	list := make([]fuse.DirEntry, 0, len(n.in.entries))
	for name, c := range n.in.entries {
		list = append(list, fuse.DirEntry{Name: name, Mode: c.mode & syscall.S_IFMT, Ino: c.ino})
	}
	sort.Slice(list, func(i, j int) bool { return list[i].Name < list[j].Name })
	return fs.NewListDirStream(list), 0
}

// Statfs reports the backing file system's space, which bounds what a cut can write.
func (n *node) Statfs(ctx context.Context, out *fuse.StatfsOut) syscall.Errno {
	var st syscall.Statfs_t
	if err := syscall.Statfs(n.f.backing, &st); err != nil {
		return fs.ToErrno(err)
	}
	out.FromStatfsT(&st)
	return 0
}

// ctlNode is the control file: writing "cut" to it cuts the power.
type ctlNode struct {
	fs.Inode
	f *FS
}

var (
	_ fs.NodeOpener    = (*ctlNode)(nil)
	_ fs.NodeWriter    = (*ctlNode)(nil)
	_ fs.NodeGetattrer = (*ctlNode)(nil)
	_ fs.NodeSetattrer = (*ctlNode)(nil)
)

func (c *ctlNode) Open(ctx context.Context, flags uint32) (fs.FileHandle, uint32, syscall.Errno) {
	return nil, fuse.FOPEN_DIRECT_IO, 0
}

func (c *ctlNode) Getattr(ctx context.Context, fh fs.FileHandle, out *fuse.AttrOut) syscall.Errno {
	out.Attr.Mode = syscall.S_IFREG | 0o200
	out.Attr.Ino = ctlIno
	out.Attr.Nlink = 1
	return 0
}

// Setattr accepts the truncate that a shell's `>` sends.
func (c *ctlNode) Setattr(ctx context.Context, fh fs.FileHandle, in *fuse.SetAttrIn, out *fuse.AttrOut) syscall.Errno {
	return c.Getattr(ctx, fh, out)
}

func (c *ctlNode) Write(ctx context.Context, fh fs.FileHandle, data []byte, off int64) (uint32, syscall.Errno) {
	if _, err := parseCommand(data); err != nil {
		return 0, syscall.EINVAL
	}
	c.f.mu.Lock()
	c.f.cutLocked()
	c.f.mu.Unlock()
	return uint32(len(data)), 0
}

// ctlIno is the control file's inode number, far above any real inode's.
const ctlIno = uint64(1) << 62
