package blobs

import (
	"context"
	"errors"
	"fmt"
	"io"
	"io/fs"
	"os"
	"path/filepath"
	"runtime"
	"sync"
	"sync/atomic"
	"time"

	"github.com/klauspost/compress/zstd"
	"golang.org/x/sys/unix"

	"github.com/casnix/casnix/blobs/pack"
	"github.com/casnix/casnix/db"
	"github.com/casnix/casnix/lockfile"
)

// Sentinel errors callers branch on.
var (
	ErrNotFound = errors.New("blob not found")
	ErrCorrupt  = errors.New("corrupt data")
)

// Defaults for ingest: write fast, pack tight later. Level 1 (when new
// frames are compressed at all: Options.Store) in 4 MiB frames stores a
// set of Debian releases in about 1.0 x the sum of their per-NAR zstd -3
// sizes and keeps the compressors off the ingest's critical
// path; `casnix repack` (Repacker) rewrites the frames into the
// space-optimal form afterwards (bench/RESULTS.md, "Core store").
const (
	DefaultLevel     = zstd.SpeedFastest
	DefaultFrameSize = 4 << 20
)

// Options tune a Store. Zero values take the defaults.
type Options struct {
	// Level is the zstd encoder level for new frames.
	Level zstd.EncoderLevel
	// Store writes new frames uncompressed (zstd frames of raw blocks,
	// appendStoredFrame) instead of at Level while the disk has room
	// (roomToStore): ingest then costs a copy, not a compression, and the
	// Repacker (whose frames these are, as any not packed) compresses them
	// later. Ignored with Remote: a bucket's packs are uploaded, and paid
	// for, by the byte.
	Store bool
	// FrameSize is the raw size at which a frame of new chunks is closed.
	FrameSize int
	// PackSize is the size at which a pack stops taking new frames.
	PackSize int64
	// CacheBytes bounds the decoded-frame cache.
	CacheBytes int64
	// Workers is the number of parallel compressors per Writer.
	Workers int
	// Decoders bounds the frames read-ahead decodes at once (default: the
	// number of CPUs). More would only take CPUs from the readers that
	// wait for them.
	Decoders int
	// ReadOnly opens an existing pack directory for reading only: it is
	// neither created nor synced (no pack below it will be written).
	ReadOnly bool

	// Remote, when set, is the bucket packs are uploaded to (remote.go,
	// upload.go); packs are still written locally first.
	Remote Remote
	// RemoteCacheDir holds cached blocks of uploaded packs (default: a
	// sibling "s3cache" of the pack directory).
	RemoteCacheDir string
	// RemoteCacheBytes bounds the local bytes of uploaded packs: their
	// local files and cached blocks (default DefaultRemoteCacheBytes).
	RemoteCacheBytes int64
	// Upload runs the uploader (serve): packs are sealed and uploaded in
	// the background. Without it, packs stay local until a process with
	// it runs.
	Upload bool
	// UploadWithin is how long a committed frame may wait before its pack
	// is sealed for upload (default DefaultUploadWithin).
	UploadWithin time.Duration
	// UploadRetryMax caps the backoff between failed uploads (default 30 s).
	UploadRetryMax time.Duration
	// SealOnCommit seals every pack a Writer wrote frames to in the
	// transaction that commits them, and Done closes those packs instead
	// of handing them back: for a caller that acknowledges only once its
	// frames are in the bucket (WaitUploaded), which must not wait behind
	// a later writer appending to the same pack.
	SealOnCommit bool
}

