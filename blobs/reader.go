package blobs

import (
	"bytes"
	"context"
	"encoding/binary"
	"errors"
	"fmt"
	"hash/crc32"
	"io"
	"os"
	"sort"
	"sync"
	"sync/atomic"

	"github.com/casnix/casnix/blobs/pack"
	"github.com/casnix/casnix/db"
	"github.com/casnix/casnix/digest"
)

// frame returns the cache entry of a decoded frame, decoding it unless it
// is cached or being decoded. The caller holds a reference to the entry and
// gives it back with s.cache.release once done with its data.
func (s *Store) frame(f db.Frame) (*frameEntry, error) {
	e, fill := s.cache.get(f.ID)
	if !fill && e.claim() {
		// Read-ahead queued it but no decoder has started it yet: the
		// reader needs it now, and decodes it itself rather than wait
		// for a decoder slot.
		fill = true
	}
	if fill {
		e.data, e.zsum, e.err = s.decodeFrameSum(f)
		s.cache.done(e)
	} else {
		<-e.ready
	}
	if e.err != nil {
		err := e.err
		s.cache.release(e)
		return nil, err
	}
	return e, nil
}

// prefetch queues a frame for decoding in the background if it is not
// cached. At most Options.Decoders frames decode in the background at once;
// the rest wait for a slot, in order, unless a reader that needs one claims
// it first. Unbounded, every frame of the read-ahead window decoded at once
// and kept the readers' goroutines (FUSE requests) from running for
// milliseconds at a time; the readers are what the decoders are for.
func (s *Store) prefetch(f db.Frame) {
	e, fill, ok := s.cache.getAhead(f.ID, f.RawLen)
	if !ok {
		return // read-ahead has its share of the cache: the reader decodes it when it gets there
	}
	if !fill {
		s.cache.release(e)
		return
	}
	s.background.Add(1)
	go func() {
		defer s.background.Done()
		defer s.cache.release(e)
		// A pack only in the bucket: its blocks download now, beside the
		// other frames of the window, not one by one as decoders free up.
		s.warmFrame(f)
		s.decodeSlots <- struct{}{}
		defer func() { <-s.decodeSlots }()
		if !e.claim() {
			return // a reader decodes it
		}
		backgroundDecodes.Add(1)
		e.data, e.zsum, e.err = s.decodeFrameSum(f)
		if e.err == nil {
			// Hash the frame's chunks here, off the reader's goroutine:
			// on one goroutine the checks took about half of a large
			// NAR's render time (bench/daemon.sh, NarFromPath).
			s.prehash(f, e)
		}
		s.cache.done(e)
	}()
}

// frameDecodes counts frame decodes, for tests and benchmarks that check
// read-ahead decodes each frame once.
var frameDecodes atomic.Int64

// prehashedFrames counts frames whose chunks the background decoders
// hashed, for tests.
var prehashedFrames atomic.Int64

// backgroundDecodes counts the frame decodes read-ahead's decoders did (the
// rest, readers did themselves), for benchmarks that show how much of the
// decoding left the reading goroutine.
var backgroundDecodes atomic.Int64

func (s *Store) decodeFrame(f db.Frame) ([]byte, error) {
	out, _, err := s.decodeFrameSum(f)
	return out, err
}

// decodeFrameSum decodes frame f and also returns the CRC-32C of the
// compressed bytes it decoded (ok == false on error), which WriteFramesTo
// uses to bind the stored bytes it sends to the decoded bytes it checked.
// The CRC costs little next to the decode (hardware CRC-32C).
func (s *Store) decodeFrameSum(f db.Frame) (_ []byte, _ zsum, err error) {
	r, err := s.reader(f.Pack)
	if err != nil {
		return nil, zsum{}, err
	}
	return s.decodeFrameFrom(r, f, false)
}

