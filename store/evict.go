package store

import (
	"context"
	"fmt"
	"sort"
	"sync/atomic"
)

// Eviction: `serve --max-size` keeps the store under a space budget by
// deleting the least recently used substituted paths (a substituter can
// fetch them again), through the collector: the same locks, roots, temp
// roots and closure rule as `casnix gc`, then compaction so the space is
// really given back.

// EvictOptions configure Evict.
type EvictOptions struct {
	// MaxSize is the budget: bytes of pack files on disk
	// (blobs.Store.DiskUsage, allocated blocks as du counts them). 0: none.
	MaxSize int64
	// Target is the share of MaxSize an eviction goes down to once over
	// it (hysteresis, so one fetch past the budget does not evict each
	// time); 0 means DefaultEvictTarget.
	Target float64
	// Pin are basenames whose closures are never evicted (ones not valid
	// are ignored).
	Pin []string
	// RuntimeRoots and RuntimeDirs are as GCOptions'.
	RuntimeRoots bool
	RuntimeDirs  []string
}

// DefaultEvictTarget is where an eviction stops, as a share of the budget.
const DefaultEvictTarget = 0.9

// evictMinDead is the share of dead bytes at which an eviction's
// compaction rewrites a pack: lower than a collection's, since the point
// is to free disk now, and a pack it leaves with dead bytes would count
// against the budget and make the next round evict more.
const evictMinDead = 0.05

// maxEvictRounds bounds one Evict: each round deletes about what the
// estimate says is over, then measures the disk again.
const maxEvictRounds = 4

// EvictResult is what an eviction did.
type EvictResult struct {
	Before, After int64 // pack bytes on disk
	Paths         []string
	BytesFreed    int64 // disk space given back by compaction
	Rounds        int
}

// EvictStats are the store's eviction counters since open.
type EvictStats struct {
	Runs, Paths, BytesFreed int64
}

type evictCounters struct {
	runs, paths, bytes atomic.Int64
}

// EvictStats returns the eviction counters.
func (s *Store) EvictStats() EvictStats {
	return EvictStats{Runs: s.evicts.runs.Load(), Paths: s.evicts.paths.Load(), BytesFreed: s.evicts.bytes.Load()}
}

// DiskUsage is the bytes the pack files take on disk.
func (s *Store) DiskUsage() (int64, error) { return s.blobs.DiskUsage() }

// Evict deletes least recently used substituted paths while the packs take
// more than o.MaxSize, down to o.Target of it. Never deleted: paths that
// were not substituted, gcroots and the temp roots of live connections
// (and runtime roots, if asked), the closures of o.Pin, and any path a
// path that stays refers to.
func (s *Store) Evict(ctx context.Context, o EvictOptions) (*EvictResult, error) {
	size, err := s.DiskUsage()
	if err != nil {
		return nil, err
	}
	res := &EvictResult{Before: size, After: size}
	if o.MaxSize <= 0 || size <= o.MaxSize {
		return res, nil
	}
	t := o.Target
	if t <= 0 || t > 1 {
		t = DefaultEvictTarget
	}
	target := int64(float64(o.MaxSize) * t)
	defer func() {
		s.evicts.paths.Add(int64(len(res.Paths)))
		s.evicts.bytes.Add(res.BytesFreed)
		sort.Strings(res.Paths)
	}()
	s.evicts.runs.Add(1)
	for res.Rounds < maxEvictRounds && size > target {
		cands, err := s.Substituted(ctx)
		if err != nil {
			return res, err
		}
		if len(cands) == 0 {
			break
		}
		var keep []string
		for _, p := range o.Pin {
			if ok, err := s.IsValid(ctx, p); err != nil {
				return res, err
			} else if ok {
				keep = append(keep, p)
			}
		}
		r, err := s.GC(ctx, GCOptions{Action: GCDeleteDead, MaxFreed: size - target, Evictable: cands,
			Keep: keep, MinDead: evictMinDead, RuntimeRoots: o.RuntimeRoots, RuntimeDirs: o.RuntimeDirs})
		res.Rounds++
		if r != nil {
			res.Paths = append(res.Paths, r.Paths...)
			res.BytesFreed += r.BytesFreed
		}
		if err != nil {
			return res, fmt.Errorf("evict: %w", err)
		}
		if size, err = s.DiskUsage(); err != nil {
			return res, err
		}
		res.After = size
		// Nothing evictable, or deleting freed no disk (dead bytes left
		// in packs below evictMinDead): more rounds would only delete more.
		if len(r.Paths) == 0 || r.BytesFreed <= 0 {
			break
		}
	}
	return res, nil
}
