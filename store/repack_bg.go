package store

import (
	"context"
	"errors"
	"sync/atomic"
	"time"

	"github.com/casnix/casnix/blobs"
	"github.com/casnix/casnix/sched"
)

// BackgroundRepack says when a daemon repacks on its own.
type BackgroundRepack struct {
	// Quiet is how long no batch may have committed before a repack
	// starts (writes come in bursts: a nix copy is over before its data
	// is rewritten).
	Quiet time.Duration
	// MinBytes is how much ingest-written data (raw) must have come in
	// since the last repack.
	MinBytes int64
	// Check is how often the conditions are looked at (default Quiet/4,
	// at most a minute).
	Check time.Duration
	// Priority is called on the repack's goroutine before it works (nil:
	// the repack runs in a sched.RunIdle turn). Tests pass a no-op: an
	// idle-class thread waits for as long as the machine is busy, which a
	// test cannot.
	Priority func()
}

// backgroundRound is a background repack's commit size: small, so that a
// collection waiting for the shared GC lock gets in soon.
const backgroundRound = 32 << 20

// RepackInBackground repacks whenever the store has been quiet for
// b.Quiet and at least b.MinBytes of new data wait, until ctx is done. The
// repack is idle work: one goroutine compressing inline, at idle CPU
// priority (a sched.RunIdle turn) except its short commits, old frames decoded
// outside the shared frame cache. It returns when ctx is done (a repack in
// progress stops at its next chunk; what it committed stays).
func (s *Store) RepackInBackground(ctx context.Context, b BackgroundRepack) {
	if b.Check <= 0 {
		b.Check = min(max(b.Quiet/4, 10*time.Millisecond), time.Minute)
	}
	residual := int64(0)
	t := time.NewTicker(b.Check)
	defer t.Stop()
	for {
		select {
		case <-ctx.Done():
			return
		case <-t.C:
		}
		if time.Since(time.Unix(0, s.lastCommit.Load())) < b.Quiet {
			continue
		}
		n, err := s.db.UnpackedBytes(ctx)
		if err != nil {
			if ctx.Err() == nil {
				s.log.Warn("background repack: cannot tell what waits", "err", err)
			}
			continue
		}
		if n < residual+b.MinBytes {
			continue
		}
		s.log.Info("background repack", "unpacked", n)
		res, err := s.repackIdle(ctx, b.Priority)
		if errors.Is(err, errYielded) {
			s.log.Info("background repack paused: other idle work waits")
			continue
		}
		if err != nil {
			if ctx.Err() == nil {
				s.log.Warn("background repack failed", "err", err)
			}
			continue
		}
		s.log.Info("background repack done", "chunks", res.Repack.ChunksMoved, "bytes", res.Repack.BytesMoved,
			"packsRemoved", res.Compact.PacksRemoved, "freed", res.Compact.Freed(), "seconds", res.Duration.Seconds())
		// Frames that keep unreachable chunks (garbage for the next
		// collection) stay unpacked: count only what comes after them.
		if residual, err = s.db.UnpackedBytes(ctx); err != nil {
			residual = n
		}
	}
}

// repackIdle runs one repack on one goroutine at idle priority, its
// frames compressed inline: in one of sched.RunIdle's turns, so that with
// the pull-through's idle ingests it never holds all of Go's Ps (two idle
// threads, the repack's and its compressor's, held both Ps of a 2-CPU
// machine while clients kept the CPUs busy, stalling every ordinary
// goroutine of the daemon). A test's priority replaces RunIdle.
func (s *Store) repackIdle(ctx context.Context, priority func()) (res *RepackResult, err error) {
	opts := RepackOptions{Blobs: blobs.RepackOptions{Idle: true, Inline: true, Workers: 1, RoundBytes: backgroundRound}}
	// The turn is given up (the repack stopped at its next chunk, what it
	// committed kept) as soon as other idle work waits for one: on 2 CPUs
	// there is one turn, and a pull's ingest must not wait for a whole
	// repack. The next quiet spell starts it again.
	rctx, cancel := context.WithCancel(ctx)
	defer cancel()
	var yielded atomic.Bool
	watch := func() {
		t := time.NewTicker(100 * time.Millisecond)
		defer t.Stop()
		for {
			select {
			case <-rctx.Done():
				return
			case <-t.C:
				if sched.Waiting() > 0 {
					yielded.Store(true)
					cancel()
					return
				}
			}
		}
	}
	work := func() {
		if sched.Waiting() > 0 {
			yielded.Store(true) // others wait already: give way before starting
			return
		}
		// Watched from when the turn is held (before, the repack is one
		// of the waiters), on an ordinary goroutine.
		go watch()
		res, err = s.Repack(rctx, opts)
		cancel()
	}
	if priority != nil {
		ch := make(chan struct{})
		go func() {
			defer close(ch)
			priority()
			work()
		}()
		<-ch
	} else if rerr := sched.RunIdle(ctx, work); rerr != nil {
		return nil, rerr
	}
	if yielded.Load() && (err != nil || res == nil) && ctx.Err() == nil {
		repackYields.Add(1)
		return res, errYielded
	}
	return res, err
}

// repackYields counts the background repacks that gave way (for tests).
var repackYields atomic.Int64

// errYielded: the background repack stopped for other idle work.
var errYielded = errors.New("background repack gave way to other idle work")
