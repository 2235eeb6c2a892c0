package cli

import (
	"context"
	"fmt"
	"io"
	"log/slog"
	"time"

	"github.com/casnix/casnix/store"
)

// deadPackDeleter deletes from the bucket the objects of dead packs no restorable state
// of the database names any more (store.DeleteDeadPacks), a minute after start (the
// replication starts with serve) and then every interval, until ctx ends. serve runs it
// on a primary only: a replica's database is the primary's, and it is the primary that
// drops packs.
func deadPackDeleter(ctx context.Context, st *store.Store, o store.DeadPackOptions, every time.Duration, log *slog.Logger) {
	t := time.NewTimer(min(every, time.Minute))
	defer t.Stop()
	failing := false
	for {
		select {
		case <-ctx.Done():
			return
		case <-t.C:
		}
		res, err := st.DeleteDeadPacks(ctx, o)
		switch {
		case err != nil:
			if ctx.Err() != nil {
				return
			}
			// Nothing is lost: the rows stay, the next round tries again.
			if !failing {
				log.Warn("deleting dead packs from the bucket failed; retrying every interval", "err", err, "interval", every)
			}
			failing = true
		case res.Deleted > 0:
			failing = false
			log.Info("deleted dead packs from the bucket", "packs", res.Deleted, "waiting", res.Waiting,
				"oldest-restorable", res.Oldest.UTC().Format(time.RFC3339), "margin", o.Margin)
		default:
			failing = false
		}
		t.Reset(every)
	}
}

// deadPackMetrics writes the counters of dead packs' deletion from the bucket.
func deadPackMetrics(w io.Writer, st *store.Store) {
	ds := st.DeadPackStats()
	age := 0.0
	if !ds.Oldest.IsZero() {
		age = time.Since(ds.Oldest).Seconds()
	}
	fmt.Fprintf(w, "# HELP casnix_packs_deleted_from_bucket_total Objects of dead packs (dropped by compactions) deleted from the bucket.\n# TYPE casnix_packs_deleted_from_bucket_total counter\ncasnix_packs_deleted_from_bucket_total %d\n", ds.Deleted)
	fmt.Fprintf(w, "# HELP casnix_packs_bucket_delete_failures_total Rounds of dead pack deletion that failed (retried).\n# TYPE casnix_packs_bucket_delete_failures_total counter\ncasnix_packs_bucket_delete_failures_total %d\n", ds.Failures)
	fmt.Fprintf(w, "# HELP casnix_db_oldest_restorable_age_seconds Age of the oldest database state a restore from the bucket can give, as of the last dead pack round (0: none or not known).\n# TYPE casnix_db_oldest_restorable_age_seconds gauge\ncasnix_db_oldest_restorable_age_seconds %g\n", age)
	ctx, cancel := context.WithTimeout(context.Background(), 5*time.Second)
	defer cancel()
	if n, err := st.DeadPacksWaiting(ctx); err == nil {
		fmt.Fprintf(w, "# HELP casnix_packs_dead_waiting Dead packs whose objects are still in the bucket (a restorable database state may name them).\n# TYPE casnix_packs_dead_waiting gauge\ncasnix_packs_dead_waiting %d\n", n)
	}
}
