package db

import (
	"context"
	"database/sql"
	"fmt"
	"slices"
	"strings"
	"sync"
)

// schemaRows lists a database's schema objects (tables, indexes, triggers,
// views) by name, SQLite's internal ones left out: what the migrations
// made, as SQLite stores it.
func schemaRows(ctx context.Context, c interface {
	QueryContext(context.Context, string, ...any) (*sql.Rows, error)
}) (map[string]string, error) {
	rows, err := c.QueryContext(ctx, `SELECT type, name, tbl_name, IFNULL(sql, '') FROM sqlite_schema
		WHERE name NOT LIKE 'sqlite\_%' ESCAPE '\'`)
	if err != nil {
		return nil, fmt.Errorf("read schema: %w", err)
	}
	defer rows.Close()
	out := map[string]string{}
	for rows.Next() {
		var typ, name, tbl, text string
		if err := rows.Scan(&typ, &name, &tbl, &text); err != nil {
			return nil, fmt.Errorf("read schema: %w", err)
		}
		out[name] = typ + " on " + tbl + ": " + text
	}
	if err := rows.Err(); err != nil {
		return nil, fmt.Errorf("read schema: %w", err)
	}
	return out, nil
}

var (
	wantSchemaOnce sync.Once
	wantSchema     map[string]string
	wantSchemaErr  error
)

// expectedSchema is the schema the migrations make, from an in-memory
// database run through them: the schema's text has no checksum, and a
// flipped byte in it (a column name, say) leaves a database SQLite's
// integrity check passes and every query naming that column fails.
func expectedSchema(ctx context.Context) (map[string]string, error) {
	wantSchemaOnce.Do(func() {
		mem, err := sql.Open("sqlite", "file::memory:")
		if err != nil {
			wantSchemaErr = fmt.Errorf("schema: %w", err)
			return
		}
		defer mem.Close()
		mem.SetMaxOpenConns(1) // one connection: one in-memory database
		if err := migrate(ctx, mem); err != nil {
			wantSchemaErr = fmt.Errorf("schema: %w", err)
			return
		}
		wantSchema, wantSchemaErr = schemaRows(ctx, mem)
	})
	return wantSchema, wantSchemaErr
}

// litestreamPrefix starts the names of the tables Litestream (package replicate) adds to
// a database it replicates (_litestream_seq, _litestream_lock).
const litestreamPrefix = "_litestream_"

// schemaProblems compares the database's schema with the migrations'.
func (d *DB) schemaProblems(ctx context.Context) ([]string, error) {
	want, err := expectedSchema(ctx)
	if err != nil {
		return nil, err
	}
	got, err := schemaRows(ctx, d.r)
	if err != nil {
		return []string{"schema: " + err.Error()}, nil
	}
	var out []string
	for name, w := range want {
		g, ok := got[name]
		switch {
		case !ok:
			out = append(out, fmt.Sprintf("schema: %q is missing (want %s)", name, w))
		case g != w:
			out = append(out, fmt.Sprintf("schema: %q is %s, want %s", name, g, w))
		}
	}
	for name, g := range got {
		if strings.HasPrefix(name, litestreamPrefix) {
			continue // Litestream's bookkeeping on a primary whose database it replicates
		}
		if _, ok := want[name]; !ok {
			out = append(out, fmt.Sprintf("schema: unknown object %q: %s", name, g))
		}
	}
	slices.Sort(out)
	return out, nil
}
