package replicate

import (
	"context"
	"encoding/binary"
	"errors"
	"fmt"
	"io"
	"io/fs"
	"log/slog"
	"os"
	"time"

	"github.com/benbjohnson/litestream"
	"github.com/superfly/ltx"
	"golang.org/x/sys/unix"

	"github.com/casnix/casnix/objstore"
)

// Follow restores the database under loc to out if out does not exist, then applies new
// transactions as the primary ships them, polling the bucket every interval, until ctx is
// done. A restart goes on from the last transaction applied (the out-txid file beside
// out). Readers of out must open it read-only (db.OpenReplica).
//
// The apply loop is casnix's, not Litestream's follow mode, for two reasons that make a
// reader beside it correct: every applied file changes the database's file change
// counter (Litestream's changes it only when page 1 is in the file, and SQLite keeps its
// page cache across transactions while that counter stays, so a reader would go on
// serving old pages), and a file is checked whole (its checksums) before any page of it
// reaches the database, so a damaged object never leaves half a transaction behind.
func Follow(ctx context.Context, loc objstore.Location, out string, interval time.Duration, log *slog.Logger) error {
	c, err := client(ctx, loc)
	if err != nil {
		return err
	}
	if log == nil {
		log = quietLogger()
	}
	if interval <= 0 {
		interval = time.Second
	}
	for waited := false; ; waited = true {
		if _, err := os.Stat(out); !errors.Is(err, fs.ErrNotExist) {
			break
		}
		err := restoreForFollow(ctx, litestream.NewReplicaWithClient(nil, c), out)
		if err == nil {
			break
		}
		if !errors.Is(err, ErrNoReplica) {
			return fmt.Errorf("follow %s: %w", loc.Sub(Dir), err)
		}
		// A replica started before its primary's first upload waits for it.
		if !waited {
			log.Info("no database in the bucket yet: waiting for the primary", "url", loc.Sub(Dir).String(), "err", err)
		}
		select {
		case <-ctx.Done():
			return nil
		case <-time.After(interval):
		}
	}
	cur, err := litestream.ReadTXIDFile(out)
	if err != nil || cur == 0 {
		return fmt.Errorf("follow %s: %s exists without the record of its last transaction (%v); remove it to restore again", loc.Sub(Dir), out, err)
	}
	f := &follower{c: c, out: out}
	t := time.NewTicker(interval)
	defer t.Stop()
	failures := 0
	for {
		next, err := f.step(ctx, cur)
		if next > cur {
			log.Debug("replica caught up", "from", cur, "to", next)
			cur = next
		}
		if err != nil && ctx.Err() == nil {
			failures++
			if failures == 1 || failures%60 == 0 {
				log.Warn("replica: applying the primary's changes failed; retrying", "err", err, "failures", failures)
			}
		} else {
			failures = 0
		}
		select {
		case <-ctx.Done():
			return nil
		case <-t.C:
		}
	}
}

type follower struct {
	c   *bucketClient
	out string
}

// step applies every file that follows cur, in order, and returns the transaction the
// database is at.
func (f *follower) step(ctx context.Context, cur ltx.TXID) (ltx.TXID, error) {
	for {
		fi, err := f.next(ctx, cur)
		if err != nil || fi == nil {
			return cur, err
		}
		if err := f.apply(ctx, fi); err != nil {
			return cur, err
		}
		cur = fi.MaxTXID
		if err := litestream.WriteTXIDFile(f.out, cur); err != nil {
			return cur, err
		}
	}
}

// next is the file that takes the database on from cur: the level-0 file that starts at
// cur+1; failing that (level 0 was compacted away, or the follower was off for long), a
// compacted file of a higher level that covers cur+1 (it holds every page changed in its
// range as of its end); failing that, a newer snapshot. Nil when the database is current.
// Only level 0 is listed when there is something there to apply, so the usual poll is one
// request.
func (f *follower) next(ctx context.Context, cur ltx.TXID) (*ltx.FileInfo, error) {
	files, err := f.list(ctx, 0, cur+1)
	if err != nil {
		return nil, err
	}
	if len(files) > 0 && files[0].MinTXID == cur+1 {
		return files[0], nil
	}
	newer := len(files) > 0
	for level := 1; level <= litestream.SnapshotLevel; level++ {
		fs, err := f.list(ctx, level, 0)
		if err != nil {
			return nil, err
		}
		var best *ltx.FileInfo
		for _, fi := range fs {
			covers := fi.MinTXID <= cur+1 || level == litestream.SnapshotLevel
			if covers && fi.MaxTXID > cur && (best == nil || fi.MaxTXID > best.MaxTXID) {
				best = fi
			}
		}
		if best != nil {
			return best, nil
		}
	}
	if newer {
		return nil, fmt.Errorf("transactions %d to %d are in no file of the bucket", cur+1, files[0].MinTXID-1)
	}
	return nil, nil
}

