package cli

import (
	"context"
	"errors"
	"fmt"
	"io"
	"os"
	"path/filepath"
	"time"

	"github.com/casnix/casnix/backupremote"
	"github.com/casnix/casnix/objstore"
	"github.com/casnix/casnix/replicate"
	"github.com/casnix/casnix/store"
)

// openBucket opens the bucket an s3:// argument names.
func openBucket(g *Globals, raw string) (*objstore.Bucket, error) {
	loc, err := objstore.ParseURL(raw)
	if err != nil {
		return nil, err
	}
	return objstore.Open(g.Ctx, loc, objstore.Options{})
}

// runBucket is `casnix backup s3://…` and its --list, --verify-only and --keep.
func (c *BackupCmd) runBucket(g *Globals) error {
	if c.Quick {
		return fmt.Errorf("--quick is for directory backups: a bucket backup checks the point against the bucket; restore verifies the data")
	}
	if c.Point != "" && !c.VerifyOnly {
		return fmt.Errorf("--point goes with --verify-only")
	}
	if c.Keep < 0 {
		return fmt.Errorf("--keep %d: want at least 1", c.Keep)
	}
	b, err := openBucket(g, c.Dest)
	if err != nil {
		return err
	}
	switch {
	case c.List:
		points, err := backupremote.ListPoints(g.Ctx, b)
		if err != nil {
			return err
		}
		printPoints(g.Stdout, points)
		return nil
	case c.VerifyOnly:
		start := time.Now()
		m, err := backupremote.Verify(g.Ctx, b, c.Point)
		if err != nil {
			return err
		}
		fmt.Fprintf(g.Stdout, "point %s in %s: OK (%d paths, database %s, %d pack objects %s) in %.2fs\n",
			m.Point, b.Location(), m.Paths, humanBytes(m.DB.Size), len(m.Packs), humanBytes(m.PackBytes()), time.Since(start).Seconds())
		return nil
	}
	st, err := g.Open()
	if err != nil {
		return err
	}
	defer st.Close()
	rep, err := backupremote.Backup(g.Ctx, st, b, backupremote.Options{
		Version: Version,
		Keep:    c.Keep,
		Log:     func(format string, args ...any) { g.Logger.Debug(fmt.Sprintf(format, args...)) },
	})
	if rep != nil { // on an error only when the point is complete and the prune failed
		secs := max(rep.Copy.Seconds(), 1e-9)
		fmt.Fprintf(g.Stdout, "backed up %s to %s point %s: %d paths, %d packs; uploaded %d objects, %s of packs (%d packs unchanged, %s already in the bucket), database %s as %s; %d write requests; in %.2fs, %.1f MB/s uploaded; verified in %.2fs\n",
			st.Dir(), b.Location(), rep.Point, rep.Paths, rep.Packs, rep.Uploaded, humanBytes(rep.UploadedBytes), rep.Skipped, humanBytes(rep.SkippedBytes),
			humanBytes(rep.DBBytes), humanBytes(rep.DBStored), rep.RequestsWritten, secs, float64(rep.UploadedBytes+rep.DBStored)/1e6/secs, rep.Verify.Seconds())
		if p := rep.Pruned; p != nil {
			fmt.Fprintf(g.Stdout, "pruned: %d points, %d incomplete points, %d pack objects (%s); %d pack objects kept", p.Points, p.Incomplete, p.Packs, humanBytes(p.PackBytes), p.PacksKept)
			if p.PacksHeldBy {
				fmt.Fprintf(g.Stdout, "; unreferenced packs left: another backup is under way")
			}
			fmt.Fprintln(g.Stdout)
		}
	}
	return err
}

