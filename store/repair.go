package store

import (
	"context"
	"errors"
	"fmt"
	"io/fs"
	"os"
	"path/filepath"
	"strings"

	"golang.org/x/sys/unix"

	"github.com/casnix/casnix/blobs"
	"github.com/casnix/casnix/db"
	"github.com/casnix/casnix/digest"
	"github.com/casnix/casnix/lockfile"
)

// ErrUnrepairable is returned by Repair for a database whose tables'
// rows cannot all be read, which neither REINDEX nor a copy mends.
var ErrUnrepairable = errors.New("database damage that repair cannot mend")

// dryRunPrefix begins the names of the database copies dry runs repair.
const dryRunPrefix = ".repair-dry-run-"

// RepairOptions tune Repair.
type RepairOptions struct {
	// DryRun repairs a copy of the database (against the real packs, which
	// repair only reads) and reports what would change; the data dir is
	// left as it was.
	DryRun bool
	// Progress, if set, is called as stages advance ("packs" scanned,
	// "paths" checked).
	Progress func(stage string, done, total int64)
}

// RepairReport is what Repair found and did (or, dry, would do).
type RepairReport struct {
	DryRun bool
	// DB is what SQLite's integrity and foreign-key checks reported
	// before the repair; Reindexed says REINDEX was run (or would be) for
	// damaged index b-trees.
	DB        []string
	Reindexed bool
	// Rebuilt says REINDEX was not enough and the database was replaced by
	// a copy of all its rows (VACUUM INTO).
	Rebuilt bool
	// Index is the chunk index rebuilt from the pack files.
	Index blobs.IndexRepair
	// Dropped lists the store paths deleted, each with why: its own damage,
	// or that it refers to a dropped path. These are the paths to import
	// or copy again.
	Dropped []Damaged
	// RowsDropped counts references, signatures, derivation outputs and
	// realisations dropped because the path they belong to is not there.
	RowsDropped int64
	// Remaining is what the database checks still report afterwards
	// (nothing, unless repair fell short).
	Remaining []string
	// Packs lists pack files whose header was damaged: each is written
	// afresh (see Repair).
	Packs []blobs.PackDamage
}

// Repair makes the store consistent with what its packs really hold, so a
// later Verify is clean, at the price of the store paths whose data is
// gone (a damaged pack header, which holds only the format's magic and
// version, is written afresh: every pack of a database this casnix opens
// is of the version it writes, since a newer casnix's database is refused
// at Open, and the records carry their own checks):
//
//  1. If SQLite's integrity_check fails, REINDEX rebuilds every index from
//     its table. If damage remains (outside the indexes: the free-page
//     list, a page two b-trees claim), the database is copied with VACUUM
//     INTO, which writes every row of every table into a fresh file; if
//     that copy reads every row and checks clean it replaces the database
//     (nothing is lost: it holds every row). If a table's rows cannot all be
//     read, Repair refuses (ErrUnrepairable) rather than keep what it can
//     read: a lost paths row would vanish unnamed, and a lost refs row would
//     leave a path valid without its references, silently breaking the
//     closure invariant Nix relies on. Restoring a backup (`casnix restore`)
//     is the way out then.
//  2. The packs, frames and chunks tables are rebuilt from the pack files'
//     own bytes (blobs.RepairIndex): rows that point at unreadable data go,
//     chunks that blobs need and the packs hold intact get rows back.
//  3. Every path whose tree does not resolve or does not render to its NAR
//     hash is deleted, with every path that refers to it, transitively, so
//     the valid set stays closed under references.
//
// Repair needs the data dir to itself: it takes the data-dir lock
// exclusively (ErrInUse while casnix serve or mount has it open), since
// those processes cache frames by id, path-info and kernel entries that
// repair changes. It also holds the GC run lock and the GC lock exclusively
// (imports hold the latter shared), so no collection or import of this
// process runs beside it. A dry run needs only the GC locks. It never writes
// to a pack file; the bytes of dropped data stay until compaction.
func (s *Store) Repair(ctx context.Context, o RepairOptions) (*RepairReport, error) {
	unlockRun, err := s.lockFile(ctx, gcRunLock, unix.LOCK_EX)
	if err != nil {
		return nil, err
	}
	defer unlockRun()
	unlock, err := s.ExclusiveGCLock(ctx)
	if err != nil {
		return nil, err
	}
	defer unlock()
	if !o.DryRun {
		// Other processes cache what repair changes (frames by id, path-info,
		// a mount's kernel entries), and frame ids lost with damaged rows
		// cannot be known to be kept from reuse: no other process may have
		// the data dir open.
		if err := unix.Flock(int(s.dirLock.Fd()), unix.LOCK_EX|unix.LOCK_NB); err != nil {
			// A failed conversion may have dropped the shared lock
			// (flock(2)): take it again before going on.
			if err2 := lockfile.Wait(ctx, s.dirLock, unix.LOCK_SH); err2 != nil {
				return nil, fmt.Errorf("data dir lock lost: %w", err2)
			}
			if err == unix.EWOULDBLOCK {
				return nil, fmt.Errorf("data dir %s %w by another casnix process: stop casnix serve and mount first", s.dir, ErrInUse)
			}
			return nil, fmt.Errorf("lock data dir: %w", err)
		}
		defer unix.Flock(int(s.dirLock.Fd()), unix.LOCK_SH)
		return s.repair(ctx, true, o.Progress)
	}
	problems, err := s.db.IntegrityCheck(ctx)
	if err != nil {
		return nil, fmt.Errorf("check database: %w", err)
	}
	// A dry run killed before it cleaned up left its copy: no other
	// repair runs now (the GC locks), so any copy is stale.
	stale, _ := filepath.Glob(filepath.Join(s.dir, dryRunPrefix+"*"))
	for _, d := range stale {
		os.RemoveAll(d)
	}
	tmp, err := os.MkdirTemp(s.dir, dryRunPrefix)
	if err != nil {
		return nil, fmt.Errorf("dry run: %w", err)
	}
	defer os.RemoveAll(tmp)
	// VACUUM INTO writes every table afresh, indexes rebuilt: the copy
	// needs no REINDEX even when the original does, so say so from the
	// original's check.
	if err := s.db.SnapshotTo(ctx, filepath.Join(tmp, DBFile)); err != nil {
		if hasIntegrityDamage(problems) {
			// What a real repair would find once REINDEX did not help.
			return nil, fmt.Errorf("%w: rows cannot all be read (%v); restore a backup (casnix restore)", ErrUnrepairable, err)
		}
		return nil, fmt.Errorf("dry run: copy database: %w", err)
	}
	packs, err := filepath.Abs(filepath.Join(s.dir, PackDir))
	if err != nil {
		return nil, err
	}
	if err := os.Symlink(packs, filepath.Join(tmp, PackDir)); err != nil {
		return nil, fmt.Errorf("dry run: %w", err)
	}
	cp, err := Open(ctx, tmp, Options{StoreDir: s.StoreDir, Logger: s.log})
	if err != nil {
		return nil, fmt.Errorf("dry run: open copy: %w", err)
	}
	defer cp.Close()
	rep, err := cp.repair(ctx, false, o.Progress)
	if err != nil {
		return nil, err
	}
	rep.DryRun = true
	rep.DB = problems
	rep.Reindexed = hasIntegrityDamage(problems)
	return rep, nil
}

