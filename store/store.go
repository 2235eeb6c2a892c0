package store

import (
	"github.com/casnix/casnix/loglimit"
	"sync"
	"sync/atomic"

	"bytes"
	"context"
	"crypto/sha256"
	"errors"
	"fmt"
	"io"
	"io/fs"
	"log/slog"
	"os"
	"path/filepath"
	"time"

	"github.com/casnix/casnix/blobs"
	"github.com/casnix/casnix/castore"
	"github.com/casnix/casnix/db"
	"github.com/casnix/casnix/digest"
	"github.com/casnix/casnix/gencache"
	"github.com/casnix/casnix/hashbehind"
	"github.com/casnix/casnix/nar"
	"github.com/casnix/casnix/objstore"
)

// Sentinel errors callers branch on.
var (
	ErrNotValid     = errors.New("is not valid") // reads "path '/nix/store/…' is not valid", as Nix words it
	ErrHashMismatch = errors.New("NAR hash mismatch")
	ErrSizeMismatch = errors.New("NAR size mismatch")
	ErrMissingRef   = errors.New("reference is not valid")
)

// Options configure Open.
type Options struct {
	StoreDir string
	Blobs    blobs.Options
	Logger   *slog.Logger
	// ReadOnly opens an existing data dir for reading only (see Open).
	ReadOnly bool
	// Packs is the s3:// URL packs go to (packs.go): recorded by the data
	// dir at first use, then optional, and refused if it differs.
	Packs string
}

// Store is an open casnix data directory.
type Store struct {
	StoreDir string
	dir      string
	db       *db.DB
	blobs    *blobs.Store
	blobOpts blobs.Options // to reopen blobs when repair replaces the database
	bucket   *objstore.Bucket
	// replicaOf is the bucket URL of the primary, for a read replica (replica.go).
	replicaOf string
	log       *slog.Logger
	infos     infoCache
	dirLock   *os.File // DirLockFile, held shared while open
	// drvHashes caches stored derivations' hashes modulo (drvhash.go).
	drvHashes drvHashCache
	// badRoots holds the unreadable root links already warned about.
	badRoots sync.Map
	// drvWarnings limits warnings about forged derivations: any client may
	// upload them as fast as it likes.
	drvWarnings loglimit.Limiter
	// lastCommit is when a batch last committed (unix nanoseconds; the
	// open time before any): the background repack waits for a quiet spell.
	lastCommit atomic.Int64
	// access holds access times not yet written (access.go).
	access accessLog
	// evicts counts evictions (evict.go).
	evicts evictCounters
	// durable, when set, is the bucket durability promise (durable.go).
	durable atomic.Pointer[durability]
	// deadPacks counts dead packs' objects deleted from the bucket (deadpacks.go).
	deadPacks deadPackCounters
	// dirs holds directories renders decoded (renderDirectory).
	dirs renderDirs
}

// DBFile and PackDir are the data directory's layout.
const (
	DBFile  = "casnix.db"
	PackDir = "packs"
)

