package store

import (
	"bytes"
	"context"
	"crypto/sha256"
	"database/sql"
	"errors"
	"fmt"
	"io"
	"io/fs"
	"os"
	"path/filepath"
	"strings"
	"syscall"
	"testing"
	"time"

	"github.com/casnix/casnix/db"
	"github.com/casnix/casnix/migrations"
)

// fileState is what a read must not change about a file of the data dir.
type fileState struct {
	size  int64
	mtime time.Time
	sum   [32]byte
}

// dirState maps every file and directory under dir to its state.
func dirState(t *testing.T, dir string) map[string]fileState {
	t.Helper()
	out := map[string]fileState{}
	err := filepath.WalkDir(dir, func(p string, d fs.DirEntry, err error) error {
		if err != nil {
			return err
		}
		fi, err := d.Info()
		if err != nil {
			return err
		}
		st := fileState{size: fi.Size(), mtime: fi.ModTime()}
		if d.Type().IsRegular() {
			data, err := os.ReadFile(p)
			if err != nil {
				return err
			}
			st.sum = sha256.Sum256(data)
		}
		rel, _ := filepath.Rel(dir, p)
		out[rel] = st
		return nil
	})
	if err != nil {
		t.Fatal(err)
	}
	return out
}

// TestReadOnlyOpenChangesNothing: a read-only open of an existing data dir
// (what dump, cat, ls and path-info use) renders paths and changes no file
// of the data dir: not the database, the packs, the lock or any directory.
// The only exceptions are SQLite's own: the first read after a writer closed
// last creates casnix.db-wal (empty) and casnix.db-shm (the wal-index, which
// every first opener re-initialises) and, unlike a writer, leaves them for
// the next read instead of creating and deleting both every time. Writes
// through the read-only store fail.
func TestReadOnlyOpenChangesNothing(t *testing.T) {
	ctx := context.Background()
	dir := t.TempDir()
	st, err := Open(ctx, dir, Options{})
	if err != nil {
		t.Fatal(err)
	}
	n := treeNAR(t, 300<<10)
	if err := add(t, st, pathA, n); err != nil {
		t.Fatal(err)
	}
	if err := st.Close(); err != nil {
		t.Fatal(err)
	}
	before := dirState(t, dir)
	for _, f := range []string{DBFile + "-wal", DBFile + "-shm"} {
		if _, ok := before[f]; ok {
			t.Fatalf("%s is there after the writer closed", f)
		}
	}
	time.Sleep(10 * time.Millisecond) // so a changed mtime shows
	var first map[string]fileState
	for i := range 3 {
		ro, err := Open(ctx, dir, Options{ReadOnly: true})
		if err != nil {
			t.Fatal(err)
		}
		if got := render(t, ro, pathA); !bytes.Equal(got, n) {
			t.Fatal("read-only store renders another NAR")
		}
		if err := ro.AddSignatures(ctx, pathA, []string{"k:c2ln"}); !errors.Is(err, db.ErrReadOnly) {
			t.Errorf("AddSignatures on a read-only store: %v, want db.ErrReadOnly", err)
		}
		if err := add(t, ro, pathB, treeNAR(t, 1000)); err == nil {
			t.Error("a read-only store took a new path")
		}
		if err := ro.Close(); err != nil {
			t.Fatal(err)
		}
		after := dirState(t, dir)
		for name, b := range before {
			if a, ok := after[name]; !ok {
				t.Errorf("read %d removed %s", i, name)
			} else if a != b && name != "." {
				// "." is the data dir: its mtime changes when the WAL files
				// are created by the first read, checked below.
				t.Errorf("read %d changed %s: %+v -> %+v", i, name, b, a)
			}
		}
		for name, a := range after {
			if _, ok := before[name]; ok {
				continue
			}
			switch {
			case name == DBFile+"-wal" && a.size == 0, name == DBFile+"-shm":
			default:
				t.Errorf("read %d left %s (%d bytes)", i, name, a.size)
			}
		}
		if i == 0 {
			first = after
			continue
		}
		// Later reads create and remove nothing: the data dir is untouched.
		if first["."] != after["."] || len(first) != len(after) {
			t.Errorf("read %d changed the data dir's entries", i)
		}
	}
}

