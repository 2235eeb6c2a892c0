package db

import (
	"context"
	"fmt"
)

// PutRealisation records (or replaces) the realisation id of the valid
// path name.
func (q q) PutRealisation(ctx context.Context, id, name, json string) error {
	pid, err := q.PathID(ctx, name)
	if err != nil {
		return err
	}
	if _, err := q.exec(ctx, "INSERT OR REPLACE INTO realisations(id, path, json) VALUES (?, ?, ?)", id, pid, json); err != nil {
		return fmt.Errorf("record realisation %s: %w", id, err)
	}
	return nil
}

// Realisation returns the stored JSON of realisation id and its output
// path's name.
func (q q) Realisation(ctx context.Context, id string) (json, name string, err error) {
	err = q.row(ctx, "SELECT r.json, p.name FROM realisations r JOIN paths p ON p.id = r.path WHERE r.id = ?", id).Scan(&json, &name)
	if err != nil {
		return "", "", notFound(err, "realisation "+id)
	}
	return json, name, nil
}

// RealisationsOf returns the stored JSON of every realisation whose output
// path is name (by its index), in id order.
func (q q) RealisationsOf(ctx context.Context, name string) ([]string, error) {
	rows, err := q.query(ctx, "SELECT r.json FROM realisations r JOIN paths p ON p.id = r.path WHERE p.name = ? ORDER BY r.id", name)
	if err != nil {
		return nil, fmt.Errorf("realisations of %s: %w", name, err)
	}
	defer rows.Close()
	var out []string
	for rows.Next() {
		var j string
		if err := rows.Scan(&j); err != nil {
			return nil, err
		}
		out = append(out, j)
	}
	return out, rows.Err()
}
