package blobs

import (
	"context"
	"errors"
	"fmt"
	"io/fs"
	"os"
	"path/filepath"
	"sync"
	"sync/atomic"
	"time"

	"golang.org/x/sys/unix"

	"github.com/casnix/casnix/blobs/pack"
	"github.com/casnix/casnix/db"
)

// DefaultUploadWithin is how long a committed frame waits, at most, before
// its pack is sealed and uploaded (plus the upload itself): the window in
// which an acknowledged write is only on the local disk.
const DefaultUploadWithin = 10 * time.Second

// uploadTick is how often the uploader looks for packs to seal and upload.
const uploadTick = time.Second

// uploader is the background sealing and upload of packs (Options.Upload).
type uploader struct {
	stop, done chan struct{}
	// round serialises upload rounds (the loop's and UploadAll's).
	round sync.Mutex

	mu        sync.Mutex
	firstSeen map[int64]time.Time // packs with committed frames not uploaded: when first seen so
	rounds    int
	// doneRounds counts rounds that finished (QueuedPacks is as of the
	// last): a waiter that sees it rise knows the queue figure is fresh.
	doneRounds int
	queue      int
	oldest     time.Time // first seen of the oldest queued pack (zero: none)
	nextTry    time.Time // after a failure: no upload before
	backoff    time.Duration
	lastErr    error

	uploadedPacks, uploadedBytes, failures, sealedPacks atomic.Int64
}

// openRemote sets up the block cache of a store with a Remote: blocks a
// previous run cached, and the local files of uploaded packs, count
// against its budget.
func (s *Store) openRemote() error {
	dir := s.opts.RemoteCacheDir
	if dir == "" {
		dir = filepath.Join(filepath.Dir(s.dir), "s3cache")
	}
	s.bcache = newBlockCache(dir, s.opts.RemoteCacheBytes, s.remote, s.evictLocal)
	if err := s.bcache.load(); err != nil {
		return err
	}
	ids, err := s.db.UploadedPacks(context.Background())
	if err != nil {
		return err
	}
	type local struct {
		id, size, mod int64
	}
	var locals []local
	for _, id := range ids {
		if fi, err := os.Stat(s.PackPath(id)); err == nil {
			locals = append(locals, local{id, diskUsage(fi), fi.ModTime().UnixNano()})
		}
	}
	// Oldest first, so the most recently written end up most recent.
	for i := 1; i < len(locals); i++ {
		for j := i; j > 0 && locals[j].mod < locals[j-1].mod; j-- {
			locals[j], locals[j-1] = locals[j-1], locals[j]
		}
	}
	s.bcache.mu.Lock()
	for _, l := range locals {
		s.bcache.insertLocked(blockKey{l.id, localFile}, l.size, true)
	}
	s.bcache.mu.Unlock()
	s.bcache.evict()
	return nil
}

func (s *Store) startUploader() {
	u := &s.upl
	u.stop, u.done = make(chan struct{}), make(chan struct{})
	u.firstSeen = map[int64]time.Time{}
	ctx, cancel := context.WithCancel(context.Background())
	stop := u.stop // stopUploader clears the field once done: this goroutine may start later
	go func() {
		<-stop
		cancel()
	}()
	go func() {
		defer close(u.done)
		t := time.NewTicker(uploadTick)
		defer t.Stop()
		for {
			if err := s.uploadRound(ctx, false); err != nil && ctx.Err() == nil {
				u.mu.Lock()
				u.lastErr = err
				u.mu.Unlock()
			}
			select {
			case <-u.stop:
				return
			case <-t.C:
			}
		}
	}()
}

// noteWritten records that frames were just committed (or are about to be)
// in packs ps, so the uploader measures their age from now rather than from
// its next look (up to a tick later). Writers of other processes are seen
// by that look only.
func (s *Store) noteWritten(ps []*packFile) {
	u := &s.upl
	if s.remote == nil || u.stop == nil {
		return
	}
	now := time.Now()
	u.mu.Lock()
	defer u.mu.Unlock()
	for _, p := range ps {
		if _, ok := u.firstSeen[p.id]; !ok && p.size > pack.HeaderSize {
			u.firstSeen[p.id] = now
		}
	}
}

// stopUploader stops the uploader; an upload under way is abandoned (its
// pack stays sealed and is uploaded again by the next run).
func (s *Store) stopUploader() {
	u := &s.upl
	if u.stop != nil {
		close(u.stop)
		<-u.done
		u.stop = nil
	}
}

// UploadAll seals every pack holding committed frames that no writer
// holds and uploads every sealed pack now, for tests and for commands
// that must leave nothing local. It returns the first upload error.
func (s *Store) UploadAll(ctx context.Context) error {
	if s.remote == nil {
		return errors.New("no bucket for packs")
	}
	return s.uploadRound(ctx, true)
}

