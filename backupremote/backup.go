// Package backupremote backs a casnix data dir up to an S3 bucket and restores it from
// there: `casnix backup s3://…` and `casnix restore s3://…`.
//
// Layout under the URL's prefix (ARCHITECTURE.md, "Backups to a bucket"):
//
//	packs/<lineage>/<NN>/<pack id>-<offset>-<tail frame id>.pack   one segment of a pack
//	points/<point>/started                                       written first
//	points/<point>/casnix.db.zst                                 the database snapshot, zstd
//	points/<point>/manifest.json                                 written last: the point is complete
//
// A point is complete only once its manifest exists, and the manifest is written only after
// every object it names was uploaded and the snapshot read back from the bucket checks out
// against them. A point names, per pack, the prefix its snapshot needs as a chain of segment
// objects. Objects are immutable: a segment is named by its pack, its offset and the id of
// the pack's last frame where it ends, which no other bytes ever are in one data dir (frame
// ids are never reused, and a pack's bytes below a live frame's end are never rewritten). A
// pack that grew gets one new segment holding just what was appended, as long as the frame
// the previous chain ended with is still there; otherwise (a collection dropped the pack's
// tail, and a writer wrote other frames there) it is uploaded whole again. A data dir draws a
// random lineage on its first bucket backup (kept in store.OriginFile with the chains of its
// last backup or restore), so two data dirs, or a data dir and a copy restored from an older
// point that then grew apart, never share a key.
package backupremote

import (
	"bytes"
	"context"
	"crypto/rand"
	"crypto/sha256"
	"encoding/hex"
	"encoding/json"
	"errors"
	"fmt"
	"io"
	"os"
	"path/filepath"
	"slices"
	"strings"
	"sync"
	"sync/atomic"
	"time"

	"github.com/klauspost/compress/zstd"

	"github.com/casnix/casnix/db"
	"github.com/casnix/casnix/objstore"
	"github.com/casnix/casnix/store"
)

// Object names under the bucket's prefix.
const (
	PacksDir     = "packs/"
	PointsDir    = "points/"
	ManifestName = "manifest.json"
	DBName       = "casnix.db.zst"
	StartedName  = "started"
	// tmpPrefix names the working directories backups make inside the data dir.
	tmpPrefix = ".s3backup-"
	// manifestFormat is the manifest's format version.
	manifestFormat = 1
)

// ErrNoPoint is returned when the bucket holds no complete point to act on.
var ErrNoPoint = errors.New("no complete backup point")

// Segment is one pack object: the bytes [Off, Off+Len) of a pack.
type Segment struct {
	Key string `json:"key"`
	Off int64  `json:"off"`
	Len int64  `json:"len"`
}

// PackRef is a pack prefix a point needs, as the chain of segment objects that hold it.
type PackRef struct {
	ID       int64     `json:"id"`
	Frame    int64     `json:"frame"` // the id of the pack's last frame in the snapshot
	Len      int64     `json:"len"`   // the prefix's length: where that frame ends
	Segments []Segment `json:"segments"`
}

// check reports whether r's segments cover [0, r.Len) in order.
func (r *PackRef) check() error {
	var off int64
	for _, s := range r.Segments {
		if s.Off != off || s.Len <= 0 {
			return fmt.Errorf("pack %d: segment %s at %d+%d does not follow on at %d", r.ID, s.Key, s.Off, s.Len, off)
		}
		off += s.Len
	}
	if off != r.Len {
		return fmt.Errorf("pack %d: segments cover %d bytes, the prefix is %d", r.ID, off, r.Len)
	}
	return nil
}

// DBRef is a point's database snapshot.
type DBRef struct {
	Key    string `json:"key"`
	Size   int64  `json:"size"`   // uncompressed
	SHA256 string `json:"sha256"` // of the uncompressed file
	Stored int64  `json:"stored"` // the object's size
}

