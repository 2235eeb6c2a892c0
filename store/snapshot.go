package store

import (
	"context"
	"errors"
	"fmt"
	"io/fs"
	"os"
	"path/filepath"

	"github.com/casnix/casnix/db"
)

// OriginFile, in a data dir, is what backups to a bucket keep about it
// (package backupremote): which object holds which pack prefix. Every
// restore removes it before its commit point, since it describes the packs
// being replaced.
const OriginFile = "backup-origin.json"

// Snapshot is what SnapshotFunc gets: a consistent copy of the database and
// where the packs it names end.
type Snapshot struct {
	// DB is the snapshot's database file (a VACUUM INTO copy, fsynced).
	DB string
	// Tails maps every pack the snapshot has frames in to where they end.
	Tails map[int64]db.PackTail
	// Paths is the number of valid paths in the snapshot.
	Paths int
	// PackPath is where a pack of the live data dir is.
	PackPath func(id int64) string
	// FrameEnd looks a frame up in the snapshot (db.DB.FrameEnd).
	FrameEnd func(ctx context.Context, id int64) (pack, end int64, ok bool, err error)
}

// Snapshot takes the snapshot a backup copies, as Backup does: the database
// is copied to dbFile in one read transaction, and fn runs with the GC lock
// held shared and the packs held (no collection sweeps, no compaction
// unlinks a pack), so every pack prefix the snapshot names stays readable
// in the live data dir until fn returns. The snapshot is checked (SQLite's
// structure and foreign-key checks) before fn sees it.
func (s *Store) Snapshot(ctx context.Context, dbFile string, fn func(Snapshot) error) error {
	unlock, err := s.SharedGCLock(ctx)
	if err != nil {
		return err
	}
	defer unlock()
	release, err := s.blobs.HoldPacks(ctx)
	if err != nil {
		return err
	}
	defer release()
	if err := s.db.SnapshotTo(ctx, dbFile); err != nil {
		return err
	}
	snap := Snapshot{DB: dbFile, PackPath: s.blobs.PackPath}
	d, err := db.Open(ctx, dbFile)
	if err != nil {
		return err
	}
	err = d.Check(ctx)
	if err == nil {
		snap.Tails, err = d.PackTails(ctx)
	}
	if err == nil {
		snap.Paths, err = d.PathCount(ctx)
	}
	if err != nil {
		d.Close()
		return fmt.Errorf("snapshot %s: %w", dbFile, err)
	}
	snap.FrameEnd = d.FrameEnd
	err = fn(snap)
	if cerr := d.Close(); err == nil && cerr != nil {
		err = fmt.Errorf("close %s: %w", dbFile, cerr)
	}
	return err
}

// forgetOrigin removes dir's OriginFile, durably.
func forgetOrigin(dir string) error {
	err := os.Remove(filepath.Join(dir, OriginFile))
	if errors.Is(err, fs.ErrNotExist) {
		return nil
	}
	if err != nil {
		return fmt.Errorf("remove %s: %w", OriginFile, err)
	}
	return syncPath(dir)
}
