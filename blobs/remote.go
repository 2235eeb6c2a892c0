package blobs

import (
	"container/list"
	"context"
	"encoding/binary"
	"errors"
	"fmt"
	"hash/crc32"
	"io"
	"io/fs"
	"os"
	"path/filepath"
	"sort"
	"strconv"
	"strings"
	"sync"
	"sync/atomic"

	"github.com/casnix/casnix/db"
)

// Remote is the object storage sealed packs are uploaded to
// (*objstore.Bucket implements it). Objects are whole packs, named by
// PackObject, written once.
type Remote interface {
	// Put uploads size bytes of r as name, atomically (all or nothing).
	Put(ctx context.Context, name string, r io.ReaderAt, size int64) error
	// GetRange reads n bytes of name from off (fewer at the object's end).
	GetRange(ctx context.Context, name string, off, n int64) (io.ReadCloser, error)
}

// ErrRemoteUnsupported is returned by operations that do not work yet on
// a store whose packs are in a bucket (repair, backup of the pack files).
var ErrRemoteUnsupported = errors.New("not supported yet with packs in a bucket")

// PackObject is the object name of pack id in the bucket: the local layout
// under packs/.
func PackObject(id int64) string {
	return fmt.Sprintf("packs/%02x/%08x.pack", id%256, id)
}

// DefaultRemoteCacheBytes bounds the local bytes of uploaded packs (their
// files still here, and cached ranges of those that are not).
const DefaultRemoteCacheBytes = 10 << 30

// blockSize is the unit remote reads fetch and the cache keeps: aligned
// ranges of a pack object. Blocks rather than frames, because ingest writes
// one frame per store path and small paths make frames of a few KiB (one
// GET each would be a request per file); blocks rather than whole packs
// (256 MiB), because a read of one file would otherwise wait for a whole
// pack. A 4 MiB block holds a whole ingest frame or a quarter of a
// repacked one, so sequential reads fetch in parallel a few blocks ahead
// (prefetch) and a random read costs one or two GETs of at most 4 MiB.
const blockSize = 4 << 20

// maxFetches bounds the block fetches in flight at once (readers and
// prefetch together).
const maxFetches = 16

// blockKey names a cache entry: a block of pack's object, or (block ==
// localFile) the pack's whole local file.
type blockKey struct{ pack, block int64 }

const localFile = -1

type blockEntry struct {
	key      blockKey
	size     int64
	elem     *list.Element
	verified bool // the file's CRC was checked since this process found it
}

// fetch is one block download others can wait for.
type fetch struct {
	done chan struct{}
	data []byte
	err  error
}

// blockCache keeps blocks of uploaded packs on local disk, and accounts for
// the uploaded packs' local files, under one byte budget: least recently
// used first out. A block file is the block's bytes and their CRC-32C (so a
// file torn by a crash, the cache being written without fsync, is refetched
// rather than read as damage). Packs not uploaded are never in it.
type blockCache struct {
	dir    string
	budget int64
	remote Remote
	// evictLocal removes pack id's local file; false if it cannot now (a
	// backup holds the packs).
	evictLocal func(id int64) bool

	slots chan struct{}

	mu      sync.Mutex
	lru     *list.List // of *blockEntry, most recent first
	entries map[blockKey]*blockEntry
	used    int64
	flights map[blockKey]*fetch

	hits, misses, fetchedBytes, evictedBlocks, evictedPacks atomic.Int64
}

func newBlockCache(dir string, budget int64, remote Remote, evictLocal func(int64) bool) *blockCache {
	return &blockCache{
		dir: dir, budget: budget, remote: remote, evictLocal: evictLocal,
		slots:   make(chan struct{}, maxFetches),
		lru:     list.New(),
		entries: map[blockKey]*blockEntry{},
		flights: map[blockKey]*fetch{},
	}
}

func (c *blockCache) path(k blockKey) string {
	return filepath.Join(c.dir, fmt.Sprintf("%08x", k.pack), strconv.FormatInt(k.block, 10)+".blk")
}

