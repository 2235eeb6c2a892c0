// Package crashfs is a FUSE file system that simulates a power cut, in the spirit of
// LazyFS (used to test PostgreSQL and etcd): it mounts a backing directory, serves every
// operation from memory, and on PowerCut writes back to the backing directory only what a
// crash may leave behind, choosing adversarially (with a seeded PRNG) among the outcomes
// POSIX allows for whatever was not made durable.
//
// # Model
//
// At Mount the whole backing tree is read into memory (regular files, directories,
// symlinks, hard links; other file types are skipped). Every later change lives only in
// memory; the backing directory is untouched until the cut. Each inode keeps two states:
//
//   - current: what every operation on the mount sees (the running system's view);
//   - durable: what survives any power cut.
//
// and the list of changes made since the two last agreed:
//
//   - File data: each write(off, bytes), truncate (setattr size, including O_TRUNC) and
//     fallocate extension is appended to the inode's pending list. fsync or fdatasync of the
//     file, through any descriptor of the inode (and the kernel writes back dirty mmap pages
//     before it sends FUSE_FSYNC), replays the pending list onto the durable data: the file's
//     whole content and size, including an extension, become durable. There is no
//     metadata-only journal: fdatasync and fsync are the same.
//   - Directory entries: create, mknod-like creation, mkdir, unlink, rmdir, rename, link
//     and symlink each append an entry change (name -> inode, or name removed) to the
//     pending list of each directory they touch; only fsync of that directory makes its
//     current entries durable. A rename records a removal in the source directory and an
//     addition in the target directory that share one fate: both directories must be
//     fsynced for the rename to be durable, and a rename inside one directory is atomic
//     (old name or new name, never both or neither, while that directory is not fsynced).
//     fsync of a file never makes its name durable, and fsync of a directory makes no
//     file data durable.
//   - Attributes other than size (mode, owner, times) are applied to both states at once:
//     they are not part of the model.
//
// # Power cut
//
// PowerCut (or the Nth fsync when Options.CutAtFsync is N, or writing "cut" to the
// control file Options.ControlName at the mount's root from any process) atomically marks
// the file system dead: every later operation fails with EIO (ENOTCONN where the FUSE
// connection can be aborted through /sys/fs/fuse/connections); the mount stays until
// Unmount.
// Then the final state is resolved:
//
//   - each pending directory change (or pair, for a rename) is independently kept or lost
//     (p = 1/2), so unsynced directory operations may be reordered; the kept ones are
//     applied in their original order on top of the directory's durable entries;
//   - each pending write is independently lost, kept, or torn (1/3 each); a torn write
//     keeps either a prefix of its 4 KiB pages (pages aligned to file offsets) or an
//     arbitrary subset of them; a pending truncate is kept or lost; kept parts are applied
//     in order on top of the file's durable data, so a file may grow with zero-filled
//     holes where an extending write's earlier pages were lost;
//   - the tree reachable from the root through the resolved entries is written to the
//     backing directory, which is emptied first. Inodes reached by two names become hard
//     links.
//
// So bytes made durable by an fsync never change unless a later write or truncate covered
// them, and an entry made durable by a directory fsync survives unless a later unlink or
// rename of it was pending.
//
// # Limits
//
//   - Everything lives in memory: the data dir must fit in RAM (twice for files with
//     pending writes), and unlinked inodes are never freed while the file system is mounted.
//   - A directory that a half-kept cross-directory rename leaves reachable under two names
//     is written under the first name only (in sorted walk order).
//   - flock and POSIX locks are not forwarded: the mount does not ask for them, so the
//     kernel handles both locally, which is right for processes on this one machine.
//   - Extended attributes, special files (fifos, sockets, devices), O_TMPFILE and
//     RENAME_EXCHANGE are not supported (EOPNOTSUPP / EINVAL).
//   - The model is stricter than ext4 or XFS (which, for example, make a rename atomic
//     across directories and persist a fsynced new file's name with its data); it is meant
//     to find code that relies on more than POSIX promises, not to mimic one file system.
//   - mtime/atime are kept in memory and written back as they were at the cut.
//   - A process must not touch MAP_SHARED pages of a file on a mount that it serves
//     itself: the faulting thread blocks in the kernel where the Go runtime cannot stop it,
//     and a stop-the-world then stops the goroutines that would answer the fault. Run
//     SQLite (whose -shm is mmapped) and other clients in another process, as the tests do.
//   - The kernel keeps flock and fcntl locks, page cache and attributes across the cut
//     for descriptors still open; after the cut every operation fails, so this is unseen.
package crashfs

