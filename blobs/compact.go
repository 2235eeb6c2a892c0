package blobs

import (
	"bufio"
	"bytes"
	"context"
	"errors"
	"fmt"
	"io"
	"io/fs"
	"os"
	"path/filepath"
	"slices"
	"strconv"
	"strings"
	"sync/atomic"
	"time"

	"golang.org/x/sys/unix"

	"github.com/casnix/casnix/blobs/pack"
	"github.com/casnix/casnix/db"
	"github.com/casnix/casnix/digest"
	"github.com/casnix/casnix/lockfile"
)

// CompactStats says what Compact did. Disk figures are allocated blocks
// (what du counts), not file lengths.
type CompactStats struct {
	PacksRemoved    int
	PacksWritten    int
	FramesCopied    int   // moved as they were
	FramesRewritten int   // recompressed without their dead chunks
	DiskRemoved     int64 // bytes of the pack files removed
	DiskWritten     int64 // bytes of the pack files written
	Skipped         int   // packs held by a writer, not looked at
	DeadLeft        int64 // dead bytes left in packs under the minDead threshold
}

// Freed is the net disk space Compact gave back.
func (c CompactStats) Freed() int64 { return c.DiskRemoved - c.DiskWritten }

// rewriteBelow is the share of a frame's raw bytes still indexed below
// which compaction recompresses the frame instead of copying it.
const rewriteBelow = 0.5

// Compact reclaims the space of deleted chunks. Pack files without an index
// row (left by a crash between a compaction's commit and its unlink) are
// removed; packs without frames are dropped; a pack with at least minDead
// (0..1) of its bytes unreferenced has its live frames copied into new
// packs, which are fsynced before one transaction per old pack moves its
// chunks and drops it; only then is the old file removed. Packs a writer
// holds (flocked, in any process) are left alone.
//
// Call it only while no other Compact runs on the data directory (the
// collector serialises runs). Chunk rows may be added meanwhile by writers,
// but never deleted: chunk deletion is the collector's sweep.
func (s *Store) Compact(ctx context.Context, minDead float64) (CompactStats, error) {
	return s.CompactSteps(ctx, minDead, nil)
}

// CompactSteps is Compact calling step (if not nil) after each step a
// crash could follow: an old pack dropped from the index, its file removed.
func (s *Store) CompactSteps(ctx context.Context, minDead float64, step func(string)) (CompactStats, error) {
	var st CompactStats
	if s.opts.ReadOnly {
		return st, fmt.Errorf("compact: %w", db.ErrReadOnly)
	}
	s.closeFree()
	c := &compactor{s: s, ctx: ctx, st: &st, dirs: map[string]bool{}, step: step}
	defer c.finish()
	orphans, err := s.orphanPacks(ctx)
	if err != nil {
		return st, err
	}
	if err := c.remove(orphans...); err != nil {
		return st, err
	}
	uses, err := s.db.PackUsage(ctx)
	if err != nil {
		return st, err
	}
	for _, u := range uses {
		if err := ctx.Err(); err != nil {
			return st, err
		}
		if err := c.pack(u, minDead); err != nil {
			return st, err
		}
	}
	if err := c.finish(); err != nil {
		return st, err
	}
	return st, nil
}

// closeFree closes the packs this process holds for its next writers, so
// they can be compacted too; the next writers reopen those that are still
// there (acquire), and then look for a pack to reuse again.
func (s *Store) closeFree() {
	s.mu.Lock()
	defer s.mu.Unlock()
	for _, p := range s.free {
		p.f.Close()
		s.reopen = append(s.reopen, p.id)
	}
	s.free = nil
	s.scanned = false
}

// diskUsage is a file's allocated bytes.
func diskUsage(fi fs.FileInfo) int64 {
	if sys, ok := fi.Sys().(*unix.Stat_t); ok {
		return sys.Blocks * 512
	}
	if sys, ok := fi.Sys().(interface{ Blocks() int64 }); ok {
		return sys.Blocks() * 512
	}
	return fi.Size()
}

// packFiles lists the pack files on disk by id.
func (s *Store) packFiles() (map[int64]string, error) {
	out := map[int64]string{}
	subs, err := os.ReadDir(s.dir)
	if err != nil {
		return nil, fmt.Errorf("list packs: %w", err)
	}
	for _, sub := range subs {
		if !sub.IsDir() {
			continue
		}
		ents, err := os.ReadDir(filepath.Join(s.dir, sub.Name()))
		if err != nil {
			return nil, fmt.Errorf("list packs: %w", err)
		}
		for _, e := range ents {
			hex, ok := strings.CutSuffix(e.Name(), ".pack")
			if !ok {
				continue
			}
			id, err := strconv.ParseInt(hex, 16, 64)
			if err != nil || s.PackPath(id) != filepath.Join(s.dir, sub.Name(), e.Name()) {
				continue // not a name casnix makes: leave it
			}
			out[id] = s.PackPath(id)
		}
	}
	return out, nil
}

