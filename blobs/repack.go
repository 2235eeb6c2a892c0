package blobs

import (
	"bufio"
	"context"
	"errors"
	"fmt"
	"runtime"

	"github.com/klauspost/compress/zstd"

	"github.com/casnix/casnix/blobs/pack"
	"github.com/casnix/casnix/db"
	"github.com/casnix/casnix/digest"
)

// Repack defaults, chosen on the releases corpus (bench/core.sh; see
// bench/RESULTS.md): klauspost's best level in 16 MiB frames with the
// chunks of one package's versions next to each other stores it in about
// 0.76 x the sum of its per-NAR zstd -3 sizes, where ingest's fastest level
// in 4 MiB frames takes about 1.0 x and the former default ("better", 4
// MiB, ingest order) 0.89 x.
const (
	RepackLevel     = zstd.SpeedBestCompression
	RepackFrameSize = 16 << 20
	// RepackGroupMin is the least a frame holds before EndGroup closes
	// it: a frame then holds one group (a package's versions) or, for
	// small packages, a few, instead of 16 MiB of whatever comes next.
	// On the releases corpus, closing frames at package boundaries cost
	// 0.8% of the space and cut the bytes decoded to read one path from
	// 17 MiB to 5 MiB on average (bench/RESULTS.md).
	RepackGroupMin = 256 << 10
	// repackRoundBytes is how many raw bytes of chunks a repack moves per
	// commit: what a crash can make it redo, and what its new packs hold
	// before their frames are indexed.
	repackRoundBytes = 256 << 20
)

// RepackOptions tune a Repacker. Zero values take the defaults.
type RepackOptions struct {
	Level     zstd.EncoderLevel
	FrameSize int
	// RoundBytes is the raw bytes moved per commit (tests make it small).
	RoundBytes int64
	// Workers is the number of frames compressed at once (default: the
	// CPUs).
	Workers int
	// Idle runs the rewrite as background work that must not slow anyone
	// down: old frames decoded privately instead of through the shared
	// frame cache and read-ahead's decoders, and commits on an ordinary
	// thread (a starved idle-priority thread must not sit on SQLite's
	// write lock).
	Idle bool
	// Priority, if set, is called at the start of each compressor
	// goroutine: sched.Idle for background work (the caller runs Add from
	// such a goroutine too).
	Priority func()
	// Inline compresses each frame on the caller's goroutine, so the
	// repack is one thread: background work runs it in one idle turn
	// (sched.RunIdle), as an idle thread of its own per compressor could
	// hold every one of Go's Ps while the kernel leaves it waiting.
	Inline bool
	// Hold, if set, is called before chunks are looked up and returns the
	// func that lets go: the caller's way of keeping a collection from
	// deleting them until the round that moves them has committed. It is
	// let go and taken again after every commit, so a waiting collection
	// gets in between rounds.
	Hold func() (release func(), err error)
	// Step, if set, is called after each step a crash could follow
	// (a frame written, packs synced, a round committed): the crash tests
	// kill the process there.
	Step func(name string)
}

// RepackStats says what a repack did.
type RepackStats struct {
	ChunksMoved int
	BytesMoved  int64 // raw bytes of the moved chunks
	// Gone counts chunks deleted or moved away by a collection between
	// the rounds of a repack: their copies are left as dead bytes.
	Gone          int
	FramesWritten int
	Rounds        int   // commits
	Written       int64 // compressed bytes of the frames written (with record headers)
}