// Manifest describes one complete backup point.
type Manifest struct {
	Format  int       `json:"format"`
	Point   string    `json:"point"`
	Time    time.Time `json:"time"`
	Casnix  string    `json:"casnix"`
	Lineage string    `json:"lineage"`
	Paths   int       `json:"paths"`
	DB      DBRef     `json:"db"`
	Packs   []PackRef `json:"packs"`
}

// PackBytes is the sum of the pack prefixes m names.
func (m *Manifest) PackBytes() int64 {
	var n int64
	for _, p := range m.Packs {
		n += p.Len
	}
	return n
}

// Options tune Backup.
type Options struct {
	// Version is the casnix version recorded in the manifest.
	Version string
	// Keep, if above 0, prunes the bucket to the newest Keep points after the backup.
	Keep int
	// Parallel is how many objects move at once (default 4).
	Parallel int
	// Log, if set, gets one line per step.
	Log func(format string, args ...any)
}

func (o *Options) logf(format string, args ...any) {
	if o.Log != nil {
		o.Log(format, args...)
	}
}

func (o *Options) parallel() int {
	if o.Parallel > 0 {
		return o.Parallel
	}
	return 4
}

// Report is what Backup did.
type Report struct {
	Point           string
	Paths           int
	Packs           int   // packs the point names
	Uploaded        int   // segment objects uploaded (at most one per pack)
	Skipped         int   // packs the bucket held as they are
	UploadedBytes   int64 // bytes of pack uploaded
	SkippedBytes    int64 // bytes of pack the point names that the bucket already held
	DBBytes         int64 // the snapshot, uncompressed
	DBStored        int64 // and as uploaded
	Copy            time.Duration
	Verify          time.Duration
	Pruned          *PruneReport
	RequestsWritten int64
}

// origin is store.OriginFile: the data dir's lineage, and the pack objects of the point it
// was restored from (which its unchanged packs are, byte for byte).
type origin struct {
	Lineage string            `json:"lineage"`
	Packs   map[int64]PackRef `json:"packs,omitempty"`
}

// loadOrigin reads dir's origin, making and durably writing a new lineage if it has none.
func loadOrigin(dir string) (*origin, error) {
	p := filepath.Join(dir, store.OriginFile)
	b, err := os.ReadFile(p)
	if err == nil {
		var o origin
		if err := json.Unmarshal(b, &o); err != nil || o.Lineage == "" {
			return nil, fmt.Errorf("%s: not a backup origin (remove it: the next backup then uploads every pack): %v", p, err)
		}
		return &o, nil
	}
	if !errors.Is(err, os.ErrNotExist) {
		return nil, err
	}
	o := &origin{Lineage: randomHex(8)}
	// The lineage is written before anything is uploaded under it, so a backup that dies
	// leaves objects the next one recognises.
	return o, writeOrigin(dir, o)
}

func writeOrigin(dir string, o *origin) error {
	b, err := json.Marshal(o)
	if err != nil {
		return err
	}
	return writeFileDurable(filepath.Join(dir, store.OriginFile), b)
}

// writeFileDurable replaces path with b: a temporary file, fsynced, renamed, directory synced.
func writeFileDurable(path string, b []byte) error {
	f, err := os.CreateTemp(filepath.Dir(path), "."+filepath.Base(path)+"-")
	if err != nil {
		return err
	}
	defer os.Remove(f.Name())
	_, err = f.Write(b)
	if err == nil {
		err = f.Sync()
	}
	if cerr := f.Close(); err == nil {
		err = cerr
	}
	if err == nil {
		err = os.Rename(f.Name(), path)
	}
	if err == nil {
		err = syncDir(filepath.Dir(path))
	}
	if err != nil {
		return fmt.Errorf("write %s: %w", path, err)
	}
	return nil
}

func syncDir(dir string) error {
	d, err := os.Open(dir)
	if err != nil {
		return err
	}
	defer d.Close()
	return d.Sync()
}

func randomHex(n int) string {
	b := make([]byte, n)
	if _, err := rand.Read(b); err != nil {
		panic(err) // crypto/rand does not fail on Linux
	}
	return hex.EncodeToString(b)
}