// Open opens (creating if needed) the data directory dir.
//
// With opts.ReadOnly, an existing data dir whose schema is current opens
// for reading only, the cheap start of one-shot reads (dump, cat, ls,
// path-info): no directory is created or synced, no migration runs, there
// is no writer connection, and writes fail with db.ErrReadOnly. A data dir
// without a database, or with an older schema, is opened as without
// ReadOnly instead: created, or migrated, as any command after an upgrade
// did before, rather than refused; a newer schema is refused either way.
func Open(ctx context.Context, dir string, opts Options) (*Store, error) {
	if opts.StoreDir == "" {
		opts.StoreDir = DefaultStoreDir
	}
	if opts.Logger == nil {
		opts.Logger = slog.New(slog.DiscardHandler)
	}
	if url, err := ReplicaOf(dir); err != nil || url != "" {
		if err != nil {
			return nil, err
		}
		return openReplica(ctx, dir, url, opts)
	}
	if opts.ReadOnly {
		st, err := openReadOnly(ctx, dir, opts)
		if !errors.Is(err, errNeedsWriter) {
			return st, err
		}
		opts.ReadOnly = false
		opts.Blobs.ReadOnly = false
	}
	if err := os.MkdirAll(dir, 0o755); err != nil {
		return nil, fmt.Errorf("create data dir: %w", err)
	}
	// A new data dir is an entry of its parent: sync that, or a power cut
	// could take the whole store with it after its first commit.
	if err := syncParent(dir); err != nil {
		return nil, err
	}
	lock, err := openDirLock(ctx, dir)
	if err != nil {
		return nil, err
	}
	d, err := db.Open(ctx, filepath.Join(dir, DBFile))
	if err != nil {
		lock.Close()
		return nil, err
	}
	bucket, err := openPacks(ctx, d, &opts, true)
	if err != nil {
		d.Close()
		lock.Close()
		return nil, err
	}
	b, err := blobs.Open(filepath.Join(dir, PackDir), d, opts.Blobs)
	if err != nil {
		d.Close()
		lock.Close()
		return nil, err
	}
	st := &Store{StoreDir: opts.StoreDir, dir: dir, db: d, blobs: b, blobOpts: opts.Blobs, bucket: bucket, log: opts.Logger, dirLock: lock}
	st.lastCommit.Store(time.Now().UnixNano())
	return st, nil
}

// openPacks connects the blob store to the bucket the data dir's packs go
// to, if any (resolvePacks; record: the flag may be recorded now).
func openPacks(ctx context.Context, d *db.DB, opts *Options, record bool) (*objstore.Bucket, error) {
	url, err := resolvePacks(ctx, d, opts.Packs, record)
	if err != nil || url == "" {
		return nil, err
	}
	bucket, err := openBucket(ctx, url)
	if err != nil {
		return nil, fmt.Errorf("packs: %w", err)
	}
	opts.Blobs.Remote = bucket
	return bucket, nil
}

// errNeedsWriter means openReadOnly cannot open the data dir: it has no
// database yet, or one that needs migrating.
var errNeedsWriter = errors.New("data dir needs a writable open")

// openReadOnly is Open with opts.ReadOnly for a data dir that has a
// database with the current schema; errNeedsWriter otherwise.
//
// It syncs nothing: a reader acknowledges nothing, so it has no durability
// to ensure. Whoever made the data dir synced its entries before their
// first commit (Open syncs the data dir's parent before it creates the
// database, and the data dir once packs/ is made), and a reader runs only
// where a database already exists. The data-dir lock is still taken
// shared, as by every opener: a restore must not swap the files under a
// reader, and an interrupted restore is finished first (openDirLock).
func openReadOnly(ctx context.Context, dir string, opts Options) (*Store, error) {
	file := filepath.Join(dir, DBFile)
	if _, err := os.Stat(file); errors.Is(err, fs.ErrNotExist) {
		return nil, errNeedsWriter
	}
	lock, err := openDirLock(ctx, dir)
	if err != nil {
		return nil, err
	}
	d, err := db.OpenReader(ctx, file)
	if errors.Is(err, db.ErrNeedsMigration) || errors.Is(err, fs.ErrNotExist) {
		lock.Close()
		return nil, errNeedsWriter
	}
	if err != nil {
		lock.Close()
		return nil, err
	}
	bucket, err := openPacks(ctx, d, &opts, false)
	if err != nil {
		d.Close()
		lock.Close()
		return nil, err
	}
	bopts := opts.Blobs
	bopts.ReadOnly = true
	b, err := blobs.Open(filepath.Join(dir, PackDir), d, bopts)
	if err != nil {
		d.Close()
		lock.Close()
		return nil, err
	}
	return &Store{StoreDir: opts.StoreDir, dir: dir, db: d, blobs: b, blobOpts: bopts, bucket: bucket, log: opts.Logger, dirLock: lock}, nil
}

// Close closes the store.
func (s *Store) Close() error {
	// Access times noted since the last flush; losing them would only make
	// those paths look older to an eviction, so a failure is not fatal.
	if _, err := s.FlushAccess(context.Background()); err != nil {
		s.log.Warn("access times not saved", "err", err)
	}
	err := errors.Join(s.blobs.Close(), s.db.Close())
	// The data-dir lock last: a restore may replace the files once it goes.
	return errors.Join(err, s.dirLock.Close())
}