// orphanPacks lists pack files that have no row. Files are listed before
// rows: a pack's row is committed before its file is created, so a file
// seen first whose row is missing was dropped, not just made.
func (s *Store) orphanPacks(ctx context.Context) ([]removal, error) {
	files, err := s.packFiles()
	if err != nil {
		return nil, err
	}
	ids, err := s.db.Packs(ctx)
	if err != nil {
		return nil, err
	}
	for _, id := range ids {
		delete(files, id)
	}
	var out []removal
	for id, path := range files {
		fi, err := os.Stat(path)
		if err != nil {
			continue
		}
		out = append(out, removal{id: id, path: path, usage: diskUsage(fi)})
	}
	return out, nil
}

// compactor copies live frames into its current output pack.
type compactor struct {
	s   *Store
	ctx context.Context
	st  *CompactStats
	out *packFile
	bw  *bufio.Writer
	// out packs written to and not yet released
	outs []*packFile
	dirs map[string]bool // of removed packs, synced at the end
	// pending are dropped packs whose files a backup holds (HoldPacks):
	// removed as soon as it lets go, at the latest in finish.
	pending []removal
	done    bool
	step    func(string)
}

// remove unlinks dropped pack files now, or once no backup holds them.
func (c *compactor) remove(rs ...removal) error {
	for _, r := range rs {
		c.dirs[filepath.Dir(r.path)] = true
	}
	c.pending = append(c.pending, rs...)
	left, err := c.s.removePacks(c.ctx, c.pending, false, c.st)
	c.pending = left
	return err
}

func (c *compactor) pack(u db.PackUse, minDead float64) error {
	s := c.s
	if u.Uploaded {
		// Its object stays in the bucket whatever happens here (snapshots
		// and replicas may name it), and its local file may be gone: it is
		// dropped once no chunk points into it (DropPack records it dead),
		// never rewritten.
		n, err := s.db.PackChunkCount(c.ctx, u.ID)
		if err != nil {
			return err
		}
		if n > 0 {
			c.st.Skipped++
			return nil
		}
		var usage int64
		if fi, err := os.Stat(s.PackPath(u.ID)); err == nil {
			usage = diskUsage(fi)
		}
		return c.drop(u.ID, nil, usage)
	}
	if s.remote != nil && u.Frames > 0 {
		// Not uploaded yet, and never rewritten: chunks moved into a new
		// pack here would be named before that pack is in the bucket (a
		// replica shows a path once the packs it knew of are uploaded). It
		// goes up as it is; once uploaded, it is dropped when no chunk
		// points into it, and the repacker (which uploads its packs before
		// it records them) is what moves live chunks out.
		c.st.Skipped++
		return nil
	}
	f, err := os.OpenFile(s.PackPath(u.ID), os.O_RDWR, 0)
	if errors.Is(err, fs.ErrNotExist) {
		if u.Frames == 0 {
			return c.dropEmpty(u.ID, 0) // allocated, never created (or being created)
		}
		return fmt.Errorf("%w: pack %d has %d frames but no file", ErrCorrupt, u.ID, u.Frames)
	}
	if err != nil {
		return fmt.Errorf("open pack %d: %w", u.ID, err)
	}
	defer f.Close()
	if err := unix.Flock(int(f.Fd()), unix.LOCK_EX|unix.LOCK_NB); err != nil {
		c.st.Skipped++
		return nil // a writer holds it (maybe this process's free list)
	}
	for _, o := range c.outs {
		if o.id == u.ID {
			return nil // never compact into itself
		}
	}
	fi, err := f.Stat()
	if err != nil {
		return fmt.Errorf("stat pack %d: %w", u.ID, err)
	}
	if u.Frames == 0 {
		return c.dropEmpty(u.ID, diskUsage(fi))
	}
	dead := fi.Size() - pack.HeaderSize - u.LiveBytes
	if float64(dead) < minDead*float64(fi.Size()) {
		c.st.DeadLeft += max(dead, 0)
		return nil
	}
	return c.move(u.ID, f, diskUsage(fi))
}

// moved is one frame written to the output pack, and its chunks' new
// offsets.
type moved struct {
	frame  db.Frame
	chunks []db.ChunkInFrame
}

