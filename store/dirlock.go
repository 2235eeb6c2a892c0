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

	"github.com/casnix/casnix/lockfile"
)

// DirLockFile is the data directory's lock: every process that opens the
// data dir (Open) holds it shared for as long as it has it open, and
// Restore holds it exclusively while it replaces the database and packs.
// So a restore never swaps files under a running `casnix serve` (whose
// acknowledged writes would go to unlinked files), and nothing opens a data
// dir halfway through a restore. It is a flock: the kernel drops it when a
// holder dies.
const DirLockFile = "casnix.lock"

// ErrInUse is returned by Restore for a data dir another casnix process
// has open, and by Open for one a restore is replacing.
var ErrInUse = errors.New("is in use")

// restoreJournal names, once a restore's staged copy is complete and
// verified, the staging directory whose contents replace the data dir's
// database and packs. Its presence is the restore's commit point: whoever
// next takes the data dir (Open, Restore) finishes the swap first.
const restoreJournal = "restore.journal"

// stagePrefix begins the names of restore staging directories.
const stagePrefix = ".restore-"

// errBusy means a non-blocking flock found the lock taken.
var errBusy = errors.New("lock is held")

// lockDir opens dir's DirLockFile and flocks it in mode (unix.LOCK_SH or
// unix.LOCK_EX) without waiting (errBusy). A lock file replaced between
// open and flock (a failed restore removes the one it created) is opened
// again, so two processes never hold locks on different files.
func lockDir(dir string, mode int) (*os.File, error) {
	path := filepath.Join(dir, DirLockFile)
	for {
		f, err := os.OpenFile(path, os.O_RDWR|os.O_CREATE, 0o644)
		if err != nil {
			return nil, fmt.Errorf("open %s: %w", path, err)
		}
		err = unix.Flock(int(f.Fd()), mode|unix.LOCK_NB)
		if err == unix.EINTR {
			f.Close()
			continue
		}
		if err != nil {
			f.Close()
			if err == unix.EWOULDBLOCK {
				return nil, errBusy
			}
			return nil, fmt.Errorf("lock %s: %w", path, err)
		}
		var a, b unix.Stat_t
		if unix.Fstat(int(f.Fd()), &a) == nil && unix.Stat(path, &b) == nil && a.Ino == b.Ino && a.Dev == b.Dev {
			return f, nil
		}
		f.Close()
	}
}

// openDirLock takes the shared data-dir lock for Open, first finishing a
// restore a crash interrupted (its journal is there) and removing staging
// directories a crash left before their journal was written. Holding the
// lock shared means no restore runs, so both are safe.
func openDirLock(ctx context.Context, dir string) (*os.File, error) {
	f, err := lockDir(dir, unix.LOCK_SH)
	if errors.Is(err, errBusy) {
		return nil, fmt.Errorf("data dir %s %w: casnix restore is replacing its contents", dir, ErrInUse)
	}
	if err != nil {
		return nil, err
	}
	if _, err := os.Stat(filepath.Join(dir, restoreJournal)); err == nil {
		// Only other openers finishing the same restore can hold it now.
		if err := lockfile.Wait(ctx, f, unix.LOCK_EX); err != nil {
			f.Close()
			return nil, err
		}
		err := recoverRestore(dir, nil)
		if err == nil {
			err = unix.Flock(int(f.Fd()), unix.LOCK_SH)
		}
		if err != nil {
			f.Close()
			return nil, fmt.Errorf("finish interrupted restore of %s: %w", dir, err)
		}
	}
	if err := removeStages(dir); err != nil {
		f.Close()
		return nil, err
	}
	return f, nil
}

// removeStages removes restore staging directories no journal names: what
// a restore killed before its commit point had copied. Call it holding the
// data-dir lock, with no journal present.
func removeStages(dir string) error {
	ents, err := os.ReadDir(dir)
	if err != nil {
		return fmt.Errorf("list %s: %w", dir, err)
	}
	for _, e := range ents {
		if e.Name() == restoreJournal+".tmp" {
			os.Remove(filepath.Join(dir, e.Name()))
		}
		if e.IsDir() && strings.HasPrefix(e.Name(), stagePrefix) {
			if err := os.RemoveAll(filepath.Join(dir, e.Name())); err != nil {
				return fmt.Errorf("remove abandoned restore %s: %w", e.Name(), err)
			}
		}
	}
	return nil
}

