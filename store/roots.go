package store

import (
	"context"
	"crypto/sha256"
	"encoding/hex"
	"errors"
	"fmt"
	"io"
	"io/fs"
	"os"
	"path/filepath"
	"sort"
	"strings"
	"sync"
	"sync/atomic"

	"golang.org/x/sys/unix"
)

// The data directory's garbage-collector roots, laid out like Nix's:
//
//   - gcroots/…: symlinks to store paths (permanent roots), in any
//     subdirectory; a symlink may also point at another symlink outside
//     the store that points into it (followed up to maxLinkDepth);
//   - gcroots/auto/<hash>: indirect roots, symlinks to a link elsewhere
//     (a result symlink) whose target is the store path; when that link
//     is gone, the collector removes the auto entry;
//   - temproots/<pid>-<n>: one file per connection or command, the NUL-
//     terminated basenames it uses, flocked while its owner lives. The
//     collector reads them all under the exclusive GC lock and removes
//     those it can lock (their owner died).
const (
	GCRootsDir   = "gcroots"
	AutoRootsDir = "auto"
	TempRootsDir = "temproots"
	maxLinkDepth = 8
)

// TempRoots are the temporary roots of one connection or one command:
// paths it uses that a collection, in this process or another, must keep.
// Safe for concurrent use.
type TempRoots struct {
	s     *Store
	mu    sync.Mutex
	f     *os.File
	names map[string]bool
}

var tempRootsSeq atomic.Int64

// NewTempRoots starts an empty set of temporary roots. Close it when the
// connection ends (a crashed owner's file is cleaned up by the next GC).
func (s *Store) NewTempRoots() (*TempRoots, error) {
	dir := filepath.Join(s.dir, TempRootsDir)
	if err := os.MkdirAll(dir, 0o755); err != nil {
		return nil, fmt.Errorf("create temp roots dir: %w", err)
	}
	for {
		path := filepath.Join(dir, fmt.Sprintf("%d-%d", os.Getpid(), tempRootsSeq.Add(1)))
		f, err := os.OpenFile(path, os.O_RDWR|os.O_CREATE|os.O_EXCL|os.O_APPEND, 0o644)
		if errors.Is(err, fs.ErrExist) {
			continue // left by an earlier process with our pid
		}
		if err != nil {
			return nil, fmt.Errorf("create temp roots: %w", err)
		}
		if err := unix.Flock(int(f.Fd()), unix.LOCK_EX); err != nil {
			f.Close()
			return nil, fmt.Errorf("lock temp roots: %w", err)
		}
		// A collector that ran between create and flock took the file for a
		// dead owner's and removed it: start over.
		var a, b unix.Stat_t
		if unix.Fstat(int(f.Fd()), &a) == nil && unix.Stat(path, &b) == nil && a.Ino == b.Ino && a.Dev == b.Dev {
			return &TempRoots{s: s, f: f, names: map[string]bool{}}, nil
		}
		f.Close()
	}
}

// Add makes name (a store path basename) a root until Close. It waits
// while a collection sweeps, so a path that is valid when Add returns stays
// valid.
func (t *TempRoots) Add(ctx context.Context, name string) error {
	return t.add(ctx, name, false)
}

// AddWithin is Add for a caller whose Batch b already holds the GC lock
// shared (HoldsGCLock): it does not yield to a collection waiting for the
// lock, which waits for b anyway. Yielding there made every path of an
// AddMultipleToStore after the first wait gcYield while a collection was
// pending, for nothing. A nil b, or one not yet holding, is Add.
func (t *TempRoots) AddWithin(ctx context.Context, b *Batch, name string) error {
	return t.add(ctx, name, b != nil && b.HoldsGCLock())
}

func (t *TempRoots) add(ctx context.Context, name string, held bool) error {
	if err := ValidateName(name); err != nil {
		return err
	}
	t.mu.Lock()
	defer t.mu.Unlock()
	if t.f == nil {
		return errors.New("temp roots closed")
	}
	if t.names[name] {
		return nil
	}
	lock := t.s.SharedGCLock
	if held {
		lock = t.s.sharedGCLockHeld
	}
	unlock, err := lock(ctx)
	if err != nil {
		return err
	}
	defer unlock()
	if _, err := t.f.WriteString(name + "\x00"); err != nil {
		return fmt.Errorf("write temp root: %w", err)
	}
	t.names[name] = true
	return nil
}

// Close drops the roots.
func (t *TempRoots) Close() error {
	t.mu.Lock()
	defer t.mu.Unlock()
	if t.f == nil {
		return nil
	}
	err := os.Remove(t.f.Name())
	err = errors.Join(err, t.f.Close())
	t.f = nil
	return err
}

