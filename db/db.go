// Package db opens casnix's SQLite database (modernc.org/sqlite, no cgo),
// applies the embedded migrations, and offers typed queries over its tables.
//
// Connections: one writer (BEGIN IMMEDIATE, so write transactions never
// deadlock on lock upgrades) and a pool of query-only readers; WAL mode lets
// readers run beside the writer. synchronous=FULL because a commit here is
// what tells a client "your path is stored".
package db

import (
	"context"
	"database/sql"
	"database/sql/driver"
	"errors"
	"fmt"
	"io/fs"
	"net/url"
	"os"
	"path/filepath"
	"runtime"
	"sort"
	"strconv"
	"strings"
	"sync"
	"syscall"

	"modernc.org/sqlite" // registers the "sqlite" driver; FileControl

	"github.com/casnix/casnix/migrations"
)

// ErrNotFound is returned by lookups of rows that do not exist.
var ErrNotFound = errors.New("not found")

// ErrSchemaTooNew means the data dir was written by a newer casnix.
var ErrSchemaTooNew = errors.New("database schema is newer than this casnix")

// ErrNeedsMigration is returned by OpenReader for a database whose schema
// is older than this binary's: only Open, which migrates, can open it.
var ErrNeedsMigration = errors.New("database schema needs migrating")

// ErrReadOnly is returned by writes to a database OpenReader opened.
var ErrReadOnly = errors.New("database is open read-only")

// DB is an open casnix database.
type DB struct {
	// readOnlyWhy, when set, says why writes are refused (a replica names
	// its primary's bucket); ErrReadOnly wraps it.
	readOnlyWhy string
	w           *sql.DB // nil when opened by OpenReader
	r           *sql.DB
	path        string
	q           // read queries on the reader pool
}

func dsn(path string, readOnly bool) string {
	v := url.Values{}
	v.Add("_pragma", "busy_timeout(30000)")
	v.Add("_pragma", "foreign_keys(1)")
	v.Add("_pragma", "synchronous(FULL)")
	v.Add("_pragma", "journal_mode(WAL)")
	// Reads through mmap skip a pread system call per page, which
	// dominated lookups on large stores; the mapping is file cache shared
	// between connections, not heap.
	v.Add("_pragma", "mmap_size(268435456)")
	v.Add("_pragma", "cache_size(-16384)")
	if readOnly {
		v.Add("_pragma", "query_only(1)")
	} else {
		v.Set("_txlock", "immediate")
		// When the WAL restarts (after a checkpoint copied all of it back),
		// the first commit cuts the file down to its new frames. Litestream
		// (replicate, on a primary with packs in a bucket) relies on that:
		// a primary killed with transactions it had not shipped yet may, on
		// its next start, checkpoint and restart the WAL before Litestream
		// runs again, and Litestream sees what happened only if the WAL is
		// now shorter than where it stopped reading ("truncated": it takes a
		// full snapshot). A restarted WAL left at its old length, its old
		// frames still in place past the new ones, passes Litestream's check
		// and it carries on from its old offset, missing the transactions
		// the checkpoint took: replicas and restores then got pages of two
		// different states (TestServeS3DurableBucket, "integrity check
		// failed" in a restore after a run of SIGKILLs).
		v.Add("_pragma", "journal_size_limit(0)")
	}
	return "file:" + path + "?" + v.Encode()
}

// Open opens (creating if needed) the database at path and migrates it.
func Open(ctx context.Context, path string) (*DB, error) {
	w, err := sql.Open("sqlite", dsn(path, false))
	if err != nil {
		return nil, fmt.Errorf("open database %s: %w", path, err)
	}
	w.SetMaxOpenConns(1)
	w.SetMaxIdleConns(1)
	w.SetConnMaxLifetime(0)
	if err := migrate(ctx, w); err != nil {
		w.Close()
		return nil, fmt.Errorf("database %s: %w", path, noSpaceAt(filepath.Dir(path), err))
	}
	r, err := sql.Open("sqlite", dsn(path, true))
	if err != nil {
		w.Close()
		return nil, fmt.Errorf("open database %s: %w", path, err)
	}
	n := max(4, 2*runtime.GOMAXPROCS(0))
	r.SetMaxOpenConns(n)
	r.SetMaxIdleConns(n)
	return &DB{w: w, r: r, path: path, q: q{c: r, stmts: newStmtCache(r.PrepareContext)}}, nil
}