// decodeFrameFrom is decodeFrameSum reading the frame from r; thorough
// checks a stored frame's content checksum too (readStoredFrame: verify
// does, readers check the chunks they take instead).
func (s *Store) decodeFrameFrom(r io.ReaderAt, f db.Frame, thorough bool) (_ []byte, _ zsum, err error) {
	frameDecodes.Add(1)
	if pf, ok := r.(*os.File); ok && f.CLen >= f.RawLen {
		// Stored (Options.Store): read into place. No CRC of the stored
		// bytes: a stored frame is never sent as stored (writeFrame).
		buf := getFrameBuf(f.RawLen)
		if out, ok := readStoredFrame(pf, f.DataOff, f.CLen, f.RawLen, buf, thorough); ok {
			return out, zsum{}, nil
		}
		putFrameBuf(buf)
	}
	comp := getBuf(int(f.CLen))[:f.CLen]
	defer putBuf(comp)
	if _, err := r.ReadAt(comp, f.DataOff); err != nil {
		return nil, zsum{}, fmt.Errorf("read pack %d offset %d: %w", f.Pack, f.DataOff, err)
	}
	out, err := s.decodeAll(comp, getFrameBuf(f.RawLen), f.RawLen)
	if err != nil {
		return nil, zsum{}, fmt.Errorf("%w: pack %d frame at %d: %v", ErrCorrupt, f.Pack, f.Offset, err)
	}
	if int64(len(out)) != f.RawLen {
		return nil, zsum{}, fmt.Errorf("%w: pack %d frame at %d: %d bytes, index says %d", ErrCorrupt, f.Pack, f.Offset, len(out), f.RawLen)
	}
	return out, zsum{crc: crc32.Checksum(comp, castagnoli), ok: true}, nil
}

// zsum is the CRC-32C of the compressed bytes a frame cache entry was
// decoded from.
type zsum struct {
	crc uint32
	ok  bool
}

var castagnoli = crc32.MakeTable(crc32.Castagnoli)

// chunkRef is one chunk of a blob and its offset in the blob.
type chunkRef struct {
	digest digest.Digest
	off    int64
	len    int64
	loc    *db.ChunkLoc // looked up on first use
}

// BlobReader reads one blob. Sequential reads (Read, WriteTo) decode ahead
// in the background; ReadAt serves random access. It is not safe for
// concurrent use except ReadAt.
type BlobReader struct {
	mu     sync.Mutex // guards chunk locations, filled lazily by concurrent ReadAt
	s      *Store
	ctx    context.Context
	size   int64
	chunks []chunkRef
	pos    int64
	ahead  aheadState
}

// Open returns a reader for blob d.
func (s *Store) Open(ctx context.Context, d digest.Digest) (*BlobReader, error) {
	locs := s.locsFor(ctx)
	if b, loc, ok := locs.blob(d); ok {
		return s.newReader(ctx, d, b, loc)
	}
	indexLookups.Add(1)
	b, loc, err := s.db.BlobAndLoc(ctx, d)
	if errors.Is(err, db.ErrNotFound) {
		return nil, fmt.Errorf("blob %s: %w", d, ErrNotFound)
	}
	if err != nil {
		return nil, err
	}
	locs.putBlob(d, b, loc)
	return s.newReader(ctx, d, b, loc)
}

// OpenMany opens up to db.ChunkBatch blobs with one index query (see
// db.BlobsAndLocs) for those the location cache does not know:
// readers[i] reads ds[i], or errs[i] says why not (a blob not stored is
// ErrNotFound). err is an index failure, for all.
func (s *Store) OpenMany(ctx context.Context, ds []digest.Digest) (readers []*BlobReader, errs []error, err error) {
	readers, errs = make([]*BlobReader, len(ds)), make([]error, len(ds))
	var miss []digest.Digest
	var missAt []int
	locs := s.locsFor(ctx)
	for i, d := range ds {
		if b, loc, ok := locs.blob(d); ok {
			readers[i], errs[i] = s.newReader(ctx, d, b, loc)
			continue
		}
		miss, missAt = append(miss, d), append(missAt, i)
	}
	if len(miss) == 0 {
		return readers, errs, nil
	}
	indexLookups.Add(1)
	found, err := s.db.BlobsAndLocs(ctx, miss)
	if err != nil {
		return nil, nil, err
	}
	for k, d := range miss {
		i := missAt[k]
		bl, ok := found[d]
		if !ok {
			errs[i] = fmt.Errorf("blob %s: %w", d, ErrNotFound)
			continue
		}
		locs.putBlob(d, bl.Blob, bl.Loc)
		readers[i], errs[i] = s.newReader(ctx, d, bl.Blob, bl.Loc)
	}
	return readers, errs, nil
}