// uploadRound seals the packs that are full or whose oldest frame waited
// UploadWithin (all of them with force), then uploads the sealed ones,
// unless a failure's backoff is running (force ignores it).
func (s *Store) uploadRound(ctx context.Context, force bool) error {
	u := &s.upl
	u.round.Lock()
	defer u.round.Unlock()
	// Before the query: a pack a writer noted after it (noteWritten) may
	// be missing from it, and must not be forgotten below.
	now := time.Now()
	states, err := s.db.PacksToUpload(ctx)
	if err != nil {
		return err
	}
	u.mu.Lock()
	if u.firstSeen == nil {
		u.firstSeen = map[int64]time.Time{}
	}
	first := u.rounds == 0
	u.rounds++
	seen := map[int64]bool{}
	for _, p := range states {
		if p.End <= pack.HeaderSize {
			continue
		}
		seen[p.ID] = true
		if _, ok := u.firstSeen[p.ID]; !ok {
			t := now
			if first {
				// Left by an earlier run: how long they waited is not
				// known, so they go now.
				t = now.Add(-s.opts.UploadWithin)
			}
			u.firstSeen[p.ID] = t
		}
	}
	for id, t := range u.firstSeen {
		if !seen[id] && t.Before(now) {
			delete(u.firstSeen, id)
		}
	}
	firstSeen := make(map[int64]time.Time, len(u.firstSeen))
	for id, t := range u.firstSeen {
		firstSeen[id] = t
	}
	wait := !force && now.Before(u.nextTry)
	u.mu.Unlock()

	var errs []error
	for _, p := range states {
		if err := ctx.Err(); err != nil {
			return err
		}
		if p.End <= pack.HeaderSize {
			continue
		}
		if !p.Sealed && (force || p.End >= s.opts.PackSize || now.Sub(firstSeen[p.ID]) >= s.opts.UploadWithin) {
			ok, err := s.seal(ctx, p.ID)
			if err != nil {
				errs = append(errs, err)
				continue
			}
			p.Sealed = ok
		}
		if !p.Sealed || wait {
			continue
		}
		if err := s.upload(ctx, p.ID); err != nil {
			s.upl.failures.Add(1)
			u.mu.Lock()
			u.backoff = min(max(2*u.backoff, time.Second), s.opts.UploadRetryMax)
			u.nextTry = time.Now().Add(u.backoff)
			u.lastErr = err
			u.mu.Unlock()
			errs = append(errs, err)
			wait = !force
			continue
		}
		u.mu.Lock()
		u.backoff = 0
		u.nextTry = time.Time{}
		u.lastErr = nil
		delete(u.firstSeen, p.ID)
		u.mu.Unlock()
	}
	u.mu.Lock()
	u.doneRounds++
	u.queue, u.oldest = len(u.firstSeen), time.Time{}
	for _, t := range u.firstSeen {
		if u.oldest.IsZero() || t.Before(u.oldest) {
			u.oldest = t
		}
	}
	u.mu.Unlock()
	return errors.Join(errs...)
}

// seal makes pack id one no writer appends to again: it takes the pack's
// flock as a writer would (out of this process's free list, or from the
// file when no writer anywhere holds it), trims anything past its last
// committed frame, and commits the mark, which writers check under the
// flock before they reuse a pack. It returns false, without an error, if a
// writer holds the pack (the next round tries again) or it is gone.
func (s *Store) seal(ctx context.Context, id int64) (bool, error) {
	s.mu.Lock()
	var p *packFile
	for i, q := range s.free {
		if q.id == id {
			p = q
			s.free = append(s.free[:i:i], s.free[i+1:]...)
			break
		}
	}
	for i, r := range s.reopen {
		if r == id {
			s.reopen = append(s.reopen[:i:i], s.reopen[i+1:]...)
			break
		}
	}
	s.mu.Unlock()
	if p == nil {
		f, err := os.OpenFile(s.PackPath(id), os.O_RDWR, 0)
		if errors.Is(err, fs.ErrNotExist) {
			return false, nil // compacted away meanwhile
		}
		if err != nil {
			return false, fmt.Errorf("open pack %d: %w", id, err)
		}
		if err := unix.Flock(int(f.Fd()), unix.LOCK_EX|unix.LOCK_NB); err != nil {
			f.Close()
			return false, nil // a writer has it
		}
		if compactedAway(f) {
			f.Close()
			return false, nil
		}
		p = &packFile{id: id, f: f}
	}
	defer p.f.Close() // drops the flock: the mark keeps writers out now
	if err := s.trimTail(ctx, p); err != nil {
		return false, err
	}
	if err := s.db.Write(ctx, func(tx *db.Tx) error { return tx.SealPack(ctx, id) }); err != nil {
		return false, err
	}
	s.upl.sealedPacks.Add(1)
	return true, nil
}

