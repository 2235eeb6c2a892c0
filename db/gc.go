package db

import (
	"context"
	"database/sql"
	"fmt"
	"time"

	"github.com/casnix/casnix/digest"
)

// Queries for garbage collection and pack compaction: whole-table scans
// that stream, and the deletes and moves only a collection makes.

// nextID is the SQL expression for a new id of table tbl (packs or frames)
// that no row, present or deleted, ever had (see migration 0003).
func nextID(tbl string) string {
	return fmt.Sprintf("(SELECT MAX(IFNULL((SELECT MAX(id) FROM %[1]s), 0), IFNULL((SELECT top FROM id_floor WHERE tbl = '%[1]s'), 0)) + 1)", tbl)
}

// raiseIDFloor records tbl's current largest id as used, before rows of it
// are deleted.
func (q q) raiseIDFloor(ctx context.Context, tbl string) error {
	_, err := q.exec(ctx, "UPDATE id_floor SET top = MAX(top, IFNULL((SELECT MAX(id) FROM "+tbl+"), 0)) WHERE tbl = ?", tbl)
	if err != nil {
		return fmt.Errorf("raise %s id floor: %w", tbl, err)
	}
	return nil
}

// PathNode is a valid path as the collector sees it.
type PathNode struct {
	ID      int64
	Name    string
	Kind    uint8
	Digest  []byte // root directory or file contents; nil for a symlink
	NarSize int64
}

// PathGraph lists every valid path and every reference edge (referrer id,
// reference id).
func (q q) PathGraph(ctx context.Context) ([]PathNode, [][2]int64, error) {
	rows, err := q.query(ctx, "SELECT id, name, kind, digest, nar_size FROM paths")
	if err != nil {
		return nil, nil, fmt.Errorf("list paths: %w", err)
	}
	var nodes []PathNode
	for rows.Next() {
		var n PathNode
		if err := rows.Scan(&n.ID, &n.Name, &n.Kind, &n.Digest, &n.NarSize); err != nil {
			rows.Close()
			return nil, nil, fmt.Errorf("list paths: %w", err)
		}
		nodes = append(nodes, n)
	}
	rows.Close()
	if err := rows.Err(); err != nil {
		return nil, nil, fmt.Errorf("list paths: %w", err)
	}
	rows, err = q.query(ctx, "SELECT referrer, reference FROM refs")
	if err != nil {
		return nil, nil, fmt.Errorf("list references: %w", err)
	}
	defer rows.Close()
	var edges [][2]int64
	for rows.Next() {
		var e [2]int64
		if err := rows.Scan(&e[0], &e[1]); err != nil {
			return nil, nil, fmt.Errorf("list references: %w", err)
		}
		edges = append(edges, e)
	}
	return nodes, edges, rows.Err()
}

// eachRow runs query and calls scan for each row, streaming.
func eachRow(ctx context.Context, q q, query string, scan func(*sql.Rows) error, args ...any) error {
	rows, err := q.query(ctx, query, args...)
	if err != nil {
		return err
	}
	defer rows.Close()
	for rows.Next() {
		if err := scan(rows); err != nil {
			return err
		}
	}
	return rows.Err()
}

// EachDirectoryDigest calls fn with the digest of every stored directory.
func (q q) EachDirectoryDigest(ctx context.Context, fn func(digest.Digest) error) error {
	err := eachRow(ctx, q, "SELECT digest FROM directories", func(r *sql.Rows) error {
		var b []byte
		if err := r.Scan(&b); err != nil {
			return err
		}
		d, err := digest.FromBytes(b)
		if err != nil {
			return err
		}
		return fn(d)
	})
	if err != nil {
		return fmt.Errorf("list directories: %w", err)
	}
	return nil
}

// EachBlob calls fn with every blob's digest and chunk list (nil for a
// single-chunk or empty blob).
func (q q) EachBlob(ctx context.Context, fn func(d digest.Digest, chunks []byte) error) error {
	err := eachRow(ctx, q, "SELECT digest, chunks FROM blobs", func(r *sql.Rows) error {
		var b, chunks []byte
		if err := r.Scan(&b, &chunks); err != nil {
			return err
		}
		d, err := digest.FromBytes(b)
		if err != nil {
			return err
		}
		return fn(d, chunks)
	})
	if err != nil {
		return fmt.Errorf("list blobs: %w", err)
	}
	return nil
}

