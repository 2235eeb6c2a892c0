package store

import (
	"container/heap"
	"context"
	"encoding/binary"
	"errors"
	"fmt"
	"path/filepath"
	"sort"
	"time"

	"golang.org/x/sys/unix"

	"github.com/casnix/casnix/blobs"
	"github.com/casnix/casnix/castore"
	"github.com/casnix/casnix/db"
	"github.com/casnix/casnix/digest"
)

// GCAction is what a collection does, numbered as Nix's GCOptions action
// on the wire.
type GCAction int

// The actions of Nix's CollectGarbage.
const (
	GCReturnLive     GCAction = 0 // list the live paths, delete nothing
	GCReturnDead     GCAction = 1 // list the dead paths, delete nothing
	GCDeleteDead     GCAction = 2 // delete dead paths (up to MaxFreed)
	GCDeleteSpecific GCAction = 3 // delete Paths, each of which must be dead
)

func (a GCAction) String() string {
	switch a {
	case GCReturnLive:
		return "return-live"
	case GCReturnDead:
		return "return-dead"
	case GCDeleteDead:
		return "delete-dead"
	case GCDeleteSpecific:
		return "delete-specific"
	}
	return fmt.Sprintf("gc-action(%d)", int(a))
}

// ErrNoRoots is returned by a GCDeleteDead with RefuseNoRoots that found
// no root.
var ErrNoRoots = errors.New("no gc roots reach a valid path: a collection would delete every path")

// ErrAlive is wrapped by the error of a GCDeleteSpecific naming a live
// path.
var ErrAlive = errors.New("is still alive")

// GCOptions configure GC.
type GCOptions struct {
	Action GCAction
	// Paths are the basenames GCDeleteSpecific deletes. Paths that are not
	// valid are ignored, as Nix does.
	Paths []string
	// IgnoreLiveness makes GCDeleteSpecific delete paths that roots reach.
	// A path another valid path refers to is never deleted (unless that
	// one is deleted too).
	IgnoreLiveness bool
	// MaxFreed stops GCDeleteDead once the estimated stored bytes of the
	// deleted paths reach it (0: no limit). Referrers are deleted before
	// what they refer to.
	MaxFreed int64
	// Evictable, when not nil, restricts GCDeleteDead to the dead paths it
	// names, and with MaxFreed deletes the least recently used first (the
	// values are last accesses; a path becomes a candidate once every
	// referrer is deleted, so an old path a recently used one needs
	// stays). `serve --max-size` evicts substituted paths with it.
	Evictable map[string]int64
	// Keep are extra roots for this run (basenames, must be valid).
	Keep []string
	// RuntimeRoots makes the store paths running processes use roots too
	// (RuntimeRoots: executables, working directories, open files, mapped
	// files, environments), as nix-daemon does. RuntimeDirs are further
	// directories where processes see store paths, beside the store
	// directory and casnix FUSE mount points.
	RuntimeRoots bool
	RuntimeDirs  []string
	// RefuseNoRoots makes GCDeleteDead fail with ErrNoRoots, deleting
	// nothing, when no root reaches a valid path: on a store imported
	// without roots it would delete everything. Nix's daemon has no such
	// check (an empty root set deletes everything there too), so the
	// daemon op leaves it off; `casnix gc` sets it unless --force.
	RefuseNoRoots bool
	// MinDead is the share of a pack's bytes that must be dead before it
	// is rewritten (0: DefaultMinDead; 1 or more: never rewrite).
	MinDead float64
	// UpperDBs are the Nix databases (db.sqlite) of Local Overlay Stores
	// whose lower store this is: every path of this store one of them
	// registers or refers to is a root (read under the GC lock).
	UpperDBs []string
}

// DefaultMinDead is the share of dead bytes at which a pack is compacted.
const DefaultMinDead = 0.25

// GCResult is what a collection did.
type GCResult struct {
	// Paths are the basenames listed (GCReturnLive, GCReturnDead) or
	// deleted, sorted.
	Paths []string
	// BytesFreed is the disk space given back: pack files removed minus
	// pack files written (allocated blocks, what du measures).
	BytesFreed int64
	// ExclusiveBytes estimates the stored bytes only the listed or deleted
	// paths used: each unreferenced chunk's share of its compressed frame.
	// For GCReturnDead it is what deleting them would free.
	ExclusiveBytes int64
	// Rows deleted from the index.
	Directories, Blobs, Chunks, Frames int
	Compact                            blobs.CompactStats
	// Roots is how many valid paths were roots of this run (before their
	// closure was added).
	Roots int
	// LockTime is how long imports were held off (the exclusive lock).
	LockTime time.Duration
}