func (o *Options) defaults() {
	if o.Remote != nil {
		o.Store = false
	}
	if o.Level == 0 {
		o.Level = DefaultLevel
	}
	if o.FrameSize < MaxChunk || o.FrameSize > 16<<20 {
		o.FrameSize = DefaultFrameSize
	}
	if o.PackSize == 0 {
		o.PackSize = 256 << 20
	}
	if o.CacheBytes == 0 {
		// Every sequential reader decodes up to 16 MiB ahead into this
		// cache; at 32 MiB, 16 concurrent NAR downloads evicted each other's
		// frames before reading them (bench/cache.sh cold, 16 clients: 97
		// MB/s at 32 MiB, 173 MB/s at 128 MiB).
		o.CacheBytes = 128 << 20
	}
	if o.Workers == 0 {
		o.Workers = runtime.GOMAXPROCS(0)
	}
	if o.Decoders == 0 {
		o.Decoders = min(runtime.NumCPU(), runtime.GOMAXPROCS(0))
	}
	if o.RemoteCacheBytes == 0 {
		o.RemoteCacheBytes = DefaultRemoteCacheBytes
	}
	if o.UploadWithin == 0 {
		o.UploadWithin = DefaultUploadWithin
	}
	if o.UploadRetryMax == 0 {
		o.UploadRetryMax = 30 * time.Second
	}
}

// FrameCacheBytes is the decoded-frame cache's bound, what the caches
// beside it are sized from.
func (s *Store) FrameCacheBytes() int64 { return s.opts.CacheBytes }

// Store is the blob store of one data directory.
type Store struct {
	dir  string
	db   *db.DB
	opts Options
	enc  *zstd.Encoder
	dec  *zstd.Decoder

	// room and roomAt cache roomToStore's look at the free space.
	room   atomic.Bool
	roomAt atomic.Int64

	mu      sync.Mutex
	free    []*packFile // packs this process holds (flocked) and no Writer uses
	reopen  []int64     // packs a compaction took from free: the next writers reopen them
	scanned bool        // existing packs were considered for reuse

	rmu     sync.RWMutex
	readers map[int64]*os.File
	// remotes are uploaded packs whose local file is gone, read from the
	// bucket through bcache.
	remotes map[int64]*remotePack

	remote Remote
	bcache *blockCache
	upl    uploader

	// faults, when set (by tests), sees every write to and sync of a pack
	// file, to inject the errors of a full or failing disk.
	faults packFaults

	cache *frameCache
	// locs remembers blob rows and chunk locations across readers
	// (loccache.go).
	locs *locCache
	// known filters the chunk lookups of Writers (known.go).
	known *knownChunks
	// decodeSlots bounds background frame decodes (a semaphore of
	// Options.Decoders slots).
	decodeSlots chan struct{}
	// background counts read-ahead's decode goroutines: Close waits for
	// them before it closes the decoder they use.
	background sync.WaitGroup

	readerSweepState
}

// Open opens the blob store whose packs live under dir (created if needed).
func Open(dir string, d *db.DB, opts Options) (*Store, error) {
	opts.defaults()
	if !opts.ReadOnly {
		if err := os.MkdirAll(dir, 0o755); err != nil {
			return nil, fmt.Errorf("create pack dir: %w", err)
		}
		// packs/ is an entry of the data dir: made durable before any pack
		// below it is (newPack syncs packs/ for a new NN/).
		if err := syncDir(filepath.Dir(dir)); err != nil {
			return nil, err
		}
	}
	enc, err := newEncoder(opts.Level, opts.FrameSize, opts.Workers)
	if err != nil {
		return nil, err
	}
	dec, err := zstd.NewReader(nil, zstd.WithDecoderConcurrency(0),
		zstd.WithDecoderMaxMemory(pack.MaxFrameBytes), zstd.IgnoreChecksum(false))
	if err != nil {
		return nil, fmt.Errorf("zstd decoder: %w", err)
	}
	s := &Store{
		dir: dir, db: d, opts: opts, enc: enc, dec: dec,
		readers: map[int64]*os.File{},
		remotes: map[int64]*remotePack{},
		cache:   newFrameCache(opts.CacheBytes),
		locs:    newLocCache(min(locCacheBytes, int(opts.CacheBytes/4))),
		known:   newKnownChunks(),
		remote:  opts.Remote,

		decodeSlots: make(chan struct{}, opts.Decoders),
	}
	if s.remote != nil {
		if err := s.openRemote(); err != nil {
			enc.Close()
			dec.Close()
			return nil, err
		}
	}
	s.startReaderSweeper()
	if s.remote != nil && opts.Upload && !opts.ReadOnly {
		s.startUploader()
	}
	return s, nil
}