// segmentKey is the object holding pack id's bytes from off to the end of frame.
func segmentKey(lineage string, id, off, frame int64) string {
	return fmt.Sprintf("%s%s/%02x/%08x-%x-%x.pack", PacksDir, lineage, id%256, id, off, frame)
}

// newPointID names a point by its UTC start time (so names sort by time) and a random tail.
func newPointID(t time.Time) string {
	return t.UTC().Format("20060102T150405.000Z") + "-" + randomHex(3)
}

func pointKey(id, name string) string { return PointsDir + id + "/" + name }

// Backup uploads a consistent point of st's data dir to b: the database snapshot and, of
// every pack prefix it names, what b lacks (planPack), then, once all of it is in the bucket
// and the snapshot read back from the bucket checks out against the pack objects, the
// manifest. The GC lock
// is held shared and the packs held (store.Snapshot) while packs upload, as for a backup to
// a directory; the snapshot itself uploads after. On failure no manifest is written: the
// point stays incomplete, ignored by restore and removed by a later prune.
func Backup(ctx context.Context, st *store.Store, b *objstore.Bucket, opts Options) (rep *Report, err error) {
	start := time.Now()
	org, err := loadOrigin(st.Dir())
	if err != nil {
		return nil, err
	}
	removeStaleTemps(st.Dir())
	tmp, err := os.MkdirTemp(st.Dir(), tmpPrefix)
	if err != nil {
		return nil, fmt.Errorf("backup working dir: %w", err)
	}
	defer os.RemoveAll(tmp)

	// The point's time is its name's (milliseconds), so --at NAME picks that point.
	at := start.UTC().Truncate(time.Millisecond)
	m := &Manifest{Format: manifestFormat, Point: newPointID(at), Time: at, Casnix: opts.Version, Lineage: org.Lineage}
	rep = &Report{Point: m.Point}
	sentBefore := b.Stats().Puts.Load()
	defer func() {
		if rep != nil {
			rep.RequestsWritten = b.Stats().Puts.Load() - sentBefore
		}
	}()
	host, _ := os.Hostname()
	started := fmt.Sprintf("casnix %s backup of %s on %s (pid %d), started %s\n", opts.Version, st.Dir(), host, os.Getpid(), start.UTC().Format(time.RFC3339))
	if err := b.Put(ctx, pointKey(m.Point, StartedName), strings.NewReader(started), int64(len(started))); err != nil {
		return nil, err
	}
	defer func() {
		if err != nil {
			// Best effort: what is left is an incomplete point, which restore ignores
			// and a later prune removes.
			dctx, cancel := context.WithTimeout(context.WithoutCancel(ctx), 30*time.Second)
			defer cancel()
			_ = b.Delete(dctx, pointKey(m.Point, DBName), pointKey(m.Point, StartedName))
		}
	}()

	snapFile := filepath.Join(tmp, store.DBFile)
	err = st.Snapshot(ctx, snapFile, func(sn store.Snapshot) error {
		m.Paths = sn.Paths
		// The objects of this lineage, and of the chains a restore brought (which a prune
		// of the point they came from may have removed since).
		keys := []string{segmentKey(org.Lineage, 0, 0, 0)}
		for _, r := range org.Packs {
			for _, sg := range r.Segments {
				keys = append(keys, sg.Key)
			}
		}
		have, err := objectSizes(ctx, b, keys)
		if err != nil {
			return err
		}
		ids := make([]int64, 0, len(sn.Tails))
		for id := range sn.Tails {
			ids = append(ids, id)
		}
		slices.Sort(ids)
		var todo []upload
		for _, id := range ids {
			ref, up, err := planPack(ctx, sn, org, have, id)
			if err != nil {
				return err
			}
			if up == nil {
				rep.Skipped++
				rep.SkippedBytes += ref.Len
			} else {
				rep.SkippedBytes += up.seg.Off
				todo = append(todo, *up)
			}
			m.Packs = append(m.Packs, ref)
		}
		opts.logf("backup %s: %d packs, %d segments to upload", m.Point, len(m.Packs), len(todo))
		var sent atomic.Int64
		err = forEach(ctx, opts.parallel(), todo, func(ctx context.Context, u upload) error {
			if err := uploadSegment(ctx, b, sn.PackPath(u.id), u); err != nil {
				return err
			}
			sent.Add(u.seg.Len)
			return nil
		})
		rep.Uploaded = len(todo)
		rep.UploadedBytes = sent.Load()
		return err
	})
	if err != nil {
		return nil, err
	}
	rep.Packs = len(m.Packs)
	rep.Paths = m.Paths

	m.DB, err = uploadDB(ctx, b, snapFile, tmp, pointKey(m.Point, DBName))
	if err != nil {
		return nil, err
	}
	rep.DBBytes, rep.DBStored = m.DB.Size, m.DB.Stored
	rep.Copy = time.Since(start)

	vstart := time.Now()
	if err := verifyPoint(ctx, b, m, tmp); err != nil {
		return nil, fmt.Errorf("verify backup point %s in %s: %w", m.Point, b.Location(), err)
	}
	rep.Verify = time.Since(vstart)

	body, err := json.MarshalIndent(m, "", " ")
	if err != nil {
		return nil, err
	}
	// The commit point: the manifest goes last.
	if err := b.Put(ctx, pointKey(m.Point, ManifestName), bytes.NewReader(body), int64(len(body))); err != nil {
		return nil, err
	}
	opts.logf("backup %s: complete", m.Point)
	// The chains this point named are where the next backup of this data dir starts.
	// Losing this record (a crash now) only makes the next backup upload whole packs.
	next := &origin{Lineage: org.Lineage, Packs: map[int64]PackRef{}}
	for _, r := range m.Packs {
		next.Packs[r.ID] = r
	}
	if err := writeOrigin(st.Dir(), next); err != nil {
		opts.logf("backup %s: %v", m.Point, err)
	}
	if opts.Keep > 0 {
		rep.Pruned, err = Prune(ctx, b, PruneOptions{Keep: opts.Keep, Log: opts.Log})
		if err != nil {
			return rep, fmt.Errorf("backup point %s is complete, but pruning failed: %w", m.Point, err)
		}
	}
	return rep, nil
}

