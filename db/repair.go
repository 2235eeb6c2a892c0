package db

import (
	"context"
	"database/sql"
	"fmt"
	"time"

	"github.com/casnix/casnix/digest"
)

// Queries for casnix repair: whole-table listings and the row changes that
// make the chunk index match what the packs really hold.

// Reindex rebuilds every index from its table (SQLite's REINDEX): the
// repair for damaged index b-trees, which integrity_check reports as rows
// missing from an index or index entries without a row.
func (d *DB) Reindex(ctx context.Context) error {
	if d.w == nil {
		return d.readOnly()
	}
	if _, err := d.w.ExecContext(ctx, "REINDEX"); err != nil {
		return fmt.Errorf("reindex: %w", err)
	}
	return nil
}

// ChunkPlace is one chunks row as stored, whether or not its frame exists.
type ChunkPlace struct {
	Digest digest.Digest
	Frame  int64
	Off    int64
	Len    int64
}

// AllFrames lists every frames row.
func (q q) AllFrames(ctx context.Context) ([]Frame, error) {
	var out []Frame
	err := eachRow(ctx, q, "SELECT id, pack, offset, data_off, clen, rawlen FROM frames ORDER BY id", func(r *sql.Rows) error {
		var f Frame
		if err := r.Scan(&f.ID, &f.Pack, &f.Offset, &f.DataOff, &f.CLen, &f.RawLen); err != nil {
			return err
		}
		out = append(out, f)
		return nil
	})
	if err != nil {
		return nil, fmt.Errorf("list frames: %w", err)
	}
	return out, nil
}

// AllChunks lists every chunks row, its frame resolving or not.
func (q q) AllChunks(ctx context.Context) ([]ChunkPlace, error) {
	var out []ChunkPlace
	err := eachRow(ctx, q, "SELECT digest, frame, off, len FROM chunks", func(r *sql.Rows) error {
		var c ChunkPlace
		var b []byte
		if err := r.Scan(&b, &c.Frame, &c.Off, &c.Len); err != nil {
			return err
		}
		d, err := digest.FromBytes(b)
		if err != nil {
			return err
		}
		c.Digest = d
		out = append(out, c)
		return nil
	})
	if err != nil {
		return nil, fmt.Errorf("list chunks: %w", err)
	}
	return out, nil
}

// EachBlobRow calls fn for every blob row with its size and chunk list
// (nil for a single-chunk blob).
func (q q) EachBlobRow(ctx context.Context, fn func(d digest.Digest, size int64, chunks []byte) error) error {
	err := eachRow(ctx, q, "SELECT digest, size, chunks FROM blobs", func(r *sql.Rows) error {
		var b, chunks []byte
		var size int64
		if err := r.Scan(&b, &size, &chunks); err != nil {
			return err
		}
		d, err := digest.FromBytes(b)
		if err != nil {
			return err
		}
		return fn(d, size, chunks)
	})
	if err != nil {
		return fmt.Errorf("list blobs: %w", err)
	}
	return nil
}

// DeleteFrame removes a frames row, first recording its id as used so it
// is never handed out again (migration 0003).
func (q q) DeleteFrame(ctx context.Context, id int64) error {
	if err := q.raiseIDFloor(ctx, "frames"); err != nil {
		return err
	}
	if _, err := q.exec(ctx, "DELETE FROM frames WHERE id = ?", id); err != nil {
		return fmt.Errorf("delete frame %d: %w", id, err)
	}
	return nil
}

// EnsurePack gives pack file id its packs row if it has none. The id is
// the file's own, already handed out once, so the id floor is kept: a row
// for the same file is not a reuse.
func (q q) EnsurePack(ctx context.Context, id int64) (added bool, err error) {
	res, err := q.exec(ctx, "INSERT OR IGNORE INTO packs(id, created) VALUES (?, ?)", id, time.Now().Unix())
	if err != nil {
		return false, fmt.Errorf("insert pack %d: %w", id, err)
	}
	n, err := res.RowsAffected()
	return n > 0, err
}

// DeleteDanglingRows removes rows that hang off a path that is not there:
// references whose referrer or reference is missing, and signatures,
// derivation outputs and realisations of a missing path. It returns how
// many went.
func (q q) DeleteDanglingRows(ctx context.Context) (int64, error) {
	var total int64
	for _, del := range []string{
		`DELETE FROM refs WHERE NOT EXISTS (SELECT 1 FROM paths p WHERE p.id = refs.referrer)
			OR NOT EXISTS (SELECT 1 FROM paths p WHERE p.id = refs.reference)`,
		"DELETE FROM sigs WHERE NOT EXISTS (SELECT 1 FROM paths p WHERE p.id = sigs.path)",
		"DELETE FROM drv_outputs WHERE NOT EXISTS (SELECT 1 FROM paths p WHERE p.id = drv_outputs.drv)",
		"DELETE FROM realisations WHERE NOT EXISTS (SELECT 1 FROM paths p WHERE p.id = realisations.path)",
	} {
		res, err := q.exec(ctx, del)
		if err != nil {
			return total, fmt.Errorf("delete dangling rows: %w", err)
		}
		n, err := res.RowsAffected()
		if err != nil {
			return total, fmt.Errorf("delete dangling rows: %w", err)
		}
		total += n
	}
	return total, nil
}

// RaisePackFloor records pack ids up to id as used, so a pack file with no
// row (its row lost, or an orphan awaiting compaction) never has its id
// handed to a new pack, whose file would then already exist.
func (q q) RaisePackFloor(ctx context.Context, id int64) error {
	if _, err := q.exec(ctx, "UPDATE id_floor SET top = MAX(top, ?) WHERE tbl = 'packs'", id); err != nil {
		return fmt.Errorf("raise packs id floor: %w", err)
	}
	return nil
}
