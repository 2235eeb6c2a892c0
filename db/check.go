package db

import (
	"context"
	"database/sql"
	"encoding/binary"
	"fmt"
	"regexp"

	"github.com/casnix/casnix/digest"
)

// Integrity checks of the database itself, for verify: SQLite's own
// structural checks, and that every row's references resolve. Flipped bytes
// in an index or a row are otherwise invisible to re-rendering: a path
// renders through the table, not the index, and a dangling row only fails
// whoever reads it next.

// Problem is one inconsistency found in the index.
type Problem struct {
	// Path is the basename of the store path it damages ("" when none can
	// be named).
	Path string
	// Chunk is set for a chunk that cannot be located (its frame is gone).
	Chunk *digest.Digest
	// Blob is set for a blob whose chunk list does not resolve.
	Blob *digest.Digest
	What string
}

func (p Problem) String() string {
	if p.Path != "" {
		return p.Path + ": " + p.What
	}
	return p.What
}

// IntegrityCheck compares the schema with the one the migrations make, runs
// PRAGMA integrity_check and PRAGMA foreign_key_check, and returns what
// they report (nil when the database is sound). An error is
// returned only when the checks could not run; a database too damaged to
// run them is reported as a problem.
func (d *DB) IntegrityCheck(ctx context.Context) ([]string, error) {
	out, err := d.schemaProblems(ctx)
	if err != nil {
		return nil, err
	}
	rows, err := d.r.QueryContext(ctx, "PRAGMA integrity_check(100)")
	if err != nil {
		return []string{fmt.Sprintf("integrity_check: %v", err)}, nil
	}
	for rows.Next() {
		var s string
		if err := rows.Scan(&s); err != nil {
			rows.Close()
			return append(out, fmt.Sprintf("integrity_check: %v", err)), nil
		}
		if s != "ok" {
			out = append(out, "integrity_check: "+s+d.namePathRow(ctx, s))
		}
	}
	if err := rows.Err(); err != nil {
		out = append(out, fmt.Sprintf("integrity_check: %v", err))
	}
	rows.Close()
	if err := ctx.Err(); err != nil {
		return nil, err
	}
	rows, err = d.r.QueryContext(ctx, "PRAGMA foreign_key_check")
	if err != nil {
		return append(out, fmt.Sprintf("foreign_key_check: %v", err)), nil
	}
	defer rows.Close()
	for rows.Next() {
		var table, parent string
		var rowid sql.NullInt64
		var fkid int64
		if err := rows.Scan(&table, &rowid, &parent, &fkid); err != nil {
			return append(out, fmt.Sprintf("foreign_key_check: %v", err)), nil
		}
		out = append(out, fmt.Sprintf("foreign_key_check: a row of %s (rowid %v) names a missing row of %s", table, rowid.Int64, parent))
	}
	if err := rows.Err(); err != nil {
		out = append(out, fmt.Sprintf("foreign_key_check: %v", err))
	}
	return out, ctx.Err()
}

// rowMissing matches integrity_check's report of a table row an index
// lacks.
var rowMissing = regexp.MustCompile(`^row (\d+) missing from index (\S+)$`)

// namePathRow names the store path of a paths row an integrity_check
// message is about, if it can (" (store path <name>)"), so the report says
// which path's lookups are broken.
func (d *DB) namePathRow(ctx context.Context, msg string) string {
	m := rowMissing.FindStringSubmatch(msg)
	if m == nil {
		return ""
	}
	var tbl string
	if d.r.QueryRowContext(ctx, "SELECT tbl_name FROM sqlite_master WHERE type = 'index' AND name = ?", m[2]).Scan(&tbl) != nil || tbl != "paths" {
		return ""
	}
	var name string
	if d.r.QueryRowContext(ctx, "SELECT name FROM paths WHERE id = ?", m[1]).Scan(&name) != nil {
		return ""
	}
	return " (store path " + name + ")"
}

