package replicate

import (
	"context"
	"errors"
	"fmt"
	"strconv"
	"strings"
	"time"

	"github.com/benbjohnson/litestream"
	"github.com/superfly/ltx"

	"github.com/casnix/casnix/objstore"
)

// Restorable is the oldest database state a restore from the bucket can produce: what a
// deletion of pack objects must still respect, since every state before a pack was
// dropped from the index names it.
type Restorable struct {
	// Replica is whether the bucket holds any LTX file of a replicated database.
	Replica bool
	// Found is whether some state is restorable. Time is when the oldest one was the
	// primary's newest: the timestamp in the header of the LTX file a restore to it ends
	// with (the primary's clock, as the drop times casnix records; for a compacted file,
	// its newest input's), and TXID its transaction.
	Found bool
	Time  time.Time
	TXID  uint64
}

// OldestRestorable finds the oldest state a restore from the replica under loc can give.
//
// Litestream's restore plan (litestream.CalcRestorePlan, v0.5.18) starts from the newest
// snapshot at or before the target, or, with none, from nothing, and then applies files
// of any level each of which starts at most one transaction past where the plan is; the
// target is a file's end (a transaction inside a file is refused as not available). So a
// restored state is always the end of a chain that starts either at a snapshot or at a
// file of a lower level whose first transaction is 1, and is never older than where its
// chain starts. The oldest restorable state is therefore the oldest end among the
// snapshots and the lower-level files starting at transaction 1 (such files exist while
// the database's first transactions are retained: the first day of a primary, or until
// level-0 retention and snapshot retention drop them). Files Litestream's retention
// removes between the listing and the reading of their headers are passed over: they can
// no longer be restored from.
//
// Costs one listing of the database's LTX files (a request per 1000 files) and one ranged
// GET per snapshot and per file starting at transaction 1.
func OldestRestorable(ctx context.Context, loc objstore.Location) (Restorable, error) {
	c, err := client(ctx, loc)
	if err != nil {
		return Restorable{}, err
	}
	return oldestRestorable(ctx, c)
}

func oldestRestorable(ctx context.Context, c *bucketClient) (Restorable, error) {
	var r Restorable
	var starts []*ltx.FileInfo
	dir := litestream.LTXDir("") + "/"
	err := c.b.List(ctx, dir, func(o objstore.Info) error {
		rest, ok := strings.CutPrefix(o.Name, dir)
		if !ok {
			return nil
		}
		lvl, name, ok := strings.Cut(rest, "/")
		if !ok {
			return nil
		}
		level, err := strconv.Atoi(lvl)
		if err != nil || level < 0 || level > litestream.SnapshotLevel {
			return nil
		}
		minTXID, maxTXID, err := ltx.ParseFilename(name)
		if err != nil {
			return nil
		}
		r.Replica = true
		if level == litestream.SnapshotLevel || minTXID == 1 {
			starts = append(starts, &ltx.FileInfo{Level: level, MinTXID: minTXID, MaxTXID: maxTXID, Size: o.Size})
		}
		return nil
	})
	if err != nil {
		return Restorable{}, fmt.Errorf("oldest restorable state in %s: %w", c.b.Location(), err)
	}
	for _, fi := range starts {
		ts, err := c.headerTime(ctx, fi)
		if errors.Is(err, objstore.ErrNotFound) {
			continue // removed by retention since the listing
		}
		if err != nil {
			return Restorable{}, fmt.Errorf("oldest restorable state in %s: %w", c.b.Location(), err)
		}
		if !r.Found || ts.Before(r.Time) || (ts.Equal(r.Time) && uint64(fi.MaxTXID) < r.TXID) {
			r.Found, r.Time, r.TXID = true, ts, uint64(fi.MaxTXID)
		}
	}
	return r, nil
}