import (
	"errors"
	"fmt"
	"math/rand"
	"os"
	"path/filepath"
	"sort"
	"strings"
	"sync"
	"syscall"
	"time"

	"github.com/hanwen/go-fuse/v2/fs"
	"github.com/hanwen/go-fuse/v2/fuse"
	"golang.org/x/sys/unix"
)

// pageSize is the unit in which a torn write keeps or loses data.
const pageSize = 4096

// DefaultControlName is the control file's name at the mount's root when
// Options.ControlName is empty.
const DefaultControlName = ".crashfs-control"

// Options configure a mount.
type Options struct {
	// Seed seeds the PRNG that resolves the non-durable state at the cut.
	Seed int64
	// CutAtFsync, if positive, cuts the power during the Nth fsync (file or directory,
	// counted from 1): that fsync returns EIO and takes effect or not by the PRNG.
	CutAtFsync int64
	// ControlName is the name, at the mount's root, of a write-only file: writing "cut"
	// to it cuts the power (for a driver in another process). It is not listed by
	// readdir. Empty means DefaultControlName.
	ControlName string
	// Debug logs every FUSE request.
	Debug bool
}

// Stats count operations since Mount.
type Stats struct {
	Ops          int64 // every FUSE operation served
	Writes       int64 // write requests
	BytesWritten int64
	Fsyncs       int64 // file and directory fsyncs (the counter CutAtFsync uses)
	FileFsyncs   int64
	DirFsyncs    int64
}

// CutReport says how the cut resolved the non-durable state.
type CutReport struct {
	KeptWrites, LostWrites, TornWrites int
	KeptTruncates, LostTruncates       int
	KeptDirOps, LostDirOps             int
	Files, Dirs                        int // written to the backing directory
}

// FS is one mounted crash-simulating file system.
type FS struct {
	backing, mnt string
	opts         Options
	server       *fuse.Server
	connAbort    string // /sys/fs/fuse/connections/N/abort, if present

	mu      sync.Mutex
	rng     *rand.Rand
	inodes  map[uint64]*inode
	root    *inode
	nextIno uint64
	dead    bool
	stats   Stats

	unmountOnce sync.Once
	done        chan struct{}
	cutErr      error
	report      CutReport
}

// inode is one file, directory or symlink with its current and durable state.
type inode struct {
	ino                 uint64
	mode                uint32 // type and permission bits
	uid, gid            uint32
	atime, mtime, ctime time.Time
	links               int // current names

	data, durable []byte // regular file
	pending       []dataOp

	target string // symlink

	entries, durEntries map[string]*inode // directory
	dirOps              []dirOp

	resolved bool // set while resolving: data/entries below hold the final state
	final    []byte
	finalEnt map[string]*inode
}

// dataOp is one non-durable change of a file's data.
type dataOp struct {
	truncate bool
	off      int64 // write offset, or the truncate's size
	data     []byte
}

// dirOp is one non-durable change of a directory entry; target nil removes it. Ops of one
// syscall (a rename) share fate.
type dirOp struct {
	name   string
	target *inode
	fate   *fate
}

type fate struct {
	decided, kept bool
}

func (in *inode) isDir() bool     { return in.mode&syscall.S_IFMT == syscall.S_IFDIR }
func (in *inode) isReg() bool     { return in.mode&syscall.S_IFMT == syscall.S_IFREG }
func (in *inode) isSymlink() bool { return in.mode&syscall.S_IFMT == syscall.S_IFLNK }

