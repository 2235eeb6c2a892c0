package store

import (
	"context"
	"errors"
	"fmt"
	"io"
	"maps"
	"os"
	"path/filepath"
	"runtime"
	"slices"
	"sync"

	"golang.org/x/sys/unix"

	"github.com/casnix/casnix/blobs"
	"github.com/casnix/casnix/castore"
	"github.com/casnix/casnix/db"
	"github.com/casnix/casnix/digest"
)

// verifyLock serialises whole-store verifications started for clients:
// each reads every pack and renders every path, so several at once would
// only multiply the I/O.
const verifyLock = "verify.lock"

// ErrVerifyBusy is returned by LockVerify without wait while another
// verification holds the lock.
var ErrVerifyBusy = errors.New("another store verification is running")

// LockVerify takes the verification lock (across processes), waiting for
// it when wait is set (until ctx is done), else failing at once with
// ErrVerifyBusy. The returned func releases it.
func (s *Store) LockVerify(ctx context.Context, wait bool) (func(), error) {
	if wait {
		return s.lockFile(ctx, verifyLock, unix.LOCK_EX)
	}
	f, err := os.OpenFile(filepath.Join(s.dir, verifyLock), os.O_RDWR|os.O_CREATE, 0o644)
	if err != nil {
		return nil, fmt.Errorf("open %s: %w", verifyLock, err)
	}
	if err := unix.Flock(int(f.Fd()), unix.LOCK_EX|unix.LOCK_NB); err != nil {
		f.Close()
		if err == unix.EWOULDBLOCK {
			return nil, ErrVerifyBusy
		}
		return nil, fmt.Errorf("lock %s: %w", verifyLock, err)
	}
	return func() { f.Close() }, nil
}

// Damaged names a store path that no longer renders to its recorded NAR,
// or whose index rows or stored chunks are damaged.
type Damaged struct {
	Name string
	Err  error
}

// VerifyReport is the outcome of Verify.
type VerifyReport struct {
	Paths  int
	Frames int64
	// DB lists damage to the database no store path can be blamed for:
	// what SQLite's integrity_check and foreign_key_check report, rows
	// that do not resolve, and scans that failed on a damaged database.
	DB      []string
	Packs   []blobs.PackDamage // pack files with a damaged header
	Chunks  []blobs.Damage     // damaged chunks, referenced or not
	Damaged []Damaged          // damaged store paths
	// Sealed counts the rows without a root_sum (written before migration
	// 0008) that verify checked and sealed, so that renders of them no
	// longer hash the NAR (NarRender).
	Sealed int
}

// OK reports whether nothing was damaged.
func (r *VerifyReport) OK() bool {
	return len(r.DB) == 0 && len(r.Packs) == 0 && len(r.Chunks) == 0 && len(r.Damaged) == 0
}

