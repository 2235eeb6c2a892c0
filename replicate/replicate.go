// Package replicate streams a primary's casnix.db to object storage and brings it back, on
// Litestream (github.com/benbjohnson/litestream, used as a library): the primary ships its
// SQLite WAL to the bucket continuously (LTX files, snapshots, retention), a restore
// rebuilds the database as of the newest state or any retained time, and a follower keeps a
// read replica's copy current by applying new LTX files as they appear.
//
// The follower writes the replica's database file in place under SQLite's own file locks
// (POSIX byte-range locks, which a process does not see its own of), so it must run in a
// process of its own beside the readers: Follow is what `casnix replica follow` runs.
package replicate

import (
	"cmp"
	"context"
	"errors"
	"fmt"
	"io"
	"io/fs"
	"log/slog"
	"os"
	"path/filepath"
	"time"

	"github.com/benbjohnson/litestream"

	"github.com/casnix/casnix/objstore"
)

// Dir is where, under a store's bucket prefix, the database's replica lives.
const Dir = "db"

// client is the Litestream replica client for the database under loc's prefix + "/db".
func client(ctx context.Context, loc objstore.Location) (*bucketClient, error) {
	b, err := objstore.Open(ctx, loc.Sub(Dir), objstore.Options{})
	if err != nil {
		return nil, err
	}
	return &bucketClient{b: b, log: quietLogger()}, nil
}

// quietLogger keeps Litestream's informational chatter out of casnix's log; warnings
// and errors still show.
func quietLogger() *slog.Logger {
	return slog.New(slog.NewTextHandler(os.Stderr, &slog.HandlerOptions{Level: slog.LevelWarn}))
}

// Options tune a Primary.
type Options struct {
	// SyncInterval is how often the WAL is shipped (Litestream's default: 1 s). It bounds
	// how much a crash of the primary's host can lose of what was committed locally.
	SyncInterval time.Duration
	// SnapshotInterval is how often a full snapshot is written (default 1 h): a restore
	// or a new replica starts from the newest one and applies what followed.
	SnapshotInterval time.Duration
	// Retention is how long snapshots (and so restore points) are kept (default 24 h).
	Retention time.Duration
	// L1Interval and L2Interval are how often level 0 is compacted into level 1 (default
	// 30 s) and level 1 into level 2 (default 5 min); L0Retention is how long a level-0
	// file stays once compacted into level 1 (Litestream's default, 5 min). Together with
	// Retention they bound how old the oldest restorable state is (OldestRestorable);
	// tests shorten them.
	L1Interval, L2Interval, L0Retention time.Duration
}

// Primary replicates one database file to a bucket until Close.
type Primary struct {
	db    *litestream.DB
	store *litestream.Store

	// syncing (one slot) serialises Sync; okStart is when the last successful one
	// started.
	syncing chan struct{}
	okStart time.Time
}

// StartPrimary starts replicating the SQLite database at dbPath (in WAL mode, as casnix's
// is) to loc's prefix + "/db". It runs beside the process's own connections: Litestream
// holds a read transaction so that only it checkpoints the WAL, after shipping it.
func StartPrimary(ctx context.Context, dbPath string, loc objstore.Location, o Options) (*Primary, error) {
	db := litestream.NewDB(dbPath)
	if o.SyncInterval > 0 {
		db.MonitorInterval = o.SyncInterval
	}
	c, err := client(ctx, loc)
	if err != nil {
		return nil, err
	}
	r := litestream.NewReplicaWithClient(db, c)
	if o.SyncInterval > 0 {
		r.SyncInterval = o.SyncInterval
	}
	db.Replica = r
	levels := litestream.CompactionLevels{
		{Level: 0},
		{Level: 1, Interval: cmp.Or(o.L1Interval, 30*time.Second)},
		{Level: 2, Interval: cmp.Or(o.L2Interval, 5*time.Minute)},
	}
	st := litestream.NewStore([]*litestream.DB{db}, levels)
	st.Logger = quietLogger()
	db.SetLogger(st.Logger)
	if o.L0Retention > 0 {
		st.SetL0Retention(o.L0Retention)
		st.L0RetentionCheckInterval = min(st.L0RetentionCheckInterval, o.L0Retention)
	}
	if o.SnapshotInterval > 0 {
		st.SnapshotInterval = o.SnapshotInterval
	}
	if o.Retention > 0 {
		st.SnapshotRetention = o.Retention
	}
	if err := st.Open(ctx); err != nil {
		return nil, fmt.Errorf("replicate %s to %s: %w", dbPath, loc.Sub(Dir), err)
	}
	return &Primary{db: db, store: st, syncing: make(chan struct{}, 1)}, nil
}

