// Package nixstore reads a live local Nix store, the source of
// `casnix import --from-nix-store ROOT`: path-info from its SQLite database
// (ROOT/nix/var/nix/db/db.sqlite, opened read-only, so a running nix-daemon
// is not disturbed) and contents from ROOT/nix/store, dumped as NAR.
package nixstore

import (
	"context"
	"database/sql"
	"errors"
	"fmt"
	"net/url"
	"os"
	"path/filepath"
	"strings"
	"time"

	"github.com/nix-community/go-nix/pkg/nixhash"

	_ "modernc.org/sqlite" // "sqlite" driver
)

// StoreDir is the store directory of the stores this package reads.
const StoreDir = "/nix/store"

// Path is one valid path of the source store.
type Path struct {
	Name       string // basename
	NarHash    [32]byte
	NarSize    int64
	Registered time.Time
	Deriver    string // basename or ""
	Ultimate   bool
	Sigs       []string
	CA         string
	References []string // basenames, sorted
}

// Source is an open Nix store.
type Source struct {
	Root  string
	db    *sql.DB
	Paths map[string]*Path
}

// Open reads every valid path's metadata from the store under root.
func Open(ctx context.Context, root string) (*Source, error) {
	dbPath := filepath.Join(root, "nix/var/nix/db/db.sqlite")
	if _, err := os.Stat(dbPath); err != nil {
		return nil, fmt.Errorf("nix store at %s: %w", root, err)
	}
	v := url.Values{}
	v.Set("mode", "ro")
	v.Add("_pragma", "busy_timeout(30000)")
	d, err := sql.Open("sqlite", "file:"+dbPath+"?"+v.Encode())
	if err != nil {
		return nil, fmt.Errorf("open %s: %w", dbPath, err)
	}
	s := &Source{Root: root, db: d, Paths: map[string]*Path{}}
	if err := s.load(ctx); err != nil {
		d.Close()
		return nil, fmt.Errorf("read %s: %w", dbPath, err)
	}
	return s, nil
}

// Close closes the database.
func (s *Source) Close() error { return s.db.Close() }

func base(p string) (string, error) {
	if !strings.HasPrefix(p, StoreDir+"/") {
		return "", fmt.Errorf("path %q is outside %s", p, StoreDir)
	}
	return p[len(StoreDir)+1:], nil
}

func (s *Source) load(ctx context.Context) error {
	// One consistent snapshot: paths and refs from the same read transaction.
	tx, err := s.db.BeginTx(ctx, &sql.TxOptions{ReadOnly: true})
	if err != nil {
		return err
	}
	defer tx.Rollback()
	rows, err := tx.QueryContext(ctx, `SELECT id, path, hash, registrationTime, IFNULL(deriver,''),
		IFNULL(narSize,0), IFNULL(ultimate,0), IFNULL(sigs,''), IFNULL(ca,'') FROM ValidPaths`)
	if err != nil {
		return err
	}
	byID := map[int64]*Path{}
	for rows.Next() {
		var (
			id, reg, size, ult        int64
			path, hash, drv, sigs, ca string
		)
		if err := rows.Scan(&id, &path, &hash, &reg, &drv, &size, &ult, &sigs, &ca); err != nil {
			rows.Close()
			return err
		}
		name, err := base(path)
		if err != nil {
			rows.Close()
			return err
		}
		p := &Path{Name: name, NarSize: size, Registered: time.Unix(reg, 0), Ultimate: ult != 0, CA: ca}
		h, err := nixhash.ParseAny(hash, nil)
		if err != nil || h.Algo() != nixhash.SHA256 {
			rows.Close()
			return fmt.Errorf("path %s: NAR hash %q: want sha256 (%v)", path, hash, err)
		}
		copy(p.NarHash[:], h.Digest())
		if drv != "" {
			if p.Deriver, err = base(drv); err != nil {
				rows.Close()
				return fmt.Errorf("path %s: deriver: %w", path, err)
			}
		}
		if sigs != "" {
			p.Sigs = strings.Fields(sigs)
		}
		byID[id] = p
		s.Paths[name] = p
	}
	rows.Close()
	if err := rows.Err(); err != nil {
		return err
	}
	refs, err := tx.QueryContext(ctx, "SELECT referrer, reference FROM Refs ORDER BY referrer, reference")
	if err != nil {
		return err
	}
	defer refs.Close()
	for refs.Next() {
		var a, b int64
		if err := refs.Scan(&a, &b); err != nil {
			return err
		}
		from, to := byID[a], byID[b]
		if from == nil || to == nil {
			return errors.New("Refs names a path that is not in ValidPaths")
		}
		from.References = append(from.References, to.Name)
	}
	return refs.Err()
}

// Closure returns the paths in the closure of names, references first
// (a topological order), so importing in this order keeps every reference
// valid before its referrer.
func (s *Source) Closure(names []string) ([]*Path, error) {
	var order []*Path
	state := map[string]uint8{} // 1 visiting, 2 done
	var visit func(n string) error
	visit = func(n string) error {
		switch state[n] {
		case 2:
			return nil
		case 1:
			return fmt.Errorf("reference cycle through %s", n)
		}
		p := s.Paths[n]
		if p == nil {
			return fmt.Errorf("path '%s/%s' is not valid in the source store", StoreDir, n)
		}
		state[n] = 1
		for _, r := range p.References {
			if r == n {
				continue
			}
			if err := visit(r); err != nil {
				return err
			}
		}
		state[n] = 2
		order = append(order, p)
		return nil
	}
	for _, n := range names {
		if err := visit(n); err != nil {
			return nil, err
		}
	}
	return order, nil
}

// All returns every valid path, references first.
func (s *Source) All() ([]*Path, error) {
	names := make([]string, 0, len(s.Paths))
	for n := range s.Paths {
		names = append(names, n)
	}
	// Sorted so the import order (and so pack layout) is reproducible.
	sortStrings(names)
	return s.Closure(names)
}

// FSPath is where a path's files are.
func (s *Source) FSPath(name string) string {
	return filepath.Join(s.Root, StoreDir, name)
}
