package store

import (
	"context"
	"fmt"
	"sync"
	"sync/atomic"
	"time"

	"github.com/casnix/casnix/blobs"
	"github.com/casnix/casnix/db"
	"github.com/casnix/casnix/replicate"
)

// Deleting dead packs' objects from the bucket (`--packs s3://…`).
//
// A compaction drops an uploaded pack from the index once no chunk points
// into it, and records it in dead_packs (db.DropPack, db.MarkUploaded); its
// object stays in the bucket, because every state of the database before
// the drop names it: a read replica a few seconds behind, and any state a
// restore from the bucket's replica can still produce (`casnix restore
// s3://… --at`, replicate.Restore). DeleteDeadPacks deletes a dead pack's
// object once the oldest state the replica can restore
// (replicate.OldestRestorable) was made more than a margin after the drop:
// every restorable state is then one the drop had already committed in, so
// none names the pack. The margin covers what separates "made at" from "holds
// the drop": the replica's lag behind the primary, Litestream shipping the
// WAL late, readers of this host still on an older read transaction, and
// clock skew between the hosts that record the drop and the snapshot. It is
// what a replica that fell further behind than the margin may find missing.
//
// Backups to a bucket (`casnix backup s3://…`, package backupremote) never
// name pack objects: their manifests name segment objects of their own,
// packs/<lineage>/NN/<id>-<offset>-<tail>.pack, uploaded from the local
// pack files (backupremote.segmentKey), and restore downloads only those.
// A dead pack's object is therefore no backup point's concern.

// DefaultDeadPackMargin is DeadPackOptions.Margin's default.
const DefaultDeadPackMargin = time.Hour

// DeadPackOptions tune DeleteDeadPacks.
type DeadPackOptions struct {
	// Margin is how much later than a pack's drop the oldest restorable
	// state of the database must have been made before the pack's object
	// is deleted (0: DefaultDeadPackMargin).
	Margin time.Duration
	// WithoutReplica applies when the bucket holds no replica of the
	// database at all (packs in a bucket, the database only here: a data
	// dir a `serve` never ran on as a primary). Then nothing but this data
	// dir's own database names pack objects, and a dead pack's object goes
	// once Margin has passed since its drop. Without it such objects stay
	// (the behaviour before deletion existed): one who later restores an
	// older copy of this database made some other way may still need them.
	WithoutReplica bool
	// Now is the clock (tests; nil: time.Now).
	Now func() time.Time
}

// DeadPackResult is what DeleteDeadPacks did.
type DeadPackResult struct {
	// Deleted is how many dead packs' objects were deleted (and their rows
	// removed); Waiting how many are kept for now.
	Deleted, Waiting int
	// Replica is whether the bucket holds a replica of the database;
	// Oldest is when its oldest restorable state was made (zero: none).
	Replica bool
	Oldest  time.Time
}

// DeadPackStats are the store's counters of dead packs' objects deleted
// from the bucket since open.
type DeadPackStats struct {
	Deleted, Failures int64
	// Oldest is the oldest restorable state as of the last round (zero:
	// none, or no round yet).
	Oldest time.Time
}

type deadPackCounters struct {
	deleted, failures atomic.Int64
	mu                sync.Mutex
	oldest            time.Time
}

// testHookDeadPacksDeleted runs after a round deleted objects and before
// their rows are removed (tests: a crash in between).
var testHookDeadPacksDeleted func() error

// DeleteDeadPacks deletes from the bucket the objects of the dead packs
// that no restorable state of the database names any more (see above), and
// then their dead_packs rows: objects first, so that a crash in between
// leaves rows whose objects are gone, which the next round deletes again
// (a delete of an object that is gone counts as done) and then forgets.
// It refuses on a read replica or a read-only open (only the primary's
// database records drops, and only it may decide what is dead), and does
// nothing on a store whose packs are local.
func (s *Store) DeleteDeadPacks(ctx context.Context, o DeadPackOptions) (*DeadPackResult, error) {
	res := &DeadPackResult{}
	if s.bucket == nil {
		return res, nil
	}
	if s.replicaOf != "" {
		return nil, fmt.Errorf("%w: this store is a read replica of %s: dead packs are deleted by its primary", db.ErrReadOnly, s.replicaOf)
	}
	if s.blobOpts.ReadOnly {
		return nil, fmt.Errorf("%w: delete dead packs from the bucket: store opened read-only", db.ErrReadOnly)
	}
	if o.Margin <= 0 {
		o.Margin = DefaultDeadPackMargin
	}
	if o.Now == nil {
		o.Now = time.Now
	}
	err := s.deleteDeadPacks(ctx, o, res)
	if err != nil {
		s.deadPacks.failures.Add(1)
	}
	return res, err
}

func (s *Store) deleteDeadPacks(ctx context.Context, o DeadPackOptions, res *DeadPackResult) error {
	dead, err := s.db.DeadPackRows(ctx)
	if err != nil || len(dead) == 0 {
		return err
	}
	res.Waiting = len(dead)
	// Listed after the rows: a pack dropped since is not among them, and
	// the bucket's oldest state only grows newer.
	oldest, err := replicate.OldestRestorable(ctx, s.bucket.Location())
	if err != nil {
		return fmt.Errorf("delete dead packs: %w", err)
	}
	res.Replica = oldest.Replica
	if oldest.Found {
		res.Oldest = oldest.Time
	}
	s.deadPacks.mu.Lock()
	s.deadPacks.oldest = res.Oldest
	s.deadPacks.mu.Unlock()
	var limit time.Time // a pack dropped before it is named by no restorable state
	switch {
	case oldest.Found:
		limit = oldest.Time
	case oldest.Replica:
		// LTX files but no state to restore (a replica being written for
		// the first time, or damaged): nothing can be ruled out.
		return nil
	case o.WithoutReplica:
		limit = o.Now()
	default:
		return nil
	}
	// Drop times are whole seconds rounded down: one more second.
	limit = limit.Add(-o.Margin - time.Second)
	var ids []int64
	var names []string
	for _, p := range dead {
		if !p.Dropped.Before(limit) {
			continue
		}
		ids = append(ids, p.ID)
		names = append(names, blobs.PackObject(p.ID))
	}
	if len(ids) == 0 {
		return nil
	}
	if err := s.bucket.Delete(ctx, names...); err != nil {
		return fmt.Errorf("delete dead packs from the bucket: %w", err)
	}
	if h := testHookDeadPacksDeleted; h != nil {
		if err := h(); err != nil {
			return err
		}
	}
	if err := s.db.Write(ctx, func(tx *db.Tx) error { return tx.ForgetDeadPacks(ctx, ids) }); err != nil {
		return fmt.Errorf("dead packs deleted from the bucket: %w", err)
	}
	res.Deleted, res.Waiting = len(ids), len(dead)-len(ids)
	s.deadPacks.deleted.Add(int64(len(ids)))
	return nil
}

// DeadPackStats returns the counters of DeleteDeadPacks.
func (s *Store) DeadPackStats() DeadPackStats {
	s.deadPacks.mu.Lock()
	defer s.deadPacks.mu.Unlock()
	return DeadPackStats{Deleted: s.deadPacks.deleted.Load(), Failures: s.deadPacks.failures.Load(), Oldest: s.deadPacks.oldest}
}

// DeadPacksWaiting is how many dead packs' objects are still in the bucket.
func (s *Store) DeadPacksWaiting(ctx context.Context) (int64, error) {
	return s.db.DeadPackCount(ctx)
}