// Repacker rewrites the chunks of frames ingest wrote (not yet packed)
// into new frames of the space-optimal form, in the order its caller
// names blobs: similar data given in a row compresses together. Chunks
// already in packed frames, and chunks named before, are left where they
// are. Every RoundBytes it makes its new packs durable and then, in one
// transaction, records the new frames (packed) and points the chunks at
// them; the old frames keep their bytes until a compaction drops the packs
// they emptied (Store.Compact). A crash loses at most the round in
// progress, whose bytes are an uncommitted pack tail like any writer's.
//
// Writers only ever add chunks; what deletes or moves them is a
// collection, which Hold keeps out while a round looks chunks up and moves
// them (chunks it swept or moved between rounds are skipped, see Gone).
type Repacker struct {
	s    *Store
	ctx  context.Context
	opts RepackOptions
	enc  *zstd.Encoder

	// the frame being filled
	raw     []byte
	entries []pack.Entry
	// chunks placed in this round and not yet committed (the index still
	// says they are in their old frames)
	seen map[digest.Digest]bool
	// frames compressing, in order
	inflight []chan repackFrame
	// frames written this round
	done     []moved
	roundRaw int64

	out  *packFile
	bw   *bufio.Writer
	outs []*packFile

	held func() // Hold's release, while held

	// the old frame last decoded (Idle: outside the shared cache)
	oldID   int64
	oldData []byte

	st  RepackStats
	err error
}

type repackFrame struct {
	raw     []byte
	comp    []byte
	entries []pack.Entry
}

// NewRepacker starts a repack. Call Add with blobs in the order they
// should be laid out, then Finish.
func (s *Store) NewRepacker(ctx context.Context, o RepackOptions) (*Repacker, error) {
	if s.opts.ReadOnly {
		return nil, fmt.Errorf("repack: %w", db.ErrReadOnly)
	}
	if o.Level == 0 {
		o.Level = RepackLevel
	}
	if o.FrameSize < MaxChunk || o.FrameSize > pack.MaxFrameBytes {
		o.FrameSize = RepackFrameSize
	}
	if o.RoundBytes <= 0 {
		o.RoundBytes = repackRoundBytes
	}
	if o.Workers <= 0 {
		o.Workers = runtime.GOMAXPROCS(0)
	}
	enc, err := newEncoder(o.Level, o.FrameSize, o.Workers)
	if err != nil {
		return nil, fmt.Errorf("repack: %w", err)
	}
	return &Repacker{s: s, ctx: ctx, opts: o, enc: enc, seen: map[digest.Digest]bool{}}, nil
}

// Add lays out the chunks of blobs (in order) that are still in frames
// ingest wrote. Blobs missing from the index are skipped: the caller
// walks trees that a concurrent import may be adding.
func (r *Repacker) Add(blobs []digest.Digest) error {
	if r.err != nil {
		return r.err
	}
	r.err = r.add(blobs)
	return r.err
}

func (r *Repacker) add(blobs []digest.Digest) error {
	var want []digest.Digest
	for len(blobs) > 0 {
		n := min(len(blobs), db.ChunkBatch)
		found, err := r.s.db.BlobsAndLocs(r.ctx, blobs[:n])
		if err != nil {
			return fmt.Errorf("repack: %w", err)
		}
		for _, d := range blobs[:n] {
			bl, ok := found[d]
			if !ok {
				continue
			}
			// newReader checks the row's chunk list as every read does.
			br, err := r.s.newReader(r.ctx, d, bl.Blob, nil)
			if err != nil {
				return fmt.Errorf("repack: %w", err)
			}
			for _, c := range br.chunks {
				want = append(want, c.digest)
			}
		}
		blobs = blobs[n:]
	}
	for len(want) > 0 {
		if err := r.hold(); err != nil {
			return err
		}
		n := min(len(want), db.ChunkBatch)
		batch := want[:n]
		want = want[n:]
		locs, err := r.s.db.Chunks(r.ctx, batch)
		if err != nil {
			return fmt.Errorf("repack: %w", err)
		}
		// Start decoding this batch's old frames on the other cores.
		for _, d := range batch {
			if l, ok := locs[d]; ok && !l.Packed && !r.seen[d] && !r.opts.Idle {
				r.s.prefetch(l.Frame)
			}
		}
		for _, d := range batch {
			l, ok := locs[d]
			if !ok || l.Packed || r.seen[d] {
				continue
			}
			if err := r.chunk(d, l); err != nil {
				return err
			}
		}
	}
	return nil
}