// newReader checks a blob's index row and returns a reader for it.
func (s *Store) newReader(ctx context.Context, d digest.Digest, b db.Blob, loc *db.ChunkLoc) (*BlobReader, error) {
	br := &BlobReader{s: s, ctx: ctx, size: b.Size}
	switch {
	case b.Chunks == nil && b.Size > 0:
		br.chunks = []chunkRef{{digest: d, len: b.Size}}
		if fits(loc, b.Size) {
			br.chunks[0].loc = loc
		}
	case b.Chunks != nil:
		if len(b.Chunks)%(digest.Size+4) != 0 {
			return nil, fmt.Errorf("%w: blob %s: chunk list of %d bytes", ErrCorrupt, d, len(b.Chunks))
		}
		var off int64
		for i := 0; i < len(b.Chunks); i += digest.Size + 4 {
			var c chunkRef
			copy(c.digest[:], b.Chunks[i:])
			c.len = int64(binary.LittleEndian.Uint32(b.Chunks[i+digest.Size:]))
			c.off = off
			off += c.len
			br.chunks = append(br.chunks, c)
		}
		if off != b.Size {
			return nil, fmt.Errorf("%w: blob %s: chunks sum to %d, size %d", ErrCorrupt, d, off, b.Size)
		}
	}
	return br, nil
}

// fits reports whether loc places a chunk of n bytes inside its frame
// (what a location from the index or the cache must do to be used).
func fits(loc *db.ChunkLoc, n int64) bool {
	return loc != nil && loc.Len == n && loc.Off+loc.Len <= loc.RawLen
}

// Size is the blob's length.
func (br *BlobReader) Size() int64 { return br.size }

// locate returns chunk i's location, looking up the locations of the
// following chunks in the same query (one round trip per ChunkBatch chunks
// instead of one per chunk).
func (br *BlobReader) locate(i int) (*db.ChunkLoc, error) {
	br.mu.Lock()
	defer br.mu.Unlock()
	c := &br.chunks[i]
	if c.loc != nil {
		return c.loc, nil
	}
	end := min(i+db.ChunkBatch, len(br.chunks))
	ds := make([]digest.Digest, 0, end-i)
	cache := br.s.locsFor(br.ctx)
	for j := i; j < end; j++ {
		cj := &br.chunks[j]
		if cj.loc != nil {
			continue
		}
		if l := cache.loc(cj.digest); fits(l, cj.len) {
			cj.loc = l
			continue
		}
		ds = append(ds, cj.digest)
	}
	if c.loc != nil {
		return c.loc, nil // cached; the rest are looked up when reached
	}
	indexLookups.Add(1)
	locs, err := br.s.db.Chunks(br.ctx, ds)
	if err != nil {
		return nil, err
	}
	for j := i; j < end; j++ {
		cj := &br.chunks[j]
		if cj.loc != nil {
			continue
		}
		loc, ok := locs[cj.digest]
		if !ok {
			if j == i {
				return nil, fmt.Errorf("%w: chunk %s of a stored blob is not in the index", ErrCorrupt, cj.digest)
			}
			continue
		}
		if !fits(&loc, cj.len) {
			return nil, fmt.Errorf("%w: chunk %s: index says %d bytes at %d of %d, blob says %d",
				ErrCorrupt, cj.digest, loc.Len, loc.Off, loc.RawLen, cj.len)
		}
		cj.loc = &loc
		cache.putLoc(cj.digest, cj.loc)
	}
	return c.loc, nil
}

// chunkData returns chunk i's bytes, checked against its digest (once per
// decode of its frame), a view into the frame cache entry e:
// do not modify them, and call br.s.cache.release(e) when done with them
// (the buffer is reused after).
func (br *BlobReader) chunkData(i int) (data []byte, e *frameEntry, err error) {
	loc, err := br.locate(i)
	if err != nil {
		return nil, nil, err
	}
	e, err = br.s.frame(loc.Frame)
	if err != nil && vanished(err) {
		// Its pack was compacted away since the lookup: look again, once.
		if loc, err = br.relocate(i); err == nil {
			e, err = br.s.frame(loc.Frame)
		}
	}
	if err != nil {
		return nil, nil, err
	}
	// The index row that placed the chunk is not checksummed: one that
	// points a byte off, or at another frame, must fail the read rather
	// than return other bytes. A location from the cache (locCache) may
	// be one the chunk has moved from (a repair rewrote it elsewhere):
	// such a failure looks the chunk up again, once.
	d := br.chunks[i].digest
	corrupt := func(loc *db.ChunkLoc) error {
		return fmt.Errorf("%w: chunk %s: the bytes the index points at (pack %d, frame at %d, offset %d) hash differently",
			ErrCorrupt, d, loc.Frame.Pack, loc.Frame.Offset, loc.Off)
	}
	if !e.check(loc.Off, loc.Len, d) {
		br.s.cache.release(e)
		nl, rerr := br.relocate(i)
		if rerr != nil || *nl == *loc {
			return nil, nil, corrupt(loc)
		}
		loc = nl
		if e, err = br.s.frame(loc.Frame); err != nil {
			return nil, nil, err
		}
		if !e.check(loc.Off, loc.Len, d) {
			br.s.cache.release(e)
			return nil, nil, corrupt(loc)
		}
	}
	return e.data[loc.Off : loc.Off+loc.Len], e, nil
}

