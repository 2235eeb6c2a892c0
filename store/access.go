package store

import (
	"context"
	"fmt"
	"sync"
	"sync/atomic"
	"time"

	"github.com/casnix/casnix/db"
)

// Access times of substituted paths, for `serve --max-size` (evict.go).
//
// A read must not cost a write: the daemon answers thousands of
// QueryPathInfo a second, and a SQLite commit per read would be the
// bottleneck (and wear the disk). So reads only note the time in memory
// (Touch), and FlushAccess writes what accumulated in one transaction. A
// crash loses at most the accesses since the last flush, which only makes
// those paths look older to the next eviction: never a correctness issue.

// accessLog is the in-memory side of access times.
type accessLog struct {
	mu sync.Mutex
	m  map[string]int64 // basename → last access, unix milliseconds
	// flushes counts the write transactions FlushAccess made (tests).
	flushes atomic.Int64
	// on: only a store that evicts (the daemon with --max-size or
	// substituters) notes accesses; others would fill the map for nothing.
	on atomic.Bool
}

// EnableAccessTimes makes reads note access times (Touch) from now on.
func (s *Store) EnableAccessTimes() { s.access.on.Store(true) }

// maxPendingAccesses bounds the map between flushes; accesses to further
// paths are dropped (they look older to eviction, nothing worse).
const maxPendingAccesses = 1 << 17

// Touch notes that path name was read now. It is cheap (a map write) and
// writes nothing: FlushAccess does.
func (s *Store) Touch(name string) {
	if !s.access.on.Load() {
		return
	}
	now := time.Now().UnixMilli()
	a := &s.access
	a.mu.Lock()
	if a.m == nil {
		a.m = map[string]int64{}
	}
	if _, ok := a.m[name]; ok || len(a.m) < maxPendingAccesses {
		a.m[name] = now
	}
	a.mu.Unlock()
}

// FlushAccess writes the access times noted since the last flush, in one
// transaction, and returns how many it wrote (paths that are not
// substituted are skipped by the update). With nothing noted it writes
// nothing.
func (s *Store) FlushAccess(ctx context.Context) (int, error) {
	a := &s.access
	a.mu.Lock()
	m := a.m
	a.m = nil
	a.mu.Unlock()
	if len(m) == 0 || s.db.ReadOnly() {
		return 0, nil
	}
	a.flushes.Add(1)
	err := s.db.Write(ctx, func(tx *db.Tx) error {
		for n, at := range m {
			if err := tx.TouchSubstituted(ctx, n, at); err != nil {
				return err
			}
		}
		return nil
	})
	if err != nil {
		// Put them back (newer notes win) for the next flush.
		a.mu.Lock()
		if a.m == nil {
			a.m = map[string]int64{}
		}
		for n, at := range m {
			if cur, ok := a.m[n]; !ok || cur < at {
				a.m[n] = at
			}
		}
		a.mu.Unlock()
		return 0, fmt.Errorf("flush access times: %w", err)
	}
	return len(m), nil
}

// AccessFlushes is how many write transactions FlushAccess has made.
func (s *Store) AccessFlushes() int64 { return s.access.flushes.Load() }

// substitutedKey marks a context whose batches record their paths as
// substituted.
type substitutedKey struct{}

// WithSubstituted returns a context under which a Batch records the paths
// it adds as substituted (in the same transaction that makes them valid),
// so `serve --max-size` may evict them: a substituter can fetch them again.
func WithSubstituted(ctx context.Context) context.Context {
	return context.WithValue(ctx, substitutedKey{}, true)
}

func isSubstituted(ctx context.Context) bool {
	v, _ := ctx.Value(substitutedKey{}).(bool)
	return v
}

// Substituted lists the valid substituted paths with their last access
// (unix milliseconds), after flushing the accesses noted in memory.
func (s *Store) Substituted(ctx context.Context) (map[string]int64, error) {
	if _, err := s.FlushAccess(ctx); err != nil {
		return nil, err
	}
	return s.db.Substituted(ctx)
}