// Mount reads backing into memory and mounts it at mnt.
func Mount(backing, mnt string, opts Options) (*FS, error) {
	if opts.ControlName == "" {
		opts.ControlName = DefaultControlName
	}
	f := &FS{
		backing: backing,
		mnt:     mnt,
		opts:    opts,
		rng:     rand.New(rand.NewSource(opts.Seed)),
		inodes:  map[uint64]*inode{},
		nextIno: 1,
		done:    make(chan struct{}),
	}
	root, err := f.load(backing, map[[2]uint64]*inode{})
	if err != nil {
		return nil, fmt.Errorf("crashfs: load %s: %w", backing, err)
	}
	if !root.isDir() {
		return nil, fmt.Errorf("crashfs: %s is not a directory", backing)
	}
	f.root = root
	sec := time.Second
	server, err := fs.Mount(mnt, &node{f: f, in: root}, &fs.Options{
		EntryTimeout: &sec,
		AttrTimeout:  &sec,
		MountOptions: fuse.MountOptions{
			FsName:      "crashfs",
			Name:        "crashfs",
			AllowOther:  true,
			DirectMount: true,
			Debug:       opts.Debug,
			MaxWrite:    1 << 20,
		},
	})
	if err != nil {
		return nil, fmt.Errorf("crashfs: mount %s: %w", mnt, err)
	}
	f.server = server
	var st unix.Stat_t
	if err := unix.Stat(mnt, &st); err == nil {
		p := fmt.Sprintf("/sys/fs/fuse/connections/%d/abort", unix.Minor(st.Dev))
		if _, err := os.Stat(p); err == nil {
			f.connAbort = p
		}
	}
	return f, nil
}

// load reads one backing path (recursively) into a new durable inode.
func (f *FS) load(path string, seen map[[2]uint64]*inode) (*inode, error) {
	var st unix.Stat_t
	if err := unix.Lstat(path, &st); err != nil {
		return nil, err
	}
	key := [2]uint64{uint64(st.Dev), st.Ino}
	if in, ok := seen[key]; ok {
		return in, nil
	}
	in := f.newInode(st.Mode, st.Uid, st.Gid)
	in.atime = time.Unix(st.Atim.Unix())
	in.mtime = time.Unix(st.Mtim.Unix())
	in.ctime = time.Unix(st.Ctim.Unix())
	seen[key] = in
	switch {
	case in.isReg():
		b, err := os.ReadFile(path)
		if err != nil {
			return nil, err
		}
		in.data = b
		in.durable = append([]byte(nil), b...)
	case in.isSymlink():
		t, err := os.Readlink(path)
		if err != nil {
			return nil, err
		}
		in.target = t
	case in.isDir():
		ents, err := os.ReadDir(path)
		if err != nil {
			return nil, err
		}
		for _, e := range ents {
			t := e.Type()
			if !(t.IsRegular() || t.IsDir() || t&os.ModeSymlink != 0) {
				continue
			}
			child, err := f.load(filepath.Join(path, e.Name()), seen)
			if err != nil {
				return nil, err
			}
			in.entries[e.Name()] = child
			in.durEntries[e.Name()] = child
			child.links++
		}
	default:
		return nil, fmt.Errorf("unsupported file type %o", st.Mode&syscall.S_IFMT)
	}
	return in, nil
}

// newInode allocates an inode; f.mu must be held (or f not yet mounted).
func (f *FS) newInode(mode, uid, gid uint32) *inode {
	now := time.Now()
	in := &inode{ino: f.nextIno, mode: mode, uid: uid, gid: gid, atime: now, mtime: now, ctime: now}
	f.nextIno++
	if in.isDir() {
		in.entries = map[string]*inode{}
		in.durEntries = map[string]*inode{}
	}
	f.inodes[in.ino] = in
	return in
}

// Mountpoint is where the file system is mounted.
func (f *FS) Mountpoint() string { return f.mnt }

// Stats returns the operation counters.
func (f *FS) Stats() Stats {
	f.mu.Lock()
	defer f.mu.Unlock()
	return f.stats
}

// Done is closed once a cut has written the backing directory.
func (f *FS) Done() <-chan struct{} { return f.done }

// Report waits for the cut to finish and says how it resolved the state.
func (f *FS) Report() (CutReport, error) {
	<-f.done
	return f.report, f.cutErr
}

// PowerCut cuts the power now and returns once the backing directory holds the
// resolved state. Calling it again (or after another trigger) just waits.
func (f *FS) PowerCut() (CutReport, error) {
	f.mu.Lock()
	f.cutLocked()
	f.mu.Unlock()
	return f.Report()
}