func (br *BlobReader) chunkAt(off int64) int {
	return sort.Search(len(br.chunks), func(i int) bool { return br.chunks[i].off+br.chunks[i].len > off })
}

// ReadAt implements io.ReaderAt.
func (br *BlobReader) ReadAt(p []byte, off int64) (int, error) {
	if off < 0 {
		return 0, errors.New("negative offset")
	}
	n := 0
	for n < len(p) && off < br.size {
		i := br.chunkAt(off)
		data, e, err := br.chunkData(i)
		if err != nil {
			return n, err
		}
		k := copy(p[n:], data[off-br.chunks[i].off:])
		br.s.cache.release(e)
		n += k
		off += int64(k)
	}
	if n < len(p) {
		return n, io.EOF
	}
	return n, nil
}

// Read implements io.Reader with read-ahead.
func (br *BlobReader) Read(p []byte) (int, error) {
	if br.pos >= br.size {
		return 0, io.EOF
	}
	br.ReadAhead(br.pos)
	i := br.chunkAt(br.pos)
	data, e, err := br.chunkData(i)
	if err != nil {
		return 0, err
	}
	k := copy(p, data[br.pos-br.chunks[i].off:])
	br.s.cache.release(e)
	br.pos += int64(k)
	return k, nil
}

// WriteTo streams the rest of the blob to w, chunk by chunk.
func (br *BlobReader) WriteTo(w io.Writer) (int64, error) {
	var total int64
	for br.pos < br.size {
		br.ReadAhead(br.pos)
		n, err := br.writeChunk(br.chunkAt(br.pos), w)
		total += n
		if err != nil {
			return total, err
		}
	}
	return total, nil
}

// writeChunk writes the rest of chunk i, from the read position on, to w
// and advances the position by what w took.
func (br *BlobReader) writeChunk(i int, w io.Writer) (int64, error) {
	data, e, err := br.chunkData(i)
	if err != nil {
		return 0, err
	}
	n, err := w.Write(data[br.pos-br.chunks[i].off:])
	br.s.cache.release(e)
	br.pos += int64(n)
	return int64(n), err
}

// prehash checks every chunk of a freshly decoded frame against the digest
// its pack record lists, and marks those that match as checked, so the
// reader only compares its own (index) digest with the one already hashed
// for the span (frameEntry.check): the index row that places a chunk is
// still what a read is checked against. A record that cannot be read or
// does not describe the frame is ignored: the reader then hashes what it
// reads itself, as before.
func (s *Store) prehash(f db.Frame, e *frameEntry) {
	n := f.DataOff - f.Offset
	if n <= 0 || n > int64(pack.MaxChunks)*64+64 {
		return
	}
	r, err := s.reader(f.Pack)
	if err != nil {
		return
	}
	hdr := make([]byte, n)
	if _, err := r.ReadAt(hdr, f.Offset); err != nil {
		return
	}
	rec, err := pack.ReadRecord(bytes.NewReader(hdr))
	if err != nil || rec.RawLen != int64(len(e.data)) || rec.HdrLen != n {
		return
	}
	var off int64
	for _, en := range rec.Entries {
		end := off + int64(en.Len)
		if end > int64(len(e.data)) {
			return
		}
		if digest.Sum(e.data[off:end]) == en.Digest {
			e.markChecked(off, int64(en.Len), en.Digest)
		}
		off = end
	}
	prehashedFrames.Add(1)
}