// oldSchemaDir makes a data dir whose database has every migration but
// the last.
func oldSchemaDir(t *testing.T) (string, int) {
	t.Helper()
	dir := t.TempDir()
	latest, err := db.LatestVersion()
	if err != nil {
		t.Fatal(err)
	}
	raw, err := sql.Open("sqlite", "file:"+filepath.Join(dir, DBFile))
	if err != nil {
		t.Fatal(err)
	}
	defer raw.Close()
	ents, err := fs.ReadDir(migrations.FS, ".")
	if err != nil {
		t.Fatal(err)
	}
	for _, e := range ents[:latest-1] {
		body, err := fs.ReadFile(migrations.FS, e.Name())
		if err != nil {
			t.Fatal(err)
		}
		if _, err := raw.Exec(string(body)); err != nil {
			t.Fatal(err)
		}
	}
	if _, err := raw.Exec(fmt.Sprintf("PRAGMA user_version = %d", latest-1)); err != nil {
		t.Fatal(err)
	}
	return dir, latest
}

// TestReadOnlyOpenSchemas: a read after an upgrade migrates an older schema
// as every command did before (the operator who upgraded casnix expects
// `casnix dump` to work, not to be told to run another command first); a
// newer schema is refused with the message that says what to do; a data dir
// that does not exist yet is created, as before, and reads as empty.
func TestReadOnlyOpenSchemas(t *testing.T) {
	ctx := context.Background()
	dir, latest := oldSchemaDir(t)
	ro, err := Open(ctx, dir, Options{ReadOnly: true})
	if err != nil {
		t.Fatalf("read-only open of an older schema: %v", err)
	}
	if names, err := ro.All(ctx); err != nil || len(names) != 0 {
		t.Fatalf("All = %q, %v", names, err)
	}
	ro.Close()
	if v, err := db.SchemaVersion(ctx, filepath.Join(dir, DBFile)); err != nil || v != latest {
		t.Fatalf("schema version after the read %d (%v), want %d", v, err, latest)
	}

	raw, err := sql.Open("sqlite", "file:"+filepath.Join(dir, DBFile))
	if err != nil {
		t.Fatal(err)
	}
	if _, err := raw.Exec("PRAGMA user_version = 999"); err != nil {
		t.Fatal(err)
	}
	raw.Close()
	if _, err := Open(ctx, dir, Options{ReadOnly: true}); !errors.Is(err, db.ErrSchemaTooNew) || !strings.Contains(err.Error(), "upgrade casnix") {
		t.Fatalf("newer schema: %v", err)
	}

	fresh := filepath.Join(t.TempDir(), "new")
	ro, err = Open(ctx, fresh, Options{ReadOnly: true})
	if err != nil {
		t.Fatalf("read-only open of a new data dir: %v", err)
	}
	defer ro.Close()
	if _, err := ro.Info(ctx, pathA); !errors.Is(err, ErrNotValid) {
		t.Fatalf("Info in a new data dir: %v", err)
	}
}

// BenchmarkOpenDump is the store's share of a one-shot `casnix dump` of a
// small path: Open, render, Close, as a writer (what every command did) and
// read-only (what dump, cat, ls and path-info do now). Process start-up is
// bench/startup.sh's.
func BenchmarkOpenDump(b *testing.B) {
	ctx := context.Background()
	dir := b.TempDir()
	st, err := Open(ctx, dir, Options{})
	if err != nil {
		b.Fatal(err)
	}
	n := treeNAR(b, 4<<10)
	if err := add(b, st, pathA, n); err != nil {
		b.Fatal(err)
	}
	st.Close()
	for _, ro := range []bool{false, true} {
		name := "writable"
		if ro {
			name = "read-only"
		}
		b.Run(name, func(b *testing.B) {
			cpu0 := cpuTime(b)
			for b.Loop() {
				st, err := Open(ctx, dir, Options{ReadOnly: ro})
				if err != nil {
					b.Fatal(err)
				}
				if _, err := st.NarRender(ctx, pathA, io.Discard); err != nil {
					b.Fatal(err)
				}
				if err := st.Close(); err != nil {
					b.Fatal(err)
				}
			}
			b.ReportMetric(float64(cpuTime(b)-cpu0)/float64(b.N)/1e6, "cpu-ms/op")
		})
	}
}

// cpuTime is the user + system time this process has used.
func cpuTime(b *testing.B) time.Duration {
	var ru syscall.Rusage
	if err := syscall.Getrusage(syscall.RUSAGE_SELF, &ru); err != nil {
		b.Fatal(err)
	}
	return time.Duration(ru.Utime.Nano() + ru.Stime.Nano())
}