// Close ends the mount as a clean shutdown would after sync(2): every change is made
// durable first, then the backing directory is written as for a cut and the mount is
// detached.
func (f *FS) Close() error {
	f.mu.Lock()
	if !f.dead {
		for _, in := range f.inodes {
			f.syncLocked(in)
		}
	}
	f.cutLocked()
	f.mu.Unlock()
	return f.Unmount()
}

// cutLocked marks the file system dead and resolves the state (f.mu held), then aborts
// the FUSE connection and writes the backing directory in the background: it may run
// inside a FUSE request, which must return first. The mount stays in place, refusing
// every operation (EIO, or ENOTCONN once aborted), so that nothing can write to the bare
// mountpoint directory below it; Unmount removes it.
func (f *FS) cutLocked() {
	if f.dead {
		return
	}
	f.dead = true
	f.resolveLocked()
	go func() {
		if f.connAbort != "" {
			_ = os.WriteFile(f.connAbort, []byte("1"), 0)
		}
		f.cutErr = f.writeBacking()
		close(f.done)
	}()
}

// Unmount cuts the power if that has not happened yet, waits for the backing directory
// to be written, and lazily detaches the mount. It may be called more than once.
func (f *FS) Unmount() error {
	_, err := f.PowerCut()
	f.unmountOnce.Do(func() {
		if uerr := unix.Unmount(f.mnt, unix.MNT_DETACH); uerr != nil && err == nil {
			err = fmt.Errorf("crashfs: detach %s: %w", f.mnt, uerr)
		}
	})
	return err
}

// resolveLocked decides the fate of every pending change, in inode order so that a seed
// reproduces a cut.
func (f *FS) resolveLocked() {
	inos := make([]uint64, 0, len(f.inodes))
	for ino := range f.inodes {
		inos = append(inos, ino)
	}
	sort.Slice(inos, func(i, j int) bool { return inos[i] < inos[j] })
	for _, ino := range inos {
		in := f.inodes[ino]
		switch {
		case in.isDir():
			ent := make(map[string]*inode, len(in.durEntries))
			for k, v := range in.durEntries {
				ent[k] = v
			}
			for _, op := range in.dirOps {
				if !op.fate.decided {
					op.fate.decided = true
					op.fate.kept = f.rng.Intn(2) == 0
					if op.fate.kept {
						f.report.KeptDirOps++
					} else {
						f.report.LostDirOps++
					}
				}
				if !op.fate.kept {
					continue
				}
				if op.target == nil {
					delete(ent, op.name)
				} else {
					ent[op.name] = op.target
				}
			}
			in.finalEnt = ent
		case in.isReg():
			data := append([]byte(nil), in.durable...)
			for _, op := range in.pending {
				data = f.resolveDataOp(data, op)
			}
			in.final = data
		}
		in.resolved = true
	}
}

// resolveDataOp applies one pending data change to data, whole, torn or not at all.
func (f *FS) resolveDataOp(data []byte, op dataOp) []byte {
	if op.truncate {
		if f.rng.Intn(2) == 0 {
			f.report.LostTruncates++
			return data
		}
		f.report.KeptTruncates++
		return resize(data, op.off)
	}
	switch f.rng.Intn(3) {
	case 0:
		f.report.LostWrites++
		return data
	case 1:
		f.report.KeptWrites++
		return writeAt(data, op.data, op.off)
	}
	f.report.TornWrites++
	// Split the write at 4 KiB boundaries of the file.
	type piece struct {
		off  int64
		data []byte
	}
	var pieces []piece
	for off, rest := op.off, op.data; len(rest) > 0; {
		n := int64(pageSize) - off%pageSize
		if n > int64(len(rest)) {
			n = int64(len(rest))
		}
		pieces = append(pieces, piece{off, rest[:n]})
		off += n
		rest = rest[n:]
	}
	if f.rng.Intn(2) == 0 {
		keep := f.rng.Intn(len(pieces) + 1)
		pieces = pieces[:keep]
	} else {
		kept := pieces[:0]
		for _, p := range pieces {
			if f.rng.Intn(2) == 0 {
				kept = append(kept, p)
			}
		}
		pieces = kept
	}
	for _, p := range pieces {
		data = writeAt(data, p.data, p.off)
	}
	return data
}