func (c *compactor) move(id int64, f *os.File, usage int64) error {
	var frames []moved
	err := c.s.db.PackFrames(c.ctx, id, func(fr db.Frame, chunks []db.ChunkInFrame) error {
		if len(chunks) == 0 {
			return nil
		}
		m, err := c.copyFrame(f, fr, chunks)
		if err != nil {
			return err
		}
		frames = append(frames, m)
		return nil
	})
	if err != nil {
		return fmt.Errorf("compact pack %d: %w", id, err)
	}
	if err := c.sync(); err != nil {
		return err
	}
	return c.drop(id, frames, usage)
}

// copyFrame appends fr's live chunks to the output pack: the record as it
// is when most of it is live, else recompressed with only the live chunks.
func (c *compactor) copyFrame(f *os.File, fr db.Frame, chunks []db.ChunkInFrame) (moved, error) {
	var live int64
	for _, ch := range chunks {
		live += ch.Len
	}
	if err := c.ensureOut(); err != nil {
		return moved{}, err
	}
	o := c.out
	if float64(live) >= rewriteBelow*float64(fr.RawLen) {
		rec := make([]byte, fr.DataOff+fr.CLen-fr.Offset)
		if _, err := f.ReadAt(rec, fr.Offset); err != nil {
			return moved{}, fmt.Errorf("read pack %d frame at %d: %w", fr.Pack, fr.Offset, err)
		}
		// The record header's CRC covers only the header; the frame's
		// data is decoded and every live chunk checked against its BLAKE3,
		// so damage is never copied into a new pack under a clean header.
		if _, err := pack.ReadRecord(bytes.NewReader(rec[:fr.DataOff-fr.Offset])); err != nil {
			return moved{}, fmt.Errorf("pack %d frame at %d: %w", fr.Pack, fr.Offset, err)
		}
		data, err := c.s.decodeAll(rec[fr.DataOff-fr.Offset:], getFrameBuf(fr.RawLen), fr.RawLen)
		if err != nil {
			return moved{}, fmt.Errorf("%w: pack %d frame at %d: %v", ErrCorrupt, fr.Pack, fr.Offset, err)
		}
		err = checkChunks(data, fr, chunks)
		putFrameBuf(data)
		if err != nil {
			return moved{}, err
		}
		nf := db.Frame{Pack: o.id, Offset: o.size, DataOff: o.size + fr.DataOff - fr.Offset, CLen: fr.CLen, RawLen: fr.RawLen, Packed: fr.Packed}
		if _, err := c.bw.Write(rec); err != nil {
			return moved{}, fmt.Errorf("write pack %d: %w", o.id, err)
		}
		o.size += int64(len(rec))
		c.st.FramesCopied++
		return moved{nf, slices.Clone(chunks)}, nil
	}
	data, err := c.s.decodeFrame(fr)
	if err != nil {
		return moved{}, err
	}
	raw := make([]byte, 0, live)
	entries := make([]pack.Entry, 0, len(chunks))
	out := make([]db.ChunkInFrame, 0, len(chunks))
	if err := checkChunks(data, fr, chunks); err != nil {
		return moved{}, err
	}
	for _, ch := range chunks {
		b := data[ch.Off : ch.Off+ch.Len]
		out = append(out, db.ChunkInFrame{Digest: ch.Digest, Off: int64(len(raw)), Len: ch.Len})
		entries = append(entries, pack.Entry{Digest: ch.Digest, Len: uint32(ch.Len)})
		raw = append(raw, b...)
	}
	comp := c.s.enc.EncodeAll(raw, nil)
	hdr := pack.RecordHeader(entries, len(comp))
	nf := db.Frame{Pack: o.id, Offset: o.size, DataOff: o.size + int64(len(hdr)), CLen: int64(len(comp)), RawLen: int64(len(raw))}
	if _, err := c.bw.Write(hdr); err != nil {
		return moved{}, fmt.Errorf("write pack %d: %w", o.id, err)
	}
	if _, err := c.bw.Write(comp); err != nil {
		return moved{}, fmt.Errorf("write pack %d: %w", o.id, err)
	}
	o.size += int64(len(hdr) + len(comp))
	c.st.FramesRewritten++
	return moved{nf, out}, nil
}

