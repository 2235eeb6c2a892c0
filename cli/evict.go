package cli

import (
	"context"
	"fmt"
	"io"
	"log/slog"
	"strings"
	"time"

	"github.com/casnix/casnix/store"
	"github.com/casnix/casnix/subst"
)

// evictor flushes access times and keeps the store under --max-size
// (store.Evict) every interval, until ctx ends. An eviction is a
// collection (a full mark under the exclusive GC lock), so while the store
// stays over the budget with nothing it may evict, checks back off (doubling,
// up to maxEvictBackoff) instead of marking every interval.
func evictor(ctx context.Context, st *store.Store, o store.EvictOptions, every time.Duration, log *slog.Logger) {
	wait := every
	t := time.NewTimer(wait)
	defer t.Stop()
	stuck := false // over the budget with nothing to evict at the last check
	for {
		select {
		case <-ctx.Done():
			return
		case <-t.C:
		}
		if _, err := st.FlushAccess(ctx); err != nil {
			log.Warn("access times", "err", err)
		}
		next := every
		if o.MaxSize > 0 {
			res, err := st.Evict(ctx, o)
			switch {
			case err != nil:
				if ctx.Err() == nil {
					log.Error("evict", "err", err)
				}
			default:
				if len(res.Paths) > 0 {
					log.Info("evicted substituted paths", "paths", len(res.Paths), "before", res.Before, "after", res.After, "budget", o.MaxSize)
				}
				over := res.After > o.MaxSize && len(res.Paths) == 0
				if over && !stuck {
					log.Warn("over --max-size and nothing more to evict now (roots, --pin closures, paths clients hold or added)", "size", res.After, "budget", o.MaxSize)
				}
				if over && stuck {
					next = min(2*wait, max(maxEvictBackoff, every))
				}
				stuck = over
			}
		}
		wait = next
		t.Reset(wait)
	}
}

// maxEvictBackoff bounds the interval between checks of a store stuck
// over --max-size.
const maxEvictBackoff = 5 * time.Minute

// pinNames turns --pin values (store paths or basenames) into basenames.
func pinNames(storeDir string, pins []string) ([]string, error) {
	var out []string
	for _, p := range pins {
		for _, f := range strings.Fields(p) {
			n := strings.TrimPrefix(f, storeDir+"/")
			if i := strings.IndexByte(n, '/'); i >= 0 {
				n = n[:i]
			}
			if err := store.ValidateName(n); err != nil {
				return nil, fmt.Errorf("--pin %s: %w", f, err)
			}
			out = append(out, n)
		}
	}
	return out, nil
}

// substMetrics writes the substituters' counters and the eviction counters
// in the Prometheus text format, for the /metrics of serve --http.
func substMetrics(w io.Writer, sub *subst.Substituter, st *store.Store, maxSize int64) {
	if sub != nil {
		stats := sub.Stats()
		for _, m := range []struct {
			name, typ, help string
			val             func(subst.Stats) int64
		}{
			{"casnix_substituter_up", "gauge", "Whether the upstream is usable (its nix-cache-info read, not in a backoff).", func(s subst.Stats) int64 {
				if s.Up {
					return 1
				}
				return 0
			}},
			{"casnix_substituter_narinfo_hits_total", "counter", "Narinfos the upstream had (fetched, not from the lookup cache).", func(s subst.Stats) int64 { return s.NarinfoHits }},
			{"casnix_substituter_narinfo_misses_total", "counter", "Narinfos the upstream did not have.", func(s subst.Stats) int64 { return s.NarinfoMisses }},
			{"casnix_substituter_nars_total", "counter", "NARs substituted from the upstream.", func(s subst.Stats) int64 { return s.NarsFetched }},
			{"casnix_substituter_nar_bytes_total", "counter", "Uncompressed NAR bytes substituted from the upstream.", func(s subst.Stats) int64 { return s.NarBytes }},
			{"casnix_substituter_requests_total", "counter", "Requests made to the upstream.", func(s subst.Stats) int64 { return s.Requests }},
			{"casnix_substituter_errors_total", "counter", "Failed requests to the upstream (a retry or failover may follow).", func(s subst.Stats) int64 { return s.Errors }},
		} {
			fmt.Fprintf(w, "# HELP %s %s\n# TYPE %s %s\n", m.name, m.help, m.name, m.typ)
			for _, s := range stats {
				fmt.Fprintf(w, "%s{upstream=%q} %d\n", m.name, s.URL, m.val(s))
			}
		}
	}
	ev := st.EvictStats()
	fmt.Fprintf(w, "# HELP casnix_evictions_total Evictions run because the store was over --max-size.\n# TYPE casnix_evictions_total counter\ncasnix_evictions_total %d\n", ev.Runs)
	fmt.Fprintf(w, "# HELP casnix_evicted_paths_total Substituted paths evicted.\n# TYPE casnix_evicted_paths_total counter\ncasnix_evicted_paths_total %d\n", ev.Paths)
	fmt.Fprintf(w, "# HELP casnix_evicted_bytes_total Disk bytes evictions gave back.\n# TYPE casnix_evicted_bytes_total counter\ncasnix_evicted_bytes_total %d\n", ev.BytesFreed)
	if n, err := st.DiskUsage(); err == nil {
		fmt.Fprintf(w, "# HELP casnix_store_pack_bytes Disk bytes of the pack files (what --max-size bounds).\n# TYPE casnix_store_pack_bytes gauge\ncasnix_store_pack_bytes %d\n", n)
	}
	packsMetrics(w, st)
	if maxSize > 0 {
		fmt.Fprintf(w, "# HELP casnix_store_max_size_bytes The --max-size budget.\n# TYPE casnix_store_max_size_bytes gauge\ncasnix_store_max_size_bytes %d\n", maxSize)
	}
}

