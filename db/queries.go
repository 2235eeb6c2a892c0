package db

import (
	"context"
	"database/sql"
	"errors"
	"fmt"
	"time"

	"github.com/casnix/casnix/digest"
)

func notFound(err error, what string) error {
	if errors.Is(err, sql.ErrNoRows) {
		return fmt.Errorf("%s: %w", what, ErrNotFound)
	}
	return fmt.Errorf("%s: %w", what, err)
}

// ---- packs, frames, chunks ----

// InsertPack allocates a new pack id.
func (q q) InsertPack(ctx context.Context) (int64, error) {
	res, err := q.exec(ctx, "INSERT INTO packs(id, created) VALUES ("+nextID("packs")+", ?)", time.Now().Unix())
	if err != nil {
		return 0, fmt.Errorf("insert pack: %w", err)
	}
	return res.LastInsertId()
}

// Packs lists all pack ids.
func (q q) Packs(ctx context.Context) ([]int64, error) {
	rows, err := q.query(ctx, "SELECT id FROM packs ORDER BY id")
	if err != nil {
		return nil, fmt.Errorf("list packs: %w", err)
	}
	defer rows.Close()
	var out []int64
	for rows.Next() {
		var id int64
		if err := rows.Scan(&id); err != nil {
			return nil, err
		}
		out = append(out, id)
	}
	return out, rows.Err()
}

// PackEnd is the end offset of the last committed frame in a pack, or 0 if
// the pack has no committed frames.
func (q q) PackEnd(ctx context.Context, pack int64) (int64, error) {
	var end sql.NullInt64
	err := q.row(ctx, "SELECT MAX(data_off+clen) FROM frames WHERE pack = ?", pack).Scan(&end)
	if err != nil {
		return 0, fmt.Errorf("pack %d end: %w", pack, err)
	}
	return end.Int64, nil
}

// Frame is one zstd frame in a pack.
type Frame struct {
	ID      int64
	Pack    int64
	Offset  int64
	DataOff int64
	CLen    int64
	RawLen  int64
	// Packed is set on frames written by repack (the space-optimal form),
	// which repack leaves alone.
	Packed bool
}

// InsertFrame records a frame and returns its id.
func (q q) InsertFrame(ctx context.Context, f Frame) (int64, error) {
	res, err := q.exec(ctx,
		"INSERT INTO frames(id, pack, offset, data_off, clen, rawlen, packed) VALUES ("+nextID("frames")+",?,?,?,?,?,?)",
		f.Pack, f.Offset, f.DataOff, f.CLen, f.RawLen, f.Packed)
	if err != nil {
		return 0, fmt.Errorf("insert frame: %w", err)
	}
	return res.LastInsertId()
}

// InsertChunk records where a chunk lives, unless it is already recorded
// (a concurrent writer may have stored the same chunk first).
func (q q) InsertChunk(ctx context.Context, d digest.Digest, frame, off, length int64) error {
	_, err := q.exec(ctx,
		"INSERT OR IGNORE INTO chunks(digest, frame, off, len) VALUES (?,?,?,?)",
		d[:], frame, off, length)
	if err != nil {
		return fmt.Errorf("insert chunk %s: %w", d, err)
	}
	return nil
}

// ChunkLoc says where a chunk's bytes are.
type ChunkLoc struct {
	Frame
	Off int64 // inside the decompressed frame
	Len int64
}

// ChunkBatch is how many chunk locations Chunks looks up per statement;
// shorter lists are padded so one prepared statement serves every call.
const ChunkBatch = 32

var chunksQuery = func() string {
	q := `SELECT c.digest, f.id, f.pack, f.offset, f.data_off, f.clen, f.rawlen, f.packed, c.off, c.len
		FROM chunks c JOIN frames f ON f.id = c.frame WHERE c.digest IN (?`
	for i := 1; i < ChunkBatch; i++ {
		q += ",?"
	}
	return q + ")"
}()