// Verify checks the database (SQLite's integrity and foreign-key checks,
// and that every row's references resolve), every pack header, re-hashes
// every chunk in every pack, then re-renders every valid path's NAR and
// compares its SHA-256 and size with the path-info. Damaged chunks and
// unresolvable rows are traced to the store paths that use them, so the
// report names the damaged paths wherever a path can be named.
//
// When the database itself is damaged, a later stage that cannot run is
// reported in DB and Verify returns what it found so far; otherwise such a
// failure is returned as the error.
func (s *Store) Verify(ctx context.Context, progress func(stage string, done, total int64)) (*VerifyReport, error) {
	// No collection meanwhile: a pack compacted away or a path deleted
	// under the scan would read as damage.
	unlock, err := s.lockFile(ctx, gcRunLock, unix.LOCK_SH)
	if err != nil {
		return nil, err
	}
	defer unlock()
	rep := &VerifyReport{}
	// failed reports a stage that could not run: database damage if the
	// database check found some, else an error.
	var damaged map[string]error
	// named moves the damaged paths found so far into the report.
	named := func() {
		rep.Damaged = rep.Damaged[:0]
		for name, err := range damaged {
			rep.Damaged = append(rep.Damaged, Damaged{name, err})
		}
		sortDamaged(rep.Damaged)
	}
	// noted reports a stage that could not run on a damaged database
	// (a value of the wrong type that a scan trips over, say) and says
	// whether verify can go on: later stages still name the paths they
	// can.
	noted := func(err error) bool {
		if ctx.Err() == nil && len(rep.DB) > 0 {
			rep.DB = append(rep.DB, err.Error())
			return true
		}
		return false
	}
	// failed reports a stage that could not run and verify cannot go on
	// without: database damage if the database check found some, else an
	// error.
	failed := func(err error) (*VerifyReport, error) {
		if noted(err) {
			named()
			return rep, nil
		}
		return nil, err
	}
	if progress != nil {
		progress("database", 0, 1)
	}
	damaged, badChunks, badBlobs, err := s.checkDatabase(ctx, rep)
	if err != nil {
		return nil, err
	}
	if progress != nil {
		progress("database", 1, 1)
	}
	rep.Packs, err = s.blobs.VerifyHeaders(ctx)
	if err != nil {
		return failed(fmt.Errorf("verify pack headers: %w", err))
	}
	rep.Chunks, err = s.blobs.Verify(ctx, func(done, total int64) {
		rep.Frames = total
		if progress != nil {
			progress("chunks", done, total)
		}
	})
	if err != nil && !noted(fmt.Errorf("verify chunks: %w", err)) {
		return nil, err
	}
	for _, c := range rep.Chunks {
		badChunks[c.Chunk] = true
	}
	names, err := s.All(ctx)
	if err != nil {
		return failed(err)
	}
	rep.Paths = len(names)
	var (
		mu   sync.Mutex
		wg   sync.WaitGroup
		next = make(chan string)
		done int64
		// unsealed: paths checked whose rows have no root_sum, with
		// the sum of the row that was checked.
		unsealed = map[string][]byte{}
	)
	for i := 0; i < runtime.GOMAXPROCS(0); i++ {
		wg.Add(1)
		go func() {
			defer wg.Done()
			for name := range next {
				pi, err := s.verifyPathInfo(ctx, name)
				mu.Lock()
				if err != nil && damaged[name] == nil {
					damaged[name] = err
				}
				if err == nil && !pi.sealed {
					unsealed[name] = db.RootSum(toRow(pi))
				}
				done++
				if progress != nil {
					progress("paths", done, int64(len(names)))
				}
				mu.Unlock()
			}
		}()
	}
	for _, n := range names {
		if ctx.Err() != nil {
			break
		}
		next <- n
	}
	close(next)
	wg.Wait()
	if err := ctx.Err(); err != nil {
		return nil, err
	}
	// A damaged chunk that rendering did not trip over (a record header
	// that disagrees with the index, say) still damages the paths using
	// it: name them.
	if len(badChunks) > 0 || len(badBlobs) > 0 {
		users, err := s.pathsUsing(ctx, names, badChunks, badBlobs)
		if err != nil && !noted(fmt.Errorf("trace damaged chunks to paths: %w", err)) {
			return nil, err
		}
		for name, what := range users {
			if damaged[name] == nil {
				damaged[name] = fmt.Errorf("%w: %s", blobs.ErrCorrupt, what)
			}
		}
	}
	named()
	if len(unsealed) > 0 && len(rep.DB) == 0 && !s.db.ReadOnly() {
		// Checked rows from before migration 0008 get their root_sum,
		// unless their path turned out damaged after all (a damaged chunk
		// traced to it) or the database has problems of its own.
		for name := range damaged {
			delete(unsealed, name)
		}
		if rep.Sealed, err = s.sealRows(ctx, unsealed); err != nil {
			return nil, err
		}
	}
	return rep, nil
}

// sealRows writes the root_sum of the rows named (SealRoot), a few hundred
// per transaction, and reports how many it wrote.
func (s *Store) sealRows(ctx context.Context, sums map[string][]byte) (int, error) {
	names := slices.Sorted(maps.Keys(sums))
	sealed := 0
	for len(names) > 0 {
		batch := names[:min(len(names), 500)]
		names = names[len(batch):]
		err := s.db.Write(ctx, func(tx *db.Tx) error {
			for _, n := range batch {
				ok, err := tx.SealRoot(ctx, n, sums[n])
				if errors.Is(err, db.ErrNotFound) {
					continue // deleted since
				}
				if err != nil {
					return err
				}
				if ok {
					sealed++
				}
			}
			return nil
		})
		if err != nil {
			return sealed, fmt.Errorf("seal checked rows: %w", err)
		}
		for _, n := range batch {
			s.infos.drop(n)
		}
	}
	return sealed, nil
}

// CheckDatabase checks the database alone (Verify's first stage, cheap
// beside reading every pack): SQLite's integrity and foreign-key checks and
// that every row's references resolve. Damage that a row names is reported
// against its store path.
func (s *Store) CheckDatabase(ctx context.Context) (*VerifyReport, error) {
	rep := &VerifyReport{}
	damaged, _, _, err := s.checkDatabase(ctx, rep)
	if err != nil {
		return nil, err
	}
	for name, err := range damaged {
		rep.Damaged = append(rep.Damaged, Damaged{name, err})
	}
	sortDamaged(rep.Damaged)
	return rep, nil
}

