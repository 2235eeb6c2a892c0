package db

import (
	"context"
	"database/sql"
	"errors"
	"fmt"
	"slices"
	"strings"
)

// PathRow is one valid store path. Names (Name, Deriver, Refs) are store path
// basenames "<hash>-<name>"; the store directory is not stored.
type PathRow struct {
	ID         int64
	Name       string
	Kind       uint8
	Digest     []byte
	Size       int64
	Executable bool
	Target     []byte
	NarHash    []byte
	NarSize    int64
	Deriver    string
	Registered int64
	Ultimate   bool
	CA         string
	Refs       []string // sorted
	Sigs       []string
	// RootSum is what the row's root_sum column holds (nil if NULL): read by
	// Path only, and written by InsertPath as RootSum of the row.
	RootSum []byte
	// DrvOutputs maps output name to basename, for derivations; only
	// written by InsertPath (read it with DrvOutputs).
	DrvOutputs map[string]string
}

func nullStr(s string) sql.NullString { return sql.NullString{String: s, Valid: s != ""} }

// InsertPath adds a store path with its references (which must exist, or be
// the path itself) and signatures.
func (q q) InsertPath(ctx context.Context, p *PathRow) (int64, error) {
	// frame_mark in the same statement, so in the transaction that commits the path's
	// frames (migration 0007).
	res, err := q.exec(ctx, `INSERT INTO paths(name, kind, digest, size, executable, target,
		nar_hash, nar_size, deriver, registered, ultimate, ca, root_sum, frame_mark)
		VALUES (?,?,?,?,?,?,?,?,?,?,?,?,?,(SELECT IFNULL(MAX(id), 0) FROM frames))`,
		p.Name, p.Kind, p.Digest, p.Size, p.Executable, p.Target, p.NarHash, p.NarSize,
		nullStr(p.Deriver), p.Registered, p.Ultimate, nullStr(p.CA), RootSum(p))
	if err != nil {
		return 0, fmt.Errorf("insert path %s: %w", p.Name, err)
	}
	id, err := res.LastInsertId()
	if err != nil {
		return 0, err
	}
	for _, r := range p.Refs {
		var rid int64
		if r == p.Name {
			rid = id
		} else if rid, err = q.PathID(ctx, r); err != nil {
			return 0, fmt.Errorf("path %s: reference %s: %w", p.Name, r, err)
		}
		if _, err := q.exec(ctx, "INSERT OR IGNORE INTO refs(referrer, reference) VALUES (?,?)", id, rid); err != nil {
			return 0, fmt.Errorf("path %s: insert reference: %w", p.Name, err)
		}
	}
	if err := q.AddSigs(ctx, id, p.Sigs); err != nil {
		return 0, fmt.Errorf("path %s: %w", p.Name, err)
	}
	for name, out := range p.DrvOutputs {
		if _, err := q.exec(ctx, "INSERT OR IGNORE INTO drv_outputs(drv, name, path) VALUES (?,?,?)", id, name, out); err != nil {
			return 0, fmt.Errorf("path %s: insert output %s: %w", p.Name, name, err)
		}
	}
	return id, nil
}

// AddSigs adds signatures to a path, ignoring ones it already has.
func (q q) AddSigs(ctx context.Context, id int64, sigs []string) error {
	for _, s := range sigs {
		if _, err := q.exec(ctx, "INSERT OR IGNORE INTO sigs(path, sig) VALUES (?,?)", id, s); err != nil {
			return fmt.Errorf("insert signature: %w", err)
		}
	}
	return nil
}

// PathID returns the id of a valid path.
func (q q) PathID(ctx context.Context, name string) (int64, error) {
	var id int64
	err := q.row(ctx, "SELECT id FROM paths WHERE name = ?", name).Scan(&id)
	if err != nil {
		return 0, notFound(err, "path "+name)
	}
	return id, nil
}

// HasPath reports whether name is a valid path.
func (q q) HasPath(ctx context.Context, name string) (bool, error) {
	_, err := q.PathID(ctx, name)
	if errors.Is(err, ErrNotFound) {
		return false, nil
	}
	return err == nil, err
}

const pathCols = `id, name, kind, digest, size, executable, target, nar_hash, nar_size,
	IFNULL(deriver,''), registered, ultimate, IFNULL(ca,''), root_sum`

// Path returns a valid path with its references and signatures, in one
// query (this is the daemon's hottest lookup: QueryPathInfo).
func (q q) Path(ctx context.Context, name string) (*PathRow, error) {
	var refs, sigs sql.NullString
	p := &PathRow{}
	err := q.row(ctx, "SELECT "+pathCols+`,
		(SELECT group_concat(t.name, ' ') FROM refs r JOIN paths t ON t.id = r.reference WHERE r.referrer = paths.id),
		(SELECT group_concat(sig, char(10)) FROM sigs WHERE sigs.path = paths.id)
		FROM paths WHERE name = ?`, name).
		Scan(&p.ID, &p.Name, &p.Kind, &p.Digest, &p.Size, &p.Executable, &p.Target,
			&p.NarHash, &p.NarSize, &p.Deriver, &p.Registered, &p.Ultimate, &p.CA, &p.RootSum, &refs, &sigs)
	if err != nil {
		return nil, notFound(err, "path "+name)
	}
	// Store path names hold no spaces and signatures no newlines, so the
	// separators are unambiguous; group_concat's order is not defined.
	if refs.String != "" {
		p.Refs = strings.Split(refs.String, " ")
		slices.Sort(p.Refs)
	}
	if sigs.String != "" {
		p.Sigs = strings.Split(sigs.String, "\n")
		slices.Sort(p.Sigs)
	}
	return p, nil
}