func printPoints(w io.Writer, points []*backupremote.Point) {
	if len(points) == 0 {
		fmt.Fprintln(w, "no backup points")
		return
	}
	fmt.Fprintf(w, "%-32s %-20s %8s %10s %6s %10s  %s\n", "POINT", "TIME", "PATHS", "DATABASE", "PACKS", "PACK BYTES", "CASNIX")
	for _, p := range points {
		if !p.Complete() {
			fmt.Fprintf(w, "%-32s %-20s incomplete (no manifest: under way, or failed)\n", p.ID, p.Modified.UTC().Format(time.RFC3339))
			continue
		}
		m := p.Manifest
		fmt.Fprintf(w, "%-32s %-20s %8d %10s %6d %10s  %s\n", m.Point, m.Time.UTC().Format(time.RFC3339), m.Paths, humanBytes(m.DB.Size), len(m.Packs), humanBytes(m.PackBytes()), m.Casnix)
	}
}

// runBucket is `casnix restore s3://…`.
func (c *RestoreCmd) runBucket(g *Globals, dst string, opts store.CopyOptions) error {
	if c.Point != "" && c.At != "" {
		return fmt.Errorf("--point and --at: give one")
	}
	ro := backupremote.RestoreOptions{CopyOptions: opts, Point: c.Point}
	if c.At != "" {
		t, err := backupremote.ParseTime(c.At)
		if err != nil {
			return err
		}
		ro.At = t
	}
	b, err := openBucket(g, c.Src)
	if err != nil {
		return err
	}
	if primary, err := isPrimaryPrefix(g, b); err != nil {
		return err
	} else if primary {
		return c.restorePrimary(g, b.Location(), dst, opts, ro.At)
	}
	m, rep, err := backupremote.Restore(g.Ctx, b, dst, ro)
	if rep != nil {
		printCopy(g.Stdout, "restored", fmt.Sprintf("%s point %s", b.Location(), m.Point), dst, rep)
	}
	return err
}

// isPrimaryPrefix reports whether b is a primary's prefix (its database replicated under
// db/, packs under packs/) rather than a place casnix backup wrote points to.
func isPrimaryPrefix(g *Globals, b *objstore.Bucket) (bool, error) {
	points, err := backupremote.ListPoints(g.Ctx, b)
	if err != nil || len(points) > 0 {
		return false, err
	}
	found := false
	err = b.List(g.Ctx, replicate.Dir+"/", func(objstore.Info) error {
		found = true
		return errStopList
	})
	if errors.Is(err, errStopList) {
		err = nil
	}
	return found, err
}

var errStopList = errors.New("stop listing")

// restorePrimary is `casnix restore s3://…` of a primary's own prefix (serve --packs):
// its database as replicated (the newest state, or as of at), with what the bucket does
// not hold dropped (store.DropNotInBucket), staged, verified against the bucket and
// swapped in like any restore. The packs stay in the bucket: the restored data dir reads
// them from there, and a serve on it takes the primary's lease as its own.
func (c *RestoreCmd) restorePrimary(g *Globals, loc objstore.Location, dst string, opts store.CopyOptions, at time.Time) error {
	if c.Point != "" {
		return fmt.Errorf("--point: %s holds a primary's replicated database, not backup points (--at TIME picks a time)", loc)
	}
	var dropped []string
	rep, err := store.RestoreWith(g.Ctx, dst, opts, func(ctx context.Context, stage string, step func(string)) (*store.CopyReport, error) {
		file := filepath.Join(stage, store.DBFile)
		if err := replicate.Restore(ctx, loc, file, at); err != nil {
			return nil, err
		}
		step("database restored")
		var err error
		if dropped, err = store.DropNotInBucket(ctx, stage); err != nil {
			return nil, err
		}
		step("dropped what the bucket lacks")
		fi, err := os.Stat(file)
		if err != nil {
			return nil, err
		}
		return &store.CopyReport{DBBytes: fi.Size()}, nil
	})
	if rep != nil {
		printCopy(g.Stdout, "restored", loc.String()+" (the primary's replicated database; packs stay in the bucket)", dst, rep)
	}
	if err == nil && len(dropped) > 0 {
		fmt.Fprintf(g.Stdout, "%d paths whose data had not reached the bucket (the upload window) were left out:\n", len(dropped))
		for _, n := range dropped {
			fmt.Fprintf(g.Stdout, "  %s\n", n)
		}
	}
	return err
}