func hasIntegrityDamage(problems []string) bool {
	for _, p := range problems {
		if strings.HasPrefix(p, "integrity_check:") {
			return true
		}
	}
	return false
}

// repair does Repair's work under its locks; real is false on a dry run's
// copy (nothing outside the copy's database is touched).
func (s *Store) repair(ctx context.Context, real bool, progress func(string, int64, int64)) (*RepairReport, error) {
	rep := &RepairReport{}
	var err error
	rep.DB, err = s.db.IntegrityCheck(ctx)
	if err != nil {
		return nil, fmt.Errorf("check database: %w", err)
	}
	if hasIntegrityDamage(rep.DB) {
		rep.Reindexed = true
		if err := s.db.Reindex(ctx); err != nil {
			s.log.Warn("reindex failed", "err", err)
		}
		after, err := s.db.IntegrityCheck(ctx)
		if err != nil {
			return nil, fmt.Errorf("check database: %w", err)
		}
		if hasIntegrityDamage(after) {
			if !real {
				return nil, fmt.Errorf("%w: %s", ErrUnrepairable, strings.Join(after, "; "))
			}
			if err := s.rebuildDatabase(ctx); err != nil {
				return nil, err
			}
			rep.Rebuilt = true
		}
	}
	if rep.Packs, err = s.blobs.VerifyHeaders(ctx); err != nil {
		return nil, fmt.Errorf("check pack headers: %w", err)
	}
	err = s.db.Write(ctx, func(tx *db.Tx) error {
		ix, err := s.blobs.RepairIndex(ctx, tx, func(done, total int64) {
			if progress != nil {
				progress("packs", done, total)
			}
		})
		if err != nil {
			return err
		}
		rep.Index = *ix
		return nil
	})
	if err != nil {
		return nil, fmt.Errorf("repair chunk index: %w", err)
	}
	if real {
		for _, p := range rep.Packs {
			if err := s.blobs.RewriteHeader(p.Pack); err != nil {
				return nil, err
			}
		}
	}
	// Frames rows went and came: no decoded frame cached under an old id
	// may serve the renders below.
	s.blobs.DropCache()
	damaged, err := s.damagedPaths(ctx, progress)
	if err != nil {
		return nil, err
	}
	nodes, edges, err := s.db.PathGraph(ctx)
	if err != nil {
		return nil, err
	}
	byID := map[int64]string{}
	ids := map[string]int64{}
	for _, n := range nodes {
		byID[n.ID] = n.Name
		ids[n.Name] = n.ID
	}
	referrers := map[string][]string{}
	for _, e := range edges {
		from, to := byID[e[0]], byID[e[1]]
		if from != "" && to != "" && from != to {
			referrers[to] = append(referrers[to], from)
		}
	}
	why := map[string]error{}
	var queue []string
	for name, err := range damaged {
		why[name] = err
		queue = append(queue, name)
	}
	for len(queue) > 0 {
		n := queue[0]
		queue = queue[1:]
		for _, r := range referrers[n] {
			if why[r] == nil {
				why[r] = fmt.Errorf("refers to dropped path %s", s.Full(n))
				queue = append(queue, r)
			}
		}
	}
	err = s.db.Write(ctx, func(tx *db.Tx) error {
		drop := make([]int64, 0, len(why))
		for name := range why {
			drop = append(drop, ids[name])
		}
		if err := tx.DeletePaths(ctx, drop); err != nil {
			return err
		}
		// Rows hanging off rows that are not paths (the paths with
		// references to rows that are not paths were dropped above).
		var err error
		rep.RowsDropped, err = tx.DeleteDanglingRows(ctx)
		return err
	})
	if err != nil {
		return nil, fmt.Errorf("drop damaged paths: %w", err)
	}
	for name, err := range why {
		s.infos.drop(name)
		rep.Dropped = append(rep.Dropped, Damaged{name, err})
	}
	sortDamaged(rep.Dropped)
	if real && len(why) > 0 {
		if err := s.bumpDeletions(); err != nil {
			s.log.Warn("mounts may show dropped paths until their entries expire", "err", err)
		}
	}
	// What the database checks still find is repair's own failure: say
	// so rather than leave it to the next verify.
	rest, err := s.CheckDatabase(ctx)
	if err != nil {
		return nil, err
	}
	rep.Remaining = rest.DB
	for _, d := range rest.Damaged {
		rep.Remaining = append(rep.Remaining, s.Full(d.Name)+": "+d.Err.Error())
	}
	return rep, nil
}

