package db

import (
	"context"
	"database/sql"
	"errors"
	"fmt"
	"time"
)

// ---- packs on object storage (migration 0006) ----

// PackState is where a pack stands on its way to the bucket.
type PackState struct {
	ID       int64
	Sealed   bool
	Uploaded bool
	End      int64 // end of its last committed frame (0: none)
}

// PacksToUpload lists the packs not uploaded yet, with their committed ends.
func (q q) PacksToUpload(ctx context.Context) ([]PackState, error) {
	var out []PackState
	err := eachRow(ctx, q, `SELECT p.id, p.sealed, IFNULL((SELECT MAX(f.data_off + f.clen) FROM frames f WHERE f.pack = p.id), 0)
		FROM packs p WHERE p.uploaded = 0 ORDER BY p.id`, func(r *sql.Rows) error {
		var s PackState
		if err := r.Scan(&s.ID, &s.Sealed, &s.End); err != nil {
			return err
		}
		out = append(out, s)
		return nil
	})
	if err != nil {
		return nil, fmt.Errorf("packs to upload: %w", err)
	}
	return out, nil
}

// UploadedPacks lists the ids of the uploaded packs still indexed.
func (q q) UploadedPacks(ctx context.Context) ([]int64, error) {
	var out []int64
	err := eachRow(ctx, q, "SELECT id FROM packs WHERE uploaded = 1 ORDER BY id", func(r *sql.Rows) error {
		var id int64
		if err := r.Scan(&id); err != nil {
			return err
		}
		out = append(out, id)
		return nil
	})
	if err != nil {
		return nil, fmt.Errorf("uploaded packs: %w", err)
	}
	return out, nil
}

// PackSealedState reports whether pack id is sealed and uploaded
// (ErrNotFound: no such pack).
func (q q) PackSealedState(ctx context.Context, id int64) (sealed, uploaded bool, err error) {
	err = q.row(ctx, "SELECT sealed, uploaded FROM packs WHERE id = ?", id).Scan(&sealed, &uploaded)
	if err != nil {
		return false, false, notFound(err, fmt.Sprintf("pack %d", id))
	}
	return sealed, uploaded, nil
}

// SealPack marks pack id sealed: no writer appends to it again.
func (q q) SealPack(ctx context.Context, id int64) error {
	if _, err := q.exec(ctx, "UPDATE packs SET sealed = 1 WHERE id = ?", id); err != nil {
		return fmt.Errorf("seal pack %d: %w", id, err)
	}
	return nil
}

// MarkUploaded records that pack id's object is in the bucket. A pack a
// compaction dropped meanwhile (no row) is recorded as dead instead, so the
// object it left in the bucket is accounted for; ok is false then.
func (q q) MarkUploaded(ctx context.Context, id int64) (ok bool, err error) {
	res, err := q.exec(ctx, "UPDATE packs SET uploaded = 1 WHERE id = ?", id)
	if err != nil {
		return false, fmt.Errorf("mark pack %d uploaded: %w", id, err)
	}
	if n, err := res.RowsAffected(); err != nil {
		return false, fmt.Errorf("mark pack %d uploaded: %w", id, err)
	} else if n == 1 {
		return true, nil
	}
	if _, err := q.exec(ctx, "INSERT OR IGNORE INTO dead_packs(id, dropped) VALUES (?, ?)", id, time.Now().Unix()); err != nil {
		return false, fmt.Errorf("record pack %d dead: %w", id, err)
	}
	return false, nil
}

// DeadPacks lists the uploaded packs dropped from the index (their objects
// are still in the bucket).
func (q q) DeadPacks(ctx context.Context) ([]int64, error) {
	var out []int64
	err := eachRow(ctx, q, "SELECT id FROM dead_packs ORDER BY id", func(r *sql.Rows) error {
		var id int64
		if err := r.Scan(&id); err != nil {
			return err
		}
		out = append(out, id)
		return nil
	})
	if err != nil {
		return nil, fmt.Errorf("dead packs: %w", err)
	}
	return out, nil
}

// Setting reads a data-dir setting ("" and no error when unset).
func (q q) Setting(ctx context.Context, key string) (string, error) {
	var v string
	err := q.row(ctx, "SELECT value FROM settings WHERE key = ?", key).Scan(&v)
	if errors.Is(err, sql.ErrNoRows) {
		return "", nil
	}
	if err != nil {
		return "", fmt.Errorf("setting %s: %w", key, err)
	}
	return v, nil
}

// SetSetting records a data-dir setting.
func (q q) SetSetting(ctx context.Context, key, value string) error {
	if _, err := q.exec(ctx, "INSERT INTO settings(key, value) VALUES (?, ?) ON CONFLICT(key) DO UPDATE SET value = excluded.value", key, value); err != nil {
		return fmt.Errorf("set %s: %w", key, err)
	}
	return nil
}
