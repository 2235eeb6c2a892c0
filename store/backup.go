package store

import (
	"context"
	"errors"
	"fmt"
	"io"
	"io/fs"
	"os"
	"path/filepath"
	"sort"
	"strings"
	"time"

	"golang.org/x/sys/unix"

	"github.com/casnix/casnix/blobs"
	"github.com/casnix/casnix/db"
)

// ErrNotEmpty is returned by Backup and Restore for a target directory
// that already holds something.
var ErrNotEmpty = errors.New("is not empty")

// CopyOptions tune Backup and Restore.
type CopyOptions struct {
	// Quick limits the check of the copy to the database structure, every
	// frame record (CRC-32C, zstd checksum) and every chunk hash; without
	// it every path's NAR is also re-rendered and compared with its
	// path-info, as `casnix verify` does.
	Quick bool
	// Force lets Restore replace a data dir that is not empty.
	Force bool
	// Step, if set, is called by Restore after each step it takes (a pack
	// staged, verify progress, each move of the swap): tests stop the
	// process there to check that every crash point is recoverable.
	Step func(name string)
}

// CopyReport is what Backup and Restore did.
type CopyReport struct {
	Paths     int
	Packs     int
	DBBytes   int64
	PackBytes int64
	Copy      time.Duration // snapshot, copy and fsync
	Verify    time.Duration
}

// Bytes is the size of the copy.
func (r *CopyReport) Bytes() int64 { return r.DBBytes + r.PackBytes }

// Backup writes a consistent copy of the data dir to dst (absent or an
// empty directory) while other processes keep importing and serving: the
// database is snapshotted in one read transaction (VACUUM INTO), and of
// each pack only the prefix that snapshot refers to is copied. Packs are
// append-only, so that prefix is stable; the GC lock, held shared for the
// whole copy, keeps a collection from sweeping, and the pack hold
// (blobs.HoldPacks) keeps a compaction from unlinking a pack the snapshot
// names (it moves the chunks in the index and unlinks the file after the
// copy). Everything is fsynced (packs before the database that names them),
// then the copy is opened as a data dir and verified. On failure dst is
// left as it was found.
func (s *Store) Backup(ctx context.Context, dst string, opts CopyOptions) (rep *CopyReport, err error) {
	start := time.Now()
	if s.blobs.Remote() {
		// It copies the local pack files, and an uploaded pack's may have
		// been evicted to the bucket.
		return nil, fmt.Errorf("backup: %w", blobs.ErrRemoteUnsupported)
	}
	created, nonEmpty, err := inspectTarget(dst)
	if err != nil {
		return nil, err
	}
	if nonEmpty {
		return nil, fmt.Errorf("backup target %s %w", dst, ErrNotEmpty)
	}
	defer func() {
		if err != nil {
			undoTarget(dst, created)
		}
	}()
	if err := os.MkdirAll(dst, 0o755); err != nil {
		return nil, fmt.Errorf("create backup dir: %w", err)
	}
	// The backup's own entry in its parent must be durable before the
	// backup is acknowledged (TestTorture caught a cut that lost it).
	if err := syncPath(filepath.Dir(filepath.Clean(dst))); err != nil {
		return nil, err
	}
	rep, err = s.backupLocked(ctx, dst)
	if err != nil {
		return nil, err
	}
	rep.Copy = time.Since(start)
	vstart := time.Now()
	if rep.Paths, err = verifyDir(ctx, dst, opts.Quick, nil); err != nil {
		return nil, fmt.Errorf("verify backup: %w", err)
	}
	rep.Verify = time.Since(vstart)
	return rep, nil
}

func (s *Store) backupLocked(ctx context.Context, dst string) (*CopyReport, error) {
	unlock, err := s.SharedGCLock(ctx)
	if err != nil {
		return nil, err
	}
	defer unlock()
	// The GC lock keeps sweeps out, not compactions (they run after the
	// sweep, without it): holding the packs keeps a compaction from
	// unlinking a pack the snapshot below still names.
	release, err := s.blobs.HoldPacks(ctx)
	if err != nil {
		return nil, err
	}
	defer release()
	partial := filepath.Join(dst, DBFile+".partial")
	if err := s.db.SnapshotTo(ctx, partial); err != nil {
		return nil, err
	}
	rep, err := copyPacks(ctx, partial, filepath.Join(s.dir, PackDir), filepath.Join(dst, PackDir), nil)
	if err != nil {
		return nil, err
	}
	// The database goes in place last, after the packs it names are durable.
	if err := syncFile(partial); err != nil {
		return nil, err
	}
	if err := os.Rename(partial, filepath.Join(dst, DBFile)); err != nil {
		return nil, fmt.Errorf("install backup database: %w", err)
	}
	if err := syncPath(dst); err != nil {
		return nil, err
	}
	return rep, nil
}