// ChunkRow is a chunk with the compressed size of its frame, for
// estimating what deleting it frees.
type ChunkRow struct {
	Digest digest.Digest
	Len    int64
	Frame  int64
	CLen   int64 // of the frame
	RawLen int64 // of the frame
}

// EachChunk calls fn for every chunk.
func (q q) EachChunk(ctx context.Context, fn func(ChunkRow) error) error {
	err := eachRow(ctx, q, "SELECT c.digest, c.len, f.id, f.clen, f.rawlen FROM chunks c JOIN frames f ON f.id = c.frame",
		func(r *sql.Rows) error {
			var c ChunkRow
			var b []byte
			if err := r.Scan(&b, &c.Len, &c.Frame, &c.CLen, &c.RawLen); err != nil {
				return err
			}
			d, err := digest.FromBytes(b)
			if err != nil {
				return err
			}
			c.Digest = d
			return fn(c)
		})
	if err != nil {
		return fmt.Errorf("list chunks: %w", err)
	}
	return nil
}

// DeleteRefsFrom removes the references of path id (done for every path
// being deleted before any of them is, since references restrict deletes).
func (q q) DeleteRefsFrom(ctx context.Context, id int64) error {
	if _, err := q.exec(ctx, "DELETE FROM refs WHERE referrer = ?", id); err != nil {
		return fmt.Errorf("delete references of path %d: %w", id, err)
	}
	return nil
}

// DeletePaths removes paths ids and their references: references restrict deletes, so
// every path's outgoing references go first (a referrer of one of them must be among
// them, or the delete fails).
func (q q) DeletePaths(ctx context.Context, ids []int64) error {
	for _, id := range ids {
		if err := q.DeleteRefsFrom(ctx, id); err != nil {
			return err
		}
	}
	for _, id := range ids {
		if err := q.DeletePath(ctx, id); err != nil {
			return err
		}
	}
	return nil
}

// DeletePath removes path id (signatures and outputs go with it).
func (q q) DeletePath(ctx context.Context, id int64) error {
	if _, err := q.exec(ctx, "DELETE FROM paths WHERE id = ?", id); err != nil {
		return fmt.Errorf("delete path %d: %w", id, err)
	}
	return nil
}

// DeleteDirectory, DeleteBlob and DeleteChunk remove one row by digest.
func (q q) DeleteDirectory(ctx context.Context, d digest.Digest) error {
	return q.deleteDigest(ctx, "directories", d)
}

// DeleteBlob removes a blob row.
func (q q) DeleteBlob(ctx context.Context, d digest.Digest) error {
	return q.deleteDigest(ctx, "blobs", d)
}

// DeleteChunk removes a chunk row (its bytes stay in the pack until the
// pack is compacted).
func (q q) DeleteChunk(ctx context.Context, d digest.Digest) error {
	return q.deleteDigest(ctx, "chunks", d)
}

func (q q) deleteDigest(ctx context.Context, tbl string, d digest.Digest) error {
	if _, err := q.exec(ctx, "DELETE FROM "+tbl+" WHERE digest = ?", d[:]); err != nil {
		return fmt.Errorf("delete from %s %s: %w", tbl, d, err)
	}
	return nil
}

// DeleteEmptyFrames removes frames no chunk points into and returns how
// many compressed bytes they held.
func (q q) DeleteEmptyFrames(ctx context.Context) (int64, error) {
	if err := q.raiseIDFloor(ctx, "frames"); err != nil {
		return 0, err
	}
	const empty = "NOT EXISTS (SELECT 1 FROM chunks c WHERE c.frame = frames.id)"
	var n int64
	if err := q.row(ctx, "SELECT IFNULL(SUM(data_off + clen - offset), 0) FROM frames WHERE "+empty).Scan(&n); err != nil {
		return 0, fmt.Errorf("size empty frames: %w", err)
	}
	if _, err := q.exec(ctx, "DELETE FROM frames WHERE "+empty); err != nil {
		return 0, fmt.Errorf("delete empty frames: %w", err)
	}
	return n, nil
}

// PackUse is how much of a pack the index still points into.
type PackUse struct {
	ID        int64
	Sealed    bool // no writer appends to it again (packs on object storage)
	Uploaded  bool
	Frames    int64
	LiveBytes int64 // frame bytes (headers and compressed data), weighted by the share of each frame's raw bytes still indexed
	End       int64 // end of its last frame (0: none)
}