// Dangling lists rows whose references do not resolve: refs to missing
// paths, path root nodes whose directory or blob is missing (emptyDir, the
// implicit empty directory, is never stored), blobs whose chunks are
// missing or do not add up to the blob's size, chunks whose frame is
// missing, frames whose pack is missing. An error means the scan could not
// run (the caller reports it as database damage).
func (q q) Dangling(ctx context.Context, emptyDir digest.Digest) ([]Problem, error) {
	out, err := q.malformed(ctx)
	if err != nil {
		return out, err
	}
	err = eachRow(ctx, q, `SELECT IFNULL(p.name, ''), r.referrer, r.reference FROM refs r LEFT JOIN paths p ON p.id = r.referrer
		WHERE p.id IS NULL OR NOT EXISTS (SELECT 1 FROM paths x WHERE x.id = r.reference)`, func(r *sql.Rows) error {
		var name string
		var from, to int64
		if err := r.Scan(&name, &from, &to); err != nil {
			return err
		}
		out = append(out, Problem{Path: name, What: fmt.Sprintf("reference from path id %d to path id %d does not resolve", from, to)})
		return nil
	})
	if err != nil {
		return out, fmt.Errorf("check references: %w", err)
	}
	err = eachRow(ctx, q, `SELECT name, kind FROM paths p WHERE NOT (
		(kind = 1 AND (digest = ? OR EXISTS (SELECT 1 FROM directories d WHERE d.digest = p.digest))) OR
		(kind = 2 AND EXISTS (SELECT 1 FROM blobs b WHERE b.digest = p.digest)) OR
		(kind = 3 AND target IS NOT NULL))`, func(r *sql.Rows) error {
		var name string
		var kind int64
		if err := r.Scan(&name, &kind); err != nil {
			return err
		}
		out = append(out, Problem{Path: name, What: fmt.Sprintf("root node (kind %d) does not resolve", kind)})
		return nil
	}, emptyDir[:])
	if err != nil {
		return out, fmt.Errorf("check path roots: %w", err)
	}
	err = eachRow(ctx, q, "SELECT digest, size, chunks FROM blobs WHERE NOT ("+malformedBlob+")", func(r *sql.Rows) error {
		var b, chunks []byte
		var size int64
		if err := r.Scan(&b, &size, &chunks); err != nil {
			return err
		}
		d, err := digest.FromBytes(b)
		if err != nil {
			return err
		}
		bad := func(what string) { out = append(out, Problem{Blob: &d, What: "blob " + d.String() + ": " + what}) }
		if chunks == nil {
			if size == 0 {
				return nil
			}
			ok, err := q.HasChunk(ctx, d)
			if err != nil {
				return err
			}
			if !ok {
				bad("its chunk is missing")
			}
			return nil
		}
		if len(chunks)%(digest.Size+4) != 0 {
			bad("malformed chunk list")
			return nil
		}
		var sum int64
		for i := 0; i < len(chunks); i += digest.Size + 4 {
			c, _ := digest.FromBytes(chunks[i : i+digest.Size])
			sum += int64(binary.LittleEndian.Uint32(chunks[i+digest.Size:]))
			ok, err := q.HasChunk(ctx, c)
			if err != nil {
				return err
			}
			if !ok {
				bad("chunk " + c.String() + " is missing")
				return nil
			}
		}
		if sum != size {
			bad(fmt.Sprintf("chunks add up to %d bytes, blob size is %d", sum, size))
		}
		return nil
	})
	if err != nil {
		return out, fmt.Errorf("check blobs: %w", err)
	}
	err = eachRow(ctx, q, `SELECT digest, frame FROM chunks c WHERE NOT (`+malformedChunk+`) AND NOT EXISTS (SELECT 1 FROM frames f WHERE f.id = c.frame)`, func(r *sql.Rows) error {
		var b []byte
		var frame int64
		if err := r.Scan(&b, &frame); err != nil {
			return err
		}
		d, err := digest.FromBytes(b)
		if err != nil {
			return err
		}
		out = append(out, Problem{Chunk: &d, What: fmt.Sprintf("chunk %s: frame %d is missing", d, frame)})
		return nil
	})
	if err != nil {
		return out, fmt.Errorf("check chunks: %w", err)
	}
	err = eachRow(ctx, q, `SELECT id, pack FROM frames f WHERE NOT (`+malformedFrame+`) AND NOT EXISTS (SELECT 1 FROM packs p WHERE p.id = f.pack)`, func(r *sql.Rows) error {
		var id, pack int64
		if err := r.Scan(&id, &pack); err != nil {
			return err
		}
		out = append(out, Problem{What: fmt.Sprintf("frame %d: pack %d is missing", id, pack)})
		return nil
	})
	if err != nil {
		return out, fmt.Errorf("check frames: %w", err)
	}
	return out, nil
}