// readTempRoots returns the temp roots of live owners (file name ->
// basenames), removing the files of dead ones when clean is set. Call it
// under the exclusive GC lock, so no Add is half-written.
func (s *Store) readTempRoots(clean bool) (map[string][]string, error) {
	dir := filepath.Join(s.dir, TempRootsDir)
	ents, err := os.ReadDir(dir)
	if errors.Is(err, fs.ErrNotExist) {
		return nil, nil
	}
	if err != nil {
		return nil, fmt.Errorf("list temp roots: %w", err)
	}
	out := map[string][]string{}
	for _, e := range ents {
		path := filepath.Join(dir, e.Name())
		f, err := os.OpenFile(path, os.O_RDWR, 0)
		if errors.Is(err, fs.ErrNotExist) {
			continue
		}
		if err != nil {
			return nil, fmt.Errorf("open temp roots: %w", err)
		}
		if unix.Flock(int(f.Fd()), unix.LOCK_EX|unix.LOCK_NB) == nil {
			// Its owner is gone (or has not locked it yet: NewTempRoots
			// notices the removal and starts over).
			if clean {
				os.Remove(path)
			}
			f.Close()
			continue
		}
		// From the descriptor, not the name: the owner may remove the file
		// (its connection ended) between the lock probe and the read.
		data, err := io.ReadAll(f)
		f.Close()
		if err != nil {
			return nil, fmt.Errorf("read temp roots %s: %w", path, err)
		}
		for _, n := range strings.Split(string(data), "\x00") {
			if n != "" {
				out[e.Name()] = append(out[e.Name()], n)
			}
		}
	}
	return out, nil
}

// AddPermRoot makes link (an absolute path) a symlink to the store path
// name and registers it as a root, as Nix's addPermRoot does: a link inside
// the data directory's gcroots/ is a root by itself, one elsewhere gets an
// indirect root in gcroots/auto/. An existing symlink at link is replaced;
// anything else there is an error. Returns link.
func (s *Store) AddPermRoot(ctx context.Context, name, link string) (string, error) {
	if err := ValidateName(name); err != nil {
		return "", err
	}
	if !filepath.IsAbs(link) {
		return "", fmt.Errorf("gc root %q: not an absolute path", link)
	}
	link = filepath.Clean(link)
	// Under the shared lock, a path that is valid now cannot be swept
	// before its root exists.
	unlock, err := s.SharedGCLock(ctx)
	if err != nil {
		return "", err
	}
	defer unlock()
	ok, err := s.IsValid(ctx, name)
	if err != nil {
		return "", err
	}
	if !ok {
		return "", fmt.Errorf("path '%s' %w", s.Full(name), ErrNotValid)
	}
	if err := replaceSymlink(s.Full(name), link); err != nil {
		return "", err
	}
	if !inDir(link, filepath.Join(s.dir, GCRootsDir)) {
		if err := s.addIndirectRoot(link); err != nil {
			return "", err
		}
	}
	return link, nil
}

// AddIndirectRoot registers link (an absolute path, normally a symlink to a
// store path) as an indirect root: whatever store path link points at when
// a collection runs is kept; once link is gone, the registration is too.
// As nix-daemon (absPath, i.e. canonPath, before addIndirectRoot), link
// must be absolute and is canonicalised lexically ("." and ".." removed,
// slashes collapsed; symlinks are not resolved). Nothing else is asked of
// it: any local user may register any path, so the collector must
// tolerate links it cannot read (readPermRoots).
func (s *Store) AddIndirectRoot(link string) error {
	if !filepath.IsAbs(link) {
		return fmt.Errorf("indirect gc root %q: not an absolute path", link)
	}
	if strings.IndexByte(link, 0) >= 0 {
		return fmt.Errorf("indirect gc root %q: contains a NUL byte", link)
	}
	return s.addIndirectRoot(filepath.Clean(link))
}

func (s *Store) addIndirectRoot(link string) error {
	h := sha256.Sum256([]byte(link))
	return replaceSymlink(link, filepath.Join(s.dir, GCRootsDir, AutoRootsDir, hex.EncodeToString(h[:16])))
}

func inDir(path, dir string) bool {
	rel, err := filepath.Rel(dir, path)
	return err == nil && rel != ".." && !strings.HasPrefix(rel, "../")
}