// OpenReader opens the existing database at path for reading only, the
// cheap start of one-shot commands (dump, cat, ls, path-info): no writer
// connection and no migration. database/sql opens reader connections as
// queries need them, so a command that queries one at a time opens one.
// A schema older than this binary's is ErrNeedsMigration (the caller opens
// with Open instead, which migrates), a newer one ErrSchemaTooNew; a
// missing file is an error wrapping fs.ErrNotExist (mode=rw never creates).
//
// Its connections keep the WAL and -shm files when they close
// (SQLITE_FCNTL_PERSIST_WAL), with journal_size_limit 0 so the WAL is
// truncated to nothing, not left at the size a writer grew it to: without
// that, every one-shot read would create both files and, closing last,
// delete them again, two creates and two unlinks in the data dir per call.
// The last closer still checkpoints the WAL into the database as before.
func OpenReader(ctx context.Context, path string) (*DB, error) {
	if _, err := os.Stat(path); err != nil {
		return nil, fmt.Errorf("open database: %w", err)
	}
	drv, err := sqliteDriver()
	if err != nil {
		return nil, err
	}
	name := dsn(path, true) + "&" + url.Values{"_pragma": {"journal_size_limit(0)"}, "mode": {"rw"}}.Encode()
	r := sql.OpenDB(persistWAL{drv: drv, dsn: name})
	n := max(4, 2*runtime.GOMAXPROCS(0))
	r.SetMaxOpenConns(n)
	r.SetMaxIdleConns(n)
	if err := checkSchema(ctx, r); err != nil {
		r.Close()
		return nil, fmt.Errorf("database %s: %w", path, err)
	}
	return &DB{r: r, path: path, q: q{c: r, stmts: newStmtCache(r.PrepareContext)}}, nil
}

// OpenReplica opens a read replica's database at path for reading: a file
// that a follower process (replicate.Follow) rewrites in place, page by
// page, in rollback-journal mode, under SQLite's exclusive file lock. So
// the connections are read-only (mode=ro: they never change the journal
// mode or create a WAL), take SQLite's shared lock for each read
// transaction and wait (busy_timeout) while the follower writes, and do
// not map the file (pages change under them between transactions; SQLite
// rereads its cache when the file change counter moves). A replica never
// migrates: its schema is the primary's, and a newer one than this
// binary's is ErrSchemaTooNew, an older one ErrNeedsMigration.
//
// A replica shows only the paths whose data is in the bucket (ReplicaPaths).
func OpenReplica(ctx context.Context, path string) (*DB, error) {
	if _, err := os.Stat(path); err != nil {
		return nil, fmt.Errorf("open replica database: %w", err)
	}
	drv, err := sqliteDriver()
	if err != nil {
		return nil, err
	}
	v := url.Values{}
	v.Add("_pragma", "busy_timeout(30000)")
	v.Add("_pragma", "cache_size(-16384)")
	v.Add("_pragma", "temp_store(memory)")
	v.Set("mode", "ro")
	r := sql.OpenDB(replicaConnector{drv: drv, dsn: "file:" + path + "?" + v.Encode()})
	n := max(4, 2*runtime.GOMAXPROCS(0))
	r.SetMaxOpenConns(n)
	r.SetMaxIdleConns(n)
	if err := checkSchema(ctx, r); err != nil {
		r.Close()
		return nil, fmt.Errorf("replica database %s: %w", path, err)
	}
	return &DB{r: r, path: path, q: q{c: r, stmts: newStmtCache(r.PrepareContext)}, readOnlyWhy: "a read replica's database is the primary's"}, nil
}

