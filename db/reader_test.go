package db

import (
	"context"
	"database/sql"
	"errors"
	"fmt"
	"io/fs"
	"path/filepath"
	"strings"
	"testing"

	"github.com/casnix/casnix/migrations"
)

// oldSchema makes a database at path with every migration but the last.
func oldSchema(t *testing.T, path string) {
	t.Helper()
	files, err := migrationFiles()
	if err != nil {
		t.Fatal(err)
	}
	raw, err := sql.Open("sqlite", "file:"+path)
	if err != nil {
		t.Fatal(err)
	}
	defer raw.Close()
	for _, m := range files[:len(files)-1] {
		body, err := fs.ReadFile(migrations.FS, m.name)
		if err != nil {
			t.Fatal(err)
		}
		if _, err := raw.Exec(string(body)); err != nil {
			t.Fatal(err)
		}
		if _, err := raw.Exec(fmt.Sprintf("PRAGMA user_version = %d", m.version)); err != nil {
			t.Fatal(err)
		}
	}
}

// TestOpenReader: a current schema opens for reading and refuses writes;
// an older one is ErrNeedsMigration (Open still migrates it), a newer one
// ErrSchemaTooNew, a missing file fs.ErrNotExist (nothing is created).
func TestOpenReader(t *testing.T) {
	ctx := context.Background()
	dir := t.TempDir()
	cur := filepath.Join(dir, "cur.db")
	d, err := Open(ctx, cur)
	if err != nil {
		t.Fatal(err)
	}
	d.Close()
	r, err := OpenReader(ctx, cur)
	if err != nil {
		t.Fatal(err)
	}
	if !r.ReadOnly() {
		t.Error("OpenReader's database says it is writable")
	}
	if _, err := r.PathNames(ctx); err != nil {
		t.Errorf("read: %v", err)
	}
	if err := r.Write(ctx, func(*Tx) error { return nil }); !errors.Is(err, ErrReadOnly) {
		t.Errorf("Write on a reader: %v, want ErrReadOnly", err)
	}
	if err := r.Reindex(ctx); !errors.Is(err, ErrReadOnly) {
		t.Errorf("Reindex on a reader: %v, want ErrReadOnly", err)
	}
	if err := r.Close(); err != nil {
		t.Fatal(err)
	}

	old := filepath.Join(dir, "old.db")
	oldSchema(t, old)
	if _, err := OpenReader(ctx, old); !errors.Is(err, ErrNeedsMigration) {
		t.Fatalf("old schema: %v, want ErrNeedsMigration", err)
	}
	if d, err = Open(ctx, old); err != nil {
		t.Fatalf("Open after a refused OpenReader: %v", err)
	}
	d.Close()
	if r, err = OpenReader(ctx, old); err != nil {
		t.Fatalf("migrated: %v", err)
	}
	r.Close()

	raw, err := sql.Open("sqlite", "file:"+cur)
	if err != nil {
		t.Fatal(err)
	}
	if _, err := raw.Exec("PRAGMA user_version = 999"); err != nil {
		t.Fatal(err)
	}
	raw.Close()
	if _, err := OpenReader(ctx, cur); !errors.Is(err, ErrSchemaTooNew) || !strings.Contains(err.Error(), "upgrade casnix") {
		t.Fatalf("newer schema: %v", err)
	}

	missing := filepath.Join(dir, "missing.db")
	if _, err := OpenReader(ctx, missing); !errors.Is(err, fs.ErrNotExist) {
		t.Fatalf("missing file: %v", err)
	}
	if _, err := SchemaVersion(ctx, missing); err == nil {
		t.Fatal("OpenReader created the missing database")
	}
}

// TestIntegrityCheckSchema: a schema as the migrations make it, freshly or
// step by step, passes; one whose text was damaged (a flipped byte in a
// column name: SQLite's integrity check passes it, and every query naming
// the column fails) is reported, naming the object.
func TestIntegrityCheckSchema(t *testing.T) {
	ctx := context.Background()
	dir := t.TempDir()
	for _, tc := range []struct {
		name   string
		make   func(path string)
		damage string
		want   string
	}{
		{"fresh", func(string) {}, "", ""},
		{"migrated from the previous version", func(p string) { oldSchema(t, p) }, "", ""},
		{"column renamed", func(string) {}, `UPDATE sqlite_schema SET sql = replace(sql, 'deriver', 'deriveR') WHERE name = 'paths'`, `schema: "paths" is`},
		{"index dropped", func(string) {}, `DELETE FROM sqlite_schema WHERE type = 'index' AND name NOT LIKE 'sqlite_%' AND rowid = (SELECT MIN(rowid) FROM sqlite_schema WHERE type = 'index' AND name NOT LIKE 'sqlite_%')`, "is missing"},
	} {
		t.Run(tc.name, func(t *testing.T) {
			path := filepath.Join(dir, strings.ReplaceAll(tc.name, " ", "_")+".db")
			tc.make(path)
			d, err := Open(ctx, path)
			if err != nil {
				t.Fatal(err)
			}
			d.Close()
			if tc.damage != "" {
				raw, err := sql.Open("sqlite", "file:"+path)
				if err != nil {
					t.Fatal(err)
				}
				raw.SetMaxOpenConns(1)
				for _, q := range []string{"PRAGMA writable_schema = ON", tc.damage, "PRAGMA writable_schema = OFF"} {
					if _, err := raw.Exec(q); err != nil {
						t.Fatalf("%s: %v", q, err)
					}
				}
				raw.Close()
			}
			d, err = Open(ctx, path)
			if err != nil {
				t.Fatal(err)
			}
			defer d.Close()
			probs, err := d.IntegrityCheck(ctx)
			if err != nil {
				t.Fatal(err)
			}
			got := strings.Join(probs, "\n")
			if tc.want == "" && got != "" || tc.want != "" && !strings.Contains(got, tc.want) {
				t.Errorf("problems:\n%s\nwant %q", got, tc.want)
			}
		})
	}
}