// Dir is the data directory.
func (s *Store) Dir() string { return s.dir }

// Full returns the full store path of a basename.
func (s *Store) Full(base string) string {
	if base == "" {
		return ""
	}
	return s.StoreDir + "/" + base
}

// PathInfo is what the store knows about a valid path.
type PathInfo struct {
	Name       string // basename
	Root       castore.Node
	NarHash    [sha256.Size]byte
	NarSize    int64
	References []string // basenames, sorted
	Deriver    string   // basename or ""
	Registered time.Time
	Ultimate   bool
	Sigs       []string
	CA         string
	// DrvOutputs, for a derivation, maps output names to basenames. It is
	// filled at import (parsed from the .drv) and read with DrvOutputs.
	DrvOutputs map[string]string
	// sealed: read from a row whose root_sum matched (db.PathRow.RootSealed),
	// so Root, NarHash and NarSize are the ones committed together.
	sealed bool
}

func fromRow(p *db.PathRow) (*PathInfo, error) {
	root, err := rootOf(p)
	if err != nil {
		return nil, err
	}
	pi := &PathInfo{
		Name: p.Name, Root: root, NarSize: p.NarSize, References: p.Refs, Deriver: p.Deriver,
		Registered: time.Unix(p.Registered, 0), Ultimate: p.Ultimate, Sigs: p.Sigs, CA: p.CA,
		sealed: p.RootSealed(),
	}
	if len(p.NarHash) != sha256.Size {
		return nil, fmt.Errorf("path %s: %w: stored NAR hash has %d bytes", p.Name, blobs.ErrCorrupt, len(p.NarHash))
	}
	copy(pi.NarHash[:], p.NarHash)
	return pi, nil
}

// rootOf decodes a path row's root node columns.
func rootOf(p *db.PathRow) (castore.Node, error) {
	n := castore.Node{Kind: castore.Kind(p.Kind), Size: uint64(p.Size), Executable: p.Executable, Target: p.Target}
	if p.Digest != nil {
		d, err := digest.FromBytes(p.Digest)
		if err != nil {
			return castore.Node{}, fmt.Errorf("path %s: %w: %v", p.Name, blobs.ErrCorrupt, err)
		}
		n.Digest = d
	}
	// The row's columns have no checksum of their own: a damaged kind
	// turned a symlink into a node of no type, or into a file or a
	// directory with a symlink's target, which FUSE showed without an
	// error. A node castore would not encode is damage.
	if err := n.Validate(); err != nil {
		return castore.Node{}, fmt.Errorf("path %s: %w: root node: %v", p.Name, blobs.ErrCorrupt, err)
	}
	return n, nil
}

// Info returns the path-info of a valid path. The result is shared: do
// not modify it.
func (s *Store) Info(ctx context.Context, name string) (*PathInfo, error) {
	s.Touch(name)
	if pi := s.infos.get(name); pi != nil {
		return pi, nil
	}
	row, err := s.db.Path(ctx, name)
	if errors.Is(err, db.ErrNotFound) {
		return nil, fmt.Errorf("path '%s' %w", s.Full(name), ErrNotValid)
	}
	if err != nil {
		return nil, err
	}
	pi, err := fromRow(row)
	if err != nil {
		return nil, err
	}
	s.infos.put(name, pi)
	return pi, nil
}

// infoCache keeps recently read path-info for a few seconds. Path-info of
// a valid path changes only by added signatures (which drop the entry here)
// or by deletion; the expiry bounds how long another process's change
// (casnix gc, casnix import adding signatures) goes unseen. Clients ask for
// the same paths over and over (every nix command walks a closure), so this
// is where the daemon's query rate comes from. Invalid paths are never
// cached: they may become valid at any moment.
type infoCache struct {
	mu sync.Mutex
	m  map[string]cachedInfo
}

type cachedInfo struct {
	pi      *PathInfo
	expires time.Time
}