// readOnly is ErrReadOnly with the reason, if any.
func (d *DB) readOnly() error {
	if d.readOnlyWhy != "" {
		return fmt.Errorf("%w: %s", ErrReadOnly, d.readOnlyWhy)
	}
	return ErrReadOnly
}

// SetReadOnlyReason is what writes to a read-only database say (with
// ErrReadOnly), e.g. "read replica of s3://…: write to its primary".
func (d *DB) SetReadOnlyReason(why string) { d.readOnlyWhy = why }

// ReplicaPaths is the view a replica's connections see as "paths": a temp
// view, which SQLite resolves before the table of the same name in main, so
// every query of the package sees it unchanged. A path is shown once every
// frame its data may use is in an uploaded pack: its frame_mark (the largest
// frame id when it was committed, migration 0007) is below the first frame of
// every pack not uploaded yet. The primary records an upload once the object
// is complete, a change the follower applies like any other, so a path shows
// up on replicas about one upload window after its commit. (Chunks a
// compaction moved into a new pack are the exception: they are in the bucket
// only once that pack is uploaded.)
const ReplicaPaths = `CREATE TEMP VIEW paths AS SELECT * FROM main.paths WHERE frame_mark < coalesce(
	(SELECT min(f.id) FROM main.frames f JOIN main.packs p ON p.id = f.pack WHERE p.uploaded = 0),
	9223372036854775807)`

// replicaConnector opens replica connections, each with ReplicaPaths.
type replicaConnector struct {
	drv driver.Driver
	dsn string
}

func (c replicaConnector) Connect(ctx context.Context) (driver.Conn, error) {
	conn, err := c.drv.Open(c.dsn)
	if err != nil {
		return nil, err
	}
	ex, ok := conn.(driver.ExecerContext)
	if !ok {
		conn.Close()
		return nil, fmt.Errorf("sqlite connection %T cannot exec", conn)
	}
	// query_only after the view: it forbids the temp schema's writes too.
	for _, q := range []string{ReplicaPaths, "PRAGMA query_only(1)"} {
		if _, err := ex.ExecContext(ctx, q, nil); err != nil {
			conn.Close()
			return nil, fmt.Errorf("replica connection: %w", err)
		}
	}
	return conn, nil
}

func (c replicaConnector) Driver() driver.Driver { return c.drv }

// checkSchema fails unless the database's schema version is the latest.
func checkSchema(ctx context.Context, c *sql.DB) error {
	latest, err := LatestVersion()
	if err != nil {
		return err
	}
	var cur int
	if err := c.QueryRowContext(ctx, "PRAGMA user_version").Scan(&cur); err != nil {
		return fmt.Errorf("read schema version: %w", err)
	}
	switch {
	case cur > latest:
		return fmt.Errorf("%w: schema version %d, this binary knows up to %d; upgrade casnix", ErrSchemaTooNew, cur, latest)
	case cur < latest:
		return fmt.Errorf("%w: schema version %d, this binary's is %d", ErrNeedsMigration, cur, latest)
	}
	return nil
}

// sqliteDriver is the registered "sqlite" driver (getting it opens nothing).
func sqliteDriver() (driver.Driver, error) {
	c, err := sql.Open("sqlite", "")
	if err != nil {
		return nil, fmt.Errorf("sqlite driver: %w", err)
	}
	defer c.Close()
	return c.Driver(), nil
}

// persistWAL is a connector whose connections set SQLITE_FCNTL_PERSIST_WAL
// (see OpenReader).
type persistWAL struct {
	drv driver.Driver
	dsn string
}