// Chunks looks up the locations of up to ChunkBatch chunks at once;
// missing chunks are absent from the result.
func (q q) Chunks(ctx context.Context, ds []digest.Digest) (map[digest.Digest]ChunkLoc, error) {
	if len(ds) > ChunkBatch {
		return nil, fmt.Errorf("chunks: %d digests, at most %d per call", len(ds), ChunkBatch)
	}
	args := make([]any, ChunkBatch)
	for i := range args {
		d := ds[min(i, len(ds)-1)]
		args[i] = d[:]
	}
	rows, err := q.query(ctx, chunksQuery, args...)
	if err != nil {
		return nil, fmt.Errorf("chunks: %w", err)
	}
	defer rows.Close()
	out := make(map[digest.Digest]ChunkLoc, len(ds))
	for rows.Next() {
		var c ChunkLoc
		var dg []byte
		if err := rows.Scan(&dg, &c.ID, &c.Pack, &c.Offset, &c.DataOff, &c.CLen, &c.RawLen, &c.Packed, &c.Off, &c.Len); err != nil {
			return nil, fmt.Errorf("chunks: %w", err)
		}
		d, err := digest.FromBytes(dg)
		if err != nil {
			return nil, fmt.Errorf("chunks: %w", err)
		}
		out[d] = c
	}
	return out, rows.Err()
}

// HasChunk reports whether a chunk is stored.
func (q q) HasChunk(ctx context.Context, d digest.Digest) (bool, error) {
	var one int
	err := q.row(ctx, "SELECT 1 FROM chunks WHERE digest = ?", d[:]).Scan(&one)
	if errors.Is(err, sql.ErrNoRows) {
		return false, nil
	}
	if err != nil {
		return false, fmt.Errorf("chunk %s: %w", d, err)
	}
	return true, nil
}

// ChunkInFrame is a chunk as listed by FrameChunks.
type ChunkInFrame struct {
	Digest digest.Digest
	Off    int64
	Len    int64
}

// EachFrame calls fn for every frame in pack order, with the chunks the
// index says it holds (possibly none, for a frame that lost a race to a
// concurrent writer storing the same chunks).
func (q q) EachFrame(ctx context.Context, fn func(Frame, []ChunkInFrame) error) error {
	return q.eachFrame(ctx, "", nil, fn)
}

func (q q) eachFrame(ctx context.Context, where string, args []any, fn func(Frame, []ChunkInFrame) error) error {
	rows, err := q.query(ctx, `SELECT f.id, f.pack, f.offset, f.data_off, f.clen, f.rawlen, f.packed, c.digest, c.off, c.len
		FROM frames f LEFT JOIN chunks c ON c.frame = f.id `+where+` ORDER BY f.pack, f.offset, c.off`, args...)
	if err != nil {
		return fmt.Errorf("list frames: %w", err)
	}
	defer rows.Close()
	var cur Frame
	var chunks []ChunkInFrame
	have := false
	for rows.Next() {
		var f Frame
		var dg []byte
		var off, ln sql.NullInt64
		if err := rows.Scan(&f.ID, &f.Pack, &f.Offset, &f.DataOff, &f.CLen, &f.RawLen, &f.Packed, &dg, &off, &ln); err != nil {
			return fmt.Errorf("list frames: %w", err)
		}
		if have && f.ID != cur.ID {
			if err := fn(cur, chunks); err != nil {
				return err
			}
			chunks = chunks[:0]
		}
		cur, have = f, true
		if dg != nil {
			d, err := digest.FromBytes(dg)
			if err != nil {
				return fmt.Errorf("frame %d: %w", f.ID, err)
			}
			chunks = append(chunks, ChunkInFrame{d, off.Int64, ln.Int64})
		}
	}
	if err := rows.Err(); err != nil {
		return fmt.Errorf("list frames: %w", err)
	}
	if have {
		return fn(cur, chunks)
	}
	return nil
}

// FrameCount is the number of frames (a progress total for verify, without
// the full scan Stats does).
func (q q) FrameCount(ctx context.Context) (int64, error) {
	var n int64
	if err := q.row(ctx, "SELECT COUNT(*) FROM frames").Scan(&n); err != nil {
		return 0, fmt.Errorf("count frames: %w", err)
	}
	return n, nil
}

// ---- blobs and directories ----

// Blob is a file's contents: its size and chunk list (nil: one chunk whose
// digest is the blob's).
type Blob struct {
	Size   int64
	Chunks []byte
}