// Sync ships everything committed so far to the bucket and returns when it is there: for
// a caller that must not acknowledge before the metadata is in the bucket, and for tests.
//
// Concurrent callers share the work: a sync that started after a caller arrived covers
// everything that caller committed, so the caller waits for it instead of running its own.
func (p *Primary) Sync(ctx context.Context) error {
	arrived := time.Now()
	select {
	case p.syncing <- struct{}{}:
	case <-ctx.Done():
		return fmt.Errorf("replicate %s: %w", p.db.Path(), ctx.Err())
	}
	defer func() { <-p.syncing }()
	if p.okStart.After(arrived) {
		return nil
	}
	start := time.Now()
	if err := p.db.SyncAndWait(ctx); err != nil {
		return fmt.Errorf("replicate %s: %w", p.db.Path(), err)
	}
	p.okStart = start
	return nil
}

// LastSync is when the bucket last took everything that was committed before it.
func (p *Primary) LastSync() time.Time { return p.db.LastSuccessfulSyncAt() }

// Close ships what is left and stops.
func (p *Primary) Close(ctx context.Context) error {
	if err := p.store.Close(ctx); err != nil {
		return fmt.Errorf("stop replicating %s: %w", p.db.Path(), err)
	}
	return nil
}

// ErrNoReplica is returned by Restore when the bucket holds no replica of a database.
var ErrNoReplica = errors.New("no database replica in the bucket")

// Restore writes the database as replicated under loc to out (which must not exist): as
// of the newest state, or of the last transaction at or before at when at is not zero.
// The restored file is checked with SQLite's integrity check.
func Restore(ctx context.Context, loc objstore.Location, out string, at time.Time) error {
	c, err := client(ctx, loc)
	if err != nil {
		return err
	}
	r := litestream.NewReplicaWithClient(nil, c)
	opt := litestream.NewRestoreOptions()
	opt.OutputPath = out
	opt.Timestamp = at
	opt.IntegrityCheck = litestream.IntegrityCheckQuick
	if err := r.Restore(ctx, opt); err != nil {
		if errors.Is(err, litestream.ErrTxNotAvailable) || errors.Is(err, litestream.ErrNoSnapshots) {
			return fmt.Errorf("restore from %s: %w (%v)", loc.Sub(Dir), ErrNoReplica, err)
		}
		return fmt.Errorf("restore from %s: %w", loc.Sub(Dir), err)
	}
	return nil
}

// AppliedTXID is the last transaction a follower applied to out (0 before the first).
// The first restore writes its transaction file before out appears (so that out never
// exists without it), so out is looked for first: until it is there, nothing is applied.
func AppliedTXID(out string) (uint64, error) {
	if _, err := os.Stat(out); errors.Is(err, fs.ErrNotExist) {
		return 0, nil
	} else if err != nil {
		return 0, err
	}
	id, err := litestream.ReadTXIDFile(out)
	if err != nil && !errors.Is(err, io.EOF) {
		return 0, err
	}
	return uint64(id), nil
}

// restoreForFollow restores the newest state to out for a follower to go on from, in
// rollback-journal mode. Litestream's own follow restore keeps the primary's WAL mode in
// the file header until a transaction rewrites page 1, and a reader that opens the file
// in WAL mode trusts its WAL index, not the file, so it would never see the pages the
// follower writes. The restore is to an explicit transaction (the newest one now), so the
// transaction file written beside out names exactly what out holds; out appears by
// rename once complete, so a crash leaves either no out (restore again) or a whole one.
func restoreForFollow(ctx context.Context, r *litestream.Replica, out string) error {
	plan, err := litestream.CalcRestorePlan(ctx, r.Client, 0, time.Time{}, quietLogger())
	if err != nil {
		return fmt.Errorf("%w (%v)", ErrNoReplica, err)
	}
	if len(plan) == 0 {
		return ErrNoReplica
	}
	txid := plan[len(plan)-1].MaxTXID
	tmp := out + ".restoring"
	_ = os.Remove(tmp)
	opt := litestream.NewRestoreOptions()
	opt.OutputPath = tmp
	opt.TXID = txid
	opt.IntegrityCheck = litestream.IntegrityCheckQuick
	if err := r.Restore(ctx, opt); err != nil {
		return err
	}
	f, err := os.OpenFile(tmp, os.O_RDWR, 0)
	if err != nil {
		return err
	}
	// Bytes 18 and 19 of the header: file format write and read versions, 1 for
	// rollback journal, 2 for WAL.
	if _, err := f.WriteAt([]byte{1, 1}, 18); err != nil {
		f.Close()
		return fmt.Errorf("set rollback-journal mode: %w", err)
	}
	if err := errors.Join(f.Sync(), f.Close()); err != nil {
		return err
	}
	if err := litestream.WriteTXIDFile(out, txid); err != nil {
		return err
	}
	if err := os.Rename(tmp, out); err != nil {
		return err
	}
	d, err := os.Open(filepath.Dir(out))
	if err != nil {
		return err
	}
	defer d.Close()
	return d.Sync()
}