const (
	infoCacheTTL = 5 * time.Second
	infoCacheMax = 1 << 16
)

func (c *infoCache) get(name string) *PathInfo {
	c.mu.Lock()
	defer c.mu.Unlock()
	e, ok := c.m[name]
	if !ok || time.Now().After(e.expires) {
		return nil
	}
	return e.pi
}

func (c *infoCache) put(name string, pi *PathInfo) {
	c.mu.Lock()
	defer c.mu.Unlock()
	if c.m == nil || len(c.m) >= infoCacheMax {
		c.m = make(map[string]cachedInfo) // crude but bounded
	}
	c.m[name] = cachedInfo{pi, time.Now().Add(infoCacheTTL)}
}

func (c *infoCache) drop(name string) {
	c.mu.Lock()
	defer c.mu.Unlock()
	delete(c.m, name)
}

// IsValid reports whether name is a valid path.
func (s *Store) IsValid(ctx context.Context, name string) (bool, error) {
	return s.db.HasPath(ctx, name)
}

// Referrers lists the valid paths that refer to name.
func (s *Store) Referrers(ctx context.Context, name string) ([]string, error) {
	return s.db.Referrers(ctx, name)
}

// PathByHashPart finds a valid path by its hash part.
func (s *Store) PathByHashPart(ctx context.Context, hash string) (string, error) {
	name, err := s.db.PathByHashPart(ctx, hash)
	if errors.Is(err, db.ErrNotFound) {
		return "", nil
	}
	return name, err
}

// All lists every valid path's basename.
func (s *Store) All(ctx context.Context) ([]string, error) {
	return s.db.PathNames(ctx)
}

// Closure returns the names in the closure of names (which must be valid),
// sorted.
func (s *Store) Closure(ctx context.Context, names []string) ([]string, error) {
	seen := map[string]bool{}
	queue := append([]string(nil), names...)
	for len(queue) > 0 {
		n := queue[len(queue)-1]
		queue = queue[:len(queue)-1]
		if seen[n] {
			continue
		}
		// One (cached) lookup gives validity and references together.
		pi, err := s.Info(ctx, n)
		if err != nil {
			return nil, err
		}
		seen[n] = true
		queue = append(queue, pi.References...)
	}
	out := make([]string, 0, len(seen))
	for n := range seen {
		out = append(out, n)
	}
	sortStrings(out)
	return out, nil
}

// Stats returns whole-store totals.
func (s *Store) Stats(ctx context.Context) (db.Stats, error) {
	return s.db.Stats(ctx)
}

// source adapts the store to nar.Source.
type source struct{ s *Store }

func (src source) Directory(ctx context.Context, d digest.Digest) (*castore.Directory, error) {
	return src.s.renderDirectory(ctx, d)
}

func (src source) OpenBlob(ctx context.Context, d digest.Digest) (nar.Blob, error) {
	return src.s.blobs.Open(ctx, d)
}

// A batch of blobs is one index query.
var _ [db.ChunkBatch - nar.BlobBatch]struct{}

// OpenBlobs makes source a nar.BatchSource: a directory's files are looked
// up nar.BlobBatch per query.
func (src source) OpenBlobs(ctx context.Context, ds []digest.Digest) ([]nar.Blob, []error, error) {
	rs, errs, err := src.s.blobs.OpenMany(ctx, ds)
	if err != nil {
		return nil, nil, err
	}
	out := make([]nar.Blob, len(rs))
	for i, r := range rs {
		if r != nil { // a nil *BlobReader must not become a non-nil nar.Blob
			out[i] = r
		}
	}
	return out, errs, nil
}

// Directory loads and decodes a directory.
func (s *Store) Directory(ctx context.Context, d digest.Digest) (*castore.Directory, error) {
	return readDirectory(ctx, s.db, d)
}

// renderDirCacheBytes bounds the directories renders keep decoded (and an
// eighth of the frame cache's bound, if less).
const renderDirCacheBytes = 16 << 20

// renderDirs is the cache of directories a NAR render reads, made on first
// use.
type renderDirs struct {
	once  sync.Once
	cache *gencache.Cache[digest.Digest, *castore.Directory]
}