// upload puts sealed pack id in the bucket whole and records it uploaded;
// its local file then counts against the cache budget.
func (s *Store) upload(ctx context.Context, id int64) error {
	f, err := os.Open(s.PackPath(id))
	if errors.Is(err, fs.ErrNotExist) {
		if _, _, err := s.db.PackSealedState(ctx, id); errors.Is(err, db.ErrNotFound) {
			return nil // dropped by a compaction meanwhile
		}
		return fmt.Errorf("%w: sealed pack %d has no file", ErrCorrupt, id)
	}
	if err != nil {
		return fmt.Errorf("open pack %d: %w", id, err)
	}
	defer f.Close()
	fi, err := f.Stat()
	if err != nil {
		return fmt.Errorf("stat pack %d: %w", id, err)
	}
	end, err := s.db.PackEnd(ctx, id)
	if err != nil {
		return err
	}
	if fi.Size() != end {
		return fmt.Errorf("%w: sealed pack %d is %d bytes, its frames end at %d", ErrCorrupt, id, fi.Size(), end)
	}
	if err := s.remote.Put(ctx, PackObject(id), f, fi.Size()); err != nil {
		return fmt.Errorf("upload pack %d: %w", id, err)
	}
	var ok bool
	err = s.db.Write(ctx, func(tx *db.Tx) error {
		var err error
		ok, err = tx.MarkUploaded(ctx, id)
		return err
	})
	if err != nil {
		return err
	}
	s.upl.uploadedPacks.Add(1)
	s.upl.uploadedBytes.Add(fi.Size())
	if ok {
		s.bcache.addLocal(id, diskUsage(fi))
	}
	return nil
}

// RemoteStats is the state of a store whose packs go to a bucket, for
// /metrics.
type RemoteStats struct {
	// QueuedPacks holds committed frames not uploaded yet; OldestPending
	// is how long the oldest of them has waited (as the uploader saw it;
	// 0: none).
	QueuedPacks    int
	OldestPending  time.Duration
	Rounds         int // upload rounds done (QueuedPacks is as of the last)
	SealedPacks    int64
	UploadedPacks  int64
	UploadedBytes  int64
	UploadFailures int64
	LastError      string
	// The block cache: bytes held (uploaded packs' local files and cached
	// blocks) and its budget, reads served from it or fetched.
	CacheBytes, CacheBudget    int64
	CacheHits, CacheMisses     int64
	FetchedBytes               int64
	EvictedBlocks, EvictedPack int64
}

// Remote reports whether the store's packs go to a bucket.
func (s *Store) Remote() bool { return s.remote != nil }

// RemoteStats returns the upload and cache state (zero without a bucket).
func (s *Store) RemoteStats() RemoteStats {
	if s.remote == nil {
		return RemoteStats{}
	}
	u := &s.upl
	u.mu.Lock()
	st := RemoteStats{QueuedPacks: u.queue, Rounds: u.doneRounds}
	if !u.oldest.IsZero() {
		st.OldestPending = time.Since(u.oldest)
	}
	if u.lastErr != nil {
		st.LastError = u.lastErr.Error()
	}
	u.mu.Unlock()
	st.SealedPacks = u.sealedPacks.Load()
	st.UploadedPacks = u.uploadedPacks.Load()
	st.UploadedBytes = u.uploadedBytes.Load()
	st.UploadFailures = u.failures.Load()
	c := s.bcache
	st.CacheBytes, st.CacheBudget = c.Used(), c.budget
	st.CacheHits, st.CacheMisses = c.hits.Load(), c.misses.Load()
	st.FetchedBytes = c.fetchedBytes.Load()
	st.EvictedBlocks, st.EvictedPack = c.evictedBlocks.Load(), c.evictedPacks.Load()
	return st
}

// WaitUploaded returns once every frame with an id up to mark is in a pack
// the bucket holds (and recorded so), sealing and uploading what it must
// meanwhile: for a caller that acknowledges a write only once its data is in
// the bucket. Failed uploads are retried (with a growing pause) until ctx
// ends; the error then names the last failure.
func (s *Store) WaitUploaded(ctx context.Context, mark int64) error {
	if s.remote == nil {
		return errors.New("no bucket for packs")
	}
	pause := 20 * time.Millisecond
	var last error
	for {
		first, ok, err := s.db.FirstFrameNotUploaded(ctx)
		if err != nil {
			return err
		}
		if !ok || first > mark {
			return nil
		}
		err = s.UploadAll(ctx)
		if err == nil {
			// Uploaded all it could: what is left is a pack a writer still
			// holds between its commit and Done (SealOnCommit), or one of
			// another process. Look again shortly.
			pause = 20 * time.Millisecond
		} else {
			last = err
			pause = min(2*pause, 2*time.Second)
		}
		select {
		case <-ctx.Done():
			if last != nil {
				return fmt.Errorf("frames up to %d not in the bucket: %w (last upload error: %v)", mark, ctx.Err(), last)
			}
			return fmt.Errorf("frames up to %d not in the bucket: %w", mark, ctx.Err())
		case <-time.After(pause):
		}
	}
}

// UploadFailing reports the last upload error if uploads are failing now
// (the uploader is backing off after it); nil otherwise.
func (s *Store) UploadFailing() error {
	u := &s.upl
	u.mu.Lock()
	defer u.mu.Unlock()
	if u.lastErr != nil && time.Now().Before(u.nextTry) {
		return u.lastErr
	}
	return nil
}