func (c persistWAL) Connect(context.Context) (driver.Conn, error) {
	conn, err := c.drv.Open(c.dsn)
	if err != nil {
		return nil, err
	}
	fc, ok := conn.(sqlite.FileControl)
	if !ok {
		conn.Close()
		return nil, fmt.Errorf("sqlite connection %T has no file control", conn)
	}
	if _, err := fc.FileControlPersistWAL("main", 1); err != nil {
		conn.Close()
		return nil, fmt.Errorf("persist WAL: %w", err)
	}
	return conn, nil
}

func (c persistWAL) Driver() driver.Driver { return c.drv }

// ReadOnly reports whether the database was opened by OpenReader.
func (d *DB) ReadOnly() bool { return d.w == nil }

// Close closes all connections.
func (d *DB) Close() error {
	err := errors.Join(d.q.stmts.close(), d.r.Close())
	if d.w != nil {
		err = errors.Join(err, d.w.Close())
	}
	return err
}

// File is the database file's path.
func (d *DB) File() string { return d.path }

// LatestVersion is the schema version this binary writes.
func LatestVersion() (int, error) {
	files, err := migrationFiles()
	if err != nil {
		return 0, err
	}
	return files[len(files)-1].version, nil
}

type migration struct {
	version int
	name    string
}

func migrationFiles() ([]migration, error) {
	entries, err := fs.ReadDir(migrations.FS, ".")
	if err != nil {
		return nil, fmt.Errorf("read migrations: %w", err)
	}
	var out []migration
	for _, e := range entries {
		num, _, ok := strings.Cut(e.Name(), "_")
		if !ok || !strings.HasSuffix(e.Name(), ".sql") {
			return nil, fmt.Errorf("migration file %q is not NNNN_name.sql", e.Name())
		}
		v, err := strconv.Atoi(num)
		if err != nil {
			return nil, fmt.Errorf("migration file %q: %w", e.Name(), err)
		}
		out = append(out, migration{v, e.Name()})
	}
	sort.Slice(out, func(i, j int) bool { return out[i].version < out[j].version })
	for i, m := range out {
		if m.version != i+1 {
			return nil, fmt.Errorf("migrations are not numbered 1..n: %q", m.name)
		}
	}
	return out, nil
}

// SchemaVersion reads the schema version of the database file at path
// without migrating it (0 for a new or empty database).
func SchemaVersion(ctx context.Context, path string) (int, error) {
	c, err := sql.Open("sqlite", "file:"+path+"?mode=ro")
	if err != nil {
		return 0, err
	}
	defer c.Close()
	var v int
	if err := c.QueryRowContext(ctx, "PRAGMA user_version").Scan(&v); err != nil {
		return 0, fmt.Errorf("read schema version: %w", err)
	}
	return v, nil
}

func migrate(ctx context.Context, w *sql.DB) error {
	files, err := migrationFiles()
	if err != nil {
		return err
	}
	latest := files[len(files)-1].version
	var cur int
	if err := w.QueryRowContext(ctx, "PRAGMA user_version").Scan(&cur); err != nil {
		return fmt.Errorf("read schema version: %w", err)
	}
	if cur > latest {
		return fmt.Errorf("%w: schema version %d, this binary knows up to %d; upgrade casnix", ErrSchemaTooNew, cur, latest)
	}
	for _, m := range files[cur:] {
		body, err := fs.ReadFile(migrations.FS, m.name)
		if err != nil {
			return fmt.Errorf("read migration %s: %w", m.name, err)
		}
		tx, err := w.BeginTx(ctx, nil)
		if err != nil {
			return fmt.Errorf("migration %s: %w", m.name, err)
		}
		if _, err := tx.ExecContext(ctx, string(body)); err != nil {
			tx.Rollback()
			return fmt.Errorf("migration %s: %w", m.name, err)
		}
		// PRAGMA takes no bind parameters; the version is an int we made.
		if _, err := tx.ExecContext(ctx, fmt.Sprintf("PRAGMA user_version = %d", m.version)); err != nil {
			tx.Rollback()
			return fmt.Errorf("migration %s: set version: %w", m.name, err)
		}
		if err := tx.Commit(); err != nil {
			return fmt.Errorf("migration %s: commit: %w", m.name, err)
		}
	}
	return nil
}