// renderDirectory is Directory for NAR renders, from a cache of decoded
// directories: a directory is named by the BLAKE3 of its encoding, so a
// decoded one is never stale, and a NAR read again (a warm nix-daemon
// has the tree in the kernel's dentry cache) costs no index lookup, digest
// or decode per directory. Renders only read what they are given; verify
// (whose renders run under blobs.NoCache) and repack read the index
// (Directory) every time.
func (s *Store) renderDirectory(ctx context.Context, d digest.Digest) (*castore.Directory, error) {
	s.dirs.once.Do(func() {
		s.dirs.cache = gencache.New[digest.Digest](int(min(renderDirCacheBytes, s.blobs.FrameCacheBytes()/8)), dirCost)
	})
	if !blobs.Cached(ctx) {
		return s.Directory(ctx, d)
	}
	if dir, ok := s.dirs.cache.Get(d); ok {
		return dir, nil
	}
	dir, err := s.Directory(ctx, d)
	if err == nil {
		s.dirs.cache.Put(d, dir)
	}
	return dir, err
}

// dirCost is about the memory a decoded directory holds.
func dirCost(dir *castore.Directory) int {
	n := 128
	for _, e := range dir.Directories {
		n += 80 + len(e.Name)
	}
	for _, e := range dir.Files {
		n += 80 + len(e.Name)
	}
	for _, e := range dir.Symlinks {
		n += 48 + len(e.Name) + len(e.Target)
	}
	return n
}

// readDirectory reads a Directory from the index (the reader pool or a
// snapshot), checks it against its digest and decodes it.
func readDirectory(ctx context.Context, ix interface {
	Directory(context.Context, digest.Digest) ([]byte, error)
}, d digest.Digest) (*castore.Directory, error) {
	if d == digest.Empty {
		// The empty directory encodes to zero bytes; it is never stored.
		return &castore.Directory{}, nil
	}
	data, err := ix.Directory(ctx, d)
	if err != nil {
		return nil, err
	}
	if got := digest.Sum(data); got != d {
		return nil, fmt.Errorf("%w: directory %s hashes to %s", blobs.ErrCorrupt, d, got)
	}
	dir, err := castore.Decode(data)
	if err != nil {
		return nil, fmt.Errorf("%w: directory %s: %v", blobs.ErrCorrupt, d, err)
	}
	return dir, nil
}

// OpenBlob opens a file's contents.
func (s *Store) OpenBlob(ctx context.Context, d digest.Digest) (*blobs.BlobReader, error) {
	return s.blobs.Open(ctx, d)
}

// NarRender writes the NAR of a valid path to w, and checks it against
// the path-info's NAR size on the way, and against its NAR hash unless the
// path's row is sealed (root_sum, migration 0008): every directory and
// chunk a render reads is checked against its BLAKE3 digest as it is
// read, and the renderer checks each file's length against its node, so
// what a sealed row's root renders to is the NAR it was committed with;
// a row without a root_sum (or one that does not match, as after a bit
// flip in the row) is hashed. `casnix verify` always hashes. The last bytes
// of the NAR are held back until the check passes, so a NAR that fails it
// reaches w truncated, with the error: a reader never gets a whole NAR
// with other bytes than the path's.
func (s *Store) NarRender(ctx context.Context, name string, w interface{ Write([]byte) (int, error) }) (int64, error) {
	pi, err := s.Info(ctx, name)
	if err != nil {
		return 0, err
	}
	return s.narRender(ctx, pi, w, !pi.sealed)
}

// narRender is NarRender of pi, hashing the NAR if hash is set.
func (s *Store) narRender(ctx context.Context, pi *PathInfo, w interface{ Write([]byte) (int, error) }, hash bool) (int64, error) {
	name := pi.Name
	cw := &checkedWriter{w: w}
	if hash {
		cw.h = hashbehind.New(sha256.New())
		defer cw.h.Close()
	}
	var rw io.Writer = cw
	if fw, ok := w.(nar.FrameWriter); ok {
		rw = checkedFrameWriter{cw, fw}
	}
	if _, err := nar.Render(ctx, rw, pi.Root, source{s}); err != nil {
		return cw.n, s.renderError(ctx, name, err)
	}
	if err := cw.finish(pi.NarHash, pi.NarSize); err != nil {
		return cw.n, s.renderError(ctx, name, err)
	}
	return cw.n, nil
}

