package backupremote

import (
	"context"
	"encoding/json"
	"fmt"
	"io"
	"os"
	"path/filepath"
	"sort"
	"strings"
	"time"

	"github.com/casnix/casnix/blobs"
	"github.com/casnix/casnix/objstore"
	"github.com/casnix/casnix/store"
)

// Point is a backup point as listed: complete (with its manifest) or not.
type Point struct {
	ID       string
	Manifest *Manifest // nil for an incomplete point
	// Objects are the point's own objects (not its packs); Modified is the newest one's
	// time on the server.
	Objects  []string
	Modified time.Time
}

// Complete reports whether p has its manifest.
func (p *Point) Complete() bool { return p.Manifest != nil }

// ListPoints returns every point in b, oldest first, with the manifests of the complete ones.
func ListPoints(ctx context.Context, b *objstore.Bucket) ([]*Point, error) {
	byID := map[string]*Point{}
	var hasManifest []string
	err := b.List(ctx, PointsDir, func(i objstore.Info) error {
		id, name, ok := strings.Cut(strings.TrimPrefix(i.Name, PointsDir), "/")
		if !ok {
			return nil
		}
		p := byID[id]
		if p == nil {
			p = &Point{ID: id}
			byID[id] = p
		}
		p.Objects = append(p.Objects, i.Name)
		if i.Modified.After(p.Modified) {
			p.Modified = i.Modified
		}
		if name == ManifestName {
			hasManifest = append(hasManifest, id)
		}
		return nil
	})
	if err != nil {
		return nil, err
	}
	for _, id := range hasManifest {
		m, err := readManifest(ctx, b, id)
		if err != nil {
			return nil, err
		}
		byID[id].Manifest = m
	}
	out := make([]*Point, 0, len(byID))
	for _, p := range byID {
		out = append(out, p)
	}
	sort.Slice(out, func(i, j int) bool { return out[i].ID < out[j].ID })
	return out, nil
}

func readManifest(ctx context.Context, b *objstore.Bucket, id string) (*Manifest, error) {
	key := pointKey(id, ManifestName)
	rc, err := b.Get(ctx, key)
	if err != nil {
		return nil, err
	}
	defer rc.Close()
	body, err := io.ReadAll(io.LimitReader(rc, 256<<20))
	if err != nil {
		return nil, fmt.Errorf("s3 %s: read %s: %w", b.Location(), key, err)
	}
	var m Manifest
	if err := json.Unmarshal(body, &m); err != nil {
		return nil, fmt.Errorf("s3 %s: %s: %w", b.Location(), key, err)
	}
	if m.Format != manifestFormat {
		return nil, fmt.Errorf("s3 %s: %s: manifest format %d, this casnix reads %d", b.Location(), key, m.Format, manifestFormat)
	}
	if m.Point != id {
		return nil, fmt.Errorf("s3 %s: %s names point %q", b.Location(), key, m.Point)
	}
	return &m, nil
}

// Select picks a complete point: the one named id, else the newest at or before at, else
// (both zero) the newest.
func Select(points []*Point, id string, at time.Time) (*Manifest, error) {
	var pick *Manifest
	for _, p := range points {
		switch {
		case !p.Complete():
		case id != "":
			if p.ID == id {
				return p.Manifest, nil
			}
		case !at.IsZero():
			if !p.Manifest.Time.After(at) {
				pick = p.Manifest
			}
		default:
			pick = p.Manifest
		}
	}
	if pick == nil {
		switch {
		case id != "":
			return nil, fmt.Errorf("%w named %s", ErrNoPoint, id)
		case !at.IsZero():
			return nil, fmt.Errorf("%w at or before %s", ErrNoPoint, at.UTC().Format(time.RFC3339))
		}
		return nil, ErrNoPoint
	}
	return pick, nil
}

