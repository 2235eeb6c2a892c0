package db

import (
	"context"
	"database/sql"
	"errors"
	"fmt"
	"os"
)

// SnapshotTo writes a consistent copy of the database to path (which must
// not exist) with VACUUM INTO: one read transaction, so the copy holds
// exactly the commits made before it began, while writers go on beside it
// (WAL). It runs on a connection of its own, so neither the writer nor the
// reader pool is held for its duration. The copy is fsynced.
func (d *DB) SnapshotTo(ctx context.Context, path string) error {
	c, err := sql.Open("sqlite", dsn(d.path, false))
	if err != nil {
		return fmt.Errorf("open database %s: %w", d.path, err)
	}
	defer c.Close()
	c.SetMaxOpenConns(1)
	if _, err := c.ExecContext(ctx, "VACUUM INTO ?", path); err != nil {
		return fmt.Errorf("snapshot database into %s: %w", path, err)
	}
	f, err := os.OpenFile(path, os.O_RDWR, 0)
	if err != nil {
		return fmt.Errorf("open snapshot: %w", err)
	}
	defer f.Close()
	if err := f.Sync(); err != nil {
		return fmt.Errorf("sync snapshot %s: %w", path, err)
	}
	return nil
}

// PackEnds maps every pack holding committed frames to the end offset of
// its last frame: the prefix of the pack file this database refers to.
func (d *DB) PackEnds(ctx context.Context) (map[int64]int64, error) {
	rows, err := d.r.QueryContext(ctx, "SELECT pack, MAX(data_off+clen) FROM frames GROUP BY pack")
	if err != nil {
		return nil, fmt.Errorf("pack ends: %w", err)
	}
	defer rows.Close()
	out := map[int64]int64{}
	for rows.Next() {
		var id, end int64
		if err := rows.Scan(&id, &end); err != nil {
			return nil, fmt.Errorf("pack ends: %w", err)
		}
		out[id] = end
	}
	return out, rows.Err()
}

// Check runs SQLite's structural check (quick_check) and the foreign-key
// check; it returns an error describing the first problem found.
func (d *DB) Check(ctx context.Context) error {
	var res string
	if err := d.r.QueryRowContext(ctx, "PRAGMA quick_check(1)").Scan(&res); err != nil {
		return fmt.Errorf("database check: %w", err)
	}
	if res != "ok" {
		return fmt.Errorf("database check: %s", res)
	}
	rows, err := d.r.QueryContext(ctx, "PRAGMA foreign_key_check")
	if err != nil {
		return fmt.Errorf("foreign key check: %w", err)
	}
	defer rows.Close()
	if rows.Next() {
		var table string
		var rowid sql.NullInt64
		var parent string
		var fk int64
		if err := rows.Scan(&table, &rowid, &parent, &fk); err != nil {
			return fmt.Errorf("foreign key check: %w", err)
		}
		return fmt.Errorf("database check: row %d of %s refers to a missing row of %s", rowid.Int64, table, parent)
	}
	return rows.Err()
}

// PackTail is where a pack's committed frames end: the end offset of its
// last frame and that frame's id. Frame ids are never reused and a pack's
// bytes below a frame's end are never rewritten while the frame exists, so
// (pack, tail frame) names one exact prefix of a pack file for the life of
// a data dir, even across collections that drop a pack's last frames (its
// tail is then trimmed and written anew).
type PackTail struct {
	End   int64
	Frame int64
}

// PackTails maps every pack holding committed frames to its tail.
func (d *DB) PackTails(ctx context.Context) (map[int64]PackTail, error) {
	// SQLite takes the bare column id from the row MAX picked.
	rows, err := d.r.QueryContext(ctx, "SELECT pack, id, MAX(data_off+clen) FROM frames GROUP BY pack")
	if err != nil {
		return nil, fmt.Errorf("pack tails: %w", err)
	}
	defer rows.Close()
	out := map[int64]PackTail{}
	for rows.Next() {
		var id int64
		var t PackTail
		if err := rows.Scan(&id, &t.Frame, &t.End); err != nil {
			return nil, fmt.Errorf("pack tails: %w", err)
		}
		out[id] = t
	}
	return out, rows.Err()
}

// PathCount is the number of valid paths.
func (d *DB) PathCount(ctx context.Context) (int, error) {
	var n int
	if err := d.r.QueryRowContext(ctx, "SELECT COUNT(*) FROM paths").Scan(&n); err != nil {
		return 0, fmt.Errorf("count paths: %w", err)
	}
	return n, nil
}

// FrameEnd returns the pack frame id is in and the offset where it ends; ok
// is false when no frame has that id.
func (d *DB) FrameEnd(ctx context.Context, id int64) (pack, end int64, ok bool, err error) {
	err = d.r.QueryRowContext(ctx, "SELECT pack, data_off+clen FROM frames WHERE id = ?", id).Scan(&pack, &end)
	if errors.Is(err, sql.ErrNoRows) {
		return 0, 0, false, nil
	}
	if err != nil {
		return 0, 0, false, fmt.Errorf("frame %d: %w", id, err)
	}
	return pack, end, true, nil
}