// load adds the block files already on disk (a previous run's), oldest
// first, unverified; temporary files of interrupted fetches are removed.
func (c *blockCache) load() error {
	if err := os.MkdirAll(c.dir, 0o755); err != nil {
		return fmt.Errorf("create cache dir: %w", err)
	}
	type found struct {
		k    blockKey
		size int64
		mod  int64
	}
	var all []found
	err := filepath.WalkDir(c.dir, func(p string, d fs.DirEntry, err error) error {
		if err != nil || d.IsDir() {
			return err
		}
		name := d.Name()
		if strings.HasSuffix(name, ".tmp") {
			os.Remove(p)
			return nil
		}
		b, ok := strings.CutSuffix(name, ".blk")
		if !ok {
			return nil
		}
		block, err1 := strconv.ParseInt(b, 10, 64)
		pack, err2 := strconv.ParseInt(filepath.Base(filepath.Dir(p)), 16, 64)
		if err1 != nil || err2 != nil {
			return nil
		}
		fi, err := d.Info()
		if err != nil {
			return nil
		}
		all = append(all, found{blockKey{pack, block}, fi.Size(), fi.ModTime().UnixNano()})
		return nil
	})
	if err != nil {
		return fmt.Errorf("scan cache dir: %w", err)
	}
	sort.Slice(all, func(i, j int) bool { return all[i].mod < all[j].mod })
	c.mu.Lock()
	defer c.mu.Unlock()
	for _, f := range all {
		c.insertLocked(f.k, f.size, false)
	}
	return nil
}

// insertLocked adds (or refreshes) an entry as the most recently used.
func (c *blockCache) insertLocked(k blockKey, size int64, verified bool) {
	if e := c.entries[k]; e != nil {
		c.used += size - e.size
		e.size = size
		e.verified = e.verified || verified
		c.lru.MoveToFront(e.elem)
		return
	}
	e := &blockEntry{key: k, size: size, verified: verified}
	e.elem = c.lru.PushFront(e)
	c.entries[k] = e
	c.used += size
}

func (c *blockCache) removeLocked(e *blockEntry) {
	c.lru.Remove(e.elem)
	delete(c.entries, e.key)
	c.used -= e.size
}

// addLocal accounts for an uploaded pack's local file of size bytes.
func (c *blockCache) addLocal(id, size int64) {
	c.mu.Lock()
	defer c.mu.Unlock()
	c.insertLocked(blockKey{id, localFile}, size, true)
	c.evictLocked()
}

// touchLocal marks an uploaded pack's local file as just used.
func (c *blockCache) touchLocal(id int64) {
	c.mu.Lock()
	if e := c.entries[blockKey{id, localFile}]; e != nil {
		c.lru.MoveToFront(e.elem)
	}
	c.mu.Unlock()
}

// forget drops pack id's entries (its pack left the index): blocks are
// removed from disk, a local file is the compaction's to remove.
func (c *blockCache) forget(id int64) {
	c.mu.Lock()
	var gone []blockKey
	for k, e := range c.entries {
		if k.pack == id {
			c.removeLocked(e)
			if k.block != localFile {
				gone = append(gone, k)
			}
		}
	}
	c.mu.Unlock()
	for _, k := range gone {
		os.Remove(c.path(k))
	}
	os.Remove(filepath.Dir(c.path(blockKey{id, 0})))
}

// evict brings the cache under its budget, least recently used first. A
// local pack file that cannot go now (a backup holds the packs, or the
// store is read-only) is passed over.
func (c *blockCache) evict() {
	c.mu.Lock()
	defer c.mu.Unlock()
	c.evictLocked()
}

// evictLocked is evict with c.mu held (it lets go of it while it unlinks
// a local pack file).
func (c *blockCache) evictLocked() {
	kept := map[blockKey]bool{}
	for c.used > c.budget {
		el := c.lru.Back()
		for el != nil && kept[el.Value.(*blockEntry).key] {
			el = el.Prev()
		}
		if el == nil {
			return
		}
		e := el.Value.(*blockEntry)
		if e.key.block != localFile {
			// A reader that opened the file keeps reading it; new ones
			// fetch the block again.
			c.removeLocked(e)
			os.Remove(c.path(e.key))
			c.evictedBlocks.Add(1)
			continue
		}
		c.mu.Unlock()
		ok := c.evictLocal(e.key.pack)
		c.mu.Lock()
		if !ok {
			kept[e.key] = true
			continue
		}
		if c.entries[e.key] == e {
			c.removeLocked(e)
		}
		c.evictedPacks.Add(1)
	}
}

// Used is the bytes the cache accounts for, Budget its bound.
func (c *blockCache) Used() int64 {
	c.mu.Lock()
	defer c.mu.Unlock()
	return c.used
}