// renderError words a failed render. A collection (or an eviction) may
// delete the path while it is read, here or in another process whose
// path-info this one still caches: its directories and chunks then vanish
// mid-render, which reads like damage ("directory … not found"). If the
// path is no longer valid, say that instead.
func (s *Store) renderError(ctx context.Context, name string, err error) error {
	if ctx.Err() == nil {
		if ok, verr := s.db.HasPath(ctx, name); verr == nil && !ok {
			s.infos.drop(name)
			return fmt.Errorf("path '%s' %w (deleted while it was read: %v)", s.Full(name), ErrNotValid, err)
		}
	}
	return fmt.Errorf("render %s: %w", s.Full(name), err)
}

// narHeld is how many bytes of a NAR checkedWriter holds back: the closing
// ")" token (length, byte, padding), without which no NAR parses.
const narHeld = 16

// checkedWriter passes a NAR on to w but the last narHeld bytes, hashing
// it (h, unless nil); finish writes those only if the hash (if hashed) and
// size are the ones given.
type checkedWriter struct {
	w    interface{ Write([]byte) (int, error) }
	h    *hashbehind.Hasher
	held []byte
	n    int64 // bytes written to w
	size int64 // bytes received
}

func (c *checkedWriter) Write(p []byte) (int, error) {
	if c.h != nil {
		c.h.Write(p)
	}
	c.size += int64(len(p))
	if len(p) >= narHeld {
		// What was held and p but its last narHeld bytes go out.
		if err := c.write(c.held); err != nil {
			return 0, err
		}
		if err := c.write(p[:len(p)-narHeld]); err != nil {
			return 0, err
		}
		c.held = append(c.held[:0], p[len(p)-narHeld:]...)
		return len(p), nil
	}
	c.held = append(c.held, p...)
	if extra := len(c.held) - narHeld; extra > 0 {
		if err := c.write(c.held[:extra]); err != nil {
			return 0, err
		}
		c.held = append(c.held[:0], c.held[extra:]...)
	}
	return len(p), nil
}

func (c *checkedWriter) write(b []byte) error {
	if len(b) == 0 {
		return nil
	}
	n, err := c.w.Write(b)
	c.n += int64(n)
	return err
}

// checkedFrameWriter is a checkedWriter whose writer takes whole stored
// frames (nar.FrameWriter): their decoded bytes are hashed like any other,
// and they are never held back, since a file's contents are never among a
// NAR's last narHeld bytes (the file node's ")" and its parents' follow),
// so the NAR's end is still what finish holds.
type checkedFrameWriter struct {
	*checkedWriter
	fw nar.FrameWriter
}

func (c checkedFrameWriter) WriteFrame(raw, stored []byte) (int, error) {
	if c.h != nil {
		c.h.Write(raw)
	}
	c.size += int64(len(raw))
	if err := c.write(c.held); err != nil {
		return 0, err
	}
	c.held = c.held[:0]
	n, err := c.fw.WriteFrame(raw, stored)
	c.n += int64(n)
	return n, err
}

// finish checks what was written against hash and size, and only then
// passes on the bytes held back.
func (c *checkedWriter) finish(want [32]byte, size int64) error {
	if c.size != size {
		return fmt.Errorf("%w: renders %d bytes, path-info says %d", ErrSizeMismatch, c.size, size)
	}
	if c.h != nil { // else a sealed row's render: not hashed (NarRender)
		var got [32]byte
		c.h.Sum(got[:0])
		if got != want {
			return fmt.Errorf("%w: renders sha256:%s, path-info says sha256:%s", ErrHashMismatch, NixBase32(got[:]), NixBase32(want[:]))
		}
	}
	return c.write(c.held)
}