// Restore copies the data dir or backup src into the data dir dst and
// verifies it there before it takes dst's place. dst must be absent or
// empty unless opts.Force; with Force its database and packs are replaced.
// Restore holds dst's data-dir lock exclusively throughout, so it refuses
// (ErrInUse) while any casnix process has dst open, and nothing opens dst
// until it is done. The copy is staged in a directory inside dst; once it is
// complete and verified, a journal naming it is written, and the swap that
// follows is finished by whoever next takes the lock (Open, Restore) if a
// crash interrupts it. So after a crash at any point dst holds either its
// old contents or the restored ones, complete, with no manual step.
func Restore(ctx context.Context, src, dst string, opts CopyOptions) (*CopyReport, error) {
	srcDB := filepath.Join(src, DBFile)
	if _, err := os.Stat(srcDB); err != nil {
		return nil, fmt.Errorf("%s is not a casnix data dir or backup: %w", src, err)
	}
	if err := CheckSchema(ctx, srcDB); err != nil {
		return nil, fmt.Errorf("restore from %s: %w", src, err)
	}
	return RestoreWith(ctx, dst, opts, func(ctx context.Context, stage string, step func(string)) (*CopyReport, error) {
		for _, name := range []string{DBFile, DBFile + "-wal"} {
			if _, err := copyFile(filepath.Join(src, name), filepath.Join(stage, name), -1); err != nil && !errors.Is(err, fs.ErrNotExist) {
				return nil, err
			}
		}
		step("database staged")
		return copyPacks(ctx, filepath.Join(stage, DBFile), filepath.Join(src, PackDir), filepath.Join(stage, PackDir), step)
	})
}

// CheckSchema returns an error unless the database file dbFile holds a
// casnix schema this binary can open.
func CheckSchema(ctx context.Context, dbFile string) error {
	v, err := db.SchemaVersion(ctx, dbFile)
	if err != nil {
		return err
	}
	latest, err := db.LatestVersion()
	if err != nil {
		return err
	}
	switch {
	case v == 0:
		return fmt.Errorf("%s holds no casnix schema", dbFile)
	case v > latest:
		return fmt.Errorf("%w: schema version %d, this binary knows up to %d", db.ErrSchemaTooNew, v, latest)
	}
	return nil
}

// StageFunc fills the empty staging directory stage with a data dir's
// database (DBFile) and packs (PackDir), durably, and reports what it
// copied. It calls step after each step it takes.
type StageFunc func(ctx context.Context, stage string, step func(string)) (*CopyReport, error)

// RestoreWith is Restore from whatever fill stages: a directory (Restore)
// or a bucket (package backupremote). Everything after the staging (the
// lock, the checks of dst, the verify, the journaled swap) is Restore's.
func RestoreWith(ctx context.Context, dst string, opts CopyOptions, fill StageFunc) (rep *CopyReport, err error) {
	start := time.Now()
	step := opts.Step
	if step == nil {
		step = func(string) {}
	}
	created, _, err := inspectTarget(dst)
	if err != nil {
		return nil, err
	}
	if err := os.MkdirAll(dst, 0o755); err != nil {
		return nil, fmt.Errorf("create data dir: %w", err)
	}
	_, statErr := os.Stat(filepath.Join(dst, DirLockFile))
	hadLock := statErr == nil
	lock, err := lockDir(dst, unix.LOCK_EX)
	if errors.Is(err, errBusy) {
		return nil, fmt.Errorf("data dir %s %w by another casnix process: stop casnix serve (and every other casnix using it) first", dst, ErrInUse)
	}
	if err != nil {
		return nil, err
	}
	var committed bool
	defer func() {
		if err != nil && !committed {
			if created {
				os.RemoveAll(dst)
			} else if !hadLock && !dataDirUsed(dst) {
				os.Remove(filepath.Join(dst, DirLockFile))
			}
		}
		lock.Close()
	}()
	// A restore a crash interrupted is finished first, and what one killed
	// before its commit point staged is dropped.
	if err := recoverRestore(dst, nil); err != nil {
		return nil, fmt.Errorf("finish interrupted restore of %s: %w", dst, err)
	}
	if err := removeStages(dst); err != nil {
		return nil, err
	}
	if dataDirUsed(dst) && !opts.Force {
		return nil, fmt.Errorf("data dir %s %w (use --force to replace its contents)", dst, ErrNotEmpty)
	}
	stage, err := os.MkdirTemp(dst, stagePrefix)
	if err != nil {
		return nil, fmt.Errorf("create staging dir: %w", err)
	}
	defer func() {
		if !committed {
			os.RemoveAll(stage)
		}
	}()
	rep, err = fill(ctx, stage, step)
	if err != nil {
		return nil, err
	}
	if err := syncFile(filepath.Join(stage, DBFile)); err != nil {
		return nil, err
	}
	rep.Copy = time.Since(start)
	vstart := time.Now()
	if rep.Paths, err = verifyDir(ctx, stage, opts.Quick, step); err != nil {
		return nil, fmt.Errorf("verify restored data: %w", err)
	}
	rep.Verify = time.Since(vstart)
	// Opening the copy to verify it checkpointed its WAL into the database
	// file; only that file moves in (a WAL left beside it would be lost).
	if fi, err := os.Stat(filepath.Join(stage, DBFile+"-wal")); err == nil && fi.Size() > 0 {
		return nil, fmt.Errorf("staged database %s still has a write-ahead log", filepath.Join(stage, DBFile))
	}
	if err := syncFile(filepath.Join(stage, DBFile)); err != nil {
		return nil, err
	}
	if err := syncPath(stage); err != nil {
		return nil, err
	}
	step("verified")
	// What a bucket backup remembers of dst's packs is about the packs
	// being replaced: forgotten before the commit point, so a later bucket
	// backup of the restored data never takes those objects for its own.
	if err := forgetOrigin(dst); err != nil {
		return nil, err
	}
	// The commit point: from here on the restored data replaces dst's,
	// now or, after a crash, at the next Open or Restore.
	if err := writeJournal(dst, filepath.Base(stage)); err != nil {
		return nil, err
	}
	committed = true
	step("journal written")
	if err := rollForward(dst, filepath.Base(stage), step); err != nil {
		return nil, fmt.Errorf("move restored data into place (the next open of %s finishes it): %w", dst, err)
	}
	return rep, nil
}