// upload is a segment to upload from pack id.
type upload struct {
	id  int64
	seg Segment
}

// planPack decides how the point names pack id: the chain of the last backup or restore
// if the pack is unchanged; that chain plus a segment of what was appended if the frame it
// ended with is still there (so every byte it holds is still the pack's); else one segment
// of the whole prefix. It returns the segment to upload, if any. A chain is only used if
// all its objects are in the bucket (have) with their sizes.
func planPack(ctx context.Context, sn store.Snapshot, org *origin, have map[string]int64, id int64) (PackRef, *upload, error) {
	t := sn.Tails[id]
	ref := PackRef{ID: id, Frame: t.Frame, Len: t.End}
	prev, ok := org.Packs[id]
	if ok && prev.check() == nil && prev.Len <= t.End {
		for _, sg := range prev.Segments {
			if have[sg.Key] != sg.Len {
				ok = false
			}
		}
		if ok && prev.Frame != t.Frame {
			pack, end, alive, err := sn.FrameEnd(ctx, prev.Frame)
			if err != nil {
				return ref, nil, err
			}
			ok = alive && pack == id && end == prev.Len
		}
	} else {
		ok = false
	}
	if ok {
		ref.Segments = slices.Clone(prev.Segments)
		if prev.Len == t.End {
			return ref, nil, nil
		}
	}
	seg := Segment{Off: 0, Len: t.End}
	if ok {
		seg = Segment{Off: prev.Len, Len: t.End - prev.Len}
	}
	seg.Key = segmentKey(org.Lineage, id, seg.Off, t.Frame)
	ref.Segments = append(ref.Segments, seg)
	if have[seg.Key] == seg.Len {
		return ref, nil, nil // uploaded by a backup that did not complete
	}
	return ref, &upload{id: id, seg: seg}, nil
}

