package blobs

import (
	"bufio"
	"context"
	"encoding/binary"
	"errors"
	"fmt"
	"hash"
	"io"
	"sync"

	"github.com/casnix/casnix/blobs/pack"
	"github.com/casnix/casnix/db"
	"github.com/casnix/casnix/digest"
	"github.com/casnix/casnix/sched"
)

// Writer adds blobs. It is not safe for concurrent use; run one per
// ingest. New chunks are grouped into frames and compressed by a pool of
// goroutines while the caller keeps reading its input, so ingest uses every
// core; memory is bounded by Workers+2 frames in flight.
//
// Life cycle: WriteBlob…, Flush (packs durable), Commit(tx) inside the
// caller's transaction, Committed once that transaction committed, then
// Done. After any error the Writer is
// poisoned: every later call returns that error.
type Writer struct {
	s   *Store
	ctx context.Context

	chunker    *Chunker
	firstChunk []byte
	pending    map[digest.Digest]struct{} // chunks written by this Writer
	// known: the store's filter of stored chunks when it was started (nil
	// while none is built); a chunk it has never seen is not asked of
	// the database.
	known *bloom
	blobs map[digest.Digest]db.Blob // blobs to record at Commit

	group    []pack.Entry
	groupRaw []byte

	// pipeline
	work  chan *frameJob
	order chan *frameJob
	wg    sync.WaitGroup // compressors
	done  chan struct{}  // appender finished

	// owned by the appender goroutine until done is closed
	cur     *packFile
	bw      *bufio.Writer
	touched []*packFile
	frames  []pendingFrame
	appErr  error

	// inline: frames are compressed by the caller (idle work), not by
	// compressor goroutines.
	inline bool

	err     error
	flushed bool
	// committed: the caller's transaction that Commit wrote into committed
	// (with SealOnCommit, the touched packs are sealed then).
	committed bool
	// ioErr: a write to or sync of a pack failed, so Done poisons the
	// packs instead of releasing them.
	ioErr bool

	// Stats for the caller.
	NewChunks, NewChunkBytes, DupChunks, DupChunkBytes int64
}

type frameJob struct {
	entries []pack.Entry
	raw     []byte
	rawLen  int64
	out     []byte
	ready   chan struct{}
}

type pendingFrame struct {
	db.Frame
	entries []pack.Entry
}

// NewWriter starts a Writer.
func (s *Store) NewWriter(ctx context.Context) *Writer {
	w := &Writer{
		s: s, ctx: ctx,
		chunker: NewChunker(nil),
		pending: map[digest.Digest]struct{}{},
		blobs:   map[digest.Digest]db.Blob{},
		work:    make(chan *frameJob, 1),
		order:   make(chan *frameJob, s.opts.Workers),
		done:    make(chan struct{}),
	}
	if !s.opts.ReadOnly && !s.db.ReadOnly() {
		// (A read replica's batches make a Writer only to refuse their
		// first path: no filter to build there.)
		w.known = s.known.filter(ctx, s.db)
	}
	// Idle work (sched.WithIdle: the pull-through's ingest) compresses on
	// the caller's thread, which the store put at idle priority, instead of
	// on compressors of its own: idle threads are bounded (sched.RunIdle),
	// since one the kernel leaves waiting keeps one of Go's Ps from every
	// ordinary goroutine of the process.
	w.inline = sched.IsIdle(ctx)
	for i := 0; i < s.opts.Workers && !w.inline; i++ {
		w.wg.Add(1)
		go w.compressor()
	}
	// The appender stays on an ordinary thread even for idle work: it holds
	// the packs it writes (acquire) and is no CPU worth sparing.
	go w.appender()
	return w
}

// testHookCompress, if set, runs before each frame is compressed, on the
// thread that compresses it.
var testHookCompress func()

func (w *Writer) compressor() {
	defer w.wg.Done()
	for j := range w.work {
		w.compress(j)
	}
}

func (w *Writer) compress(j *frameJob) {
	if h := testHookCompress; h != nil {
		h()
	}
	if w.s.opts.Store && w.s.roomToStore() {
		j.out = appendStoredFrame(getBuf(storedFrameMax(len(j.raw))), j.raw)
	} else {
		j.out = w.s.enc.EncodeAll(j.raw, getBuf(len(j.raw)+len(j.raw)/64+64))
	}
	putBuf(j.raw)
	j.raw = nil
	close(j.ready)
}

// appender writes finished frames to packs in submission order.
func (w *Writer) appender() {
	defer close(w.done)
	for j := range w.order {
		<-j.ready
		if w.appErr != nil {
			putBuf(j.out)
			continue // drain
		}
		w.appErr = w.appendFrame(j)
	}
	if w.appErr == nil && w.bw != nil {
		if err := w.bw.Flush(); err != nil {
			w.appErr = fmt.Errorf("write pack %d: %w", w.cur.id, err)
		}
	}
}

