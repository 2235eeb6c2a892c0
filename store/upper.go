package store

import (
	"context"
	"database/sql"
	"errors"
	"fmt"
	"io/fs"
	"net/url"
	"os"
	"path/filepath"
	"strconv"
	"strings"
)

// upperRoots reads the Nix database of an upper layer whose Local Overlay
// Store has this store as its lower store, read-only, and returns the
// basenames of this store's paths it registers as valid or any of its
// valid paths refers to. The overlay registers nothing in the lower store
// (no gcroots, no temp roots), so these are what a collection must keep
// for the overlay to stay whole. (Nix copies a lower path's row into the
// upper database when an upper path refers to it, so the two sets mostly
// coincide; both are read so neither is relied on.)
func (s *Store) upperRoots(ctx context.Context, dbPath string) ([]string, error) {
	if _, err := os.Stat(dbPath); err != nil {
		return nil, fmt.Errorf("upper database: %w", err)
	}
	v := url.Values{}
	v.Set("mode", "ro")
	v.Add("_pragma", "busy_timeout(30000)")
	d, err := sql.Open("sqlite", "file:"+dbPath+"?"+v.Encode())
	if err != nil {
		return nil, fmt.Errorf("open upper database %s: %w", dbPath, err)
	}
	defer d.Close()
	rows, err := d.QueryContext(ctx, `SELECT path FROM ValidPaths
		UNION SELECT v.path FROM Refs r JOIN ValidPaths v ON v.id = r.reference`)
	if err != nil {
		return nil, fmt.Errorf("read upper database %s: %w", dbPath, err)
	}
	defer rows.Close()
	prefix := s.StoreDir + "/"
	var out []string
	for rows.Next() {
		var p string
		if err := rows.Scan(&p); err != nil {
			return nil, fmt.Errorf("read upper database %s: %w", dbPath, err)
		}
		if base, ok := strings.CutPrefix(p, prefix); ok && ValidateName(base) == nil {
			out = append(out, base)
		}
	}
	if err := rows.Err(); err != nil {
		return nil, fmt.Errorf("read upper database %s: %w", dbPath, err)
	}
	return out, nil
}

// deletionsFile counts collections that deleted paths, for processes that
// cache what they served (the FUSE mount's kernel entries) to notice a
// collection run by another process.
const deletionsFile = "gc.deletions"

// bumpDeletions increments the deletions counter (best effort: a lost
// update only delays an invalidation to the next collection, and the
// counter is rewritten by rename, so a reader never sees half of it).
func (s *Store) bumpDeletions() error {
	n, err := s.Deletions()
	if err != nil {
		n = 0
	}
	path := filepath.Join(s.dir, deletionsFile)
	tmp := fmt.Sprintf("%s.%d.tmp", path, os.Getpid())
	if err := os.WriteFile(tmp, []byte(strconv.FormatUint(n+1, 10)+"\n"), 0o644); err != nil {
		return fmt.Errorf("write %s: %w", deletionsFile, err)
	}
	if err := os.Rename(tmp, path); err != nil {
		os.Remove(tmp)
		return fmt.Errorf("write %s: %w", deletionsFile, err)
	}
	return nil
}

// Deletions returns a counter that grows whenever a collection (in any
// process) deleted paths; 0 before the first.
func (s *Store) Deletions() (uint64, error) {
	data, err := os.ReadFile(filepath.Join(s.dir, deletionsFile))
	if errors.Is(err, fs.ErrNotExist) {
		return 0, nil
	}
	if err != nil {
		return 0, err
	}
	n, err := strconv.ParseUint(strings.TrimSpace(string(data)), 10, 64)
	if err != nil {
		return 0, fmt.Errorf("%s: %w", deletionsFile, err)
	}
	return n, nil
}
