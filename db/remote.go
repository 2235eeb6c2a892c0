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
	return q.ids(ctx, "uploaded packs", "SELECT id FROM packs WHERE uploaded = 1 ORDER BY id")
}

// ids runs query, which selects one integer column, and returns its values.
func (q q) ids(ctx context.Context, what, query string) ([]int64, error) {
	var out []int64
	err := eachRow(ctx, q, query, func(r *sql.Rows) error {
		var id int64
		if err := r.Scan(&id); err != nil {
			return err
		}
		out = append(out, id)
		return nil
	})
	if err != nil {
		return nil, fmt.Errorf("%s: %w", what, err)
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
	return q.ids(ctx, "dead packs", "SELECT id FROM dead_packs ORDER BY id")
}

// DeadPack is an uploaded pack a compaction dropped from the index, whose
// object is still in the bucket.
type DeadPack struct {
	ID      int64
	Dropped time.Time // when it was dropped (second precision, rounded down)
}

// DeadPackRows lists the dead packs, oldest drop first. A row whose id a
// pack row has (never so: pack ids are not reused) is left out, so that no
// caller deletes the object of a pack the index names.
func (q q) DeadPackRows(ctx context.Context) ([]DeadPack, error) {
	var out []DeadPack
	err := eachRow(ctx, q, `SELECT d.id, d.dropped FROM dead_packs d
		WHERE NOT EXISTS (SELECT 1 FROM packs p WHERE p.id = d.id) ORDER BY d.dropped, d.id`, func(r *sql.Rows) error {
		var p DeadPack
		var dropped int64
		if err := r.Scan(&p.ID, &dropped); err != nil {
			return err
		}
		p.Dropped = time.Unix(dropped, 0)
		out = append(out, p)
		return nil
	})
	if err != nil {
		return nil, fmt.Errorf("dead packs: %w", err)
	}
	return out, nil
}

// DeadPackCount is how many dead packs' objects are still in the bucket.
func (q q) DeadPackCount(ctx context.Context) (int64, error) {
	var n int64
	if err := q.row(ctx, "SELECT count(*) FROM dead_packs").Scan(&n); err != nil {
		return 0, fmt.Errorf("count dead packs: %w", err)
	}
	return n, nil
}

// ForgetDeadPacks removes the dead_packs rows of ids, whose objects are
// gone from the bucket.
func (tx *Tx) ForgetDeadPacks(ctx context.Context, ids []int64) error {
	for _, id := range ids {
		if _, err := tx.exec(ctx, "DELETE FROM dead_packs WHERE id = ?", id); err != nil {
			return fmt.Errorf("forget dead pack %d: %w", id, err)
		}
	}
	return nil
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

// NotInBucket describes what of a database restored from its bucket replica the bucket
// does not hold: the packs with frames that were never uploaded, and the first of their
// frames (see ReplicaPaths). ok is false when every pack with frames was uploaded.
func (q q) NotInBucket(ctx context.Context) (packs []int64, firstFrame int64, ok bool, err error) {
	err = eachRow(ctx, q, `SELECT p.id, min(f.id) FROM packs p JOIN frames f ON f.pack = p.id
		WHERE p.uploaded = 0 GROUP BY p.id ORDER BY p.id`, func(r *sql.Rows) error {
		var id, first int64
		if err := r.Scan(&id, &first); err != nil {
			return err
		}
		if !ok || first < firstFrame {
			firstFrame = first
		}
		ok = true
		packs = append(packs, id)
		return nil
	})
	if err != nil {
		return nil, 0, false, fmt.Errorf("packs not in the bucket: %w", err)
	}
	return packs, firstFrame, ok, nil
}

// PathsFromFrameMark lists the paths committed when frame id mark (or a later one)
// existed: the paths whose data may use that frame or later ones.
func (q q) PathsFromFrameMark(ctx context.Context, mark int64) ([]string, error) {
	return q.strings(ctx, "SELECT name FROM paths WHERE frame_mark >= ? ORDER BY name", mark)
}

// ChunksInPacks counts the chunks whose frames are in packs.
func (q q) ChunksInPacks(ctx context.Context, packs []int64) (int64, error) {
	var total int64
	for _, id := range packs {
		var n int64
		if err := q.row(ctx, "SELECT count(*) FROM chunks c JOIN frames f ON f.id = c.frame WHERE f.pack = ?", id).Scan(&n); err != nil {
			return 0, fmt.Errorf("chunks in pack %d: %w", id, err)
		}
		total += n
	}
	return total, nil
}

// DropPacks deletes the frames and rows of packs no chunk points into any more.
func (tx *Tx) DropPacks(ctx context.Context, packs []int64) error {
	for _, id := range packs {
		if _, err := tx.exec(ctx, "DELETE FROM frames WHERE pack = ?", id); err != nil {
			return fmt.Errorf("drop frames of pack %d: %w", id, err)
		}
		if _, err := tx.exec(ctx, "DELETE FROM packs WHERE id = ?", id); err != nil {
			return fmt.Errorf("drop pack %d: %w", id, err)
		}
	}
	return nil
}

// FirstFrameNotUploaded is the smallest frame id in a pack not uploaded yet (ok false:
// every frame is in an uploaded pack). A path is in the bucket once this is above its
// frame_mark (see ReplicaPaths).
func (q q) FirstFrameNotUploaded(ctx context.Context) (first int64, ok bool, err error) {
	var v sql.NullInt64
	// Per pack through frames_pack: a handful of packs are not uploaded, while frames
	// are many.
	err = q.row(ctx, `SELECT min((SELECT min(f.id) FROM frames f WHERE f.pack = p.id))
		FROM packs p WHERE p.uploaded = 0`).Scan(&v)
	if err != nil {
		return 0, false, fmt.Errorf("first frame not uploaded: %w", err)
	}
	return v.Int64, v.Valid, nil
}

// MaxFrameID is the largest frame id (0: none), the frame_mark a path committed now gets.
func (q q) MaxFrameID(ctx context.Context) (int64, error) {
	var id int64
	if err := q.row(ctx, "SELECT IFNULL(MAX(id), 0) FROM frames").Scan(&id); err != nil {
		return 0, fmt.Errorf("max frame id: %w", err)
	}
	return id, nil
}