func (w *Writer) appendFrame(j *frameJob) error {
	if w.cur != nil && w.cur.size >= w.s.opts.PackSize {
		if err := w.bw.Flush(); err != nil {
			return fmt.Errorf("write pack %d: %w", w.cur.id, err)
		}
		w.cur = nil
	}
	if w.cur == nil {
		p, err := w.s.acquire(w.ctx)
		if err != nil {
			return err
		}
		w.cur = p
		w.touched = append(w.touched, p)
		if _, err := p.f.Seek(p.size, io.SeekStart); err != nil {
			return fmt.Errorf("seek pack %d: %w", p.id, err)
		}
		if w.bw == nil {
			w.bw = bufio.NewWriterSize(w.s.packWriter(p), 1<<20)
		} else {
			w.bw.Reset(w.s.packWriter(p))
		}
	}
	hdr := pack.RecordHeader(j.entries, len(j.out))
	f := pendingFrame{
		Frame: db.Frame{
			Pack: w.cur.id, Offset: w.cur.size, DataOff: w.cur.size + int64(len(hdr)),
			CLen: int64(len(j.out)), RawLen: j.rawLen,
		},
		entries: j.entries,
	}
	if _, err := w.bw.Write(hdr); err != nil {
		return fmt.Errorf("write pack %d: %w", w.cur.id, err)
	}
	if _, err := w.bw.Write(j.out); err != nil {
		return fmt.Errorf("write pack %d: %w", w.cur.id, err)
	}
	w.cur.size += int64(len(hdr) + len(j.out))
	w.frames = append(w.frames, f)
	putBuf(j.out)
	j.out = nil
	return nil
}

// WriteBlob stores the contents read from r (exactly size bytes) and
// returns the blob's digest.
func (w *Writer) WriteBlob(r io.Reader, size int64) (digest.Digest, error) {
	if w.err != nil {
		return digest.Digest{}, w.err
	}
	d, err := w.writeBlob(r, size)
	if err != nil {
		w.err = err
	}
	return d, err
}

func (w *Writer) writeBlob(r io.Reader, size int64) (digest.Digest, error) {
	w.chunker.Reset(io.LimitReader(r, size))
	var (
		list  []byte
		first digest.Digest
		n     int
		total int64
	)
	// Most files are one chunk, whose digest is the blob's: the whole-file
	// hash is only started when a second chunk shows up, from a copy of the
	// first (copying is far cheaper than hashing everything twice).
	w.firstChunk = w.firstChunk[:0]
	var whole hash.Hash
	for {
		c, err := w.chunker.Next()
		if errors.Is(err, io.EOF) {
			break
		}
		if err != nil {
			return digest.Digest{}, fmt.Errorf("read blob: %w", err)
		}
		cd := digest.Sum(c)
		switch n {
		case 0:
			first = cd
			w.firstChunk = append(w.firstChunk, c...)
		case 1:
			whole = digest.New()
			whole.Write(w.firstChunk)
			fallthrough
		default:
			whole.Write(c)
		}
		n++
		total += int64(len(c))
		list = append(list, cd[:]...)
		list = binary.LittleEndian.AppendUint32(list, uint32(len(c)))
		if err := w.addChunk(cd, c); err != nil {
			return digest.Digest{}, err
		}
	}
	if total != size {
		return digest.Digest{}, fmt.Errorf("read blob: %w (got %d of %d bytes)", io.ErrUnexpectedEOF, total, size)
	}
	var bd digest.Digest
	switch n {
	case 0:
		// The empty blob has no chunks; it is recorded so lookups succeed.
		bd, list = digest.Empty, nil
	case 1:
		bd, list = first, nil // the one chunk is the blob
	default:
		bd = digest.FromHash(whole)
	}
	if _, ok := w.blobs[bd]; !ok {
		w.blobs[bd] = db.Blob{Size: size, Chunks: list}
	}
	return bd, nil
}

func (w *Writer) addChunk(d digest.Digest, c []byte) error {
	if _, ok := w.pending[d]; ok {
		w.DupChunks++
		w.DupChunkBytes += int64(len(c))
		return nil
	}
	have := false
	if w.known != nil && !w.known.mayHave(d) {
		w.s.known.skipped.Add(1)
	} else {
		w.s.known.lookups.Add(1)
		var err error
		if have, err = w.s.db.HasChunk(w.ctx, d); err != nil {
			return err
		}
	}
	if have {
		w.DupChunks++
		w.DupChunkBytes += int64(len(c))
		return nil
	}
	w.pending[d] = struct{}{}
	w.NewChunks++
	w.NewChunkBytes += int64(len(c))
	// A frame never exceeds FrameSize, so the zstd window (and with it the
	// encoders' memory) can be exactly FrameSize.
	if len(w.groupRaw)+len(c) > w.s.opts.FrameSize || len(w.group) >= pack.MaxChunks {
		if err := w.submit(); err != nil {
			return err
		}
	}
	if w.groupRaw == nil {
		// Sized up front (grown by append from nil, every group cost a
		// copy per doubling), and only once a chunk needs it: taken
		// ahead, the buffer after a writer's last frame (one writer per
		// ingested path) was never used nor given back, 4 MiB of garbage
		// per path.
		w.groupRaw = getBuf(w.s.opts.FrameSize)
	}
	w.group = append(w.group, pack.Entry{Digest: d, Len: uint32(len(c))})
	w.groupRaw = append(w.groupRaw, c...)
	return nil
}