// Rows whose values have the wrong type. SQLite keeps whatever type a
// record's header says, so a flipped bit there turns an integer into text
// or a blob without integrity_check noticing; scans then fail on the row.
// These conditions find such rows (c, f, b: chunks, frames, blobs).
const (
	malformedChunk = `typeof(c.digest) != 'blob' OR length(c.digest) != 32 OR typeof(c.frame) != 'integer' OR
		typeof(c.off) != 'integer' OR typeof(c.len) != 'integer'`
	malformedFrame = `typeof(f.id) != 'integer' OR typeof(f.pack) != 'integer' OR typeof(f.offset) != 'integer' OR
		typeof(f.data_off) != 'integer' OR typeof(f.clen) != 'integer' OR typeof(f.rawlen) != 'integer'`
	malformedBlob = `typeof(digest) != 'blob' OR length(digest) != 32 OR typeof(size) != 'integer' OR
		(chunks IS NOT NULL AND typeof(chunks) != 'blob')`
	malformedPath = `typeof(kind) != 'integer' OR typeof(size) != 'integer' OR typeof(executable) != 'integer' OR
		(digest IS NOT NULL AND (typeof(digest) != 'blob' OR length(digest) != 32)) OR
		(target IS NOT NULL AND typeof(target) != 'blob') OR
		typeof(nar_hash) != 'blob' OR length(nar_hash) != 32 OR typeof(nar_size) != 'integer' OR
		typeof(registered) != 'integer' OR typeof(ultimate) != 'integer'`
)

// malformed reports rows whose values have the wrong type, against what
// they damage: a path row against its path, a chunk row (or every chunk of
// a frame row) against the chunk, a blob row against the blob; a chunk or
// blob row whose digest itself is malformed names nothing (its users find
// it missing).
func (q q) malformed(ctx context.Context) ([]Problem, error) {
	var out []Problem
	digestOf := func(b []byte) *digest.Digest {
		d, err := digest.FromBytes(b)
		if err != nil {
			return nil
		}
		return &d
	}
	err := eachRow(ctx, q, `SELECT CAST(name AS TEXT) FROM paths WHERE `+malformedPath, func(r *sql.Rows) error {
		var name string
		if err := r.Scan(&name); err != nil {
			return err
		}
		out = append(out, Problem{Path: name, What: "path row holds a value of the wrong type"})
		return nil
	})
	if err != nil {
		return out, fmt.Errorf("check path rows: %w", err)
	}
	err = eachRow(ctx, q, `SELECT CAST(c.digest AS BLOB), 'chunk row holds a value of the wrong type' FROM chunks c WHERE `+malformedChunk+`
		UNION ALL SELECT CAST(c.digest AS BLOB), 'its frame row holds a value of the wrong type'
		FROM frames f JOIN chunks c ON c.frame = f.id WHERE `+malformedFrame, func(r *sql.Rows) error {
		var b []byte
		var what string
		if err := r.Scan(&b, &what); err != nil {
			return err
		}
		p := Problem{Chunk: digestOf(b), What: fmt.Sprintf("chunk %x: %s", b, what)}
		if p.Chunk != nil {
			p.What = "chunk " + p.Chunk.String() + ": " + what
		}
		out = append(out, p)
		return nil
	})
	if err != nil {
		return out, fmt.Errorf("check chunk rows: %w", err)
	}
	err = eachRow(ctx, q, `SELECT CAST(digest AS BLOB) FROM blobs WHERE `+malformedBlob, func(r *sql.Rows) error {
		var b []byte
		if err := r.Scan(&b); err != nil {
			return err
		}
		p := Problem{Blob: digestOf(b), What: fmt.Sprintf("blob %x: row holds a value of the wrong type", b)}
		out = append(out, p)
		return nil
	})
	if err != nil {
		return out, fmt.Errorf("check blob rows: %w", err)
	}
	return out, nil
}