func (q q) strings(ctx context.Context, query string, args ...any) ([]string, error) {
	rows, err := q.query(ctx, query, args...)
	if err != nil {
		return nil, err
	}
	defer rows.Close()
	var out []string
	for rows.Next() {
		var s string
		if err := rows.Scan(&s); err != nil {
			return nil, err
		}
		out = append(out, s)
	}
	return out, rows.Err()
}

// Referrers lists the basenames of paths that refer to name.
func (q q) Referrers(ctx context.Context, name string) ([]string, error) {
	return q.strings(ctx, `SELECT s.name FROM paths t JOIN refs r ON r.reference = t.id
		JOIN paths s ON s.id = r.referrer WHERE t.name = ? ORDER BY s.name`, name)
}

// PathByHashPart finds the valid path whose basename starts with hashPart
// followed by '-'.
func (q q) PathByHashPart(ctx context.Context, hashPart string) (string, error) {
	var name string
	err := q.row(ctx, "SELECT name FROM paths WHERE name >= ? AND name < ? ORDER BY name LIMIT 1",
		hashPart+"-", hashPart+".").Scan(&name)
	if err != nil {
		return "", notFound(err, "hash part "+hashPart)
	}
	return name, nil
}

// PathNames lists the names of every valid path, in order.
func (q q) PathNames(ctx context.Context) ([]string, error) {
	return q.strings(ctx, "SELECT name FROM paths ORDER BY name")
}

// DrvOutput is one output of a derivation.
type DrvOutput struct {
	Name string
	Path string // basename, "" if not known in advance
}

// DrvOutputs lists the outputs of derivation drv (a valid .drv path).
func (q q) DrvOutputs(ctx context.Context, drv string) ([]DrvOutput, error) {
	rows, err := q.query(ctx, `SELECT o.name, o.path FROM paths p JOIN drv_outputs o ON o.drv = p.id
		WHERE p.name = ? ORDER BY o.name`, drv)
	if err != nil {
		return nil, fmt.Errorf("outputs of %s: %w", drv, err)
	}
	defer rows.Close()
	var out []DrvOutput
	for rows.Next() {
		var o DrvOutput
		if err := rows.Scan(&o.Name, &o.Path); err != nil {
			return nil, err
		}
		out = append(out, o)
	}
	return out, rows.Err()
}

// DerivationsWithOutput lists the valid derivations that have out as an
// output.
func (q q) DerivationsWithOutput(ctx context.Context, out string) ([]string, error) {
	return q.strings(ctx, `SELECT DISTINCT p.name FROM drv_outputs o JOIN paths p ON p.id = o.drv
		WHERE o.path = ? ORDER BY p.name`, out)
}

// PathNamesAfter lists up to limit valid path names greater than after, in
// order: a cursor for streaming the whole list without holding it.
func (q q) PathNamesAfter(ctx context.Context, after string, limit int) ([]string, error) {
	return q.strings(ctx, "SELECT name FROM paths WHERE name > ? ORDER BY name LIMIT ?", after, limit)
}

// PathRoot returns just the root node columns of a valid path and its NAR
// hash (one indexed lookup, no references or signatures): what a
// file-system lookup needs.
func (q q) PathRoot(ctx context.Context, name string) (*PathRow, error) {
	p := &PathRow{Name: name}
	err := q.row(ctx, "SELECT id, kind, digest, size, executable, target, nar_hash FROM paths WHERE name = ?", name).
		Scan(&p.ID, &p.Kind, &p.Digest, &p.Size, &p.Executable, &p.Target, &p.NarHash)
	if err != nil {
		return nil, notFound(err, "path "+name)
	}
	return p, nil
}

// PathRootsByName lists up to limit valid paths' root nodes in the order of
// their names without the hash part (so the versions of a package come
// together), derivations (".drv") after every other path, after the path
// named after ("": from the start). Repack reads the store in this order, a
// page at a time, so no read transaction stays open across its commits.
// Derivations go last because they are small text files that compress well
// with each other and are read on their own (a derivation next to the
// package it builds would make reading it decode the package).
func (q q) PathRootsByName(ctx context.Context, after string, limit int) ([]PathRow, error) {
	var out []PathRow
	// The name's hash part is 32 characters and a dash: substr from 34 is
	// the package name and version.
	rows, err := q.query(ctx, `SELECT id, name, kind, digest, size, executable, target, nar_hash FROM paths
		WHERE (substr(name, -4) = '.drv', substr(name, 34), name) > (substr(?, -4) = '.drv', substr(?, 34), ?)
		ORDER BY substr(name, -4) = '.drv', substr(name, 34), name LIMIT ?`, after, after, after, limit)
	if err != nil {
		return nil, fmt.Errorf("paths by name: %w", err)
	}
	defer rows.Close()
	for rows.Next() {
		var p PathRow
		if err := rows.Scan(&p.ID, &p.Name, &p.Kind, &p.Digest, &p.Size, &p.Executable, &p.Target, &p.NarHash); err != nil {
			return nil, fmt.Errorf("paths by name: %w", err)
		}
		out = append(out, p)
	}
	if err := rows.Err(); err != nil {
		return nil, fmt.Errorf("paths by name: %w", err)
	}
	return out, nil
}
