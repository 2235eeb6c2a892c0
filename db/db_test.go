package db

import (
	"context"
	"database/sql"
	"errors"
	"fmt"
	"path/filepath"
	"slices"
	"strings"
	"syscall"
	"testing"

	"github.com/casnix/casnix/digest"
)

func TestMigrateAndRefuseNewer(t *testing.T) {
	ctx := context.Background()
	path := filepath.Join(t.TempDir(), "x.db")
	d, err := Open(ctx, path)
	if err != nil {
		t.Fatal(err)
	}
	latest, err := LatestVersion()
	if err != nil {
		t.Fatal(err)
	}
	d.Close()
	if v, err := SchemaVersion(ctx, path); err != nil || v != latest {
		t.Fatalf("schema version %d (%v), want %d", v, err, latest)
	}
	// Reopening is a no-op migration.
	d, err = Open(ctx, path)
	if err != nil {
		t.Fatal(err)
	}
	d.Close()

	// A data dir from a newer casnix is refused with a clear message.
	raw, err := sql.Open("sqlite", "file:"+path)
	if err != nil {
		t.Fatal(err)
	}
	if _, err := raw.Exec("PRAGMA user_version = 999"); err != nil {
		t.Fatal(err)
	}
	raw.Close()
	_, err = Open(ctx, path)
	if !errors.Is(err, ErrSchemaTooNew) || !strings.Contains(err.Error(), "upgrade casnix") {
		t.Fatalf("err = %v", err)
	}
}

func TestPathByHashPart(t *testing.T) {
	ctx := context.Background()
	d, err := Open(ctx, filepath.Join(t.TempDir(), "x.db"))
	if err != nil {
		t.Fatal(err)
	}
	defer d.Close()
	names := []string{"aaaa-x", "aaab-y", "aaa-z"}
	err = d.Write(ctx, func(tx *Tx) error {
		for _, n := range names {
			if _, err := tx.InsertPath(ctx, &PathRow{Name: n, Kind: 1, NarHash: make([]byte, 32)}); err != nil {
				return err
			}
		}
		return nil
	})
	if err != nil {
		t.Fatal(err)
	}
	tests := []struct{ hash, want string }{{"aaaa", "aaaa-x"}, {"aaab", "aaab-y"}, {"aaa", "aaa-z"}, {"aab", ""}}
	for _, tc := range tests {
		got, err := d.PathByHashPart(ctx, tc.hash)
		if tc.want == "" {
			if !errors.Is(err, ErrNotFound) {
				t.Errorf("%s: %q %v", tc.hash, got, err)
			}
			continue
		}
		if got != tc.want || err != nil {
			t.Errorf("%s: %q %v", tc.hash, got, err)
		}
	}
}

// TestIntegrityCheckNamesPath: a paths row missing from the name index (as
// a flipped byte in the index leaves it) is reported with its store path;
// rows of other tables are not given a path.
func TestIntegrityCheckNamesPath(t *testing.T) {
	ctx := context.Background()
	path := filepath.Join(t.TempDir(), "t.db")
	d, err := Open(ctx, path)
	if err != nil {
		t.Fatal(err)
	}
	const name = "00000000000000000000000000000000-a"
	if err := d.Write(ctx, func(tx *Tx) error {
		_, err := tx.InsertPath(ctx, &PathRow{Name: name, Kind: 3, Target: []byte("x"), NarHash: make([]byte, 32), NarSize: 1})
		return err
	}); err != nil {
		t.Fatal(err)
	}
	if got, err := d.IntegrityCheck(ctx); err != nil || len(got) != 0 {
		t.Fatalf("sound database: %q %v", got, err)
	}
	defer d.Close()
	// The message integrity_check gives for a row its name index lacks.
	if got := d.namePathRow(ctx, "row 1 missing from index sqlite_autoindex_paths_1"); got != " (store path "+name+")" {
		t.Fatalf("namePathRow = %q", got)
	}
	if got := d.namePathRow(ctx, "row 1 missing from index refs_reference"); got != "" {
		t.Fatalf("namePathRow of another table's index = %q", got)
	}
}

// TestWriteFull fills the database up to SQLite's max_page_count, which fails
// like a full disk does (SQLITE_FULL): the error must say "no space left on
// device" and wrap ENOSPC, nothing of the failed transaction may be visible,
// and the next Write must work.
func TestWriteFull(t *testing.T) {
	ctx := context.Background()
	d, err := Open(ctx, filepath.Join(t.TempDir(), "x.db"))
	if err != nil {
		t.Fatal(err)
	}
	defer d.Close()
	if err := d.Write(ctx, func(tx *Tx) error {
		_, err := tx.tx.ExecContext(ctx, "CREATE TABLE junk(b BLOB)")
		return err
	}); err != nil {
		t.Fatal(err)
	}
	var pages int
	if err := d.w.QueryRowContext(ctx, "PRAGMA page_count").Scan(&pages); err != nil {
		t.Fatal(err)
	}
	if _, err := d.w.ExecContext(ctx, fmt.Sprintf("PRAGMA max_page_count = %d", pages+8)); err != nil {
		t.Fatal(err)
	}
	err = d.Write(ctx, func(tx *Tx) error {
		_, err := tx.tx.ExecContext(ctx, "INSERT INTO junk VALUES (randomblob(1000000))")
		return err
	})
	if !errors.Is(err, syscall.ENOSPC) || !strings.Contains(err.Error(), "no space left on device") {
		t.Fatalf("insert past max_page_count: %v, want an error wrapping ENOSPC", err)
	}
	if err := d.Write(ctx, func(tx *Tx) error {
		_, err := tx.tx.ExecContext(ctx, "INSERT INTO junk VALUES (x'01')")
		return err
	}); err != nil {
		t.Fatalf("write after a full one: %v", err)
	}
	var n int
	if err := d.r.QueryRowContext(ctx, "SELECT count(*) FROM junk").Scan(&n); err != nil || n != 1 {
		t.Fatalf("junk has %d rows (%v), want the 1 committed after the failure", n, err)
	}
}