// InsertBlob records a blob unless present.
func (q q) InsertBlob(ctx context.Context, d digest.Digest, b Blob) error {
	_, err := q.exec(ctx, "INSERT OR IGNORE INTO blobs(digest, size, chunks) VALUES (?,?,?)", d[:], b.Size, b.Chunks)
	if err != nil {
		return fmt.Errorf("insert blob %s: %w", d, err)
	}
	return nil
}

// BlobAndLoc looks up a blob and, when it is a single chunk, that chunk's
// location, in one query: the common case of a small file costs one round
// trip instead of two.
func (q q) BlobAndLoc(ctx context.Context, d digest.Digest) (Blob, *ChunkLoc, error) {
	var b Blob
	var l locScan
	err := q.row(ctx, `SELECT b.size, b.chunks, `+blobLocFrom+` WHERE b.digest = ?`, d[:]).
		Scan(append([]any{&b.Size, &b.Chunks}, l.dest()...)...)
	if err != nil {
		return b, nil, notFound(err, "blob "+d.String())
	}
	return b, l.loc(), nil
}

// blobLocFrom is the columns of a single-chunk blob's chunk location and
// the joins that find them (NULL for a chunked blob), after the blob's
// own columns: what BlobAndLoc and BlobsAndLocs select, scanned by locScan.
const blobLocFrom = `f.id, f.pack, f.offset, f.data_off, f.clen, f.rawlen, c.off, c.len
		FROM blobs b LEFT JOIN chunks c ON b.chunks IS NULL AND c.digest = b.digest
		LEFT JOIN frames f ON f.id = c.frame`

// locScan receives blobLocFrom's columns.
type locScan struct{ id, pack, offset, dataOff, clen, rawlen, off, ln sql.NullInt64 }

func (l *locScan) dest() []any {
	return []any{&l.id, &l.pack, &l.offset, &l.dataOff, &l.clen, &l.rawlen, &l.off, &l.ln}
}

// loc is the scanned location, nil for a chunked blob.
func (l *locScan) loc() *ChunkLoc {
	if !l.id.Valid {
		return nil
	}
	return &ChunkLoc{
		Frame: Frame{ID: l.id.Int64, Pack: l.pack.Int64, Offset: l.offset.Int64, DataOff: l.dataOff.Int64, CLen: l.clen.Int64, RawLen: l.rawlen.Int64},
		Off:   l.off.Int64, Len: l.ln.Int64,
	}
}

// BlobLoc is a blob and, when it is one chunk, that chunk's location.
type BlobLoc struct {
	Blob
	Loc *ChunkLoc
}

var blobsQuery = func() string {
	q := `SELECT b.digest, b.size, b.chunks, ` + blobLocFrom + ` WHERE b.digest IN (?`
	for i := 1; i < ChunkBatch; i++ {
		q += ",?"
	}
	return q + ")"
}()

// BlobsAndLocs is BlobAndLoc for up to ChunkBatch blobs in one query:
// rendering a directory of small files costs one round trip per
// ChunkBatch files, not one per file, so a NAR holds a reader from the
// pool for a few queries instead of thousands. Missing blobs are absent
// from the result.
func (q q) BlobsAndLocs(ctx context.Context, ds []digest.Digest) (map[digest.Digest]BlobLoc, error) {
	if len(ds) == 0 {
		return nil, nil
	}
	if len(ds) > ChunkBatch {
		return nil, fmt.Errorf("blobs: %d digests, at most %d per call", len(ds), ChunkBatch)
	}
	args := make([]any, ChunkBatch)
	for i := range args {
		d := ds[min(i, len(ds)-1)]
		args[i] = d[:]
	}
	rows, err := q.query(ctx, blobsQuery, args...)
	if err != nil {
		return nil, fmt.Errorf("blobs: %w", err)
	}
	defer rows.Close()
	out := make(map[digest.Digest]BlobLoc, len(ds))
	for rows.Next() {
		var dg []byte
		var b Blob
		var l locScan
		if err := rows.Scan(append([]any{&dg, &b.Size, &b.Chunks}, l.dest()...)...); err != nil {
			return nil, fmt.Errorf("blobs: %w", err)
		}
		d, err := digest.FromBytes(dg)
		if err != nil {
			return nil, fmt.Errorf("blobs: %w", err)
		}
		out[d] = BlobLoc{Blob: b, Loc: l.loc()}
	}
	if err := rows.Err(); err != nil {
		return nil, fmt.Errorf("blobs: %w", err)
	}
	return out, nil
}