// readAt reads p at off of pack id's object, block by block, fetching
// missing blocks in parallel.
func (c *blockCache) readAt(ctx context.Context, id int64, p []byte, off int64) (int, error) {
	if len(p) == 0 {
		return 0, nil
	}
	first, last := off/blockSize, (off+int64(len(p))-1)/blockSize
	if first == last {
		return c.readBlock(ctx, id, first, p, off-first*blockSize)
	}
	ns := make([]int, last-first+1)
	errs := make([]error, len(ns))
	var wg sync.WaitGroup
	for b := first; b <= last; b++ {
		lo := max(off, b*blockSize)
		hi := min(off+int64(len(p)), (b+1)*blockSize)
		i := b - first
		wg.Add(1)
		go func() {
			defer wg.Done()
			ns[i], errs[i] = c.readBlock(ctx, id, b, p[lo-off:hi-off], lo-b*blockSize)
		}()
	}
	wg.Wait()
	n := 0
	for i := range ns {
		n += ns[i]
		if errs[i] != nil {
			return n, errs[i]
		}
		if ns[i] < int(min(off+int64(len(p)), (first+int64(i)+1)*blockSize)-max(off, (first+int64(i))*blockSize)) {
			return n, io.ErrUnexpectedEOF
		}
	}
	return n, nil
}

// readBlock reads p from offset off within block b of pack id.
func (c *blockCache) readBlock(ctx context.Context, id, b int64, p []byte, off int64) (int, error) {
	k := blockKey{id, b}
	c.mu.Lock()
	e := c.entries[k]
	verified := e != nil && e.verified
	if e != nil {
		c.lru.MoveToFront(e.elem)
	}
	c.mu.Unlock()
	if e != nil {
		if n, ok := c.readCached(k, verified, p, off); ok {
			c.hits.Add(1)
			return n, short(n, len(p))
		}
	}
	c.misses.Add(1)
	data, err := c.fetch(ctx, k)
	if err != nil {
		return 0, err
	}
	if off >= int64(len(data)) {
		return 0, io.ErrUnexpectedEOF
	}
	n := copy(p, data[off:])
	return n, short(n, len(p))
}

func short(n, want int) error {
	if n < want {
		return io.ErrUnexpectedEOF
	}
	return nil
}

// readCached reads from a cached block file; ok is false if the file is
// gone or fails its CRC (the entry is then dropped, and the caller fetches).
func (c *blockCache) readCached(k blockKey, verified bool, p []byte, off int64) (int, bool) {
	f, err := os.Open(c.path(k))
	if err != nil {
		c.drop(k)
		return 0, false
	}
	defer f.Close()
	if verified {
		fi, err := f.Stat()
		if err != nil {
			return 0, false
		}
		end := min(off+int64(len(p)), fi.Size()-4)
		if end <= off {
			return 0, true
		}
		n, err := f.ReadAt(p[:end-off], off)
		if err != nil && !errors.Is(err, io.EOF) {
			return 0, false
		}
		return n, true
	}
	all, err := io.ReadAll(f)
	if err != nil || len(all) < 4 {
		c.drop(k)
		return 0, false
	}
	data := all[:len(all)-4]
	if crc32.Checksum(data, castagnoli) != binary.LittleEndian.Uint32(all[len(all)-4:]) {
		c.drop(k)
		return 0, false
	}
	c.mu.Lock()
	if e := c.entries[k]; e != nil {
		e.verified = true
	}
	c.mu.Unlock()
	if off >= int64(len(data)) {
		return 0, true
	}
	return copy(p, data[off:]), true
}

func (c *blockCache) drop(k blockKey) {
	c.mu.Lock()
	if e := c.entries[k]; e != nil {
		c.removeLocked(e)
	}
	c.mu.Unlock()
	os.Remove(c.path(k))
}

// fetch downloads block k once however many readers ask at once, keeps it
// on disk, and returns its bytes.
func (c *blockCache) fetch(ctx context.Context, k blockKey) ([]byte, error) {
	c.mu.Lock()
	if f := c.flights[k]; f != nil {
		c.mu.Unlock()
		select {
		case <-f.done:
			return f.data, f.err
		case <-ctx.Done():
			return nil, ctx.Err()
		}
	}
	f := &fetch{done: make(chan struct{})}
	c.flights[k] = f
	c.mu.Unlock()
	// Detached from the first asker's context: others may wait for it.
	f.data, f.err = c.download(context.WithoutCancel(ctx), k)
	c.mu.Lock()
	delete(c.flights, k)
	c.mu.Unlock()
	close(f.done)
	return f.data, f.err
}