// gcRunLock serialises collections on a data directory; the GC lock proper
// (GCLockFile) is only held exclusively for the mark and sweep.
const gcRunLock = "gc.run"

// GC collects garbage: it finds the roots (gcroots/, live temp roots,
// o.Keep), computes the live closure, and depending on o.Action lists or
// deletes what is dead: path-info first, then the directories, blobs and
// chunks no remaining path uses, and finally rewrites packs that became
// mostly dead. The mark and the sweep of the index run under the exclusive
// GC lock (ingest waits; reads go on); compaction runs after it, beside
// imports and readers.
func (s *Store) GC(ctx context.Context, o GCOptions) (*GCResult, error) {
	if o.Action < GCReturnLive || o.Action > GCDeleteSpecific {
		return nil, fmt.Errorf("unknown garbage collector action %d", int(o.Action))
	}
	for _, k := range o.Keep {
		if err := ValidateName(k); err != nil {
			return nil, fmt.Errorf("keep: %w", err)
		}
	}
	res := &GCResult{}
	if o.Action == GCReturnLive || o.Action == GCReturnDead {
		// Listing reads a snapshot and takes no lock (markAndSweep).
		if _, err := s.markAndSweep(ctx, o, res); err != nil {
			return nil, err
		}
		return res, nil
	}
	unlockRun, err := s.lockFile(ctx, gcRunLock, unix.LOCK_EX)
	if err != nil {
		return nil, err
	}
	defer unlockRun()
	deleted, err := s.markAndSweep(ctx, o, res)
	if err != nil {
		return nil, err
	}
	if o.Action != GCDeleteDead && o.Action != GCDeleteSpecific {
		return res, nil
	}
	for _, n := range deleted {
		s.infos.drop(n)
	}
	if len(deleted) > 0 {
		if err := s.bumpDeletions(); err != nil {
			s.log.Warn("mounts may show deleted paths until their entries expire", "err", err)
		}
	}
	minDead := o.MinDead
	if minDead == 0 {
		minDead = DefaultMinDead
	}
	res.Compact, err = s.blobs.Compact(ctx, minDead)
	res.BytesFreed = res.Compact.Freed()
	if err != nil {
		return res, fmt.Errorf("compact packs: %w", err)
	}
	return res, nil
}

// pathGraph is the valid paths and their reference edges.
type pathGraph struct {
	nodes     []db.PathNode
	byName    map[string]int
	refs      [][]int // index -> references
	referrers [][]int // index -> referrers
}

// index is what a collection reads from the database: the store's reader
// pool (*db.DB, under the exclusive GC lock) or one read snapshot (*db.Tx,
// for the actions that only list).
type index interface {
	PathGraph(ctx context.Context) ([]db.PathNode, [][2]int64, error)
	Directory(ctx context.Context, d digest.Digest) ([]byte, error)
	BlobAndLoc(ctx context.Context, d digest.Digest) (db.Blob, *db.ChunkLoc, error)
	Stats(ctx context.Context) (db.Stats, error)
	EachBlob(ctx context.Context, fn func(d digest.Digest, chunks []byte) error) error
	EachDirectoryDigest(ctx context.Context, fn func(digest.Digest) error) error
	EachChunk(ctx context.Context, fn func(db.ChunkRow) error) error
}

func loadGraph(ctx context.Context, ix index) (*pathGraph, error) {
	nodes, edges, err := ix.PathGraph(ctx)
	if err != nil {
		return nil, err
	}
	g := &pathGraph{nodes: nodes, byName: make(map[string]int, len(nodes)),
		refs: make([][]int, len(nodes)), referrers: make([][]int, len(nodes))}
	byID := make(map[int64]int, len(nodes))
	for i, n := range nodes {
		g.byName[n.Name] = i
		byID[n.ID] = i
	}
	for _, e := range edges {
		a, ok1 := byID[e[0]]
		b, ok2 := byID[e[1]]
		if !ok1 || !ok2 || a == b {
			continue
		}
		g.refs[a] = append(g.refs[a], b)
		g.referrers[b] = append(g.referrers[b], a)
	}
	return g, nil
}

