package crashfs

import (
	"database/sql"
	"fmt"
	"math/rand"
	"path/filepath"
	"strconv"
	"strings"
	"testing"

	_ "modernc.org/sqlite"

	"github.com/casnix/casnix/tests/nixtest"
)

// openDB opens path with casnix's journal settings and the given synchronous level.
func openDB(path, synchronous string) (*sql.DB, error) {
	db, err := sql.Open("sqlite", "file:"+path+"?_pragma=journal_mode(WAL)&_pragma=synchronous("+synchronous+
		")&_pragma=wal_autocheckpoint(16)&_pragma=busy_timeout(1000)")
	if err != nil {
		return nil, err
	}
	db.SetMaxOpenConns(1)
	return db, nil
}

// sqliteCut creates the table on the backing dir, mounts it with the given cut trigger,
// lets a helper process commit transactions until the cut (cutAfterCommits > 0 cuts
// once that many COMMITs returned), then checks the backing copy. It returns how many
// transactions committed, and what is wrong after the cut: committed transactions lost
// or a database that fails integrity_check ("" if nothing).
func sqliteCut(t *testing.T, seed int64, synchronous string, cutAtFsync int64, cutAfterCommits int) (committed int, problem string) {
	t.Helper()
	backing := t.TempDir()
	dbPath := filepath.Join(backing, "db")
	db, err := openDB(dbPath, "FULL")
	must(t, err)
	_, err = db.Exec(`CREATE TABLE t (id INTEGER PRIMARY KEY, v BLOB NOT NULL)`)
	must(t, err)
	must(t, db.Close())

	f := mount(t, backing, Options{Seed: seed, CutAtFsync: cutAtFsync})
	cmd, out := startHelper(t, "sqlite", "CRASHFS_DB="+filepath.Join(f.Mountpoint(), "db"),
		"CRASHFS_SYNC="+synchronous, fmt.Sprintf("CRASHFS_SEED=%d", seed))
	var ids []int
	for out.Scan() {
		line := out.Text()
		if strings.HasPrefix(line, "stop ") {
			continue
		}
		id, err := strconv.Atoi(line)
		if err != nil {
			t.Fatalf("sqlite client said %q", line)
		}
		ids = append(ids, id)
		if cutAfterCommits > 0 && len(ids) == cutAfterCommits {
			go f.PowerCut()
		}
	}
	if err := cmd.Wait(); err != nil {
		t.Fatalf("sqlite client: %v", err)
	}
	if _, err := f.PowerCut(); err != nil {
		t.Fatal(err)
	}

	db, err = openDB(dbPath, "FULL")
	must(t, err)
	defer db.Close()
	var check string
	if err := db.QueryRow(`PRAGMA integrity_check`).Scan(&check); err != nil || check != "ok" {
		return len(ids), fmt.Sprintf("integrity_check: %.200q, %v", check, err)
	}
	present := map[int]bool{}
	rows, err := db.Query(`SELECT id FROM t`)
	if err != nil {
		return len(ids), fmt.Sprintf("query after cut: %v", err)
	}
	for rows.Next() {
		var id int
		must(t, rows.Scan(&id))
		present[id] = true
	}
	must(t, rows.Err())
	lost := 0
	for _, id := range ids {
		if !present[id] {
			lost++
		}
	}
	if lost > 0 {
		return len(ids), fmt.Sprintf("%d of %d committed transactions lost", lost, len(ids))
	}
	return len(ids), ""
}

// TestSQLiteWALSurvivesCuts cuts power at random fsyncs under SQLite in WAL mode with
// synchronous=FULL (casnix's settings): every committed transaction survives and the
// database passes integrity_check.
func TestSQLiteWALSurvivesCuts(t *testing.T) {
	nixtest.RequireFUSE(t)
	const cuts = 50
	rng := rand.New(rand.NewSource(42))
	var total, midway int
	for i := 0; i < cuts; i++ {
		seed := int64(i)
		at := 1 + rng.Int63n(400)
		committed, problem := sqliteCut(t, seed, "FULL", at, 0)
		if problem != "" {
			t.Errorf("seed %d, cut at fsync %d: %s", seed, at, problem)
		}
		total += committed
		if committed < 400 {
			midway++
		}
	}
	if midway == 0 {
		t.Errorf("no cut landed before the client finished")
	}
	t.Logf("%d cuts (%d before the last commit), %d committed transactions checked", cuts, midway, total)
}

// TestSQLiteSyncOffLosesCommits is the negative control: with synchronous=OFF SQLite
// never fsyncs, so some cuts must lose committed transactions or corrupt the database,
// showing the tool can fail.
func TestSQLiteSyncOffLosesCommits(t *testing.T) {
	nixtest.RequireFUSE(t)
	const cuts = 10
	rng := rand.New(rand.NewSource(7))
	var lossy []string
	for i := 0; i < cuts; i++ {
		after := 5 + rng.Intn(100)
		committed, problem := sqliteCut(t, int64(i), "OFF", 0, after)
		if problem != "" {
			lossy = append(lossy, fmt.Sprintf("seed %d (%d committed): %s", i, committed, problem))
		}
	}
	if len(lossy) == 0 {
		t.Fatalf("no cut of %d lost a committed transaction or corrupted the database under synchronous=OFF", cuts)
	}
	t.Logf("%d of %d cuts detected damage:\n%s", len(lossy), cuts, strings.Join(lossy, "\n"))
}