// checkDatabase runs the database checks into rep.DB and returns the
// damaged paths found, and the chunks and blobs that do not resolve.
func (s *Store) checkDatabase(ctx context.Context, rep *VerifyReport) (damaged map[string]error, badChunks, badBlobs map[digest.Digest]bool, err error) {
	rep.DB, err = s.db.IntegrityCheck(ctx)
	if err != nil {
		return nil, nil, nil, fmt.Errorf("check database: %w", err)
	}
	damaged = map[string]error{}
	badChunks = map[digest.Digest]bool{}
	badBlobs = map[digest.Digest]bool{}
	problems, err := s.db.Dangling(ctx, digest.Empty)
	if err != nil {
		if ctx.Err() != nil {
			return nil, nil, nil, ctx.Err()
		}
		rep.DB = append(rep.DB, err.Error())
	}
	for _, p := range problems {
		switch {
		case p.Path != "":
			if damaged[p.Path] == nil {
				damaged[p.Path] = fmt.Errorf("%w: %s", blobs.ErrCorrupt, p.What)
			}
		case p.Chunk != nil:
			badChunks[*p.Chunk] = true
			rep.DB = append(rep.DB, p.What)
		case p.Blob != nil:
			badBlobs[*p.Blob] = true
			rep.DB = append(rep.DB, p.What)
		default:
			rep.DB = append(rep.DB, p.What)
		}
	}
	return damaged, badChunks, badBlobs, nil
}

// pathsUsing returns the paths among names whose trees use one of the
// chunks or blobs given, with what they use.
func (s *Store) pathsUsing(ctx context.Context, names []string, chunks, blobSet map[digest.Digest]bool) (map[string]string, error) {
	blobMemo := map[digest.Digest]string{}
	dirMemo := map[digest.Digest]string{}
	blob := func(d digest.Digest) (string, error) {
		if what, ok := blobMemo[d]; ok {
			return what, nil
		}
		what := ""
		if blobSet[d] {
			what = "uses damaged blob " + d.String()
		} else {
			b, _, err := s.db.BlobAndLoc(ctx, d)
			if err != nil {
				what = "blob " + d.String() + ": " + err.Error()
			} else if b.Chunks == nil {
				if b.Size > 0 && chunks[d] {
					what = "uses damaged chunk " + d.String()
				}
			} else {
				for i := 0; i+digest.Size <= len(b.Chunks); i += digest.Size + 4 {
					c, _ := digest.FromBytes(b.Chunks[i : i+digest.Size])
					if chunks[c] {
						what = "uses damaged chunk " + c.String()
						break
					}
				}
			}
		}
		blobMemo[d] = what
		return what, nil
	}
	var dir func(d digest.Digest) (string, error)
	dir = func(d digest.Digest) (string, error) {
		if what, ok := dirMemo[d]; ok {
			return what, nil
		}
		if err := ctx.Err(); err != nil {
			return "", err
		}
		what := ""
		var err error
		dd, derr := s.Directory(ctx, d)
		if derr != nil {
			// A damaged directory damages its users; it is no reason to
			// stop tracing the others.
			if ctx.Err() != nil {
				return "", ctx.Err()
			}
			what = derr.Error()
		} else {
			for _, f := range dd.Files {
				if what, err = blob(f.Digest); err != nil || what != "" {
					break
				}
			}
			for _, c := range dd.Directories {
				if what != "" || err != nil {
					break
				}
				what, err = dir(c.Digest)
			}
		}
		if err != nil {
			return "", err
		}
		dirMemo[d] = what
		return what, nil
	}
	out := map[string]string{}
	for _, name := range names {
		row, err := s.db.PathRoot(ctx, name)
		if err != nil {
			out[name] = err.Error()
			continue
		}
		root, err := rootOf(row)
		if err != nil {
			out[name] = err.Error()
			continue
		}
		var what string
		switch root.Kind {
		case castore.KindFile:
			what, err = blob(root.Digest)
		case castore.KindDirectory:
			what, err = dir(root.Digest)
		}
		if err != nil {
			return nil, err
		}
		if what != "" {
			out[name] = what
		}
	}
	return out, nil
}

// verifyPath re-renders a path and checks it against its path-info's NAR
// hash and size: hashed even if its row is sealed (NarRender), so verify
// checks the whole chain from row to bytes.
func (s *Store) verifyPath(ctx context.Context, name string) error {
	_, err := s.verifyPathInfo(ctx, name)
	return err
}

// verifyPathInfo is verifyPath, returning the path-info it checked.
func (s *Store) verifyPathInfo(ctx context.Context, name string) (*PathInfo, error) {
	// A path added before casnix checked names as Nix 2.34 does ("..",
	// an empty name): Nix clients fail to parse it wherever a listing
	// holds it, so it is reported like damage.
	if err := ValidateName(name); err != nil {
		return nil, fmt.Errorf("a name Nix cannot parse: %w", err)
	}
	pi, err := s.Info(ctx, name)
	if err != nil {
		return nil, err
	}
	// From the index, not from what reads cached of it.
	_, err = s.narRender(blobs.NoCache(ctx), pi, io.Discard, true)
	return pi, err
}
