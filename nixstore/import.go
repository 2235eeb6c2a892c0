package nixstore

import (
	"context"
	"errors"
	"fmt"
	"io"
	"time"

	"github.com/casnix/casnix/nar"
	"github.com/casnix/casnix/store"
)

// Batch limits: a batch commits when any is reached. Each commit is one
// fsync of the packs and one SQLite transaction, so batching many small
// paths is what makes a whole-store import fast; the time bound keeps the
// work lost to a crash small.
const (
	batchBytes = 1 << 30
	batchPaths = 5000
	batchTime  = 3 * time.Second
)

// Summary counts what Import did.
type Summary struct {
	Total, Present, Imported, Failed int
	NarBytes                         int64 // NAR bytes ingested
	NewChunkBytes, DupChunkBytes     int64
	Failures                         []error
}

// Progress is told about each path as it is handled.
type Progress func(done, total int, narBytes int64)

// Import copies paths (in the order given, references first) into st,
// skipping those already valid. Each NAR is dumped from the source's files
// and its SHA-256 checked against the source database before it commits.
// A path that fails is reported and skipped along with the paths that refer
// to it; the others are still imported.
func Import(ctx context.Context, st *store.Store, src *Source, paths []*Path, progress Progress) (*Summary, error) {
	sum := &Summary{Total: len(paths)}
	var todo []*Path
	for _, p := range paths {
		ok, err := st.IsValid(ctx, p.Name)
		if err != nil {
			return sum, err
		}
		if ok {
			sum.Present++
		} else {
			todo = append(todo, p)
		}
	}
	failed := map[string]bool{}
	for len(todo) > 0 {
		if err := ctx.Err(); err != nil {
			return sum, err
		}
		n, bad, err := importBatch(ctx, st, src, todo, failed, sum)
		if err != nil {
			return sum, err
		}
		if bad != nil {
			// The batch was aborted; retry the paths before the bad one.
			failed[bad.path.Name] = true
			sum.Failed++
			sum.Failures = append(sum.Failures, bad.err)
			continue
		}
		todo = todo[n:]
		if progress != nil {
			progress(sum.Present+sum.Imported+sum.Failed, sum.Total, sum.NarBytes)
		}
	}
	return sum, nil
}

type pathErr struct {
	path *Path
	err  error
}

// importBatch imports a prefix of todo in one batch and returns how many
// paths it consumed. If one path fails, the batch is aborted and that path
// is returned for the caller to skip.
func importBatch(ctx context.Context, st *store.Store, src *Source, todo []*Path, failed map[string]bool, sum *Summary) (int, *pathErr, error) {
	b := st.NewBatch(ctx)
	start := time.Now()
	n := 0
	var bytes int64
	for _, p := range todo {
		if b.Len() > 0 && (b.NarBytes >= batchBytes || b.Len() >= batchPaths || time.Since(start) >= batchTime) {
			break
		}
		n++
		if failed[p.Name] {
			continue // counted when it failed
		}
		if dep := failedRef(p, failed); dep != "" {
			failed[p.Name] = true
			sum.Failed++
			sum.Failures = append(sum.Failures, fmt.Errorf("%s/%s: skipped: reference %s/%s failed", StoreDir, p.Name, StoreDir, dep))
			continue
		}
		if err := addPath(ctx, b, src, p); err != nil {
			b.Abort()
			if ctx.Err() != nil {
				return 0, nil, ctx.Err()
			}
			// Retrying the rest of the batch happens in the caller's loop:
			// the bad path is marked failed and skipped next time.
			return 0, &pathErr{p, err}, nil
		}
		bytes += p.NarSize
	}
	_, nb, _, db := b.Stats()
	if _, err := b.Commit(); err != nil {
		return 0, nil, err
	}
	sum.Imported += b.Len()
	sum.NarBytes += bytes
	sum.NewChunkBytes += nb
	sum.DupChunkBytes += db
	return n, nil, nil
}

func failedRef(p *Path, failed map[string]bool) string {
	for _, r := range p.References {
		if failed[r] {
			return r
		}
	}
	return ""
}

func addPath(ctx context.Context, b *store.Batch, src *Source, p *Path) error {
	pr, pw := io.Pipe()
	go func() {
		_, err := nar.DumpPath(pw, src.FSPath(p.Name))
		pw.CloseWithError(err)
	}()
	_, err := b.Add(pr, store.PathInfo{
		Name: p.Name, NarHash: p.NarHash, NarSize: p.NarSize, References: p.References,
		Deriver: p.Deriver, Registered: p.Registered, Ultimate: p.Ultimate, Sigs: p.Sigs, CA: p.CA,
	})
	// Unblock the dumper if Add stopped early.
	pr.CloseWithError(errors.New("import stopped"))
	if err != nil {
		return err
	}
	return nil
}