// chunk appends one chunk, read from its old frame and checked against its
// digest, to the frame being filled.
func (r *Repacker) chunk(d digest.Digest, l db.ChunkLoc) error {
	data, release, err := r.oldFrame(l.Frame)
	if err != nil && vanished(err) {
		// A collection between rounds compacted its pack away: the chunk
		// is in a frame of the collection's now, left for the next repack.
		r.st.Gone++
		return nil
	}
	if err != nil {
		return fmt.Errorf("repack: chunk %s: %w", d, err)
	}
	defer release()
	if l.Off < 0 || l.Len <= 0 || l.Off+l.Len > int64(len(data)) || digest.Sum(data[l.Off:l.Off+l.Len]) != d {
		return fmt.Errorf("repack: %w: chunk %s: the bytes the index points at (pack %d, frame at %d, offset %d) hash differently",
			ErrCorrupt, d, l.Pack, l.Frame.Offset, l.Off)
	}
	if len(r.raw)+int(l.Len) > r.opts.FrameSize || len(r.entries) >= pack.MaxChunks {
		if err := r.closeFrame(); err != nil {
			return err
		}
	}
	if r.raw == nil {
		r.raw = getFrameBuf(int64(r.opts.FrameSize))[:0]
	}
	r.raw = append(r.raw, data[l.Off:l.Off+l.Len]...)
	r.entries = append(r.entries, pack.Entry{Digest: d, Len: uint32(l.Len)})
	r.seen[d] = true
	r.roundRaw += l.Len
	return nil
}

// oldFrame returns the decoded data of an old frame and the func to call
// when done with it: from the shared cache, or when Idle, its own copy of
// the last frame it decoded (chunks come in the order ingest wrote them,
// so one is enough).
func (r *Repacker) oldFrame(f db.Frame) ([]byte, func(), error) {
	if !r.opts.Idle {
		e, err := r.s.frame(f)
		if err != nil {
			return nil, nil, err
		}
		return e.data, func() { r.s.cache.release(e) }, nil
	}
	if r.oldData == nil || r.oldID != f.ID {
		if r.oldData != nil {
			putFrameBuf(r.oldData)
			r.oldData = nil
		}
		data, err := r.s.decodeFrame(f)
		if err != nil {
			return nil, nil, err
		}
		r.oldID, r.oldData = f.ID, data
	}
	return r.oldData, func() {}, nil
}

// EndGroup ends a group of similar data (the caller's: the versions of one
// package): the frame being filled is closed if it holds RepackGroupMin,
// so that reading one group does not decode the next one too.
func (r *Repacker) EndGroup() error {
	if r.err != nil {
		return r.err
	}
	if len(r.raw) >= RepackGroupMin {
		r.err = r.closeFrame()
	}
	return r.err
}

// closeFrame hands the frame being filled to a compressor, and commits the
// round once it holds RoundBytes.
func (r *Repacker) closeFrame() error {
	if len(r.entries) == 0 {
		return nil
	}
	fr := repackFrame{raw: r.raw, entries: r.entries}
	r.raw, r.entries = nil, nil
	ch := make(chan repackFrame, 1)
	r.inflight = append(r.inflight, ch)
	compress := func() {
		fr.comp = r.enc.EncodeAll(fr.raw, getBuf(len(fr.raw)+len(fr.raw)/64+64))
		ch <- fr
	}
	if r.opts.Inline {
		compress()
	} else {
		go func() {
			if r.opts.Priority != nil {
				r.opts.Priority()
			}
			compress()
		}()
	}
	// Keep at most Workers frames compressing: each holds a frame of raw
	// bytes and its output.
	for len(r.inflight) > r.opts.Workers {
		if err := r.writeNext(); err != nil {
			return err
		}
	}
	if r.roundRaw >= r.opts.RoundBytes {
		return r.commit()
	}
	return nil
}