func (c *blockCache) download(ctx context.Context, k blockKey) ([]byte, error) {
	c.slots <- struct{}{}
	defer func() { <-c.slots }()
	name := PackObject(k.pack)
	rc, err := c.remote.GetRange(ctx, name, k.block*blockSize, blockSize)
	if err != nil {
		return nil, fmt.Errorf("read pack %d block %d from the bucket: %w", k.pack, k.block, err)
	}
	data, err := io.ReadAll(io.LimitReader(rc, blockSize+1))
	rc.Close()
	if err != nil {
		return nil, fmt.Errorf("read pack %d block %d from the bucket: %w", k.pack, k.block, err)
	}
	if len(data) > blockSize {
		return nil, fmt.Errorf("read pack %d block %d from the bucket: more bytes than asked for", k.pack, k.block)
	}
	c.fetchedBytes.Add(int64(len(data)))
	// Kept on disk without fsync: a cache. A file a crash tears fails its
	// CRC and is fetched again.
	p := c.path(k)
	if err := os.MkdirAll(filepath.Dir(p), 0o755); err == nil {
		tmp := p + ".tmp"
		var crc [4]byte
		binary.LittleEndian.PutUint32(crc[:], crc32.Checksum(data, castagnoli))
		if err := os.WriteFile(tmp, append(data[:len(data):len(data)], crc[:]...), 0o644); err == nil && os.Rename(tmp, p) == nil {
			c.mu.Lock()
			c.insertLocked(k, int64(len(data))+4, true)
			c.evictLocked()
			c.mu.Unlock()
		} else {
			os.Remove(tmp)
		}
	}
	return data, nil
}

// warm fetches the blocks of [off, off+n) of pack id not cached yet, in
// parallel, for read-ahead.
func (c *blockCache) warm(ctx context.Context, id, off, n int64) {
	if n <= 0 {
		return
	}
	var wg sync.WaitGroup
	for b := off / blockSize; b <= (off+n-1)/blockSize; b++ {
		k := blockKey{id, b}
		c.mu.Lock()
		_, ok := c.entries[k]
		c.mu.Unlock()
		if ok {
			continue
		}
		wg.Add(1)
		go func() {
			defer wg.Done()
			c.fetch(ctx, k) // an error is the reader's to meet
		}()
	}
	wg.Wait()
}

// remotePack reads an uploaded pack whose local file is gone, through the
// block cache.
type remotePack struct {
	c  *blockCache
	id int64
}

func (r *remotePack) ReadAt(p []byte, off int64) (int, error) {
	return r.c.readAt(context.Background(), r.id, p, off)
}

// bucketPack reads an uploaded pack straight from the bucket, bypassing
// the cache: what verify checks.
type bucketPack struct {
	remote Remote
	id     int64
}

func (r *bucketPack) ReadAt(p []byte, off int64) (int, error) {
	rc, err := r.remote.GetRange(context.Background(), PackObject(r.id), off, int64(len(p)))
	if err != nil {
		return 0, fmt.Errorf("read pack %d from the bucket: %w", r.id, err)
	}
	defer rc.Close()
	n, err := io.ReadFull(rc, p)
	if err != nil {
		return n, fmt.Errorf("read pack %d from the bucket: %w", r.id, err)
	}
	return n, nil
}

// ---- Store side ----

// remoteReader returns a reader of pack id from the bucket if the pack is
// uploaded (nil if it is not, or has no row).
func (s *Store) remoteReader(id int64) (io.ReaderAt, error) {
	_, uploaded, err := s.db.PackSealedState(context.Background(), id)
	if errors.Is(err, db.ErrNotFound) {
		return nil, nil
	}
	if err != nil {
		return nil, err
	}
	if !uploaded {
		return nil, nil
	}
	return &remotePack{c: s.bcache, id: id}, nil
}

// evictLocal removes uploaded pack id's local file, unless a backup holds
// the packs (the hold lock, as a compaction's unlink).
func (s *Store) evictLocal(id int64) bool {
	if s.opts.ReadOnly {
		return false
	}
	unlock, err := s.tryHold()
	if err != nil {
		return false
	}
	defer unlock()
	if err := os.Remove(s.PackPath(id)); err != nil && !errors.Is(err, fs.ErrNotExist) {
		return false
	}
	s.forgetLocalReader(id)
	return true
}

// warmFrame fetches, for read-ahead, the blocks of frame f if its pack is
// only in the bucket: every frame of the window downloads in parallel
// (before waiting for a decode slot), not one after the other as they
// decode.
func (s *Store) warmFrame(f db.Frame) {
	if s.bcache == nil {
		return
	}
	r, err := s.reader(f.Pack)
	if _, remote := r.(*remotePack); err != nil || !remote {
		return
	}
	s.bcache.warm(context.Background(), f.Pack, f.Offset, f.DataOff+f.CLen-f.Offset)
}