// ParseTime reads a --at argument: RFC 3339, a date, or a point's name.
func ParseTime(s string) (time.Time, error) {
	for _, layout := range []string{time.RFC3339Nano, "2006-01-02T15:04:05", "2006-01-02 15:04:05", "2006-01-02", "20060102T150405.000Z", "20060102T150405Z"} {
		if t, err := time.Parse(layout, s); err == nil {
			return t, nil
		}
	}
	if len(s) > 7 && s[len(s)-7] == '-' {
		if t, err := time.Parse("20060102T150405.000Z", s[:len(s)-7]); err == nil {
			return t, nil
		}
	}
	return time.Time{}, fmt.Errorf("time %q: want RFC 3339 (2006-01-02T15:04:05Z), a date, or a point name", s)
}

// Verify checks the point named id (the newest if empty) against the bucket as Backup does
// before it writes the manifest: the snapshot reads back intact and every frame it names is
// within the pack objects, all present with the sizes the manifest gives.
func Verify(ctx context.Context, b *objstore.Bucket, id string) (*Manifest, error) {
	points, err := ListPoints(ctx, b)
	if err != nil {
		return nil, err
	}
	m, err := Select(points, id, time.Time{})
	if err != nil {
		return nil, fmt.Errorf("s3 %s: %w", b.Location(), err)
	}
	tmp, err := os.MkdirTemp("", "casnix-verify-")
	if err != nil {
		return nil, err
	}
	defer os.RemoveAll(tmp)
	if err := verifyPoint(ctx, b, m, tmp); err != nil {
		return m, fmt.Errorf("backup point %s in %s: %w", m.Point, b.Location(), err)
	}
	return m, nil
}

// PruneOptions tune Prune.
type PruneOptions struct {
	// Keep is how many complete points to keep, newest first (at least 1).
	Keep int
	// StaleAfter is how old an incomplete point must be to be removed: younger ones may
	// be backups under way (default 24h).
	StaleAfter time.Duration
	Log        func(format string, args ...any)
}

// PruneReport is what Prune removed.
type PruneReport struct {
	Points      int // complete points removed
	Incomplete  int // stale incomplete points removed
	Packs       int // pack objects no retained point names
	PackBytes   int64
	PacksKept   int  // pack objects retained points name
	PacksHeldBy bool // pack removal skipped: a backup is under way
}

// Prune keeps the newest Keep complete points and removes the others (manifest first, so a
// point half removed is incomplete, never a complete point missing objects), then the
// incomplete points older than StaleAfter, then every pack object no remaining complete
// point names. While a younger incomplete point exists (a backup may be under way, relying
// on packs it found in the bucket) no pack is removed.
func Prune(ctx context.Context, b *objstore.Bucket, opts PruneOptions) (*PruneReport, error) {
	if opts.Keep < 1 {
		return nil, fmt.Errorf("prune: keep %d points: at least 1", opts.Keep)
	}
	if opts.StaleAfter == 0 {
		opts.StaleAfter = 24 * time.Hour
	}
	logf := func(format string, args ...any) {
		if opts.Log != nil {
			opts.Log(format, args...)
		}
	}
	points, err := ListPoints(ctx, b)
	if err != nil {
		return nil, err
	}
	rep := &PruneReport{}
	var complete []*Point
	for _, p := range points {
		if p.Complete() {
			complete = append(complete, p)
		}
	}
	keep := map[string]bool{}
	for i, p := range complete {
		if i >= len(complete)-opts.Keep {
			keep[p.ID] = true
			continue
		}
		if err := b.Delete(ctx, pointKey(p.ID, ManifestName)); err != nil {
			return rep, err
		}
		if err := b.Delete(ctx, p.Objects...); err != nil {
			return rep, err
		}
		rep.Points++
		logf("prune: removed point %s", p.ID)
	}
	// The server's clock, not ours, dates incomplete points: the newest object the
	// listing shows is the server's now, near enough.
	now := time.Now()
	for _, p := range points {
		if p.Modified.After(now) {
			now = p.Modified
		}
	}
	busy := false
	for _, p := range points {
		if p.Complete() {
			continue
		}
		if now.Sub(p.Modified) < opts.StaleAfter {
			busy = true
			continue
		}
		if err := b.Delete(ctx, p.Objects...); err != nil {
			return rep, err
		}
		rep.Incomplete++
		logf("prune: removed incomplete point %s", p.ID)
	}
	if busy {
		rep.PacksHeldBy = true
		logf("prune: a backup is under way (incomplete point younger than %s): packs left for the next prune", opts.StaleAfter)
		return rep, nil
	}
	named := map[string]bool{}
	for _, p := range complete {
		if keep[p.ID] {
			for _, r := range p.Manifest.Packs {
				for _, sg := range r.Segments {
					named[sg.Key] = true
				}
			}
		}
	}
	var drop []string
	if err := b.List(ctx, PacksDir, func(i objstore.Info) error {
		if !isSegmentKey(i.Name) {
			// Not a backup's: a primary's pack object (`serve --packs` on the same
			// prefix, packs/NN/<id>.pack), which its own dead pack deletion handles.
			return nil
		}
		if named[i.Name] {
			rep.PacksKept++
			return nil
		}
		drop = append(drop, i.Name)
		rep.PackBytes += i.Size
		return nil
	}); err != nil {
		return rep, err
	}
	if len(drop) == 0 {
		return rep, nil
	}
	// A backup that started since the listing above may rely on these packs.
	again, err := ListPoints(ctx, b)
	if err != nil {
		return rep, err
	}
	for _, p := range again {
		if !p.Complete() && now.Sub(p.Modified) < opts.StaleAfter {
			rep.PacksHeldBy, rep.PackBytes = true, 0
			logf("prune: backup %s started: packs left for the next prune", p.ID)
			return rep, nil
		}
	}
	if err := b.Delete(ctx, drop...); err != nil {
		return rep, err
	}
	rep.Packs = len(drop)
	logf("prune: removed %d pack objects", len(drop))
	return rep, nil
}