// dataDirUsed reports whether dir holds anything but its lock file and
// restore staging directories: the contents a restore would replace.
func dataDirUsed(dir string) bool {
	ents, err := os.ReadDir(dir)
	if err != nil {
		return false
	}
	for _, e := range ents {
		if e.Name() != DirLockFile && !strings.HasPrefix(e.Name(), stagePrefix) {
			return true
		}
	}
	return false
}

// inspectTarget reports whether dir is absent (and will be created) or a
// directory that is not empty.
func inspectTarget(dir string) (absent, nonEmpty bool, err error) {
	f, err := os.Open(dir)
	if errors.Is(err, fs.ErrNotExist) {
		return true, false, nil
	}
	if err != nil {
		return false, false, fmt.Errorf("open %s: %w", dir, err)
	}
	defer f.Close()
	names, err := f.Readdirnames(1)
	if err != nil && err != io.EOF {
		return false, false, fmt.Errorf("read %s: %w", dir, err)
	}
	return false, len(names) > 0, nil
}

// undoTarget removes what a failed Backup wrote into dst, which was empty
// or absent before.
func undoTarget(dst string, created bool) {
	if created {
		os.RemoveAll(dst)
		return
	}
	entries, _ := os.ReadDir(dst)
	for _, e := range entries {
		os.RemoveAll(filepath.Join(dst, e.Name()))
	}
}

// copyPacks copies, for every pack the database at dbFile has frames in,
// the prefix of the pack up to the end of its last frame from srcDir to
// dstDir (pack directory layout), fsyncing files and directories. The
// database is checked first, so a damaged one fails here, not halfway.
func copyPacks(ctx context.Context, dbFile, srcDir, dstDir string, step func(string)) (*CopyReport, error) {
	d, err := db.Open(ctx, dbFile)
	if err != nil {
		return nil, err
	}
	if err := d.Check(ctx); err != nil {
		d.Close()
		return nil, err
	}
	ends, err := d.PackEnds(ctx)
	if cerr := d.Close(); err == nil && cerr != nil {
		err = fmt.Errorf("close %s: %w", dbFile, cerr)
	}
	if err != nil {
		return nil, err
	}
	st, err := os.Stat(dbFile)
	if err != nil {
		return nil, err
	}
	rep := &CopyReport{Packs: len(ends), DBBytes: st.Size()}
	ids := make([]int64, 0, len(ends))
	for id := range ends {
		ids = append(ids, id)
	}
	sort.Slice(ids, func(i, j int) bool { return ids[i] < ids[j] })
	dirs := map[string]bool{dstDir: true}
	if err := os.MkdirAll(dstDir, 0o755); err != nil {
		return nil, fmt.Errorf("create pack dir: %w", err)
	}
	for _, id := range ids {
		if err := ctx.Err(); err != nil {
			return nil, err
		}
		to := blobs.PackFile(dstDir, id)
		if !dirs[filepath.Dir(to)] {
			if err := os.MkdirAll(filepath.Dir(to), 0o755); err != nil {
				return nil, fmt.Errorf("create pack dir: %w", err)
			}
			dirs[filepath.Dir(to)] = true
		}
		n, err := copyFile(blobs.PackFile(srcDir, id), to, ends[id])
		if err != nil {
			return nil, fmt.Errorf("pack %d: %w", id, err)
		}
		rep.PackBytes += n
		if step != nil {
			step(fmt.Sprintf("pack %d staged", id))
		}
	}
	sorted := make([]string, 0, len(dirs))
	for d := range dirs {
		sorted = append(sorted, d)
	}
	// Deepest first: a directory's entry in its parent is synced after it.
	sort.Slice(sorted, func(i, j int) bool { return strings.Count(sorted[i], "/") > strings.Count(sorted[j], "/") })
	for _, d := range sorted {
		if err := syncPath(d); err != nil {
			return nil, err
		}
	}
	return rep, nil
}