func (f *follower) list(ctx context.Context, level int, seek ltx.TXID) ([]*ltx.FileInfo, error) {
	it, err := f.c.LTXFiles(ctx, level, seek, false)
	if err != nil {
		return nil, err
	}
	defer it.Close()
	var out []*ltx.FileInfo
	for it.Next() {
		out = append(out, it.Item())
	}
	return out, it.Err()
}

// apply downloads fi, checks it whole into a spool file, then writes its pages into the
// database under SQLite's exclusive lock.
func (f *follower) apply(ctx context.Context, fi *ltx.FileInfo) error {
	rc, err := f.c.OpenLTXFile(ctx, fi.Level, fi.MinTXID, fi.MaxTXID, 0, 0)
	if err != nil {
		return err
	}
	defer rc.Close()
	spool, err := os.CreateTemp("", "casnix-follow-")
	if err != nil {
		return err
	}
	defer os.Remove(spool.Name())
	defer spool.Close()
	dec := ltx.NewDecoder(rc)
	if err := dec.DecodeHeader(); err != nil {
		return fmt.Errorf("%s: %w", ltx.FormatFilename(fi.MinTXID, fi.MaxTXID), err)
	}
	hdr := dec.Header()
	ps := int(hdr.PageSize)
	data := make([]byte, ps)
	var pages []uint32
	for {
		var ph ltx.PageHeader
		err := dec.DecodePage(&ph, data)
		if err == io.EOF {
			break
		}
		if err != nil {
			return fmt.Errorf("%s: page: %w", ltx.FormatFilename(fi.MinTXID, fi.MaxTXID), err)
		}
		if _, err := spool.Write(data); err != nil {
			return err
		}
		pages = append(pages, ph.Pgno)
	}
	if err := dec.Close(); err != nil { // the file's checksums
		return fmt.Errorf("%s: %w", ltx.FormatFilename(fi.MinTXID, fi.MaxTXID), err)
	}
	return f.write(spool, pages, ps, hdr.Commit)
}

// SQLite's lock bytes (os_unix.c): a writer takes PENDING, then the whole SHARED range
// exclusively; readers hold part of the SHARED range while they read, and cannot start
// while PENDING is taken (they retry within their busy timeout).
const (
	pendingByte = 0x40000000
	sharedFirst = pendingByte + 2
	sharedSize  = 510
)

func fcntlLock(f *os.File, typ int16, start, n int64) error {
	return unix.FcntlFlock(f.Fd(), unix.F_SETLKW, &unix.Flock_t{Type: typ, Whence: io.SeekStart, Start: start, Len: n})
}

// write copies the spooled pages into the database, sets the header for readers (rollback
// journal mode, a new change counter, the size) and syncs, all under the exclusive lock.
func (f *follower) write(spool *os.File, pages []uint32, ps int, commit uint32) (err error) {
	db, err := os.OpenFile(f.out, os.O_RDWR, 0)
	if err != nil {
		return err
	}
	defer db.Close()
	if err := fcntlLock(db, unix.F_WRLCK, pendingByte, 1); err != nil {
		return fmt.Errorf("lock %s: %w", f.out, err)
	}
	defer fcntlLock(db, unix.F_UNLCK, pendingByte, 1)
	if err := fcntlLock(db, unix.F_WRLCK, sharedFirst, sharedSize); err != nil {
		return fmt.Errorf("lock %s: %w", f.out, err)
	}
	defer fcntlLock(db, unix.F_UNLCK, sharedFirst, sharedSize)
	data := make([]byte, ps)
	for i, pg := range pages {
		if _, err := spool.ReadAt(data, int64(i)*int64(ps)); err != nil {
			return fmt.Errorf("spool: %w", err)
		}
		if _, err := db.WriteAt(data, int64(pg-1)*int64(ps)); err != nil {
			return fmt.Errorf("write page %d of %s: %w", pg, f.out, err)
		}
	}
	if commit > 0 {
		if err := db.Truncate(int64(commit) * int64(ps)); err != nil {
			return err
		}
	}
	var h [100]byte
	if _, err := db.ReadAt(h[:], 0); err != nil {
		return fmt.Errorf("read header of %s: %w", f.out, err)
	}
	h[18], h[19] = 1, 1 // rollback journal, not WAL: readers read the file itself
	counter := binary.BigEndian.Uint32(h[24:]) + 1
	binary.BigEndian.PutUint32(h[24:], counter) // readers drop their page caches
	binary.BigEndian.PutUint32(h[92:], counter) // the size below is valid for this counter
	if commit > 0 {
		binary.BigEndian.PutUint32(h[28:], commit)
	}
	if _, err := db.WriteAt(h[:], 0); err != nil {
		return fmt.Errorf("write header of %s: %w", f.out, err)
	}
	return db.Sync()
}
