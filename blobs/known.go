package blobs

import (
	"context"
	"encoding/binary"
	"math/bits"
	"sync"
	"sync/atomic"

	"github.com/casnix/casnix/db"
	"github.com/casnix/casnix/digest"
)

// knownChunks answers "is this chunk stored already?" from memory for most
// chunks an ingest meets. New data is nearly all misses, and each miss
// asked of SQLite cost about 25 µs on the ingesting goroutine, the one
// every byte of an upload passes through: 1.3 of its 7.7 CPU-s in a
// `nix copy --to` of the releases corpus. A Bloom filter over the digests
// of the store's chunks says "no" for certain or "maybe"; a "maybe" is
// still asked of the database, so the filter never makes a Writer skip a
// chunk that is not stored.
//
// What the filter misses is a chunk it was never told of: one committed by
// another process since the last refresh. Writing such a chunk again is the
// same harmless outcome as two Writers racing to store it today (the
// second copy is unreferenced, INSERT OR IGNORE keeps the first, and
// compaction reclaims it), so it costs space, never correctness. Refreshes
// keep that window small: every NewWriter reads the chunks of frames
// numbered above the highest one seen (frame ids grow in commit order,
// SQLite serialising writers), and a Writer adds its own chunks when its
// transaction commits.
//
// Memory is bounded: knownBitsMax bits at most whatever the store's size
// (past about 13 million chunks the filter answers "maybe" more often, and
// more lookups go to the database, as before it existed).
type knownChunks struct {
	f atomic.Pointer[bloom]

	mu        sync.Mutex // one refresh or build at a time
	lastFrame int64      // highest frame id whose chunks are in f
	building  bool
	wg        sync.WaitGroup // a build in progress
	ctx       context.Context
	cancel    context.CancelFunc

	// lookups counts the chunks asked of the database, skipped those the
	// filter answered (tests and the closing note's figures).
	lookups, skipped atomic.Int64
}

const (
	knownBitsPerChunk = 10 // about 1% false "maybe" at capacity, with knownHashes
	knownHashes       = 7
	knownBitsMin      = 1 << 23 // 1 MiB
	knownBitsMax      = 1 << 27 // 16 MiB
)

func newKnownChunks() *knownChunks {
	k := &knownChunks{}
	k.ctx, k.cancel = context.WithCancel(context.Background())
	return k
}

// close stops a build in progress and waits for it.
func (k *knownChunks) close() {
	k.cancel()
	k.wg.Wait()
}

// filter brings the filter up to date with what the database holds and
// returns it, or nil while none is built (the first call starts building one
// in the background: a Writer asks the database until it is ready).
func (k *knownChunks) filter(ctx context.Context, d *db.DB) *bloom {
	if !k.mu.TryLock() {
		// Another Writer is refreshing: what it reads is as good.
		return k.f.Load()
	}
	defer k.mu.Unlock()
	f := k.f.Load()
	if f == nil || f.n.Load() > f.capacity {
		k.startBuild(d)
		return f
	}
	last, err := d.ChunkDigestsAfter(ctx, k.lastFrame, func(c digest.Digest) { f.add(c) })
	if err != nil {
		// Not fatal: a stale filter only misses dedup, and the next
		// Writer refreshes again from the same frame.
		return f
	}
	k.lastFrame = last
	return f
}

// startBuild builds a new filter, sized for the store's chunks, on a
// goroutine. It runs with k.mu held by the caller.
func (k *knownChunks) startBuild(d *db.DB) {
	if k.building {
		return
	}
	k.building = true
	k.wg.Add(1)
	go func() {
		defer k.wg.Done()
		n, err := d.ChunkCount(k.ctx)
		var f *bloom
		var last int64
		if err == nil {
			f = newBloom(n)
			last, err = d.ChunkDigestsAfter(k.ctx, 0, func(c digest.Digest) { f.add(c) })
		}
		k.mu.Lock()
		defer k.mu.Unlock()
		k.building = false
		if err != nil {
			return // the next Writer tries again; meanwhile the old filter, or the database
		}
		// What Writers committed while this one was built is in the scan's
		// snapshot or in frames above last, which the next refresh reads.
		k.lastFrame = last
		k.f.Store(f)
	}()
}

// committed adds a Writer's chunks once its transaction committed.
func (k *knownChunks) committed(ds map[digest.Digest]struct{}) {
	f := k.f.Load()
	if f == nil {
		return
	}
	for d := range ds {
		f.add(d)
	}
}

// bloom is a Bloom filter of chunk digests, safe for concurrent use. The
// digests are BLAKE3 hashes, so their own bits serve as the filter's hash
// functions.
type bloom struct {
	words    []atomic.Uint64
	mask     uint64 // number of bits - 1 (a power of two)
	capacity int64  // chunks it was sized for
	n        atomic.Int64
}

func newBloom(chunks int64) *bloom {
	want := uint64(max(2*chunks, 1)) * knownBitsPerChunk // room to grow before a rebuild
	nbits := uint64(knownBitsMin)
	if want > nbits {
		nbits = 1 << bits.Len64(want-1)
	}
	nbits = min(nbits, knownBitsMax)
	return &bloom{
		words:    make([]atomic.Uint64, nbits/64),
		mask:     nbits - 1,
		capacity: int64(nbits / knownBitsPerChunk),
	}
}

// probes returns the filter's two base hashes of d (double hashing: probe
// i is h1 + i*h2).
func probes(d digest.Digest) (h1, h2 uint64) {
	return binary.LittleEndian.Uint64(d[0:8]), binary.LittleEndian.Uint64(d[8:16]) | 1
}

func (b *bloom) add(d digest.Digest) {
	h1, h2 := probes(d)
	for i := uint64(0); i < knownHashes; i++ {
		bit := (h1 + i*h2) & b.mask
		b.words[bit/64].Or(1 << (bit % 64))
	}
	b.n.Add(1)
}

// mayHave reports false only for a digest never added.
func (b *bloom) mayHave(d digest.Digest) bool {
	h1, h2 := probes(d)
	for i := uint64(0); i < knownHashes; i++ {
		bit := (h1 + i*h2) & b.mask
		if b.words[bit/64].Load()&(1<<(bit%64)) == 0 {
			return false
		}
	}
	return true
}