// writeNext appends the oldest compressing frame to the output pack.
func (r *Repacker) writeNext() error {
	fr := <-r.inflight[0]
	r.inflight = r.inflight[1:]
	defer putFrameBuf(fr.raw)
	defer putBuf(fr.comp)
	if r.out == nil || r.out.size >= r.s.opts.PackSize {
		if err := r.newOut(); err != nil {
			return err
		}
	}
	o := r.out
	hdr := pack.RecordHeader(fr.entries, len(fr.comp))
	nf := db.Frame{Pack: o.id, Offset: o.size, DataOff: o.size + int64(len(hdr)),
		CLen: int64(len(fr.comp)), RawLen: int64(len(fr.raw)), Packed: true}
	if _, err := r.bw.Write(hdr); err != nil {
		return fmt.Errorf("repack: write pack %d: %w", o.id, err)
	}
	if _, err := r.bw.Write(fr.comp); err != nil {
		return fmt.Errorf("repack: write pack %d: %w", o.id, err)
	}
	o.size += int64(len(hdr) + len(fr.comp))
	m := moved{frame: nf, chunks: make([]db.ChunkInFrame, len(fr.entries))}
	var off int64
	for i, e := range fr.entries {
		m.chunks[i] = db.ChunkInFrame{Digest: e.Digest, Off: off, Len: int64(e.Len)}
		off += int64(e.Len)
	}
	r.done = append(r.done, m)
	r.step("frame written")
	r.st.FramesWritten++
	r.st.Written += int64(len(hdr) + len(fr.comp))
	return nil
}

// newOut starts a new output pack (created, with its header, durable).
func (r *Repacker) newOut() error {
	if r.out != nil {
		if err := r.bw.Flush(); err != nil {
			return fmt.Errorf("repack: write pack %d: %w", r.out.id, err)
		}
	}
	p, err := r.s.newPack(r.ctx)
	if err != nil {
		return err
	}
	r.out = p
	r.outs = append(r.outs, p)
	if _, err := p.f.Seek(p.size, 0); err != nil {
		return fmt.Errorf("repack: seek pack %d: %w", p.id, err)
	}
	if r.bw == nil {
		r.bw = bufio.NewWriterSize(r.s.packWriter(p), 1<<20)
	} else {
		r.bw.Reset(r.s.packWriter(p))
	}
	return nil
}

// commit makes the round's frames durable, then records them and moves
// their chunks in one transaction.
func (r *Repacker) commit() error {
	for len(r.inflight) > 0 {
		if err := r.writeNext(); err != nil {
			return err
		}
	}
	if len(r.done) == 0 {
		return nil
	}
	if err := r.bw.Flush(); err != nil {
		return fmt.Errorf("repack: write pack %d: %w", r.out.id, err)
	}
	for _, o := range r.outs {
		if err := r.s.syncPack(o); err != nil {
			return fmt.Errorf("repack: sync pack %d: %w", o.id, err)
		}
	}
	r.step("packs synced")
	if r.s.remote != nil {
		// The round's packs go to the bucket whole before any chunk points
		// into them: a replica, or a restore after this host is lost, must
		// never find a chunk in a pack the bucket lacks. They are sealed
		// and marked uploaded in the round's transaction; a crash before it
		// leaves an object nothing names (and a local pack without frames,
		// which the next compaction drops).
		for _, o := range r.outs {
			if err := r.s.remote.Put(r.ctx, PackObject(o.id), o.f, o.size); err != nil {
				return fmt.Errorf("repack: upload pack %d: %w", o.id, err)
			}
		}
		r.step("packs uploaded")
	}
	var gone int
	err := r.onOrdinaryThread(func() (err error) {
		gone, err = r.record()
		return err
	})
	if err != nil {
		return fmt.Errorf("repack: %w", err)
	}
	if r.s.remote != nil {
		// Sealed: the next round writes new packs. Their local files count
		// against the cache budget like any uploaded pack's.
		for _, o := range r.outs {
			if fi, err := o.f.Stat(); err == nil {
				r.s.bcache.addLocal(o.id, diskUsage(fi))
			}
			o.f.Close()
		}
		r.out, r.outs = nil, nil
		r.s.bcache.evict()
	}
	for _, m := range r.done {
		r.st.ChunksMoved += len(m.chunks)
		for _, c := range m.chunks {
			r.st.BytesMoved += c.Len
		}
	}
	r.st.ChunksMoved -= gone
	r.st.Gone += gone
	r.st.Rounds++
	r.step("round committed")
	r.done = r.done[:0]
	r.roundRaw = 0
	clear(r.seen)
	// Let a waiting collection in; the chunks still to be placed are
	// looked up again under the next hold only if their batch is new, so
	// those of the current batch may be gone by then (counted in Gone).
	r.release()
	return nil
}