// replaceSymlink atomically makes path a symlink to target (durably: the
// directory is synced), refusing to replace anything but a symlink.
func replaceSymlink(target, path string) error {
	if fi, err := os.Lstat(path); err == nil && fi.Mode()&fs.ModeSymlink == 0 {
		return fmt.Errorf("cannot create symlink '%s': it exists and is not a symlink", path)
	}
	dir := filepath.Dir(path)
	if err := os.MkdirAll(dir, 0o755); err != nil {
		return fmt.Errorf("create %s: %w", dir, err)
	}
	tmp := fmt.Sprintf("%s.tmp-%d-%d", path, os.Getpid(), tempRootsSeq.Add(1))
	if err := os.Symlink(target, tmp); err != nil {
		return fmt.Errorf("create symlink %s: %w", path, err)
	}
	if err := os.Rename(tmp, path); err != nil {
		os.Remove(tmp)
		return fmt.Errorf("create symlink %s: %w", path, err)
	}
	d, err := os.Open(dir)
	if err != nil {
		return fmt.Errorf("sync %s: %w", dir, err)
	}
	defer d.Close()
	if err := d.Sync(); err != nil {
		return fmt.Errorf("sync %s: %w", dir, err)
	}
	return nil
}

// storeBase returns the basename of the store path that p is or lies
// inside, or "".
func (s *Store) storeBase(p string) string {
	rest, ok := strings.CutPrefix(p, s.StoreDir+"/")
	if !ok {
		return ""
	}
	base, _, _ := strings.Cut(rest, "/")
	if ValidateName(base) != nil {
		return ""
	}
	return base
}

// readPermRoots walks gcroots/ and returns root link -> basename, for
// links pointing (possibly through further symlinks outside the store) at
// a store path. Indirect roots under auto/ whose link is gone are removed
// when clean is set.
func (s *Store) readPermRoots(clean bool) (map[string]string, error) {
	top := filepath.Join(s.dir, GCRootsDir)
	out := map[string]string{}
	err := filepath.WalkDir(top, func(path string, d fs.DirEntry, err error) error {
		if err != nil {
			if errors.Is(err, fs.ErrNotExist) {
				return nil
			}
			if path == top {
				return err
			}
			// Like Nix's findRoots: one unreadable entry must not stop
			// every collection.
			s.log.Warn("cannot read potential gc root", "path", path, "err", err)
			if d != nil && d.IsDir() {
				return fs.SkipDir
			}
			return nil
		}
		if d.Type()&fs.ModeSymlink == 0 {
			return nil
		}
		if strings.Contains(filepath.Base(path), ".tmp-") {
			return nil // a replaceSymlink in progress or crashed
		}
		key, target := path, path
		for i := 0; i < maxLinkDepth; i++ {
			t, err := os.Readlink(target)
			if errors.Is(err, fs.ErrNotExist) && target != path {
				// An indirect root whose link was removed.
				if clean && filepath.Dir(path) == filepath.Join(top, AutoRootsDir) {
					os.Remove(path)
				}
				return nil
			}
			if errors.Is(err, unix.EINVAL) {
				return nil // not a symlink: not a root
			}
			if err != nil {
				// ENOTDIR, EACCES, ELOOP, ENAMETOOLONG…: a link anyone
				// may register (AddIndirectRoot is open to untrusted
				// clients) must not make every later collection fail,
				// so, as Nix's findRoots, it is skipped with a warning.
				if _, seen := s.badRoots.LoadOrStore(path, true); !seen {
					// Once per link and process: a collection or
					// FindRoots runs this on every call, and the link
					// stays until someone removes it.
					s.log.Warn("cannot read potential gc root", "root", path, "link", target, "err", err)
				}
				return nil
			}
			if !filepath.IsAbs(t) {
				t = filepath.Join(filepath.Dir(target), t)
			}
			if base := s.storeBase(t); base != "" {
				if filepath.Dir(path) == filepath.Join(top, AutoRootsDir) {
					key = target // an indirect root is known by its link
				}
				out[key] = base
				return nil
			}
			target = t
		}
		return nil
	})
	if err != nil {
		return nil, fmt.Errorf("read gc roots: %w", err)
	}
	return out, nil
}

// Roots lists the roots a collection would start from (FindRoots): root
// link -> store path basenames. Permanent and indirect roots are keyed by
// their link, temporary roots by "{temp:<file>}". Dangling roots are
// listed too (their path is not valid); nothing is removed.
func (s *Store) Roots(ctx context.Context) (map[string][]string, error) {
	perm, err := s.readPermRoots(false)
	if err != nil {
		return nil, err
	}
	// Reading temp roots while an Add writes could see half a name: the
	// shared lock keeps Add out only against a collector, so names are
	// validated instead.
	temp, err := s.readTempRoots(false)
	if err != nil {
		return nil, err
	}
	out := map[string][]string{}
	for link, base := range perm {
		out[link] = []string{base}
	}
	for file, names := range temp {
		var ok []string
		for _, n := range names {
			if ValidateName(n) == nil {
				ok = append(ok, n)
			}
		}
		sort.Strings(ok)
		out["{temp:"+file+"}"] = ok
	}
	return out, nil
}