// writeAt writes b at off, growing data with zeros as needed.
func writeAt(data, b []byte, off int64) []byte {
	if end := off + int64(len(b)); end > int64(len(data)) {
		data = resize(data, end)
	}
	copy(data[off:], b)
	return data
}

// resize truncates or zero-extends data to size.
func resize(data []byte, size int64) []byte {
	if size <= int64(len(data)) {
		return data[:size]
	}
	if size <= int64(cap(data)) {
		old := len(data)
		data = data[:size]
		clear(data[old:])
		return data
	}
	nd := make([]byte, size, size+size/4)
	copy(nd, data)
	return nd
}

// syncLocked makes in's current state durable (f.mu held).
func (f *FS) syncLocked(in *inode) {
	switch {
	case in.isReg():
		for _, op := range in.pending {
			if op.truncate {
				in.durable = resize(in.durable, op.off)
			} else {
				in.durable = writeAt(in.durable, op.data, op.off)
			}
		}
		in.pending = nil
	case in.isDir():
		in.durEntries = make(map[string]*inode, len(in.entries))
		for k, v := range in.entries {
			in.durEntries[k] = v
		}
		in.dirOps = nil
	}
}

// writeBacking empties the backing directory and writes the resolved tree into it.
func (f *FS) writeBacking() error {
	ents, err := os.ReadDir(f.backing)
	if err != nil {
		return fmt.Errorf("crashfs: read backing dir: %w", err)
	}
	for _, e := range ents {
		if err := os.RemoveAll(filepath.Join(f.backing, e.Name())); err != nil {
			return fmt.Errorf("crashfs: empty backing dir: %w", err)
		}
	}
	w := &writer{f: f, paths: map[*inode]string{}}
	w.paths[f.root] = f.backing
	if err := w.dir(f.root, f.backing); err != nil {
		return err
	}
	if err := os.Chmod(f.backing, os.FileMode(f.root.mode&0o7777)); err != nil {
		return fmt.Errorf("crashfs: chmod backing dir: %w", err)
	}
	return nil
}

type writer struct {
	f     *FS
	paths map[*inode]string
}

func (w *writer) dir(d *inode, path string) error {
	names := make([]string, 0, len(d.finalEnt))
	for name := range d.finalEnt {
		names = append(names, name)
	}
	sort.Strings(names)
	for _, name := range names {
		c := d.finalEnt[name]
		p := filepath.Join(path, name)
		if prev, ok := w.paths[c]; ok {
			if c.isDir() {
				continue // see Limits: a directory keeps its first name only
			}
			if err := os.Link(prev, p); err != nil {
				return fmt.Errorf("crashfs: write %s: %w", p, err)
			}
			continue
		}
		w.paths[c] = p
		var err error
		switch {
		case c.isDir():
			w.f.report.Dirs++
			if err = os.Mkdir(p, os.FileMode(c.mode&0o777)); err == nil {
				err = w.dir(c, p)
			}
			if err == nil {
				err = os.Chmod(p, modePerm(c.mode))
			}
		case c.isReg():
			w.f.report.Files++
			if err = os.WriteFile(p, c.final, 0o600); err == nil {
				err = os.Chmod(p, modePerm(c.mode))
			}
		case c.isSymlink():
			err = os.Symlink(c.target, p)
		}
		if err == nil {
			err = os.Lchown(p, int(c.uid), int(c.gid))
		}
		if err == nil && !c.isSymlink() {
			err = os.Chtimes(p, c.atime, c.mtime)
		}
		if err != nil {
			return fmt.Errorf("crashfs: write %s: %w", p, err)
		}
	}
	return nil
}

// modePerm converts permission bits, setuid/setgid/sticky included, for os.Chmod.
func modePerm(mode uint32) os.FileMode {
	m := os.FileMode(mode & 0o777)
	if mode&syscall.S_ISUID != 0 {
		m |= os.ModeSetuid
	}
	if mode&syscall.S_ISGID != 0 {
		m |= os.ModeSetgid
	}
	if mode&syscall.S_ISVTX != 0 {
		m |= os.ModeSticky
	}
	return m
}

// parseCommand recognises a control-file write.
func parseCommand(b []byte) (string, error) {
	cmd := strings.TrimSpace(string(b))
	if cmd != "cut" {
		return "", errors.New("unknown command")
	}
	return cmd, nil
}