// uploadSegment uploads u's bytes of the pack file at path.
func uploadSegment(ctx context.Context, b *objstore.Bucket, path string, u upload) error {
	f, err := os.Open(path)
	if err != nil {
		return fmt.Errorf("pack %d: %w", u.id, err)
	}
	defer f.Close()
	fi, err := f.Stat()
	if err != nil {
		return fmt.Errorf("pack %d: %w", u.id, err)
	}
	if fi.Size() < u.seg.Off+u.seg.Len {
		return fmt.Errorf("pack %d: %s is %d bytes, the snapshot names %d", u.id, path, fi.Size(), u.seg.Off+u.seg.Len)
	}
	return b.Put(ctx, u.seg.Key, io.NewSectionReader(f, u.seg.Off, u.seg.Len), u.seg.Len)
}

// uploadDB compresses the database file at path into dir and uploads it as key.
func uploadDB(ctx context.Context, b *objstore.Bucket, path, dir, key string) (DBRef, error) {
	ref := DBRef{Key: key}
	in, err := os.Open(path)
	if err != nil {
		return ref, err
	}
	defer in.Close()
	zpath := filepath.Join(dir, DBName)
	out, err := os.Create(zpath)
	if err != nil {
		return ref, err
	}
	defer out.Close()
	enc, err := zstd.NewWriter(out, zstd.WithEncoderLevel(zstd.SpeedDefault), zstd.WithEncoderConcurrency(1))
	if err != nil {
		return ref, err
	}
	h := sha256.New()
	n, err := io.Copy(enc, io.TeeReader(in, h))
	if cerr := enc.Close(); err == nil {
		err = cerr
	}
	if err != nil {
		return ref, fmt.Errorf("compress %s: %w", path, err)
	}
	ref.Size, ref.SHA256 = n, hex.EncodeToString(h.Sum(nil))
	fi, err := out.Stat()
	if err != nil {
		return ref, err
	}
	ref.Stored = fi.Size()
	return ref, b.Put(ctx, key, out, ref.Stored)
}

// downloadDB fetches m's database snapshot into the new file path and checks its size and
// SHA-256 against the manifest.
func downloadDB(ctx context.Context, b *objstore.Bucket, m *Manifest, path string) error {
	rc, err := b.Get(ctx, m.DB.Key)
	if err != nil {
		return err
	}
	defer rc.Close()
	dec, err := zstd.NewReader(rc, zstd.WithDecoderConcurrency(1))
	if err != nil {
		return err
	}
	defer dec.Close()
	out, err := os.OpenFile(path, os.O_WRONLY|os.O_CREATE|os.O_EXCL, 0o644)
	if err != nil {
		return err
	}
	h := sha256.New()
	n, err := io.Copy(io.MultiWriter(out, h), dec)
	if err == nil {
		err = out.Sync()
	}
	if cerr := out.Close(); err == nil {
		err = cerr
	}
	if err != nil {
		return fmt.Errorf("s3 %s: read %s: %w", b.Location(), m.DB.Key, err)
	}
	if sum := hex.EncodeToString(h.Sum(nil)); n != m.DB.Size || sum != m.DB.SHA256 {
		return fmt.Errorf("s3 %s: %s is %d bytes with SHA-256 %s, the manifest says %d bytes, %s", b.Location(), m.DB.Key, n, sum, m.DB.Size, m.DB.SHA256)
	}
	return nil
}