// onOrdinaryThread runs fn on a goroutine of its own when Idle (the
// caller's thread is at idle priority), else on the caller's.
func (r *Repacker) onOrdinaryThread(fn func() error) error {
	if !r.opts.Idle {
		return fn()
	}
	ch := make(chan error, 1)
	go func() { ch <- fn() }()
	return <-ch
}

// record records the round's frames (packed) and points their chunks at
// them, in one transaction, and returns how many of the chunks a
// collection had swept meanwhile.
func (r *Repacker) record() (gone int, err error) {
	err = r.s.db.Write(r.ctx, func(tx *db.Tx) error {
		for _, m := range r.done {
			id, err := tx.InsertFrame(r.ctx, m.frame)
			if err != nil {
				return err
			}
			for _, c := range m.chunks {
				err := tx.MoveChunk(r.ctx, c.Digest, id, c.Off)
				if errors.Is(err, db.ErrNotFound) {
					// Swept by a collection between rounds (looked up
					// under an earlier hold): its copy is dead bytes.
					gone++
					continue
				}
				if err != nil {
					return err
				}
			}
		}
		if r.s.remote != nil {
			for _, o := range r.outs {
				if err := tx.SealPack(r.ctx, o.id); err != nil {
					return err
				}
				if _, err := tx.MarkUploaded(r.ctx, o.id); err != nil {
					return err
				}
			}
		}
		return nil
	})
	if err == nil {
		r.s.locs.clear() // the round's chunks moved (see locCache)
	}
	return gone, err
}

// hold takes the caller's hold unless it is held.
func (r *Repacker) hold() error {
	if r.held != nil || r.opts.Hold == nil {
		return nil
	}
	rel, err := r.opts.Hold()
	if err != nil {
		return fmt.Errorf("repack: %w", err)
	}
	r.held = rel
	return nil
}

// release lets go of the caller's hold if it is held.
func (r *Repacker) release() {
	if r.held != nil {
		r.held()
		r.held = nil
	}
}

func (r *Repacker) step(name string) {
	if r.opts.Step != nil {
		r.opts.Step(name)
	}
}

// Finish commits what is left and hands the new packs to this process's
// next writers (a failed repack closes them instead: their uncommitted
// tails are cut off when they are next taken). It does not remove the old
// packs: Compact does, once nothing points into them.
func (r *Repacker) Finish() (RepackStats, error) {
	err := r.err
	if err == nil {
		err = r.closeFrame()
	}
	if err == nil {
		err = r.commit()
	}
	for len(r.inflight) > 0 {
		fr := <-r.inflight[0]
		r.inflight = r.inflight[1:]
		putFrameBuf(fr.raw)
		putBuf(fr.comp)
	}
	if r.raw != nil {
		putFrameBuf(r.raw)
		r.raw = nil
	}
	if r.oldData != nil {
		putFrameBuf(r.oldData)
		r.oldData = nil
	}
	r.enc.Close()
	r.release()
	if err != nil {
		r.s.poison(r.outs...)
		r.outs = nil
		r.err = err
		return r.st, err
	}
	r.s.release(r.outs...)
	r.outs = nil
	r.err = errors.New("repack: finished")
	return r.st, nil
}