// Lookup resolves a path inside a store path ("" for its root).
func (s *Store) Lookup(ctx context.Context, name, sub string) (castore.Node, error) {
	n, err := s.Root(ctx, name)
	if err != nil {
		return castore.Node{}, err
	}
	for _, comp := range splitSub(sub) {
		if n.Kind != castore.KindDirectory {
			return castore.Node{}, fmt.Errorf("%s/%s: %w", s.Full(name), sub, os.ErrNotExist)
		}
		dir, err := s.Directory(ctx, n.Digest)
		if err != nil {
			return castore.Node{}, err
		}
		child, ok := dir.Lookup([]byte(comp))
		if !ok {
			return castore.Node{}, fmt.Errorf("%s/%s: %w", s.Full(name), sub, os.ErrNotExist)
		}
		n = child
	}
	return n, nil
}

func splitSub(sub string) []string {
	var out []string
	start := 0
	for i := 0; i <= len(sub); i++ {
		if i == len(sub) || sub[i] == '/' {
			if i > start {
				out = append(out, sub[start:i])
			}
			start = i + 1
		}
	}
	return out
}

// DrvOutputs lists a derivation's outputs (name -> basename, "" if not
// known in advance).
func (s *Store) DrvOutputs(ctx context.Context, drv string) ([]db.DrvOutput, error) {
	return s.db.DrvOutputs(ctx, drv)
}

// ValidDerivers lists the valid derivations that have out as an output.
func (s *Store) ValidDerivers(ctx context.Context, out string) ([]string, error) {
	return s.db.DerivationsWithOutput(ctx, out)
}

// AddSignatures adds signatures to a valid path.
func (s *Store) AddSignatures(ctx context.Context, name string, sigs []string) error {
	defer s.infos.drop(name)
	err := s.db.Write(ctx, func(tx *db.Tx) error {
		id, err := tx.PathID(ctx, name)
		if errors.Is(err, db.ErrNotFound) {
			return fmt.Errorf("path '%s' %w", s.Full(name), ErrNotValid)
		}
		if err != nil {
			return err
		}
		return tx.AddSigs(ctx, id, sigs)
	})
	if err != nil {
		return err
	}
	return s.syncMeta(ctx)
}

// NamesAfter lists up to limit valid path names after the given one, in
// order (a cursor, so listings stream however large the store).
func (s *Store) NamesAfter(ctx context.Context, after string, limit int) ([]string, error) {
	return s.db.PathNamesAfter(ctx, after, limit)
}

// Root returns the root node of a valid path, without the rest of its
// path-info: the cheap lookup a file system needs.
func (s *Store) Root(ctx context.Context, name string) (castore.Node, error) {
	row, err := s.db.PathRoot(ctx, name)
	if errors.Is(err, db.ErrNotFound) {
		return castore.Node{}, fmt.Errorf("path '%s' %w", s.Full(name), ErrNotValid)
	}
	if err != nil {
		return castore.Node{}, err
	}
	s.Touch(name)
	n, err := rootOf(row)
	if err != nil || n.Kind != castore.KindSymlink {
		return n, err
	}
	// A symlink's target is in the path row, which has no checksum but
	// the NAR hash; its NAR is a few bytes, so check it here rather than
	// hand out another target.
	h := sha256.New()
	if _, err := nar.Render(ctx, h, n, source{s}); err != nil {
		return castore.Node{}, fmt.Errorf("path %s: %w", s.Full(name), err)
	}
	if !bytes.Equal(h.Sum(nil), row.NarHash) {
		return castore.Node{}, fmt.Errorf("path %s: %w: its symlink's NAR does not hash to its NAR hash", s.Full(name), blobs.ErrCorrupt)
	}
	return n, nil
}

// syncParent fsyncs the directory holding dir.
func syncParent(dir string) error {
	p, err := os.Open(filepath.Dir(filepath.Clean(dir)))
	if err != nil {
		return fmt.Errorf("open parent of %s: %w", dir, err)
	}
	defer p.Close()
	if err := p.Sync(); err != nil {
		return fmt.Errorf("sync parent of %s: %w", dir, err)
	}
	return nil
}