// Close releases packs and files.
func (s *Store) Close() error {
	s.stopUploader()
	s.stopReaderSweeper()
	s.known.close()
	s.mu.Lock()
	var errs []error
	for _, p := range s.free {
		errs = append(errs, p.f.Close()) // closing drops the flock
	}
	s.free = nil
	s.mu.Unlock()
	s.rmu.Lock()
	for id, f := range s.readers {
		errs = append(errs, f.Close())
		delete(s.readers, id)
	}
	s.rmu.Unlock()
	s.background.Wait()
	s.enc.Close()
	s.dec.Close()
	return errors.Join(errs...)
}

// PackPath is where pack id lives.
func (s *Store) PackPath(id int64) string { return PackFile(s.dir, id) }

// PackFile is where pack id lives under the pack directory dir.
func PackFile(dir string, id int64) string {
	return filepath.Join(dir, fmt.Sprintf("%02x", id%256), fmt.Sprintf("%08x.pack", id))
}

// newEncoder makes the zstd encoder of frames of up to frameSize raw bytes
// (ingest's and repack's), workers of them compressing at once.
func newEncoder(level zstd.EncoderLevel, frameSize, workers int) (*zstd.Encoder, error) {
	// The window only needs to cover one frame; zstd's default (8 MiB)
	// would cost 16 MiB of history per encoder for nothing.
	window := 1 << 20
	for window < frameSize {
		window <<= 1
	}
	enc, err := zstd.NewWriter(nil, zstd.WithEncoderLevel(level), zstd.WithEncoderCRC(true),
		zstd.WithEncoderConcurrency(workers), zstd.WithZeroFrames(true), zstd.WithWindowSize(window))
	if err != nil {
		return nil, fmt.Errorf("zstd encoder: %w", err)
	}
	return enc, nil
}

// packFaults lets tests inject write and sync errors into pack files.
type packFaults interface {
	// Writer wraps the writes to pack id (headers and frames).
	Writer(id int64, w io.Writer) io.Writer
	// Sync is called instead of syncing pack id's file f.
	Sync(id int64, f *os.File) error
}

// packWriter is where the bytes for p go.
func (s *Store) packWriter(p *packFile) io.Writer {
	if s.faults != nil {
		return s.faults.Writer(p.id, p.f)
	}
	return p.f
}

// syncPack makes p's data durable (fdatasync).
func (s *Store) syncPack(p *packFile) error {
	if s.faults != nil {
		return s.faults.Sync(p.id, p.f)
	}
	if noPackFsync {
		return nil
	}
	return fdatasync(p.f)
}

// packFile is a pack open for appending by this process.
type packFile struct {
	id   int64
	f    *os.File
	size int64
}

// acquire hands out a pack for a Writer: one from the free list, one a
// compaction took from the free list, an existing pack with room that no
// other process holds, or a new one. Before a pack is appended to, anything
// past its last committed frame is cut off.
func (s *Store) acquire(ctx context.Context) (*packFile, error) {
	if s.opts.ReadOnly {
		return nil, fmt.Errorf("take a pack for writing: %w", db.ErrReadOnly)
	}
	s.mu.Lock()
	var p *packFile
	if n := len(s.free); n > 0 {
		p, s.free = s.free[n-1], s.free[:n-1]
	}
	s.mu.Unlock()
	if p != nil && s.opts.SealOnCommit {
		// A Writer whose caller did not say its transaction committed
		// handed its packs back: they may be sealed all the same.
		if sealed, _, err := s.db.PackSealedState(ctx, p.id); err != nil || sealed {
			p.f.Close()
			if err != nil && !errors.Is(err, db.ErrNotFound) {
				return nil, err
			}
			return s.acquire(ctx)
		}
	}
	if p != nil {
		if err := s.trimTail(ctx, p); err != nil {
			p.f.Close()
			return nil, err
		}
		return p, nil
	}
	// Every writer that finds the free list empty takes the next pack a
	// compaction closed, not only the first: otherwise each collection
	// followed by concurrent writers would leave packs no one writes to
	// again, and a long-running daemon would gather small packs (and a
	// descriptor on each) without bound.
	for {
		s.mu.Lock()
		n := len(s.reopen)
		if n == 0 {
			s.mu.Unlock()
			break
		}
		id := s.reopen[n-1]
		s.reopen = s.reopen[:n-1]
		s.mu.Unlock()
		p, err := s.tryReuse(ctx, id)
		if err != nil {
			return nil, err
		}
		if p != nil {
			return p, nil
		}
	}
	s.mu.Lock()
	scan := !s.scanned
	s.scanned = true
	s.mu.Unlock()
	if scan {
		p, err := s.reuseExisting(ctx)
		if err != nil || p != nil {
			return p, err
		}
	}
	return s.newPack(ctx)
}

