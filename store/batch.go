package store

import (
	"bytes"
	"context"
	"errors"
	"fmt"
	"hash"
	"io"
	"slices"
	"strings"
	"time"

	"github.com/casnix/casnix/blobs"
	"github.com/casnix/casnix/castore"
	"github.com/casnix/casnix/db"
	"github.com/casnix/casnix/digest"
	"github.com/casnix/casnix/nar"
	"github.com/casnix/casnix/sched"
)

// Batch adds store paths atomically: all of them become valid at Commit,
// or none. Use one Batch per goroutine. A failed Add poisons the Batch
// (its bytes are already mixed into shared frames), so callers that want
// to keep going Abort and retry the other paths in a new Batch.
type Batch struct {
	s     *Store
	ctx   context.Context
	w     *blobs.Writer
	dirs  map[digest.Digest][]byte
	paths []*PathInfo
	names map[string]bool
	// drvHashes are the hashes modulo of the derivations added so far,
	// for checking the outputs of derivations that use them
	// (checkDrvOutputs); they go to the store's cache at commit.
	drvHashes map[string]string
	err       error
	done      bool
	// unlock releases the shared GC lock, held from the first Add to
	// Commit or Abort: chunks deduplicated against and references checked
	// stay put until the batch's rows are committed.
	unlock func()
	// released: the Writer and the GC lock were handed back (release).
	released bool

	// NarBytes is the NAR bytes added so far (to size batches).
	NarBytes int64
}

// NewBatch starts a batch.
func (s *Store) NewBatch(ctx context.Context) *Batch {
	b := &Batch{s: s, ctx: ctx, w: s.blobs.NewWriter(ctx), dirs: map[digest.Digest][]byte{}, names: map[string]bool{}, drvHashes: map[string]string{}}
	if s.replicaOf != "" {
		b.err = fmt.Errorf("%w: this store is a read replica of %s: write to its primary", db.ErrReadOnly, s.replicaOf)
	} else if d := s.durable.Load(); d != nil {
		// Uploads are failing: a write now could only time out after its
		// data came in, so it is refused before.
		if err := s.blobs.UploadFailing(); err != nil {
			b.err = fmt.Errorf("%w: writes are acknowledged only once in the bucket %s (--durability bucket), and uploads there are failing: %v", ErrNotDurable, s.Packs(), err)
		}
	}
	return b
}

// Has reports whether name was added to the batch.
func (b *Batch) Has(name string) bool { return b.names[name] }

// Len is the number of paths added.
func (b *Batch) Len() int { return len(b.paths) }

// Stats returns the blob writer's chunk counters.
func (b *Batch) Stats() (newChunks, newBytes, dupChunks, dupBytes int64) {
	return b.w.NewChunks, b.w.NewChunkBytes, b.w.DupChunks, b.w.DupChunkBytes
}

// batchSink is the nar.Sink of one Add.
type batchSink struct {
	b       *Batch
	drv     *bytes.Buffer // captures a .drv file's contents for parsing
	content io.Writer     // hashes file contents for a flat or text content address
}

// maxDrvSize bounds how much of a .drv file is kept for parsing; real ones
// are kilobytes.
const maxDrvSize = 16 << 20

func (k batchSink) WriteBlob(r io.Reader, size int64) (digest.Digest, error) {
	if k.drv != nil && size <= maxDrvSize {
		r = io.TeeReader(r, k.drv)
	}
	if k.content != nil {
		r = io.TeeReader(r, k.content)
	}
	return k.b.w.WriteBlob(r, size)
}

func (k batchSink) PutDirectory(d *castore.Directory) (digest.Digest, error) {
	data := d.Encode()
	dg := digest.Sum(data)
	if len(data) == 0 {
		return dg, nil // the empty directory is implicit
	}
	if _, ok := k.b.dirs[dg]; !ok {
		k.b.dirs[dg] = data
	}
	return dg, nil
}

// HoldsGCLock reports whether b holds the GC lock shared: from its first
// Add until it commits or aborts.
func (b *Batch) HoldsGCLock() bool { return b.unlock != nil }

// Add ingests one NAR for the path described by info. info.NarHash and
// info.NarSize, when non-zero, are what the NAR must hash to; the computed
// values are filled in. References must be valid already, be added earlier
// in this batch, or be the path itself.
func (b *Batch) Add(r io.Reader, info PathInfo) (*PathInfo, error) {
	if b.err != nil {
		return nil, b.err
	}
	if b.done {
		return nil, errors.New("batch already finished")
	}
	if b.unlock == nil {
		unlock, err := b.s.SharedGCLock(b.ctx)
		if err != nil {
			b.err = err
			return nil, err
		}
		b.unlock = unlock
	}
	var pi *PathInfo
	var err error
	if sched.IsIdle(b.ctx) {
		// Idle work (the pull-through's ingest of what a client streams
		// past it): parsing, chunking and hashing run on an idle thread of
		// their own, discarded after. What it holds meanwhile: the GC lock
		// shared (taken above, on the caller's thread; a collection waits
		// for it as for any long ingest, and new batches wait for that at
		// most gcYield), the Writer's packs (the appender's, on an ordinary
		// thread) and, for an instant at a time, SQLite reader connections
		// (WAL readers block no writer) and what r takes (a spool's mutex).
		// The Writer compresses on this thread too (blobs.NewWriter).
		if rerr := sched.RunIdle(b.ctx, func() { pi, err = b.add(r, info) }); rerr != nil {
			err = rerr
		}
	} else {
		pi, err = b.add(r, info)
	}
	if err != nil {
		b.err = err
		return nil, err
	}
	return pi, nil
}