// rootNames gathers the roots of this collection, cleaning up dead temp
// roots and dangling indirect roots.
func (s *Store) rootNames(ctx context.Context, o GCOptions, clean bool) (map[string]bool, error) {
	roots := map[string]bool{}
	perm, err := s.readPermRoots(clean)
	if err != nil {
		return nil, err
	}
	for _, b := range perm {
		roots[b] = true
	}
	temp, err := s.readTempRoots(clean)
	if err != nil {
		return nil, err
	}
	for _, names := range temp {
		for _, n := range names {
			roots[n] = true
		}
	}
	for _, k := range o.Keep {
		roots[k] = true
	}
	for _, u := range o.UpperDBs {
		names, err := s.upperRoots(ctx, u)
		if err != nil {
			return nil, err
		}
		for _, n := range names {
			roots[n] = true
		}
	}
	if o.RuntimeRoots {
		for _, names := range s.RuntimeRoots(o.RuntimeDirs) {
			for _, n := range names {
				roots[n] = true
			}
		}
	}
	return roots, nil
}

// markAndSweep lists or deletes. The actions that only list read one
// database snapshot and then the roots, without any lock: a path committed
// after the snapshot is simply not listed, a path in it had its temp root
// written before its commit (so the roots, read later, have it unless its
// owner died), and a concurrent collection cannot change the snapshot. So
// listing never holds off writers (an untrusted client looping on
// --print-dead must not starve them). Deleting marks and sweeps under the
// exclusive GC lock.
func (s *Store) markAndSweep(ctx context.Context, o GCOptions, res *GCResult) ([]string, error) {
	if o.Action == GCReturnLive || o.Action == GCReturnDead {
		err := s.db.Snapshot(ctx, func(tx *db.Tx) error {
			_, err := s.mark(ctx, tx, o, res, false)
			return err
		})
		return nil, err
	}
	unlock, err := s.ExclusiveGCLock(ctx)
	if err != nil {
		return nil, err
	}
	locked := time.Now()
	defer func() {
		unlock()
		res.LockTime = time.Since(locked)
	}()
	return s.mark(ctx, s.db, o, res, true)
}

// mark computes what is live and dead from ix and the roots (removing dead
// temp roots and dangling indirect roots when clean), then lists or
// sweeps as o.Action says.
func (s *Store) mark(ctx context.Context, ix index, o GCOptions, res *GCResult, clean bool) ([]string, error) {
	g, err := loadGraph(ctx, ix)
	if err != nil {
		return nil, err
	}
	roots, err := s.rootNames(ctx, o, clean)
	if err != nil {
		return nil, err
	}
	for _, k := range o.Keep {
		if _, ok := g.byName[k]; !ok {
			return nil, fmt.Errorf("keep: path '%s' %w", s.Full(k), ErrNotValid)
		}
	}
	// The live closure: roots and everything they refer to.
	live := make([]bool, len(g.nodes))
	var stack []int
	for r := range roots {
		if i, ok := g.byName[r]; ok && !live[i] {
			live[i] = true
			stack = append(stack, i)
		}
	}
	res.Roots = len(stack)
	if o.RefuseNoRoots && o.Action == GCDeleteDead && res.Roots == 0 && len(g.nodes) > 0 {
		return nil, ErrNoRoots
	}
	for len(stack) > 0 {
		i := stack[len(stack)-1]
		stack = stack[:len(stack)-1]
		for _, j := range g.refs[i] {
			if !live[j] {
				live[j] = true
				stack = append(stack, j)
			}
		}
	}
	if o.Action == GCReturnLive {
		for i, n := range g.nodes {
			if live[i] {
				res.Paths = append(res.Paths, n.Name)
			}
		}
		sort.Strings(res.Paths)
		return nil, nil
	}

	del := make([]bool, len(g.nodes))
	switch o.Action {
	case GCDeleteSpecific:
		if err := s.specific(g, o, live, del); err != nil {
			return nil, err
		}
	default:
		for i, n := range g.nodes {
			del[i] = !live[i]
			if o.Evictable != nil {
				_, ok := o.Evictable[n.Name]
				del[i] = del[i] && ok
			}
		}
	}

	m := newMarker(ix, ctx)
	if o.Action == GCDeleteDead && o.MaxFreed > 0 {
		if err := m.limit(g, del, o.MaxFreed, o.Evictable); err != nil {
			return nil, err
		}
	}
	for i, n := range g.nodes {
		if !del[i] {
			if err := m.path(n); err != nil {
				return nil, err
			}
		}
	}
	var names []string
	var ids []int64
	for i, n := range g.nodes {
		if del[i] {
			names = append(names, n.Name)
			ids = append(ids, n.ID)
		}
	}
	sort.Strings(names)
	res.Paths = names
	sw, err := m.sweepLists()
	if err != nil {
		return nil, err
	}
	res.ExclusiveBytes = sw.bytes
	res.Directories, res.Blobs, res.Chunks = len(sw.dirs), len(sw.blobs), len(sw.chunks)
	if o.Action == GCReturnDead {
		return nil, nil
	}
	err = s.db.Write(ctx, func(tx *db.Tx) error {
		// All the deleted paths' referrers are being deleted too.
		if err := tx.DeletePaths(ctx, ids); err != nil {
			return err
		}
		for _, d := range sw.dirs {
			if err := tx.DeleteDirectory(ctx, d); err != nil {
				return err
			}
		}
		for _, d := range sw.blobs {
			if err := tx.DeleteBlob(ctx, d); err != nil {
				return err
			}
		}
		for _, d := range sw.chunks {
			if err := tx.DeleteChunk(ctx, d); err != nil {
				return err
			}
		}
		_, err := tx.DeleteEmptyFrames(ctx)
		return err
	})
	if err != nil {
		return nil, fmt.Errorf("sweep: %w", err)
	}
	return names, nil
}