// RestoreOptions tune Restore.
type RestoreOptions struct {
	store.CopyOptions
	// Point names the point to restore; At picks the newest at or before it; neither: the
	// newest complete point.
	Point    string
	At       time.Time
	Parallel int
}

// Restore restores a complete point of b into the data dir dst through store.RestoreWith:
// the database snapshot (checked against the manifest's SHA-256) and each pack prefix the
// point names are downloaded into the staging dir, checked, verified as a data dir, and
// swapped in with the journal that makes a crash at any step recoverable. A pack object
// that is missing or shorter than the point needs fails the restore, dst untouched.
func Restore(ctx context.Context, b *objstore.Bucket, dst string, opts RestoreOptions) (*Manifest, *store.CopyReport, error) {
	points, err := ListPoints(ctx, b)
	if err != nil {
		return nil, nil, err
	}
	m, err := Select(points, opts.Point, opts.At)
	if err != nil {
		return nil, nil, fmt.Errorf("s3 %s: %w", b.Location(), err)
	}
	par := opts.Parallel
	if par <= 0 {
		par = 4
	}
	rep, err := store.RestoreWith(ctx, dst, opts.CopyOptions, func(ctx context.Context, stage string, step func(string)) (*store.CopyReport, error) {
		return stagePoint(ctx, b, m, stage, par, step)
	})
	if err != nil {
		return m, nil, fmt.Errorf("restore point %s from %s: %w", m.Point, b.Location(), err)
	}
	// The restored packs are, byte for byte, the objects the point names: a backup of
	// the restored data dir names those objects again as long as a pack is unchanged,
	// under a lineage of its own for everything new. A crash before this leaves no
	// origin (Restore removed the old one before its commit point): the next backup
	// then uploads every pack, which is only slower.
	org := &origin{Lineage: randomHex(8), Packs: map[int64]PackRef{}}
	for _, r := range m.Packs {
		org.Packs[r.ID] = r
	}
	if err := writeOrigin(dst, org); err != nil {
		return m, rep, fmt.Errorf("restored point %s, but could not record its pack objects (the next backup uploads every pack): %w", m.Point, err)
	}
	return m, rep, nil
}