// TestBlobsAndLocs: the batch lookup answers what BlobAndLoc answers for
// each digest (single-chunk blobs with their location, chunked blobs
// without, missing blobs absent), for lists shorter than, equal to and
// (refused) longer than a batch.
func TestBlobsAndLocs(t *testing.T) {
	ctx := context.Background()
	d, err := Open(ctx, filepath.Join(t.TempDir(), "x.db"))
	if err != nil {
		t.Fatal(err)
	}
	defer d.Close()
	var stored []digest.Digest
	err = d.Write(ctx, func(tx *Tx) error {
		pack, err := tx.InsertPack(ctx)
		if err != nil {
			return err
		}
		frame, err := tx.InsertFrame(ctx, Frame{Pack: pack, Offset: 0, DataOff: 16, CLen: 100, RawLen: 4096})
		if err != nil {
			return err
		}
		for i := range ChunkBatch {
			dg := digest.Sum([]byte(fmt.Sprint("blob", i)))
			stored = append(stored, dg)
			b := Blob{Size: int64(10 + i)}
			if i%3 == 0 { // chunked: a list of (digest, length)
				b.Chunks = make([]byte, digest.Size+4)
			} else if err := tx.InsertChunk(ctx, dg, frame, int64(i*10), int64(10+i)); err != nil {
				return err
			}
			if err := tx.InsertBlob(ctx, dg, b); err != nil {
				return err
			}
		}
		return nil
	})
	if err != nil {
		t.Fatal(err)
	}
	missing := digest.Sum([]byte("missing"))
	tests := []struct {
		name string
		ds   []digest.Digest
	}{
		{"one", stored[:1]},
		{"some and a missing one", append([]digest.Digest{missing}, stored[1:5]...)},
		{"a full batch", stored},
		{"only missing", []digest.Digest{missing}},
		{"none", nil},
	}
	for _, tc := range tests {
		t.Run(tc.name, func(t *testing.T) {
			got, err := d.BlobsAndLocs(ctx, tc.ds)
			if err != nil {
				t.Fatal(err)
			}
			n := 0
			for _, dg := range tc.ds {
				b, loc, err := d.BlobAndLoc(ctx, dg)
				bl, ok := got[dg]
				if errors.Is(err, ErrNotFound) {
					if ok {
						t.Errorf("%s: missing blob in the batch answer", dg)
					}
					continue
				}
				n++
				if err != nil || !ok {
					t.Fatalf("%s: %v, in batch %v", dg, err, ok)
				}
				if bl.Size != b.Size || string(bl.Chunks) != string(b.Chunks) || (loc == nil) != (bl.Loc == nil) || (loc != nil && *loc != *bl.Loc) {
					t.Errorf("%s: batch %+v %+v, single %+v %+v", dg, bl.Blob, bl.Loc, b, loc)
				}
			}
			if len(got) != n {
				t.Errorf("batch answered %d blobs, want %d", len(got), n)
			}
		})
	}
	if _, err := d.BlobsAndLocs(ctx, append(stored, missing)); err == nil {
		t.Error("a list longer than a batch was accepted")
	}
}

// TestPathRootsByName pages through paths in the order of their names
// without the hash part, whatever the page size: the versions of a package
// come together, ties broken by the whole name, derivations last.
func TestPathRootsByName(t *testing.T) {
	ctx := context.Background()
	d, err := Open(ctx, filepath.Join(t.TempDir(), "x.db"))
	if err != nil {
		t.Fatal(err)
	}
	defer d.Close()
	h := func(c byte) string { return strings.Repeat(string(c), 32) }
	names := []string{h('z') + "-foo-1.0", h('0') + "-foo-1.1", h('m') + "-bar-2", h('a') + "-foo-1.0", h('b') + "-zed",
		h('c') + "-foo-1.0.drv", h('d') + "-bar-2.drv"}
	want := []string{h('m') + "-bar-2", h('a') + "-foo-1.0", h('z') + "-foo-1.0", h('0') + "-foo-1.1", h('b') + "-zed",
		h('d') + "-bar-2.drv", h('c') + "-foo-1.0.drv"}
	err = d.Write(ctx, func(tx *Tx) error {
		for _, n := range names {
			if _, err := tx.InsertPath(ctx, &PathRow{Name: n, Kind: 1, NarHash: make([]byte, 32)}); err != nil {
				return err
			}
		}
		return nil
	})
	if err != nil {
		t.Fatal(err)
	}
	for _, page := range []int{1, 2, 3, 10} {
		var got []string
		after := ""
		for {
			rows, err := d.PathRootsByName(ctx, after, page)
			if err != nil {
				t.Fatal(err)
			}
			for _, r := range rows {
				got = append(got, r.Name)
			}
			if len(rows) < page {
				break
			}
			after = rows[len(rows)-1].Name
		}
		if !slices.Equal(got, want) {
			t.Errorf("page %d: %q, want %q", page, got, want)
		}
	}
}