// specific marks o.Paths for deletion, failing (deleting nothing) if one of
// them is alive: reached from a root (unless IgnoreLiveness) or referred to
// by a valid path that is not deleted with it.
func (s *Store) specific(g *pathGraph, o GCOptions, live, del []bool) error {
	var cand []int
	for _, p := range o.Paths {
		if i, ok := g.byName[p]; ok && !del[i] {
			del[i] = true
			cand = append(cand, i)
		}
	}
	// Un-mark paths with a referrer that stays, until nothing changes.
	for changed := true; changed; {
		changed = false
		for _, i := range cand {
			if !del[i] {
				continue
			}
			keep := live[i] && !o.IgnoreLiveness
			for _, r := range g.referrers[i] {
				if !del[r] {
					keep = true
				}
			}
			if keep {
				del[i] = false
				changed = true
			}
		}
	}
	for _, p := range o.Paths {
		if i, ok := g.byName[p]; ok && !del[i] {
			return fmt.Errorf("cannot delete path '%s' since it %w; to find out why, use: nix-store --query --roots and nix-store --query --referrers", s.Full(p), ErrAlive)
		}
	}
	return nil
}

// marker marks what the kept paths use. Marks are the first 8 bytes of a
// digest: a collision keeps something dead (never the reverse), and the
// set costs a fraction of full digests.
type marker struct {
	ix    index
	ctx   context.Context
	marks map[uint64]struct{}
}

func newMarker(ix index, ctx context.Context) *marker {
	return &marker{ix: ix, ctx: ctx, marks: map[uint64]struct{}{}}
}

func key(d digest.Digest) uint64 { return binary.LittleEndian.Uint64(d[:8]) }

func (m *marker) mark(d digest.Digest) bool {
	k := key(d)
	if _, ok := m.marks[k]; ok {
		return false
	}
	m.marks[k] = struct{}{}
	return true
}

func (m *marker) marked(d digest.Digest) bool {
	_, ok := m.marks[key(d)]
	return ok
}

// path marks a path's directories and file contents; chunks are marked
// from the blobs table in sweepLists.
func (m *marker) path(n db.PathNode) error {
	return m.tree(n, func(digest.Digest) error { return nil })
}

// tree walks a path's tree, marking directories and blobs, and calls
// newBlob for each blob it marks first.
func (m *marker) tree(n db.PathNode, newBlob func(digest.Digest) error) error {
	if n.Digest == nil {
		return nil
	}
	d, err := digest.FromBytes(n.Digest)
	if err != nil {
		return fmt.Errorf("path %s: %w: %v", n.Name, blobs.ErrCorrupt, err)
	}
	switch castore.Kind(n.Kind) {
	case castore.KindFile:
		if m.mark(d) {
			return newBlob(d)
		}
		return nil
	case castore.KindDirectory:
	default:
		return nil
	}
	stack := []digest.Digest{d}
	if !m.mark(d) {
		return nil
	}
	for len(stack) > 0 {
		if err := m.ctx.Err(); err != nil {
			return err
		}
		d := stack[len(stack)-1]
		stack = stack[:len(stack)-1]
		dir, err := readDirectory(m.ctx, m.ix, d)
		if err != nil {
			return fmt.Errorf("path %s: %w", n.Name, err)
		}
		for _, f := range dir.Files {
			if m.mark(f.Digest) {
				if err := newBlob(f.Digest); err != nil {
					return err
				}
			}
		}
		for _, c := range dir.Directories {
			if m.mark(c.Digest) {
				stack = append(stack, c.Digest)
			}
		}
	}
	return nil
}