func (b *Batch) add(r io.Reader, info PathInfo) (*PathInfo, error) {
	full := b.s.Full(info.Name)
	if err := ValidateName(info.Name); err != nil {
		return nil, err
	}
	if info.Deriver != "" {
		if err := ValidateName(info.Deriver); err != nil {
			return nil, fmt.Errorf("%s: deriver: %w", full, err)
		}
	}
	if b.names[info.Name] {
		return nil, fmt.Errorf("%s: added twice in one batch", full)
	}
	refs := slices.Clone(info.References)
	slices.Sort(refs)
	refs = slices.Compact(refs)
	for _, ref := range refs {
		if err := ValidateName(ref); err != nil {
			return nil, fmt.Errorf("%s: reference: %w", full, err)
		}
		if ref == info.Name || b.names[ref] {
			continue
		}
		ok, err := b.s.db.HasPath(b.ctx, ref)
		if err != nil {
			return nil, err
		}
		if !ok {
			return nil, fmt.Errorf("%s: reference %s: %w", full, b.s.Full(ref), ErrMissingRef)
		}
	}
	sink := batchSink{b: b}
	if strings.HasSuffix(info.Name, ".drv") {
		sink.drv = &bytes.Buffer{}
	}
	var ca *CA
	var caHash hash.Hash
	var modulo *moduloHash
	if info.CA != "" {
		c, err := ParseCA(info.CA)
		if err != nil {
			return nil, fmt.Errorf("%s: %w", full, err)
		}
		ca = &c
		if caHash, err = NewCAHash(c.Algo); err != nil {
			return nil, fmt.Errorf("%s: %w", full, err)
		}
		switch {
		case c.Method == CANAR && selfRef(info.Name, info.References):
			// Hashed modulo its own hash part (selfref.go).
			hp, err := hashPart(info.Name)
			if err != nil {
				return nil, fmt.Errorf("%s: %w", full, err)
			}
			modulo = newModuloHash(caHash, hp)
			r = io.TeeReader(r, modulo)
		case c.Method != CANAR:
			sink.content = caHash
		case c.Algo != "sha256": // sha256 is the NAR hash, computed anyway
			r = io.TeeReader(r, caHash)
		}
	}
	res, err := nar.Ingest(r, sink)
	if err != nil {
		return nil, fmt.Errorf("import %s: %w", full, err)
	}
	if err := b.w.EndGroup(); err != nil {
		return nil, fmt.Errorf("import %s: %w", full, err)
	}
	if info.NarSize != 0 && res.NarSize != info.NarSize {
		return nil, fmt.Errorf("import %s: %w: got %d bytes, expected %d", full, ErrSizeMismatch, res.NarSize, info.NarSize)
	}
	var zero [32]byte
	if info.NarHash != zero && !bytes.Equal(res.NarHash[:], info.NarHash[:]) {
		return nil, fmt.Errorf("import %s: %w: got sha256:%s, expected sha256:%s", full, ErrHashMismatch,
			NixBase32(res.NarHash[:]), NixBase32(info.NarHash[:]))
	}
	if ca != nil {
		if err := b.checkCA(*ca, caHash, modulo, res, info.Name, refs); err != nil {
			return nil, err
		}
	}
	pi := info
	if sink.drv != nil && res.Root.Kind == castore.KindFile {
		outs, self, err := b.s.checkDrvOutputs(b.ctx, info.Name, sink.drv.Bytes(), b.drvHashes)
		switch {
		case errors.Is(err, errNotDrv):
			// A path may be named .drv without being one.
			b.s.log.Debug("derivation outputs not recorded", "path", full, "err", err)
		case err != nil:
			b.s.drvWarnings.Warn(b.s.log, "derivation outputs not recorded", "path", full, "err", err)
		}
		if self != "" {
			b.drvHashes[info.Name] = self
		}
		pi.DrvOutputs = outs
	}
	pi.References = refs
	pi.Root = res.Root
	pi.NarHash = res.NarHash
	pi.NarSize = res.NarSize
	if pi.Registered.IsZero() {
		pi.Registered = time.Now()
	}
	b.paths = append(b.paths, &pi)
	b.names[pi.Name] = true
	b.NarBytes += res.NarSize
	return &pi, nil
}

