package store

import (
	"context"
	"errors"
	"fmt"
	"time"

	"github.com/casnix/casnix/db"
)

// ErrNotDurable is a write refused or taken back because it could not reach the bucket
// in time under the bucket durability promise (SetBucketDurable).
var ErrNotDurable = errors.New("not in the bucket")

// durability is the bucket promise: a write is acknowledged only once its packs are
// uploaded and the metadata naming them is replicated.
type durability struct {
	// sync ships every committed transaction of the database to the bucket and returns
	// once it is there (replicate.Primary.Sync).
	sync    func(context.Context) error
	timeout time.Duration
}

// SetBucketDurable makes every later write of a store whose packs are in a bucket wait,
// before it returns (so before the client's acknowledgement), until the packs holding
// its frames are uploaded and sync has shipped the metadata naming them; a write that
// cannot get there within timeout fails with ErrNotDurable and its paths are taken
// back. The store must have been opened with blobs.Options.SealOnCommit, so that no
// later writer holds a pack with frames someone waits for.
func (s *Store) SetBucketDurable(sync func(context.Context) error, timeout time.Duration) error {
	if s.Packs() == "" {
		return errors.New("bucket durability needs packs in a bucket (--packs)")
	}
	if !s.blobOpts.SealOnCommit {
		return errors.New("bucket durability needs a store opened with SealOnCommit")
	}
	s.durable.Store(&durability{sync: sync, timeout: timeout})
	return nil
}

// waitDurable waits until the frames up to mark and the metadata committed so far are
// in the bucket. On failure the paths the batch added are taken back, so that a client
// that retries finds them missing rather than valid but not in the bucket.
func (s *Store) waitDurable(ctx context.Context, d *durability, mark int64, added []string) error {
	ctx, cancel := context.WithTimeout(ctx, d.timeout)
	defer cancel()
	err := s.blobs.WaitUploaded(ctx, mark)
	if err == nil {
		err = d.sync(ctx)
	}
	if err == nil {
		return nil
	}
	err = fmt.Errorf("%w %s within %s (--durability bucket): %v", ErrNotDurable, s.Packs(), d.timeout, err)
	if len(added) == 0 {
		return err
	}
	if uerr := s.takeBack(added); uerr != nil {
		s.log.Warn("paths not acknowledged stay valid here (a later upload puts them in the bucket)", "paths", len(added), "err", uerr)
		return fmt.Errorf("%w; the paths stay valid here: %v", err, uerr)
	}
	return fmt.Errorf("%d paths not added: %w", len(added), err)
}

// takeBack deletes the named paths just added, in one transaction; it fails, deleting
// none, if another path refers to one of them meanwhile. Their data stays for GC.
func (s *Store) takeBack(names []string) error {
	ctx := context.Background()
	defer func() {
		for _, n := range names {
			s.infos.drop(n)
		}
	}()
	return s.db.Write(ctx, func(tx *db.Tx) error {
		ids := make([]int64, 0, len(names))
		for _, n := range names {
			id, err := tx.PathID(ctx, n)
			if errors.Is(err, db.ErrNotFound) {
				continue
			}
			if err != nil {
				return err
			}
			ids = append(ids, id)
		}
		return tx.DeletePaths(ctx, ids)
	})
}

// syncMeta is waitDurable for a write of metadata only (signatures, realisations): no
// frames to wait for (mark 0) and nothing to take back; the client sees the error and may
// retry.
func (s *Store) syncMeta(ctx context.Context) error {
	if d := s.durable.Load(); d != nil {
		return s.waitDurable(ctx, d, 0, nil)
	}
	return nil
}