// Tx is a write transaction.
type Tx struct {
	tx *sql.Tx
	q
}

// Write runs fn in one write transaction and commits it if fn returns nil.
//
// A failed commit (SQLITE_FULL or SQLITE_IOERR: the disk filled up or the
// WAL could not be written) may leave SQLite's transaction open on the
// connection, and SQLite's own automatic rollback is not guaranteed after
// such errors; the one writer connection is therefore rolled back and
// discarded, so the next Write starts on a fresh connection that sees only
// committed data. Errors that mean "no space" also wrap syscall.ENOSPC, so
// callers and users see "no space left on device" rather than SQLite's
// "database or disk is full".
func (d *DB) Write(ctx context.Context, fn func(*Tx) error) error {
	if d.w == nil {
		return d.readOnly()
	}
	conn, err := d.w.Conn(ctx)
	if err != nil {
		return fmt.Errorf("begin: %w", d.noSpace(err))
	}
	defer conn.Close()
	tx, err := conn.BeginTx(ctx, nil)
	if err != nil {
		discard(conn)
		return fmt.Errorf("begin: %w", d.noSpace(err))
	}
	// Statements are prepared on the transaction itself: the writer pool has
	// one connection, which the transaction holds.
	stmts := newStmtCache(tx.PrepareContext)
	defer stmts.close()
	if err := fn(&Tx{tx: tx, q: q{c: tx, stmts: stmts}}); err != nil {
		if rerr := tx.Rollback(); rerr != nil {
			discard(conn)
		}
		return d.noSpace(err)
	}
	if err := tx.Commit(); err != nil {
		discard(conn)
		return fmt.Errorf("commit: %w", d.noSpace(err))
	}
	return nil
}

// discard rolls back whatever transaction SQLite may still hold open on
// conn and has the pool close it instead of reusing it.
func discard(conn *sql.Conn) {
	conn.Raw(func(dc any) error {
		if e, ok := dc.(driver.ExecerContext); ok {
			e.ExecContext(context.Background(), "ROLLBACK", nil) // "no transaction is active" is fine
		}
		return driver.ErrBadConn
	})
}

// fullSlack is how little space left still counts as a full file system
// (see noSpaceAt).
const fullSlack = 1 << 20

// SQLite's primary result codes SQLITE_IOERR and SQLITE_FULL.
const (
	sqliteIOErr = 10
	sqliteFull  = 13
)

// noSpace is noSpaceAt for the database's directory.
func (d *DB) noSpace(err error) error { return noSpaceAt(filepath.Dir(d.path), err) }

// noSpaceAt is noSpace, and also names ENOSPC for an SQLITE_IOERR when the
// file system of dir has no space left. Opening a WAL database maps its
// -shm file, which SQLite grows by writing to it; on a full disk that fails
// as a bare "disk I/O error" (SQLITE_IOERR_SHMSIZE), SQLite keeping errno
// to itself, though the cure is to free space. A commit that faults on a
// page of the mapped -shm the full file system cannot back fails the same
// way (SQLITE_IOERR_IN_PAGE). "Full" allows for less than fullSlack left:
// ext4 refuses writes while it still reports a little space (its reserved
// clusters), and a write may need more blocks than are left.
func noSpaceAt(dir string, err error) error {
	var se interface{ Code() int }
	if err == nil || errors.Is(err, syscall.ENOSPC) || !errors.As(err, &se) || se.Code()&0xff != sqliteIOErr {
		return noSpace(err)
	}
	var st syscall.Statfs_t
	if syscall.Statfs(dir, &st) != nil || st.Bavail*uint64(st.Bsize) >= fullSlack {
		return err
	}
	return fmt.Errorf("%w (file system full: %w)", err, syscall.ENOSPC)
}

