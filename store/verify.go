package store

import (
	"context"
	"crypto/sha256"
	"fmt"
	"runtime"
	"sync"

	"golang.org/x/sys/unix"

	"github.com/casnix/casnix/blobs"
)

// Damaged names a store path that no longer renders to its recorded NAR.
type Damaged struct {
	Name string
	Err  error
}

// VerifyReport is the outcome of Verify.
type VerifyReport struct {
	Paths   int
	Frames  int64
	Chunks  []blobs.Damage // damaged chunks, referenced or not
	Damaged []Damaged      // damaged store paths
}

// OK reports whether nothing was damaged.
func (r *VerifyReport) OK() bool { return len(r.Chunks) == 0 && len(r.Damaged) == 0 }

// Verify re-hashes every chunk in every pack, then re-renders every valid
// path's NAR and compares its SHA-256 and size with the path-info.
func (s *Store) Verify(ctx context.Context, progress func(stage string, done, total int64)) (*VerifyReport, error) {
	// No collection meanwhile: a pack compacted away or a path deleted
	// under the scan would read as damage.
	unlock, err := s.lockFile(ctx, gcRunLock, unix.LOCK_SH)
	if err != nil {
		return nil, err
	}
	defer unlock()
	rep := &VerifyReport{}
	rep.Chunks, err = s.blobs.Verify(ctx, func(done, total int64) {
		rep.Frames = total
		if progress != nil {
			progress("chunks", done, total)
		}
	})
	if err != nil {
		return nil, fmt.Errorf("verify chunks: %w", err)
	}
	names, err := s.All(ctx)
	if err != nil {
		return nil, err
	}
	rep.Paths = len(names)
	var (
		mu   sync.Mutex
		wg   sync.WaitGroup
		next = make(chan string)
		done int64
	)
	for i := 0; i < runtime.GOMAXPROCS(0); i++ {
		wg.Add(1)
		go func() {
			defer wg.Done()
			for name := range next {
				err := s.verifyPath(ctx, name)
				mu.Lock()
				if err != nil {
					rep.Damaged = append(rep.Damaged, Damaged{name, err})
				}
				done++
				if progress != nil {
					progress("paths", done, int64(len(names)))
				}
				mu.Unlock()
			}
		}()
	}
	for _, n := range names {
		if ctx.Err() != nil {
			break
		}
		next <- n
	}
	close(next)
	wg.Wait()
	if err := ctx.Err(); err != nil {
		return nil, err
	}
	sortDamaged(rep.Damaged)
	return rep, nil
}

func (s *Store) verifyPath(ctx context.Context, name string) error {
	pi, err := s.Info(ctx, name)
	if err != nil {
		return err
	}
	h := sha256.New()
	n, err := s.NarRender(ctx, name, h)
	if err != nil {
		return err
	}
	if n != pi.NarSize {
		return fmt.Errorf("%w: renders %d bytes, path-info says %d", ErrSizeMismatch, n, pi.NarSize)
	}
	var got [32]byte
	h.Sum(got[:0])
	if got != pi.NarHash {
		return fmt.Errorf("%w: renders sha256:%s, path-info says sha256:%s", ErrHashMismatch, NixBase32(got[:]), NixBase32(pi.NarHash[:]))
	}
	return nil
}