// checkChunks checks the live chunks of fr against their digests in its
// decoded data.
func checkChunks(data []byte, fr db.Frame, chunks []db.ChunkInFrame) error {
	if int64(len(data)) != fr.RawLen {
		return fmt.Errorf("%w: pack %d frame at %d: %d bytes, index says %d", ErrCorrupt, fr.Pack, fr.Offset, len(data), fr.RawLen)
	}
	for _, ch := range chunks {
		if ch.Off < 0 || ch.Len < 0 || ch.Off+ch.Len > int64(len(data)) {
			return fmt.Errorf("%w: chunk %s outside pack %d frame at %d", ErrCorrupt, ch.Digest, fr.Pack, fr.Offset)
		}
		if digest.Sum(data[ch.Off:ch.Off+ch.Len]) != ch.Digest {
			return fmt.Errorf("%w: chunk %s in pack %d frame at %d", ErrCorrupt, ch.Digest, fr.Pack, fr.Offset)
		}
	}
	return nil
}

// ensureOut makes sure there is an output pack with room.
func (c *compactor) ensureOut() error {
	if c.out != nil && c.out.size < c.s.opts.PackSize {
		return nil
	}
	if c.out != nil {
		if err := c.bw.Flush(); err != nil {
			return fmt.Errorf("write pack %d: %w", c.out.id, err)
		}
	}
	p, err := c.s.newPack(c.ctx)
	if err != nil {
		return err
	}
	c.out = p
	c.outs = append(c.outs, p)
	c.st.PacksWritten++
	if _, err := p.f.Seek(p.size, io.SeekStart); err != nil {
		return fmt.Errorf("seek pack %d: %w", p.id, err)
	}
	if c.bw == nil {
		c.bw = bufio.NewWriterSize(p.f, 1<<20)
	} else {
		c.bw.Reset(p.f)
	}
	return nil
}

// sync makes everything written so far durable.
func (c *compactor) sync() error {
	if c.out == nil {
		return nil
	}
	if err := c.bw.Flush(); err != nil {
		return fmt.Errorf("write pack %d: %w", c.out.id, err)
	}
	for _, o := range c.outs {
		if err := fdatasync(o.f); err != nil {
			return fmt.Errorf("sync pack %d: %w", o.id, err)
		}
	}
	return nil
}

// dropEmpty drops a pack without frames, unless a writer is creating a
// pack: then it may be that one, its row committed but its file not yet
// made or locked (Store.createPack), and it is left for the next run.
func (c *compactor) dropEmpty(id int64, usage int64) error {
	unlock, err := c.s.tryLockEx(CreateLockFile)
	if errors.Is(err, lockfile.ErrBusy) {
		c.st.Skipped++
		return nil
	}
	if err != nil {
		return err
	}
	defer unlock()
	return c.drop(id, nil, usage)
}

// drop points the moved chunks at their new frames and removes pack id from
// the index in one transaction, then deletes its file.
func (c *compactor) drop(id int64, frames []moved, usage int64) error {
	err := c.s.db.Write(c.ctx, func(tx *db.Tx) error {
		for _, m := range frames {
			fid, err := tx.InsertFrame(c.ctx, m.frame)
			if err != nil {
				return err
			}
			for _, ch := range m.chunks {
				if err := tx.MoveChunk(c.ctx, ch.Digest, fid, ch.Off); err != nil {
					return err
				}
			}
		}
		// Every chunk of the pack must have moved: the foreign key makes
		// DropPack fail otherwise, and this names the problem.
		if n, err := tx.PackChunkCount(c.ctx, id); err != nil {
			return err
		} else if n != 0 {
			return fmt.Errorf("pack %d gained %d chunks while being compacted", id, n)
		}
		return tx.DropPack(c.ctx, id)
	})
	if err != nil {
		return fmt.Errorf("compact pack %d: %w", id, err)
	}
	c.s.locs.clear() // its chunks moved: no reader need find that out by failing
	if c.step != nil {
		c.step("old pack dropped")
	}
	// Not synced per pack: a file that comes back after a crash has no row
	// and is removed by the next Compact.
	return c.remove(removal{id: id, path: c.s.PackPath(id), usage: usage})
}

// finish measures and hands back the output packs (to this process's free
// list, so the next writer fills them up). It is idempotent.
func (c *compactor) finish() error {
	if c.done {
		return nil
	}
	c.done = true
	var errs []error
	if c.out != nil {
		errs = append(errs, c.bw.Flush())
	}
	for _, o := range c.outs {
		if fi, err := o.f.Stat(); err == nil {
			c.st.DiskWritten += diskUsage(fi)
		}
	}
	// Wait for backups that hold packs this run dropped, then unlink them.
	left, err := c.s.removePacks(c.ctx, c.pending, true, c.st)
	c.pending = left
	errs = append(errs, err)
	for d := range c.dirs {
		// A dropped pack row may never have had its file or its packs/NN/
		// (a crash right after its id was committed): no entry to sync.
		if err := syncDir(d); err != nil && !errors.Is(err, fs.ErrNotExist) {
			errs = append(errs, err)
		}
	}
	c.s.release(c.outs...)
	c.outs = nil
	return errors.Join(errs...)
}

