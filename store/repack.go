package store

import (
	"bytes"
	"context"
	"errors"
	"fmt"
	"time"

	"golang.org/x/sys/unix"

	"github.com/casnix/casnix/blobs"
	"github.com/casnix/casnix/castore"
	"github.com/casnix/casnix/db"
	"github.com/casnix/casnix/digest"
)

// RepackOptions tune Repack.
type RepackOptions struct {
	Blobs blobs.RepackOptions
	// MinDead is the share of dead bytes at which the compaction after the
	// rewrite drops or rewrites a pack (0: DefaultMinDead).
	MinDead float64
	// Step, if set, is called after each step a crash could follow (in
	// the rewrite and in the compaction after it).
	Step func(name string)
}

// RepackResult says what Repack did.
type RepackResult struct {
	Paths    int // walked
	Repack   blobs.RepackStats
	Compact  blobs.CompactStats
	Duration time.Duration
}

// repackPage is how many paths Repack reads per query: it pages through
// the store so that no read transaction spans its commits (which would keep
// SQLite from checkpointing the WAL).
const repackPage = 256

// repackBlobBatch is how many blobs the walk hands the repacker at once.
const repackBlobBatch = 256

// repackLock serialises repacks on a data directory (two would copy the
// same chunks twice).
const repackLock = "repack.lock"

// Repack rewrites the chunks ingest stored in its fast form into the
// space-optimal one (blobs.Repacker), laid out in the order of the paths'
// names without their hash parts, so the versions of a package sit next to
// each other, and each path's files in NAR order, so a path still reads
// from a few neighbouring frames. Then a compaction removes the packs it
// emptied. Each round of the rewrite holds the GC lock shared, as an import
// does (no sweep deletes a chunk it is moving; a waiting collection gets in
// between rounds); the compaction holds the GC run lock, as a collection's
// does. Imports and reads go on, and what they add is left for the next
// repack.
func (s *Store) Repack(ctx context.Context, o RepackOptions) (*RepackResult, error) {
	start := time.Now()
	unlockRepack, err := s.lockFile(ctx, repackLock, unix.LOCK_EX)
	if err != nil {
		return nil, err
	}
	defer unlockRepack()
	o.Blobs.Step = o.Step
	o.Blobs.Hold = func() (func(), error) { return s.SharedGCLock(ctx) }
	rp, err := s.blobs.NewRepacker(ctx, o.Blobs)
	if err != nil {
		return nil, err
	}
	res := &RepackResult{}
	walkErr := s.repackWalk(ctx, rp, res)
	res.Repack, err = rp.Finish()
	if walkErr != nil {
		return res, walkErr
	}
	if err != nil {
		return res, err
	}
	minDead := o.MinDead
	if minDead == 0 {
		minDead = DefaultMinDead
	}
	unlockRun, err := s.lockFile(ctx, gcRunLock, unix.LOCK_EX)
	if err != nil {
		return res, err
	}
	defer unlockRun()
	res.Compact, err = s.blobs.CompactSteps(ctx, minDead, o.Step)
	res.Duration = time.Since(start)
	if err != nil {
		return res, fmt.Errorf("repack: compact packs: %w", err)
	}
	return res, nil
}

// repackWalk hands the repacker every valid path's file blobs, path by
// path in name order, each path's files in NAR order.
func (s *Store) repackWalk(ctx context.Context, rp *blobs.Repacker, res *RepackResult) error {
	var batch []digest.Digest
	flush := func() error {
		if len(batch) == 0 {
			return nil
		}
		err := rp.Add(batch)
		batch = batch[:0]
		return err
	}
	add := func(d digest.Digest) error {
		batch = append(batch, d)
		if len(batch) < repackBlobBatch {
			return nil
		}
		return flush()
	}
	group := ""
	after := ""
	for {
		rows, err := s.db.PathRootsByName(ctx, after, repackPage)
		if err != nil {
			return fmt.Errorf("repack: %w", err)
		}
		for i := range rows {
			if err := ctx.Err(); err != nil {
				return err
			}
			n, err := rootOf(&rows[i])
			if err != nil {
				return fmt.Errorf("repack: %w", err)
			}
			if g := packageOf(rows[i].Name); g != group {
				// A new package: its data starts a frame of its own once
				// the last one holds enough.
				if err := flush(); err != nil {
					return err
				}
				if err := rp.EndGroup(); err != nil {
					return err
				}
				group = g
			}
			switch n.Kind {
			case castore.KindFile:
				err = add(n.Digest)
			case castore.KindDirectory:
				err = s.repackTree(ctx, n.Digest, add)
			}
			if errors.Is(err, db.ErrNotFound) {
				// A collection deleted the path since the page was read.
				if ok, verr := s.IsValid(ctx, rows[i].Name); verr == nil && !ok {
					continue
				}
			}
			if err != nil {
				return fmt.Errorf("repack: path %s: %w", rows[i].Name, err)
			}
			res.Paths++
		}
		if len(rows) < repackPage {
			break
		}
		after = rows[len(rows)-1].Name
	}
	return flush()
}

// repackTree calls add for the files of directory d in NAR order (entries
// by name, a subdirectory's files where its name falls).
func (s *Store) repackTree(ctx context.Context, d digest.Digest, add func(digest.Digest) error) error {
	dir, err := s.Directory(ctx, d)
	if err != nil {
		return err
	}
	fi, di := 0, 0
	for fi < len(dir.Files) || di < len(dir.Directories) {
		if di == len(dir.Directories) || (fi < len(dir.Files) && bytes.Compare(dir.Files[fi].Name, dir.Directories[di].Name) < 0) {
			if err := add(dir.Files[fi].Digest); err != nil {
				return err
			}
			fi++
			continue
		}
		if err := s.repackTree(ctx, dir.Directories[di].Digest, add); err != nil {
			return err
		}
		di++
	}
	return nil
}

// packageOf is a store path name's package: the name without its hash
// part and from the first dash followed by a digit on (its version), as
// Nix's parseDrvName splits names. "<hash>-gcc-12.2.0-lib" and
// "<hash>-gcc-13.1.0.drv" are both "gcc".
func packageOf(name string) string {
	// The hash part is 32 characters and a dash.
	if len(name) > 33 {
		name = name[33:]
	}
	for i := 0; i+1 < len(name); i++ {
		if name[i] == '-' && name[i+1] >= '0' && name[i+1] <= '9' {
			return name[:i]
		}
	}
	return name
}