func (w *Writer) submit() error {
	if len(w.group) == 0 {
		return nil
	}
	j := &frameJob{entries: w.group, raw: w.groupRaw, rawLen: int64(len(w.groupRaw)), ready: make(chan struct{})}
	w.group, w.groupRaw = nil, nil
	if w.inline {
		w.compress(j)
		w.order <- j
		return w.ctx.Err()
	}
	// No ctx cases: compressors and the appender always drain, and a job
	// queued for the appender but never compressed would block it forever.
	w.order <- j
	w.work <- j
	return w.ctx.Err()
}

// EndGroup closes the frame being filled, so that what comes next starts a
// new frame. The store calls it between store paths: a frame then never
// holds two paths' contents, and reading one path (dump, NarFromPath, a
// small file through FUSE) decodes only that path's frames.
func (w *Writer) EndGroup() error {
	if w.err != nil {
		return w.err
	}
	if err := w.submit(); err != nil {
		w.err = err
	}
	return w.err
}

// Flush compresses what is left, writes it, and fsyncs every pack written
// to. After Flush the Writer takes no more blobs.
func (w *Writer) Flush() error {
	if w.flushed {
		return w.err
	}
	w.flushed = true
	if w.err == nil {
		w.err = w.submit()
	}
	putBuf(w.groupRaw) // a group a failed writer did not submit
	w.group, w.groupRaw = nil, nil
	close(w.work)
	close(w.order)
	w.wg.Wait()
	<-w.done
	if w.err != nil {
		return w.err
	}
	if w.appErr != nil {
		w.err = w.appErr
		w.ioErr = true
		return w.err
	}
	for _, p := range w.touched {
		if err := w.s.syncPack(p); err != nil {
			// A failed fsync may have dropped dirty pages: this pack's
			// tail cannot be trusted, so it is never committed, and the
			// fsync is not retried (a second one can succeed with the data
			// gone).
			w.err = fmt.Errorf("sync pack %d: %w", p.id, err)
			w.ioErr = true
			return w.err
		}
	}
	return nil
}

// Commit records the Writer's frames, chunks and blobs in tx. Call it after
// a successful Flush.
func (w *Writer) Commit(ctx context.Context, tx *db.Tx) error {
	if w.err != nil {
		return w.err
	}
	if !w.flushed {
		return errors.New("blobs: Commit before Flush")
	}
	for _, f := range w.frames {
		id, err := tx.InsertFrame(ctx, f.Frame)
		if err != nil {
			return err
		}
		var off int64
		for _, e := range f.entries {
			if err := tx.InsertChunk(ctx, e.Digest, id, off, int64(e.Len)); err != nil {
				return err
			}
			off += int64(e.Len)
		}
	}
	for d, b := range w.blobs {
		if err := tx.InsertBlob(ctx, d, b); err != nil {
			return err
		}
	}
	if w.s.opts.SealOnCommit {
		// The pack files end at their last frame: Flush wrote and synced
		// exactly the frames above, under the packs' flocks, after acquire
		// cut off whatever an earlier writer left past its frames.
		for _, p := range w.touched {
			if err := tx.SealPack(ctx, p.id); err != nil {
				return err
			}
		}
	}
	return nil
}

// Committed records that the transaction Commit wrote into has committed.
func (w *Writer) Committed() {
	w.committed = true
	w.s.known.committed(w.pending)
}

// Done hands the Writer's packs back. Whether or not the transaction
// committed, the packs are trimmed back to their committed frames before
// anyone appends again, so an aborted Writer leaves nothing reachable.
func (w *Writer) Done() {
	if !w.flushed {
		w.err = errors.Join(w.err, errors.New("abandoned"))
		w.Flush()
	}
	switch {
	case w.ioErr:
		w.s.poison(w.touched...)
	case w.committed && w.s.opts.SealOnCommit:
		// Sealed: the uploader's now. Closing drops the flocks.
		w.s.noteWritten(w.touched)
		for _, p := range w.touched {
			p.f.Close()
		}
	default:
		w.s.noteWritten(w.touched)
		w.s.release(w.touched...)
	}
	w.touched = nil
}