// damagedPaths returns the paths whose rows do not resolve or that do not
// render to their recorded NAR hash and size.
func (s *Store) damagedPaths(ctx context.Context, progress func(string, int64, int64)) (map[string]error, error) {
	damaged := map[string]error{}
	problems, err := s.db.Dangling(ctx, digest.Empty)
	if err != nil {
		return nil, fmt.Errorf("check rows: %w", err)
	}
	for _, p := range problems {
		if p.Path != "" && damaged[p.Path] == nil {
			damaged[p.Path] = fmt.Errorf("%w: %s", blobs.ErrCorrupt, p.What)
		}
	}
	names, err := s.All(ctx)
	if err != nil {
		return nil, err
	}
	for i, name := range names {
		if progress != nil {
			progress("paths", int64(i+1), int64(len(names)))
		}
		if damaged[name] != nil {
			continue
		}
		if err := s.verifyPath(ctx, name); err != nil {
			if ctx.Err() != nil {
				return nil, ctx.Err()
			}
			damaged[name] = err
		}
	}
	return damaged, nil
}

// rebuildFile is where rebuildDatabase writes its copy.
const rebuildFile = DBFile + ".rebuild"

// rebuildDatabase replaces the database by a VACUUM INTO copy of it, if the
// copy reads every row and checks clean. It needs the data dir to itself
// (Repair holds the data-dir lock exclusively) and s to itself: the
// database and blob store are closed and reopened under it.
func (s *Store) rebuildDatabase(ctx context.Context) error {
	path := filepath.Join(s.dir, DBFile)
	tmp := filepath.Join(s.dir, rebuildFile)
	os.Remove(tmp)
	if err := s.db.SnapshotTo(ctx, tmp); err != nil {
		os.Remove(tmp)
		return fmt.Errorf("%w: rows cannot all be read (%v); restore a backup (casnix restore)", ErrUnrepairable, err)
	}
	cp, err := db.Open(ctx, tmp)
	if err != nil {
		os.Remove(tmp)
		return fmt.Errorf("%w: open copy: %v", ErrUnrepairable, err)
	}
	problems, err := cp.IntegrityCheck(ctx)
	cp.Close()
	if err == nil && len(problems) > 0 {
		err = errors.New(strings.Join(problems, "; "))
	}
	if err != nil {
		os.Remove(tmp)
		return fmt.Errorf("%w: copy of the database: %v", ErrUnrepairable, err)
	}
	if err := syncFile(tmp); err != nil {
		return err
	}
	// Closing checkpoints the WAL into the old file; what is left of it
	// must not be applied to the new one.
	if err := errors.Join(s.blobs.Close(), s.db.Close()); err != nil {
		return fmt.Errorf("close database: %w", err)
	}
	for _, ext := range []string{"-wal", "-shm"} {
		if err := os.Remove(path + ext); err != nil && !errors.Is(err, fs.ErrNotExist) {
			return fmt.Errorf("replace database: %w", err)
		}
	}
	if err := os.Rename(tmp, path); err != nil {
		return fmt.Errorf("replace database: %w", err)
	}
	if err := syncPath(s.dir); err != nil {
		return err
	}
	d, err := db.Open(ctx, path)
	if err != nil {
		return fmt.Errorf("reopen database: %w", err)
	}
	b, err := blobs.Open(filepath.Join(s.dir, PackDir), d, s.blobOpts)
	if err != nil {
		d.Close()
		return fmt.Errorf("reopen packs: %w", err)
	}
	s.db, s.blobs = d, b
	return nil
}