// verifyPoint checks m against the bucket: its database snapshot reads back intact (size,
// SHA-256, SQLite's checks), every pack it has frames in is named by m up to at least its
// last frame, and every pack object m names is in the bucket with exactly the size m
// gives. dir is a scratch directory.
func verifyPoint(ctx context.Context, b *objstore.Bucket, m *Manifest, dir string) error {
	path := filepath.Join(dir, "verify-"+randomHex(4)+".db")
	defer os.Remove(path)
	if err := downloadDB(ctx, b, m, path); err != nil {
		return err
	}
	tails, err := readTails(ctx, path)
	if err != nil {
		return fmt.Errorf("database snapshot %s: %w", m.DB.Key, err)
	}
	refs := map[int64]PackRef{}
	var keys []string
	for _, r := range m.Packs {
		if err := r.check(); err != nil {
			return err
		}
		refs[r.ID] = r
		for _, sg := range r.Segments {
			keys = append(keys, sg.Key)
		}
	}
	for id, t := range tails {
		r, ok := refs[id]
		if !ok {
			return fmt.Errorf("the snapshot has frames in pack %d, which the manifest does not name", id)
		}
		if t.End > r.Len {
			return fmt.Errorf("the snapshot has frames in pack %d up to %d, past the %d bytes the manifest names", id, t.End, r.Len)
		}
	}
	sizes, err := objectSizes(ctx, b, keys)
	if err != nil {
		return err
	}
	for _, r := range m.Packs {
		for _, sg := range r.Segments {
			sz, ok := sizes[sg.Key]
			if !ok {
				return fmt.Errorf("s3 %s: pack %d: %s: %w", b.Location(), r.ID, sg.Key, objstore.ErrNotFound)
			}
			if sz != sg.Len {
				return fmt.Errorf("s3 %s: pack %d: %s is %d bytes, the point needs %d", b.Location(), r.ID, sg.Key, sz, sg.Len)
			}
		}
	}
	return nil
}

// objectSizes lists the sizes of the objects in the lineage directories of keys: one
// listing per lineage.
func objectSizes(ctx context.Context, b *objstore.Bucket, keys []string) (map[string]int64, error) {
	dirs := map[string]bool{}
	for _, k := range keys {
		parts := strings.SplitN(k, "/", 3)
		if len(parts) < 3 || parts[0]+"/" != PacksDir {
			return nil, fmt.Errorf("malformed pack object key %q", k)
		}
		dirs[parts[0]+"/"+parts[1]+"/"] = true
	}
	sizes := map[string]int64{}
	for d := range dirs {
		if err := b.List(ctx, d, func(i objstore.Info) error { sizes[i.Name] = i.Size; return nil }); err != nil {
			return nil, err
		}
	}
	return sizes, nil
}

// readTails opens the database file at path (checking it) and returns its pack tails.
func readTails(ctx context.Context, path string) (map[int64]db.PackTail, error) {
	if err := store.CheckSchema(ctx, path); err != nil {
		return nil, err
	}
	d, err := db.Open(ctx, path)
	if err != nil {
		return nil, err
	}
	defer d.Close()
	if err := d.Check(ctx); err != nil {
		return nil, err
	}
	return d.PackTails(ctx)
}

// removeStaleTemps removes working directories of backups that died more than a day ago.
func removeStaleTemps(dir string) {
	ents, _ := os.ReadDir(dir)
	for _, e := range ents {
		if !strings.HasPrefix(e.Name(), tmpPrefix) {
			continue
		}
		if fi, err := e.Info(); err == nil && time.Since(fi.ModTime()) > 24*time.Hour {
			os.RemoveAll(filepath.Join(dir, e.Name()))
		}
	}
}

// forEach runs fn on every item, n at a time; the first error cancels the rest.
func forEach[T any](ctx context.Context, n int, items []T, fn func(context.Context, T) error) error {
	ctx, cancel := context.WithCancel(ctx)
	defer cancel()
	var (
		wg    sync.WaitGroup
		mu    sync.Mutex
		first error
	)
	ch := make(chan T)
	for range min(n, len(items)) {
		wg.Add(1)
		go func() {
			defer wg.Done()
			for it := range ch {
				if err := fn(ctx, it); err != nil {
					mu.Lock()
					if first == nil {
						first = err
						cancel()
					}
					mu.Unlock()
				}
			}
		}()
	}
feed:
	for _, it := range items {
		select {
		case ch <- it:
		case <-ctx.Done():
			break feed
		}
	}
	close(ch)
	wg.Wait()
	if first != nil {
		return first
	}
	return ctx.Err()
}