// recoverRestore finishes a restore whose journal is in dir (nothing to do
// without one). Call it holding the data-dir lock exclusively.
func recoverRestore(dir string, step func(string)) error {
	data, err := os.ReadFile(filepath.Join(dir, restoreJournal))
	if errors.Is(err, fs.ErrNotExist) {
		return nil
	}
	if err != nil {
		return fmt.Errorf("read restore journal: %w", err)
	}
	stage := strings.TrimSpace(string(data))
	if !strings.HasPrefix(stage, stagePrefix) || strings.ContainsRune(stage, '/') {
		return fmt.Errorf("restore journal %s names %q, not a staging directory", filepath.Join(dir, restoreJournal), stage)
	}
	return rollForward(dir, stage, step)
}

// rollForward moves a verified staged copy into the data dir. Every step
// can be repeated after a crash at any point: what is still in the staging
// directory has not been moved yet, so the journal's presence and the
// staging directory's contents say what is left to do.
func rollForward(dir, stage string, step func(string)) error {
	if step == nil {
		step = func(string) {}
	}
	st := filepath.Join(dir, stage)
	exists := func(p string) bool { _, err := os.Lstat(p); return err == nil }
	newDB, newPacks := filepath.Join(st, DBFile), filepath.Join(st, PackDir)
	if exists(newDB) {
		// The old database's WAL must not meet the new database.
		for _, n := range []string{DBFile + "-wal", DBFile + "-shm", DBFile + "-journal"} {
			if err := os.Remove(filepath.Join(dir, n)); err != nil && !errors.Is(err, fs.ErrNotExist) {
				return fmt.Errorf("remove old %s: %w", n, err)
			}
		}
		step("old WAL removed")
	}
	if exists(newPacks) {
		if old := filepath.Join(dir, PackDir); exists(old) {
			aside := filepath.Join(st, "old-"+PackDir)
			if err := os.RemoveAll(aside); err != nil {
				return fmt.Errorf("remove old packs: %w", err)
			}
			if err := os.Rename(old, aside); err != nil {
				return fmt.Errorf("move old packs aside: %w", err)
			}
			step("old packs moved aside")
		}
		if err := os.Rename(newPacks, filepath.Join(dir, PackDir)); err != nil {
			return fmt.Errorf("move restored packs into place: %w", err)
		}
		step("packs moved in")
	}
	if exists(newDB) {
		if err := os.Rename(newDB, filepath.Join(dir, DBFile)); err != nil {
			return fmt.Errorf("move restored database into place: %w", err)
		}
		step("database moved in")
	}
	// Each move above is a rename between st and dir, durable only once
	// both directories are synced (POSIX: fsync of one directory makes only
	// its own entries durable), and both must be before the journal goes.
	// dir, where the restored entries land, is synced first: a cut between
	// the two syncs can then at worst leave an entry under both names,
	// which the journal still present finishes; st first could make the
	// removal from st durable while the new name in dir is not, and the
	// restored data would be lost.
	if err := syncPath(dir); err != nil {
		return err
	}
	if exists(st) {
		if err := syncPath(st); err != nil {
			return err
		}
	}
	if err := os.Remove(filepath.Join(dir, restoreJournal)); err != nil && !errors.Is(err, fs.ErrNotExist) {
		return fmt.Errorf("remove restore journal: %w", err)
	}
	if err := syncPath(dir); err != nil {
		return err
	}
	step("journal removed")
	if err := os.RemoveAll(st); err != nil {
		return fmt.Errorf("remove staging dir: %w", err)
	}
	step("staging dir removed")
	return nil
}

// writeJournal writes the restore journal naming stage durably: a temporary
// file, fsynced, renamed into place, the directory fsynced.
func writeJournal(dir, stage string) error {
	tmp := filepath.Join(dir, restoreJournal+".tmp")
	f, err := os.OpenFile(tmp, os.O_WRONLY|os.O_CREATE|os.O_TRUNC, 0o644)
	if err != nil {
		return fmt.Errorf("write restore journal: %w", err)
	}
	_, err = f.WriteString(stage + "\n")
	if err == nil {
		err = f.Sync()
	}
	if cerr := f.Close(); err == nil {
		err = cerr
	}
	if err == nil {
		err = os.Rename(tmp, filepath.Join(dir, restoreJournal))
	}
	if err != nil {
		os.Remove(tmp)
		return fmt.Errorf("write restore journal: %w", err)
	}
	return syncPath(dir)
}