// PackUsage lists every pack with its frame bytes.
func (q q) PackUsage(ctx context.Context) ([]PackUse, error) {
	var out []PackUse
	// A frame's bytes count as live in proportion to the raw bytes of the
	// chunks still pointing into it.
	err := eachRow(ctx, q, `SELECT p.id, p.sealed, p.uploaded, COUNT(f.id),
		IFNULL(SUM((f.data_off + f.clen - f.offset) * IFNULL(c.live, 0) / MAX(f.rawlen, 1)), 0),
		IFNULL(MAX(f.data_off + f.clen), 0)
		FROM packs p LEFT JOIN frames f ON f.pack = p.id
		LEFT JOIN (SELECT frame, SUM(len) AS live FROM chunks GROUP BY frame) c ON c.frame = f.id
		GROUP BY p.id ORDER BY p.id`, func(r *sql.Rows) error {
		var u PackUse
		if err := r.Scan(&u.ID, &u.Sealed, &u.Uploaded, &u.Frames, &u.LiveBytes, &u.End); err != nil {
			return err
		}
		out = append(out, u)
		return nil
	})
	if err != nil {
		return nil, fmt.Errorf("pack usage: %w", err)
	}
	return out, nil
}

// PackFrames calls fn for every frame of one pack, in order, with its
// chunks (EachFrame for a single pack).
func (q q) PackFrames(ctx context.Context, pack int64, fn func(Frame, []ChunkInFrame) error) error {
	return q.eachFrame(ctx, "WHERE f.pack = ?", []any{pack}, fn)
}

// PackChunkCount is the number of chunks indexed in pack.
func (q q) PackChunkCount(ctx context.Context, pack int64) (int64, error) {
	var n int64
	err := q.row(ctx, "SELECT COUNT(*) FROM chunks c JOIN frames f ON f.id = c.frame WHERE f.pack = ?", pack).Scan(&n)
	if err != nil {
		return 0, fmt.Errorf("count chunks of pack %d: %w", pack, err)
	}
	return n, nil
}

// MoveChunk points a chunk at a new frame and offset.
func (q q) MoveChunk(ctx context.Context, d digest.Digest, frame, off int64) error {
	res, err := q.exec(ctx, "UPDATE chunks SET frame = ?, off = ? WHERE digest = ?", frame, off, d[:])
	if err != nil {
		return fmt.Errorf("move chunk %s: %w", d, err)
	}
	if n, err := res.RowsAffected(); err != nil || n != 1 {
		return fmt.Errorf("move chunk %s: %w", d, ErrNotFound)
	}
	return nil
}

// DropPack removes pack id and its frames from the index. It fails (foreign
// key) if a chunk still points into the pack.
func (q q) DropPack(ctx context.Context, id int64) error {
	if err := q.raiseIDFloor(ctx, "frames"); err != nil {
		return err
	}
	if err := q.raiseIDFloor(ctx, "packs"); err != nil {
		return err
	}
	// An uploaded pack's object stays in the bucket: remember it (a later
	// step deletes it once no metadata snapshot names it).
	if _, err := q.exec(ctx, "INSERT OR IGNORE INTO dead_packs(id, dropped) SELECT id, ? FROM packs WHERE id = ? AND uploaded = 1", time.Now().Unix(), id); err != nil {
		return fmt.Errorf("record pack %d dead: %w", id, err)
	}
	if _, err := q.exec(ctx, "DELETE FROM frames WHERE pack = ?", id); err != nil {
		return fmt.Errorf("drop frames of pack %d: %w", id, err)
	}
	if _, err := q.exec(ctx, "DELETE FROM packs WHERE id = ?", id); err != nil {
		return fmt.Errorf("drop pack %d: %w", id, err)
	}
	return nil
}

// UnpackedBytes is the raw size of the frames ingest wrote that no repack
// has rewritten yet (with their dead chunks: what a repack may find to do).
func (q q) UnpackedBytes(ctx context.Context) (int64, error) {
	var n int64
	if err := q.row(ctx, "SELECT IFNULL(SUM(rawlen), 0) FROM frames WHERE packed = 0").Scan(&n); err != nil {
		return 0, fmt.Errorf("unpacked bytes: %w", err)
	}
	return n, nil
}