// reuseExisting tries the newest packs on disk, so a restarted process keeps
// filling its last pack instead of leaving many small ones.
func (s *Store) reuseExisting(ctx context.Context) (*packFile, error) {
	ids, err := s.db.Packs(ctx)
	if err != nil {
		return nil, err
	}
	for i := len(ids) - 1; i >= 0 && i >= len(ids)-4; i-- {
		p, err := s.tryReuse(ctx, ids[i])
		if err != nil || p != nil {
			return p, err
		}
	}
	return nil, nil
}

// tryReuse opens pack id for appending, trimmed to its committed frames. It
// returns nil without an error when the pack cannot take frames: gone (never
// created, or compacted away), held by another writer, or full.
func (s *Store) tryReuse(ctx context.Context, id int64) (*packFile, error) {
	f, err := os.OpenFile(s.PackPath(id), os.O_RDWR, 0)
	if errors.Is(err, fs.ErrNotExist) {
		return nil, nil // allocated, crashed before the file was made; or compacted
	}
	if err != nil {
		return nil, fmt.Errorf("open pack %d: %w", id, err)
	}
	if err := unix.Flock(int(f.Fd()), unix.LOCK_EX|unix.LOCK_NB); err != nil {
		f.Close()
		return nil, nil // another writer has it
	}
	if compactedAway(f) {
		f.Close()
		return nil, nil
	}
	// A sealed pack is the uploader's: sealing commits under this flock,
	// so the mark read now stays true.
	if sealed, _, err := s.db.PackSealedState(ctx, id); errors.Is(err, db.ErrNotFound) || (err == nil && sealed) {
		f.Close()
		return nil, nil
	} else if err != nil {
		f.Close()
		return nil, err
	}
	st, err := f.Stat()
	if err != nil {
		f.Close()
		return nil, fmt.Errorf("stat pack %d: %w", id, err)
	}
	if st.Size() >= s.opts.PackSize {
		f.Close()
		return nil, nil
	}
	p := &packFile{id: id, f: f, size: st.Size()}
	if err := s.trimTail(ctx, p); err != nil {
		f.Close()
		return nil, err
	}
	return p, nil
}

// trimTail truncates p to the end of its last committed frame (or just its
// header), dropping what a crashed or aborted writer left behind.
func (s *Store) trimTail(ctx context.Context, p *packFile) error {
	end, err := s.db.PackEnd(ctx, p.id)
	if err != nil {
		return err
	}
	if end < pack.HeaderSize {
		end = pack.HeaderSize
	}
	st, err := p.f.Stat()
	if err != nil {
		return fmt.Errorf("stat pack %d: %w", p.id, err)
	}
	if st.Size() < pack.HeaderSize && end == pack.HeaderSize {
		// No frame committed, and the header never made it to disk: its
		// write failed (ENOSPC) or the process died before its fsync. The
		// pack is still empty, so it is given its header again rather than
		// called corrupt, which would refuse every import from then on.
		return s.rewriteHeader(p)
	}
	if st.Size() < end {
		return fmt.Errorf("%w: pack %d is %d bytes but the index has frames up to %d", ErrCorrupt, p.id, st.Size(), end)
	}
	if st.Size() > end {
		if err := p.f.Truncate(end); err != nil {
			return fmt.Errorf("truncate pack %d: %w", p.id, err)
		}
		if err := p.f.Sync(); err != nil {
			return fmt.Errorf("sync pack %d: %w", p.id, err)
		}
	}
	p.size = end
	return nil
}

