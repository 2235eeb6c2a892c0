package db

import (
	"context"
	"fmt"
)

// MarkSubstituted records path id as substituted, last accessed at (unix
// milliseconds).
func (q q) MarkSubstituted(ctx context.Context, id, at int64) error {
	if _, err := q.exec(ctx, "INSERT OR IGNORE INTO substituted(path, accessed) VALUES (?,?)", id, at); err != nil {
		return fmt.Errorf("mark path %d substituted: %w", id, err)
	}
	return nil
}

// TouchSubstituted moves the access time of the substituted path name
// forward to at; a path that is not substituted (or not valid) is left
// alone.
func (q q) TouchSubstituted(ctx context.Context, name string, at int64) error {
	_, err := q.exec(ctx, `UPDATE substituted SET accessed = ? WHERE accessed < ?
		AND path = (SELECT id FROM paths WHERE name = ?)`, at, at, name)
	if err != nil {
		return fmt.Errorf("touch %s: %w", name, err)
	}
	return nil
}

// Substituted lists the substituted valid paths: basename → last access
// (unix milliseconds).
func (q q) Substituted(ctx context.Context) (map[string]int64, error) {
	rows, err := q.query(ctx, "SELECT p.name, s.accessed FROM substituted s JOIN paths p ON p.id = s.path")
	if err != nil {
		return nil, fmt.Errorf("list substituted paths: %w", err)
	}
	defer rows.Close()
	out := map[string]int64{}
	for rows.Next() {
		var n string
		var at int64
		if err := rows.Scan(&n, &at); err != nil {
			return nil, err
		}
		out[n] = at
	}
	return out, rows.Err()
}