// packsMetrics writes the upload queue, the block cache and the bucket's
// request counters of a store whose packs go to a bucket.
func packsMetrics(w io.Writer, st *store.Store) {
	bs := st.BucketStats()
	if bs == nil {
		return
	}
	rs := st.RemoteStats()
	for _, m := range []struct {
		name, typ, help string
		val             float64
	}{
		{"casnix_packs_upload_queue", "gauge", "Packs holding committed frames not uploaded to the bucket yet.", float64(rs.QueuedPacks)},
		{"casnix_packs_upload_oldest_seconds", "gauge", "Age of the oldest committed frame not uploaded yet (as the uploader saw it; 0: none).", rs.OldestPending.Seconds()},
		{"casnix_packs_upload_rounds_total", "counter", "Upload rounds done (the queue gauge is as of the last).", float64(rs.Rounds)},
		{"casnix_packs_sealed_total", "counter", "Packs sealed for upload.", float64(rs.SealedPacks)},
		{"casnix_packs_uploaded_total", "counter", "Packs uploaded.", float64(rs.UploadedPacks)},
		{"casnix_packs_uploaded_bytes_total", "counter", "Bytes of packs uploaded.", float64(rs.UploadedBytes)},
		{"casnix_packs_upload_failures_total", "counter", "Failed pack uploads (retried with backoff).", float64(rs.UploadFailures)},
		{"casnix_packs_cache_bytes", "gauge", "Local bytes of uploaded packs: their local files and cached blocks.", float64(rs.CacheBytes)},
		{"casnix_packs_cache_budget_bytes", "gauge", "The --cache-size budget.", float64(rs.CacheBudget)},
		{"casnix_packs_cache_hits_total", "counter", "Block reads served from the local cache.", float64(rs.CacheHits)},
		{"casnix_packs_cache_misses_total", "counter", "Block reads that went to the bucket.", float64(rs.CacheMisses)},
		{"casnix_packs_cache_fetched_bytes_total", "counter", "Bytes fetched from the bucket into the cache.", float64(rs.FetchedBytes)},
		{"casnix_packs_cache_evicted_blocks_total", "counter", "Cached blocks evicted.", float64(rs.EvictedBlocks)},
		{"casnix_packs_cache_evicted_packs_total", "counter", "Uploaded packs' local files evicted.", float64(rs.EvictedPack)},
		{"casnix_s3_requests_total", "counter", "Requests to the packs' bucket, retries included.", float64(bs.Requests.Load())},
		{"casnix_s3_gets_total", "counter", "GET requests to the packs' bucket.", float64(bs.Gets.Load())},
		{"casnix_s3_puts_total", "counter", "PUT requests (and multipart parts) to the packs' bucket.", float64(bs.Puts.Load())},
		{"casnix_s3_sent_bytes_total", "counter", "Bytes uploaded to the packs' bucket.", float64(bs.BytesSent.Load())},
		{"casnix_s3_received_bytes_total", "counter", "Bytes downloaded from the packs' bucket.", float64(bs.BytesReceived.Load())},
	} {
		fmt.Fprintf(w, "# HELP %s %s\n# TYPE %s %s\n%s %g\n", m.name, m.help, m.name, m.typ, m.name, m.val)
	}
	deadPackMetrics(w, st)
}