// InsertDirectory records an encoded Directory unless present.
func (q q) InsertDirectory(ctx context.Context, d digest.Digest, data []byte) error {
	_, err := q.exec(ctx, "INSERT OR IGNORE INTO directories(digest, data) VALUES (?,?)", d[:], data)
	if err != nil {
		return fmt.Errorf("insert directory %s: %w", d, err)
	}
	return nil
}

// Directory returns an encoded Directory.
func (q q) Directory(ctx context.Context, d digest.Digest) ([]byte, error) {
	var data []byte
	err := q.row(ctx, "SELECT data FROM directories WHERE digest = ?", d[:]).Scan(&data)
	if err != nil {
		return nil, notFound(err, "directory "+d.String())
	}
	return data, nil
}

// ---- stats ----

// Stats are whole-store totals.
type Stats struct {
	Paths          int64
	NarBytes       int64 // sum of NAR sizes: the logical size
	Blobs          int64
	BlobBytes      int64 // sum of distinct file contents
	Chunks         int64
	ChunkBytes     int64 // sum of distinct chunk raw sizes
	Frames         int64
	CompressedSize int64 // sum of frame compressed sizes
	Directories    int64
}

// Stats computes totals (a scan: fine for info, not for hot paths).
func (q q) Stats(ctx context.Context) (Stats, error) {
	var s Stats
	err := q.row(ctx, `SELECT
		(SELECT COUNT(*) FROM paths), (SELECT IFNULL(SUM(nar_size),0) FROM paths),
		(SELECT COUNT(*) FROM blobs), (SELECT IFNULL(SUM(size),0) FROM blobs),
		(SELECT COUNT(*) FROM chunks), (SELECT IFNULL(SUM(len),0) FROM chunks),
		(SELECT COUNT(*) FROM frames), (SELECT IFNULL(SUM(clen),0) FROM frames),
		(SELECT COUNT(*) FROM directories)`).
		Scan(&s.Paths, &s.NarBytes, &s.Blobs, &s.BlobBytes, &s.Chunks, &s.ChunkBytes, &s.Frames, &s.CompressedSize, &s.Directories)
	if err != nil {
		return s, fmt.Errorf("stats: %w", err)
	}
	return s, nil
}

// ChunkCount is how many chunks the store holds.
func (q q) ChunkCount(ctx context.Context) (int64, error) {
	var n int64
	if err := q.row(ctx, "SELECT count(*) FROM chunks").Scan(&n); err != nil {
		return 0, fmt.Errorf("count chunks: %w", err)
	}
	return n, nil
}

// ChunkDigestsAfter calls fn with the digest of every chunk in a frame
// numbered above frame, and returns the highest frame number among them
// (frame itself when there are none). Frame ids grow in commit order, so
// calling it again with what it returned reads what was committed since.
func (q q) ChunkDigestsAfter(ctx context.Context, frame int64, fn func(digest.Digest)) (int64, error) {
	rows, err := q.query(ctx, "SELECT digest, frame FROM chunks WHERE frame > ?", frame)
	if err != nil {
		return frame, fmt.Errorf("chunks after frame %d: %w", frame, err)
	}
	defer rows.Close()
	last := frame
	for rows.Next() {
		var dg []byte
		var f int64
		if err := rows.Scan(&dg, &f); err != nil {
			return frame, fmt.Errorf("chunks after frame %d: %w", frame, err)
		}
		d, err := digest.FromBytes(dg)
		if err != nil {
			return frame, fmt.Errorf("chunks after frame %d: %w", frame, err)
		}
		fn(d)
		last = max(last, f)
	}
	if err := rows.Err(); err != nil {
		return frame, fmt.Errorf("chunks after frame %d: %w", frame, err)
	}
	return last, nil
}