// rewriteHeader makes p, which holds no committed frame, a pack of just its
// header again, durably.
func (s *Store) rewriteHeader(p *packFile) error {
	if err := p.f.Truncate(0); err != nil {
		return fmt.Errorf("truncate pack %d: %w", p.id, err)
	}
	if _, err := p.f.WriteAt(pack.Header(), 0); err != nil {
		return fmt.Errorf("write pack %d header: %w", p.id, err)
	}
	if err := p.f.Sync(); err != nil {
		return fmt.Errorf("sync pack %d: %w", p.id, err)
	}
	p.size = pack.HeaderSize
	return nil
}

// newPack makes a new pack and takes it for the caller. The pack's row
// commits before its file exists, so a writer scanning for packs to reuse
// (reuseExisting) may open and lock the fresh file between its creation
// here and the flock; that writer then owns it (it writes the header
// itself), and this caller allocates another. Each lost race hands a pack
// to some other writer, so the loop ends; the bound only guards a bug.
func (s *Store) newPack(ctx context.Context) (*packFile, error) {
	for try := 0; ; try++ {
		p, err := s.createPack(ctx)
		if errors.Is(err, errPackTaken) && try < 16 {
			continue
		}
		return p, err
	}
}

// errPackTaken: another writer locked a pack createPack had just created.
var errPackTaken = errors.New("pack taken by another writer")

// afterPackCreate runs between a new pack file's creation and its flock.
// A variable so a test can make another writer take the pack there.
var afterPackCreate = func(id int64) {}

// afterPackRow runs between a new pack's row committing and its file's
// creation. A variable so a test can run a compaction there.
var afterPackRow = func(id int64) {}

// CreateLockFile, in the pack directory, is held shared by every writer
// creating a pack, from before its row commits until it holds the new
// file's flock. In between, the pack is a row without frames whose file is
// missing or not locked yet, which is what a compaction drops as an
// abandoned allocation; a compaction drops such a pack only while it holds
// this lock exclusively (compactor.dropEmpty). It is a flock, so it works
// across processes (a `casnix gc` beside a serving daemon).
const CreateLockFile = "create.lock"

func (s *Store) createPack(ctx context.Context) (*packFile, error) {
	unlock, err := lockfile.Open(ctx, filepath.Join(s.dir, CreateLockFile), unix.LOCK_SH)
	if err != nil {
		return nil, fmt.Errorf("allocate pack: %w", err)
	}
	defer unlock()
	var id int64
	err = s.db.Write(ctx, func(tx *db.Tx) error {
		var err error
		id, err = tx.InsertPack(ctx)
		return err
	})
	if err != nil {
		return nil, fmt.Errorf("allocate pack: %w", err)
	}
	afterPackRow(id)
	path := s.PackPath(id)
	sub := filepath.Dir(path)
	_, statErr := os.Stat(sub)
	if err := os.MkdirAll(sub, 0o755); err != nil {
		return nil, fmt.Errorf("create pack dir: %w", err)
	}
	// A new packs/NN/ is itself an entry of packs/: without syncing
	// packs/, a crash could lose NN/ and with it a pack whose frames the
	// index already names.
	if errors.Is(statErr, fs.ErrNotExist) {
		if err := syncDir(filepath.Dir(sub)); err != nil {
			return nil, err
		}
	}
	f, err := os.OpenFile(path, os.O_RDWR|os.O_CREATE|os.O_EXCL, 0o644)
	if err != nil {
		return nil, fmt.Errorf("create pack %d: %w", id, err)
	}
	afterPackCreate(id)
	if err := unix.Flock(int(f.Fd()), unix.LOCK_EX|unix.LOCK_NB); err != nil {
		f.Close()
		if errors.Is(err, unix.EWOULDBLOCK) {
			return nil, fmt.Errorf("lock new pack %d: %w", id, errPackTaken)
		}
		return nil, fmt.Errorf("lock new pack %d: %w", id, err)
	}
	p := &packFile{id: id, f: f}
	if _, err := s.packWriter(p).Write(pack.Header()); err != nil {
		f.Close()
		return nil, fmt.Errorf("write pack %d header: %w", id, err)
	}
	// The header and the directory entry must be durable before any frame
	// in this pack is committed to the index.
	if err := s.syncPack(p); err != nil {
		f.Close()
		return nil, fmt.Errorf("sync pack %d: %w", id, err)
	}
	if err := syncDir(filepath.Dir(path)); err != nil {
		f.Close()
		return nil, err
	}
	return &packFile{id: id, f: f, size: pack.HeaderSize}, nil
}