// limit narrows del to the paths whose deletion frees about maxFreed
// bytes: referrers before what they refer to, so what is deleted never
// leaves a dangling reference. What stays is marked by the caller.
//
// With atimes, the ready path least recently accessed goes first (ties by
// name, so a run is reproducible); without, the order is Kahn's.
func (m *marker) limit(g *pathGraph, del []bool, maxFreed int64, atimes map[string]int64) error {
	// First mark what stays anyway, so a dead path's estimate counts only
	// content nothing live shares.
	for i, n := range g.nodes {
		if !del[i] {
			if err := m.path(n); err != nil {
				return err
			}
		}
	}
	st, err := m.ix.Stats(m.ctx)
	if err != nil {
		return err
	}
	ratio := 1.0
	if st.ChunkBytes > 0 {
		ratio = float64(st.CompressedSize) / float64(st.ChunkBytes)
	}
	// Kahn's order on the dead subgraph, by referrers: a path is ready once
	// every referrer is chosen.
	pending := make([]int, len(g.nodes))
	var ready []int
	for i := range g.nodes {
		if !del[i] {
			continue
		}
		pending[i] = len(g.referrers[i])
		if pending[i] == 0 {
			ready = append(ready, i)
		}
	}
	q := &readyQueue{g: g, atimes: atimes, fifo: atimes == nil}
	for _, i := range ready {
		heap.Push(q, i)
	}
	chosen := make([]bool, len(g.nodes))
	var freed float64
	for q.Len() > 0 && freed < float64(maxFreed) {
		i := heap.Pop(q).(int)
		chosen[i] = true
		err := m.tree(g.nodes[i], func(d digest.Digest) error {
			b, _, err := m.ix.BlobAndLoc(m.ctx, d)
			if err != nil {
				return err
			}
			freed += float64(b.Size) * ratio
			return nil
		})
		if err != nil {
			return err
		}
		for _, j := range g.refs[i] {
			if del[j] {
				if pending[j]--; pending[j] == 0 {
					heap.Push(q, j)
				}
			}
		}
	}
	copy(del, chosen)
	// The marks made by chosen paths' walks must not protect their content:
	// start over with the same decision.
	m.marks = map[uint64]struct{}{}
	return nil
}

// readyQueue orders the paths limit may delete next: by access time (then
// name) for an eviction, in arrival order otherwise.
type readyQueue struct {
	g      *pathGraph
	atimes map[string]int64
	fifo   bool
	items  []int
	seq    []int // arrival order, for fifo
	n      int
}

func (q *readyQueue) Len() int { return len(q.items) }
func (q *readyQueue) Less(a, b int) bool {
	if q.fifo {
		return q.seq[a] < q.seq[b]
	}
	na, nb := q.g.nodes[q.items[a]].Name, q.g.nodes[q.items[b]].Name
	if ta, tb := q.atimes[na], q.atimes[nb]; ta != tb {
		return ta < tb
	}
	return na < nb
}
func (q *readyQueue) Swap(a, b int) {
	q.items[a], q.items[b] = q.items[b], q.items[a]
	q.seq[a], q.seq[b] = q.seq[b], q.seq[a]
}
func (q *readyQueue) Push(x any) {
	q.items = append(q.items, x.(int))
	q.seq = append(q.seq, q.n)
	q.n++
}
func (q *readyQueue) Pop() any {
	i := q.items[len(q.items)-1]
	q.items = q.items[:len(q.items)-1]
	q.seq = q.seq[:len(q.seq)-1]
	return i
}

// sweep is what the index holds that nothing kept uses.
type sweep struct {
	dirs, blobs, chunks []digest.Digest
	bytes               int64
}

func (m *marker) sweepLists() (*sweep, error) {
	sw := &sweep{}
	err := m.ix.EachBlob(m.ctx, func(d digest.Digest, chunks []byte) error {
		if !m.marked(d) {
			sw.blobs = append(sw.blobs, d)
			return nil
		}
		for i := 0; i+digest.Size <= len(chunks); i += digest.Size + 4 {
			var c digest.Digest
			copy(c[:], chunks[i:])
			m.mark(c)
		}
		return nil
	})
	if err != nil {
		return nil, err
	}
	if err := m.ix.EachDirectoryDigest(m.ctx, func(d digest.Digest) error {
		if !m.marked(d) {
			sw.dirs = append(sw.dirs, d)
		}
		return nil
	}); err != nil {
		return nil, err
	}
	if err := m.ix.EachChunk(m.ctx, func(c db.ChunkRow) error {
		if !m.marked(c.Digest) {
			sw.chunks = append(sw.chunks, c.Digest)
			if c.RawLen > 0 {
				sw.bytes += c.CLen * c.Len / c.RawLen
			}
		}
		return nil
	}); err != nil {
		return nil, err
	}
	return sw, nil
}

// GCRoots is the directory of permanent roots.
func (s *Store) GCRoots() string { return filepath.Join(s.dir, GCRootsDir) }
