package blobs

import (
	"context"
	"sync/atomic"

	"github.com/casnix/casnix/db"
	"github.com/casnix/casnix/digest"
	"github.com/casnix/casnix/gencache"
)

// locCacheBytes bounds what locCache holds, about (and a quarter of the
// frame cache's bound, if less): its blob rows (chunk lists included) and
// its chunk locations get half each. A releases-sized store (27k blobs,
// 47k chunks) fits in a few MiB; a larger one keeps what was read
// recently.
const locCacheBytes = 32 << 20

// indexLookups counts the index queries readers made for blob rows and
// chunk locations, for tests of the cache.
var indexLookups atomic.Int64

// entryCost is what one entry costs besides a chunk list: the key, the
// map's share, a ChunkLoc.
const entryCost = 160

// locCache remembers, across readers, what the index said a blob is (its
// size and chunk list) and where a chunk is (its frame and offset), so a
// NAR of many small files read again costs no index lookup per batch of
// files, as a warm nix-daemon costs no lookup beyond the kernel's dentry and
// inode caches. Lookups were a quarter of the CPU of a warm NarFromPath of
// the releases corpus (bench/narfrom.sh).
//
// A blob row never changes (the digest is of its contents). A chunk's
// location does, when a compaction, repack or repair moves it; a reader
// treats a cached location like one it looked up itself before the move:
// the frame it names is gone (vanished) or its bytes do not hash to the
// chunk, and the reader looks the chunk up again (relocate), which also
// replaces the cached location. Every chunk read is checked against its
// digest, so a stale location can fail a read's first try but never
// return other bytes. This process's own compactions and repacks clear it.
type locCache struct {
	blobs *gencache.Cache[digest.Digest, db.Blob]
	locs  *gencache.Cache[digest.Digest, *db.ChunkLoc] // shared: never modified
}

func newLocCache(bytes int) *locCache {
	return &locCache{
		blobs: gencache.New[digest.Digest](bytes/2, func(b db.Blob) int { return entryCost + len(b.Chunks) }),
		locs:  gencache.New[digest.Digest](bytes/2, func(*db.ChunkLoc) int { return entryCost }),
	}
}

// clear forgets everything (after this process moved chunks).
func (c *locCache) clear() {
	c.blobs.Clear()
	c.locs.Clear()
}

// A nil *locCache caches nothing: what a reader under NoCache uses
// (Store.locsFor).

// blob returns blob d's row and, for a blob of one chunk, its location:
// ok only if both are cached (what one index lookup would have answered).
func (c *locCache) blob(d digest.Digest) (b db.Blob, loc *db.ChunkLoc, ok bool) {
	if c == nil {
		return db.Blob{}, nil, false
	}
	if b, ok = c.blobs.Get(d); !ok {
		return db.Blob{}, nil, false
	}
	if b.Chunks == nil && b.Size > 0 {
		if loc, ok = c.locs.Get(d); !ok {
			return db.Blob{}, nil, false
		}
	}
	return b, loc, true
}

// putBlob remembers blob d's row, and loc (if it fits the row) as where
// its one chunk is.
func (c *locCache) putBlob(d digest.Digest, b db.Blob, loc *db.ChunkLoc) {
	if c == nil {
		return
	}
	c.blobs.Put(d, b)
	if b.Chunks == nil && fits(loc, b.Size) {
		c.locs.Put(d, loc)
	}
}

// loc returns where chunk d is, nil if not cached. The ChunkLoc is shared:
// never modify it.
func (c *locCache) loc(d digest.Digest) *db.ChunkLoc {
	if c == nil {
		return nil
	}
	l, _ := c.locs.Get(d)
	return l
}

// putLoc remembers where chunk d is.
func (c *locCache) putLoc(d digest.Digest, loc *db.ChunkLoc) {
	if c != nil {
		c.locs.Put(d, loc)
	}
}

// dropLoc forgets chunk d's location if it is still loc (a reader found
// loc stale; a newer one another reader put stays).
func (c *locCache) dropLoc(d digest.Digest, loc *db.ChunkLoc) {
	c.locs.Drop(d, func(l *db.ChunkLoc) bool { return l == loc })
}

type noCacheKey struct{}

// NoCache returns a context under which readers look every blob row and
// chunk location up in the index (and callers above, such as a render's
// directories, skip their caches too; see Cached): what verify reads, so
// that it checks the index, not what was cached from it.
func NoCache(ctx context.Context) context.Context {
	return context.WithValue(ctx, noCacheKey{}, true)
}

// locsFor is the location cache for reads under ctx: nil (no cache) under
// NoCache.
func (s *Store) locsFor(ctx context.Context) *locCache {
	if !Cached(ctx) {
		return nil
	}
	return s.locs
}

// Cached says whether ctx allows answers from caches of index lookups.
func Cached(ctx context.Context) bool {
	no, _ := ctx.Value(noCacheKey{}).(bool)
	return !no
}