// stagePoint downloads m into the staging dir stage.
func stagePoint(ctx context.Context, b *objstore.Bucket, m *Manifest, stage string, par int, step func(string)) (*store.CopyReport, error) {
	dbFile := filepath.Join(stage, store.DBFile)
	if err := downloadDB(ctx, b, m, dbFile); err != nil {
		return nil, err
	}
	tails, err := readTails(ctx, dbFile)
	if err != nil {
		return nil, fmt.Errorf("database snapshot %s: %w", m.DB.Key, err)
	}
	step("database staged")
	refs := map[int64]PackRef{}
	for _, r := range m.Packs {
		refs[r.ID] = r
	}
	var need []PackRef
	for id, t := range tails {
		r, ok := refs[id]
		if !ok || r.Len < t.End {
			return nil, fmt.Errorf("the snapshot has frames in pack %d up to %d, which the manifest does not name", id, t.End)
		}
		if err := r.check(); err != nil {
			return nil, err
		}
		need = append(need, r)
	}
	sort.Slice(need, func(i, j int) bool { return need[i].ID < need[j].ID })
	packDir := filepath.Join(stage, store.PackDir)
	dirs := map[string]bool{packDir: true}
	for _, r := range need {
		dirs[filepath.Dir(blobs.PackFile(packDir, r.ID))] = true
	}
	for d := range dirs {
		if err := os.MkdirAll(d, 0o755); err != nil {
			return nil, err
		}
	}
	rep := &store.CopyReport{Packs: len(need), DBBytes: m.DB.Size}
	err = forEach(ctx, par, need, func(ctx context.Context, r PackRef) error {
		return downloadPack(ctx, b, r, blobs.PackFile(packDir, r.ID))
	})
	if err != nil {
		return nil, err
	}
	for _, r := range need {
		rep.PackBytes += r.Len
		step(fmt.Sprintf("pack %d staged", r.ID))
	}
	// Deepest first: a directory's entry in its parent is synced after it.
	sorted := make([]string, 0, len(dirs))
	for d := range dirs {
		sorted = append(sorted, d)
	}
	sort.Slice(sorted, func(i, j int) bool { return strings.Count(sorted[i], "/") > strings.Count(sorted[j], "/") })
	sorted = append(sorted, stage)
	for _, d := range sorted {
		if err := syncDir(d); err != nil {
			return nil, fmt.Errorf("sync %s: %w", d, err)
		}
	}
	return rep, nil
}

// downloadPack writes the segments of r, in order, to the new file path, fsynced.
func downloadPack(ctx context.Context, b *objstore.Bucket, r PackRef, path string) error {
	out, err := os.OpenFile(path, os.O_WRONLY|os.O_CREATE|os.O_EXCL, 0o644)
	if err != nil {
		return err
	}
	for _, sg := range r.Segments {
		if err == nil {
			err = downloadSegment(ctx, b, sg, out)
		}
	}
	if err == nil {
		err = out.Sync()
	}
	if cerr := out.Close(); err == nil {
		err = cerr
	}
	if err != nil {
		return fmt.Errorf("pack %d: %w", r.ID, err)
	}
	return nil
}

// downloadSegment appends the object sg to out, which must then be sg.Off+sg.Len long.
func downloadSegment(ctx context.Context, b *objstore.Bucket, sg Segment, out *os.File) error {
	rc, err := b.GetRange(ctx, sg.Key, 0, sg.Len)
	if err != nil {
		return err
	}
	defer rc.Close()
	n, err := io.Copy(out, io.LimitReader(rc, sg.Len))
	if err != nil {
		return fmt.Errorf("download s3 %s: %s: %w", b.Location(), sg.Key, err)
	}
	if n != sg.Len {
		return fmt.Errorf("%w: s3 %s: %s is %d bytes, the point needs %d (truncated object?)", blobs.ErrCorrupt, b.Location(), sg.Key, n, sg.Len)
	}
	return nil
}

// isSegmentKey reports whether name is laid out as segmentKey lays out a backup's segment
// objects (packs/<lineage>/<NN>/<id>-<offset>-<frame>.pack), not as a primary's pack
// objects under the same prefix (packs/<NN>/<id>.pack, blobs.PackObject).
func isSegmentKey(name string) bool {
	parts := strings.Split(name, "/")
	return len(parts) == 4 && parts[0]+"/" == PacksDir && strings.HasSuffix(parts[3], ".pack") && strings.Count(parts[3], "-") == 2
}