// ---- readers of packs that go away ----

// forgetReaders closes this process's read handles on packs that were
// removed. A read already running on one completes (the descriptor is
// released after it); later ones fail as vanished and re-look-up.
func (s *Store) forgetReaders(ids ...int64) {
	s.rmu.Lock()
	defer s.rmu.Unlock()
	for _, id := range ids {
		if f := s.readers[id]; f != nil {
			f.Close()
			delete(s.readers, id)
		}
		delete(s.remotes, id)
		if s.bcache != nil {
			s.bcache.forget(id)
		}
	}
}

// readerSweepEvery rate-limits dropDeadReaders.
const readerSweepEvery = time.Second

// dropDeadReaders closes read handles on pack files another process
// removed (link count 0): otherwise this process would keep their disk
// space allocated for as long as it runs. At most once a second.
func (s *Store) dropDeadReaders() {
	now := time.Now().UnixNano()
	last := s.readerSweep.Load()
	if now-last < int64(readerSweepEvery) || !s.readerSweep.CompareAndSwap(last, now) {
		return
	}
	s.rmu.Lock()
	defer s.rmu.Unlock()
	for id, f := range s.readers {
		var st unix.Stat_t
		if err := unix.Fstat(int(f.Fd()), &st); err == nil && st.Nlink == 0 {
			f.Close()
			delete(s.readers, id)
		}
	}
}

// compactedAway reports whether an open pack file was removed (by a
// compaction that held it while this process opened it): appending to it
// would commit frames of a dropped pack.
func compactedAway(f *os.File) bool {
	var st unix.Stat_t
	return unix.Fstat(int(f.Fd()), &st) == nil && st.Nlink == 0
}

// vanished reports whether a read failed because its pack went away (moved
// by a compaction): the caller looks the chunk up again.
func vanished(err error) bool {
	return errors.Is(err, fs.ErrNotExist) || errors.Is(err, os.ErrClosed) ||
		errors.Is(err, io.EOF) || errors.Is(err, io.ErrUnexpectedEOF)
}

// relocate forgets the locations this reader holds in chunk i's pack and
// looks chunk i up again.
func (br *BlobReader) relocate(i int) (*db.ChunkLoc, error) {
	br.mu.Lock()
	if loc := br.chunks[i].loc; loc != nil {
		p := loc.Pack
		for j := range br.chunks {
			if l := br.chunks[j].loc; l != nil && l.Pack == p {
				br.s.locs.dropLoc(br.chunks[j].digest, l)
				br.chunks[j].loc = nil
			}
		}
	}
	br.mu.Unlock()
	return br.locate(i)
}

// readerSweepState is embedded in Store: when dropDeadReaders last ran
// (unix nanoseconds), and the background sweeper's stop channel.
type readerSweepState struct {
	readerSweep atomic.Int64
	stopSweep   chan struct{}
	sweeperDone chan struct{}
}

// startReaderSweeper runs dropDeadReaders every few seconds, so a process
// that stops reading (an idle daemon) still lets go of removed packs.
func (s *Store) startReaderSweeper() {
	s.stopSweep = make(chan struct{})
	s.sweeperDone = make(chan struct{})
	go func() {
		defer close(s.sweeperDone)
		t := time.NewTicker(2 * readerSweepEvery)
		defer t.Stop()
		for {
			select {
			case <-s.stopSweep:
				return
			case <-t.C:
				s.dropDeadReaders()
			}
		}
	}()
}

func (s *Store) stopReaderSweeper() {
	if s.stopSweep != nil {
		close(s.stopSweep)
		<-s.sweeperDone
		s.stopSweep = nil
	}
}

// DiskUsage is the allocated bytes (what du counts) of the pack files on
// disk: the space the store's data takes, dead bytes a compaction has not
// dropped yet included.
func (s *Store) DiskUsage() (int64, error) {
	files, err := s.packFiles()
	if err != nil {
		return 0, err
	}
	var n int64
	for _, p := range files {
		fi, err := os.Stat(p)
		if err != nil {
			if errors.Is(err, fs.ErrNotExist) {
				continue // compacted away meanwhile
			}
			return 0, fmt.Errorf("pack size: %w", err)
		}
		n += diskUsage(fi)
	}
	return n, nil
}