// copyFile copies the first n bytes of from (all of it if n < 0) into the
// new file to and fsyncs it. A source shorter than n is an error: the
// database it came with refers to bytes it lacks.
func copyFile(from, to string, n int64) (int64, error) {
	in, err := os.Open(from)
	if err != nil {
		return 0, err
	}
	defer in.Close()
	st, err := in.Stat()
	if err != nil {
		return 0, err
	}
	if n < 0 {
		n = st.Size()
	}
	if st.Size() < n {
		return 0, fmt.Errorf("%w: %s is %d bytes, the database refers to %d (truncated copy?)", blobs.ErrCorrupt, from, st.Size(), n)
	}
	out, err := os.OpenFile(to, os.O_WRONLY|os.O_CREATE|os.O_EXCL, 0o644)
	if err != nil {
		return 0, err
	}
	// io.Copy from a LimitedReader of a file lets the kernel copy
	// (copy_file_range) without the bytes passing through us.
	written, err := io.Copy(out, io.LimitReader(in, n))
	if err == nil && written != n {
		err = fmt.Errorf("%s: copied %d of %d bytes", from, written, n)
	}
	if err == nil {
		err = out.Sync()
	}
	if cerr := out.Close(); err == nil {
		err = cerr
	}
	if err != nil {
		return 0, fmt.Errorf("copy %s: %w", from, err)
	}
	return written, nil
}

func syncFile(path string) error {
	f, err := os.OpenFile(path, os.O_RDWR, 0)
	if err != nil {
		return fmt.Errorf("open %s: %w", path, err)
	}
	defer f.Close()
	if err := f.Sync(); err != nil {
		return fmt.Errorf("sync %s: %w", path, err)
	}
	return nil
}

func syncPath(dir string) error {
	d, err := os.Open(dir)
	if err != nil {
		return fmt.Errorf("open %s: %w", dir, err)
	}
	defer d.Close()
	if err := d.Sync(); err != nil {
		return fmt.Errorf("sync %s: %w", dir, err)
	}
	return nil
}

// verifyDir opens the data dir dir and checks it: the database structure,
// every frame and chunk, and unless quick every path's NAR. It returns the
// number of valid paths.
func verifyDir(ctx context.Context, dir string, quick bool, step func(string)) (int, error) {
	s, err := Open(ctx, dir, Options{})
	if err != nil {
		return 0, err
	}
	defer s.Close()
	if err := s.db.Check(ctx); err != nil {
		return 0, err
	}
	names, err := s.All(ctx)
	if err != nil {
		return 0, err
	}
	if quick {
		var progress func(done, total int64)
		if step != nil {
			progress = func(done, _ int64) { step(fmt.Sprintf("verified frame %d", done)) }
		}
		damaged, err := s.blobs.Verify(ctx, progress)
		if err != nil {
			return 0, err
		}
		if len(damaged) > 0 {
			return 0, fmt.Errorf("%d damaged chunks, first: %w", len(damaged), damaged[0])
		}
		return len(names), nil
	}
	var progress func(stage string, done, total int64)
	if step != nil {
		progress = func(stage string, done, _ int64) { step(fmt.Sprintf("verified %s %d", stage, done)) }
	}
	rep, err := s.Verify(ctx, progress)
	if err != nil {
		return 0, err
	}
	switch {
	case len(rep.DB) > 0:
		return 0, fmt.Errorf("%d database problems, first: %s", len(rep.DB), rep.DB[0])
	case len(rep.Packs) > 0:
		return 0, fmt.Errorf("%d damaged pack headers, first: %w", len(rep.Packs), rep.Packs[0])
	case len(rep.Chunks) > 0:
		return 0, fmt.Errorf("%d damaged chunks, first: %w", len(rep.Chunks), rep.Chunks[0])
	case len(rep.Damaged) > 0:
		return 0, fmt.Errorf("%d damaged paths, first: %s: %w", len(rep.Damaged), rep.Damaged[0].Name, rep.Damaged[0].Err)
	}
	return rep.Paths, nil
}