// checkCA checks a content-addressed path: its contents hash to its content
// address, and the address, name and references make its store path, so a
// client cannot pass arbitrary contents off as content-addressed.
func (b *Batch) checkCA(ca CA, h hash.Hash, modulo *moduloHash, res *nar.Result, name string, refs []string) error {
	full := b.s.Full(name)
	got := h.Sum(nil)
	switch {
	case modulo != nil:
		var err error
		if got, err = modulo.Sum(); err != nil {
			return fmt.Errorf("import %s: %w: %v", full, ErrCAMismatch, err)
		}
	case ca.Method == CANAR && ca.Algo == "sha256":
		got = res.NarHash[:]
	}
	// A flat hash covers a regular file's contents only (Nix lets a flat
	// fixed-output derivation make its file executable).
	if ca.Method != CANAR && res.Root.Kind != castore.KindFile {
		return fmt.Errorf("import %s: %w: a flat or text content address needs a regular file", full, ErrCAMismatch)
	}
	if !bytes.Equal(got, ca.Hash) {
		return fmt.Errorf("import %s: %w: specified %s, got %s", full, ErrCAMismatch, ca, CA{Method: ca.Method, Algo: ca.Algo, Hash: got})
	}
	want, err := ca.PathOf(b.s.StoreDir, name, refs)
	if err != nil {
		return fmt.Errorf("import %s: %w: %v", full, ErrCAMismatch, err)
	}
	if want != name {
		return fmt.Errorf("import %s: %w: content address %s and references make %s", full, ErrCAMismatch, ca, b.s.Full(want))
	}
	return nil
}

// Commit makes the batch's paths valid: pack data is fsynced first, then
// one transaction records chunks, blobs, directories and path-info. Paths
// that became valid meanwhile (another importer) are left as they are.
func (b *Batch) Commit() (added []string, err error) {
	if b.done {
		return nil, errors.New("batch already finished")
	}
	b.done = true
	defer b.release()
	if sched.IsIdle(b.ctx) {
		// Idle work commits on an ordinary thread, whoever calls: the packs'
		// fsyncs and the SQLite transaction hold the write lock every
		// writer waits on, which an idle thread a busy machine starves
		// would hold for as long.
		sched.RunOrdinary(func() { added, err = b.commit() })
		return added, err
	}
	return b.commit()
}

// testHookCommit, if set, runs inside each batch's SQLite transaction.
var testHookCommit func()

// commit is Commit's work.
func (b *Batch) commit() (added []string, err error) {
	if b.err != nil {
		return nil, b.err
	}
	if err := b.w.Flush(); err != nil {
		return nil, fmt.Errorf("write packs: %w", err)
	}
	substituted := isSubstituted(b.ctx)
	durable := b.s.durable.Load()
	var mark int64
	err = b.s.db.Write(b.ctx, func(tx *db.Tx) error {
		added = added[:0]
		if h := testHookCommit; h != nil {
			h()
		}
		if err := b.w.Commit(b.ctx, tx); err != nil {
			return err
		}
		if durable != nil {
			var err error
			if mark, err = tx.MaxFrameID(b.ctx); err != nil {
				return err
			}
		}
		for d, data := range b.dirs {
			if err := tx.InsertDirectory(b.ctx, d, data); err != nil {
				return err
			}
		}
		for _, pi := range b.paths {
			have, err := tx.HasPath(b.ctx, pi.Name)
			if err != nil {
				return err
			}
			if have {
				continue
			}
			id, err := tx.InsertPath(b.ctx, toRow(pi))
			if err != nil {
				if errors.Is(err, db.ErrNotFound) {
					// A reference vanished (deleted by GC) since Add checked it.
					return fmt.Errorf("%s: %w: %v", b.s.Full(pi.Name), ErrMissingRef, err)
				}
				return err
			}
			if substituted {
				if err := tx.MarkSubstituted(b.ctx, id, time.Now().UnixMilli()); err != nil {
					return err
				}
			}
			added = append(added, pi.Name)
		}
		return nil
	})
	if err != nil {
		return nil, fmt.Errorf("commit: %w", err)
	}
	b.w.Committed()
	// Packs and the GC lock go back before any wait for the bucket.
	b.release()
	b.s.lastCommit.Store(time.Now().UnixNano())
	b.s.drvHashes.put(b.drvHashes)
	if durable != nil {
		if err := b.s.waitDurable(b.ctx, durable, mark, added); err != nil {
			return nil, err
		}
	}
	return added, nil
}

// Abort drops the batch; nothing it added becomes visible.
func (b *Batch) Abort() {
	if b.done {
		return
	}
	b.done = true
	b.release()
}

func (b *Batch) release() {
	if b.released {
		return
	}
	b.released = true
	b.w.Done()
	if b.unlock != nil {
		b.unlock()
		b.unlock = nil
	}
}

func toRow(pi *PathInfo) *db.PathRow {
	r := &db.PathRow{
		Name: pi.Name, Kind: uint8(pi.Root.Kind), Size: int64(pi.Root.Size),
		Executable: pi.Root.Executable, Target: pi.Root.Target,
		NarHash: pi.NarHash[:], NarSize: pi.NarSize, Deriver: pi.Deriver,
		Registered: pi.Registered.Unix(), Ultimate: pi.Ultimate, CA: pi.CA,
		Refs: pi.References, Sigs: pi.Sigs, DrvOutputs: pi.DrvOutputs,
	}
	if pi.Root.Kind != castore.KindSymlink {
		r.Digest = pi.Root.Digest[:]
	}
	return r
}