// syncDir fsyncs a directory. A variable so tests can see which
// directories are synced.
var syncDir = func(dir string) error {
	d, err := os.Open(dir)
	if err != nil {
		return fmt.Errorf("open dir %s: %w", dir, err)
	}
	defer d.Close()
	if err := d.Sync(); err != nil {
		return fmt.Errorf("sync dir %s: %w", dir, err)
	}
	return nil
}

// poison closes packs a Writer saw a write or sync error on, instead of
// handing them to the next Writer: after a failed fsync the kernel may have
// dropped dirty pages and will not report that again on this descriptor,
// so nothing more is trusted through it. The packs may be opened afresh
// later (reuseExisting, which trims what the failed Writer left), so the
// scan for them is allowed again.
func (s *Store) poison(ps ...*packFile) {
	for _, p := range ps {
		p.f.Close() // drops the flock
	}
	s.mu.Lock()
	s.scanned = false
	s.mu.Unlock()
}

// release returns packs to the free list, or closes those that are full.
func (s *Store) release(ps ...*packFile) {
	s.mu.Lock()
	defer s.mu.Unlock()
	for _, p := range ps {
		if p.size >= s.opts.PackSize {
			p.f.Close()
			continue
		}
		s.free = append(s.free, p)
	}
}

// reader returns a read-only handle on pack id: its local file, or, for
// an uploaded pack whose file was evicted, the bucket through the block
// cache. Every frame read goes through here.
func (s *Store) reader(id int64) (io.ReaderAt, error) {
	s.dropDeadReaders()
	s.rmu.RLock()
	f := s.readers[id]
	r := s.remotes[id]
	s.rmu.RUnlock()
	if f != nil {
		if s.bcache != nil {
			s.bcache.touchLocal(id)
		}
		return f, nil
	}
	if r != nil {
		return r, nil
	}
	s.rmu.Lock()
	defer s.rmu.Unlock()
	if f := s.readers[id]; f != nil {
		return f, nil
	}
	if r := s.remotes[id]; r != nil {
		return r, nil
	}
	f, err := os.Open(s.PackPath(id))
	if errors.Is(err, fs.ErrNotExist) && s.bcache != nil {
		rr, rerr := s.remoteReader(id)
		if rerr != nil {
			return nil, rerr
		}
		if rr != nil {
			s.remotes[id] = rr.(*remotePack)
			return rr, nil
		}
	}
	if err != nil {
		return nil, fmt.Errorf("open pack %d: %w", id, err)
	}
	s.readers[id] = f
	return f, nil
}

// forgetLocalReader closes this process's handle on pack id's local file
// (evicted: later reads go to the bucket).
func (s *Store) forgetLocalReader(id int64) {
	s.rmu.Lock()
	defer s.rmu.Unlock()
	if f := s.readers[id]; f != nil {
		f.Close()
		delete(s.readers, id)
	}
}