// noSpace makes an SQLITE_FULL error also wrap syscall.ENOSPC: SQLite says
// "database or disk is full", which names neither the cause nor the fix.
func noSpace(err error) error {
	var se interface{ Code() int }
	if err == nil || errors.Is(err, syscall.ENOSPC) || !errors.As(err, &se) || se.Code()&0xff != sqliteFull {
		return err
	}
	return fmt.Errorf("%w (%w)", err, syscall.ENOSPC)
}

// Snapshot runs fn in one read transaction on the reader pool: every query
// made through the Tx sees the database as of its first query, whatever
// commits meanwhile (WAL snapshot isolation), and no writer waits for it.
// The Tx is read-only (its connection is query_only).
func (d *DB) Snapshot(ctx context.Context, fn func(*Tx) error) error {
	tx, err := d.r.BeginTx(ctx, nil)
	if err != nil {
		return fmt.Errorf("begin read: %w", err)
	}
	defer tx.Rollback()
	stmts := newStmtCache(tx.PrepareContext)
	defer stmts.close()
	return fn(&Tx{tx: tx, q: q{c: tx, stmts: stmts}})
}

type queryer interface {
	ExecContext(ctx context.Context, query string, args ...any) (sql.Result, error)
	QueryContext(ctx context.Context, query string, args ...any) (*sql.Rows, error)
	QueryRowContext(ctx context.Context, query string, args ...any) *sql.Row
}

// q implements the typed queries on the reader pool or in a write
// transaction.
// Queries go through prepared statements cached per connection pool:
// parsing SQL on every call cost more than running it.
type q struct {
	c     queryer
	stmts *stmtCache
}

func (q q) stmt(ctx context.Context, query string) (*sql.Stmt, error) {
	return q.stmts.get(ctx, query)
}

func (q q) exec(ctx context.Context, query string, args ...any) (sql.Result, error) {
	st, err := q.stmt(ctx, query)
	if err != nil {
		return nil, err
	}
	return st.ExecContext(ctx, args...)
}

func (q q) query(ctx context.Context, query string, args ...any) (*sql.Rows, error) {
	st, err := q.stmt(ctx, query)
	if err != nil {
		return nil, err
	}
	return st.QueryContext(ctx, args...)
}

// rowScanner defers a prepare error to Scan, like *sql.Row does.
type rowScanner struct {
	row *sql.Row
	err error
}

func (r rowScanner) Scan(dest ...any) error {
	if r.err != nil {
		return r.err
	}
	return r.row.Scan(dest...)
}

func (q q) row(ctx context.Context, query string, args ...any) rowScanner {
	st, err := q.stmt(ctx, query)
	if err != nil {
		return rowScanner{err: err}
	}
	return rowScanner{row: st.QueryRowContext(ctx, args...)}
}

type prepareFunc func(ctx context.Context, query string) (*sql.Stmt, error)

// stmtCache prepares each query once per pool or write transaction.
type stmtCache struct {
	prep prepareFunc
	mu   sync.Mutex
	m    map[string]*sql.Stmt
}

func newStmtCache(p prepareFunc) *stmtCache { return &stmtCache{prep: p, m: map[string]*sql.Stmt{}} }

func (c *stmtCache) get(ctx context.Context, query string) (*sql.Stmt, error) {
	c.mu.Lock()
	defer c.mu.Unlock()
	if st, ok := c.m[query]; ok {
		return st, nil
	}
	st, err := c.prep(ctx, query)
	if err != nil {
		return nil, fmt.Errorf("prepare: %w", err)
	}
	c.m[query] = st
	return st, nil
}

func (c *stmtCache) close() error {
	c.mu.Lock()
	defer c.mu.Unlock()
	var errs []error
	for k, st := range c.m {
		errs = append(errs, st.Close())
		delete(c.m, k)
	}
	return errors.Join(errs...)
}
