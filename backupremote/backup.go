// Package backupremote backs a casnix data dir up to an S3 bucket and restores it from
// there: `casnix backup s3://…` and `casnix restore s3://…`.
//
// Layout under the URL's prefix (ARCHITECTURE.md, "Backups"):
//
//	packs/<lineage>/<NN>/<pack id>-<tail frame id>.pack   a pack's prefix, up to its last frame
//	points/<point>/started                              written first: a backup is under way
//	points/<point>/casnix.db.zst                        the database snapshot, zstd
//	points/<point>/manifest.json                        written last: the point is complete
//
// A point is complete only once its manifest exists, and the manifest is written only after
// every object it names was uploaded and read back (the snapshot's frames all lie within the
// pack objects the manifest names). Pack objects are immutable: a pack's committed prefix is
// named by the pack id and the id of its last frame, which no other content of that pack ever
// has in one data dir (frame ids are never reused, and a pack's bytes below a live frame's
// end are never rewritten). A pack that grew is uploaded again, whole, under its new tail;
// the older object stays as long as a retained point names it. A data dir draws a random
// lineage on its first bucket backup (kept in store.OriginFile), so two data dirs, or a
// data dir and a copy restored from an older point that then grew apart, never share a key.
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
	"sort"
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

// PackRef is one pack object a point needs.
type PackRef struct {
	ID    int64  `json:"id"`
	Key   string `json:"key"`
	Frame int64  `json:"frame"` // the id of the pack's last frame in the snapshot
	Len   int64  `json:"len"`   // bytes of the object the snapshot needs (all of it)
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
	Packs           int // pack objects the point names
	Uploaded        int // pack objects uploaded
	Skipped         int // pack objects the bucket already held
	UploadedBytes   int64
	SkippedBytes    int64
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

// packKey is the object holding pack id's prefix up to the end of frame.
func packKey(lineage string, id, frame int64) string {
	return fmt.Sprintf("%s%s/%02x/%08x-%x.pack", PacksDir, lineage, id%256, id, frame)
}

// newPointID names a point by its UTC start time (so names sort by time) and a random tail.
func newPointID(t time.Time) string {
	return t.UTC().Format("20060102T150405.000Z") + "-" + randomHex(3)
}

func pointKey(id, name string) string { return PointsDir + id + "/" + name }

// Backup uploads a consistent point of st's data dir to b: the database snapshot and every
// pack prefix it names that b lacks, then, once all of it is in the bucket and the snapshot
// read back from the bucket checks out against the pack objects, the manifest. The GC lock
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

	m := &Manifest{Format: manifestFormat, Point: newPointID(start), Time: start.UTC(), Casnix: opts.Version, Lineage: org.Lineage}
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
		// The objects of this lineage, and those a restore brought that may still serve
		// (a prune of the point they came from may have removed them since).
		listed := []PackRef{{Key: packKey(org.Lineage, 0, 0)}}
		for id, r := range org.Packs {
			if t, ok := sn.Tails[id]; ok && r.Frame == t.Frame && r.Len == t.End {
				listed = append(listed, r)
			}
		}
		have, err := objectSizes(ctx, b, listed)
		if err != nil {
			return err
		}
		ids := make([]int64, 0, len(sn.Tails))
		for id := range sn.Tails {
			ids = append(ids, id)
		}
		slices.Sort(ids)
		var todo []PackRef
		for _, id := range ids {
			t := sn.Tails[id]
			ref := PackRef{ID: id, Frame: t.Frame, Len: t.End, Key: packKey(org.Lineage, id, t.Frame)}
			if r, ok := org.Packs[id]; ok && r.Frame == t.Frame && r.Len == t.End && have[r.Key] == t.End {
				ref.Key = r.Key // unchanged since the restore that brought it
				rep.Skipped++
				rep.SkippedBytes += t.End
			} else if have[ref.Key] == t.End {
				rep.Skipped++
				rep.SkippedBytes += t.End
			} else {
				todo = append(todo, ref)
			}
			m.Packs = append(m.Packs, ref)
		}
		opts.logf("backup %s: %d packs, %d to upload", m.Point, len(m.Packs), len(todo))
		var sent atomic.Int64
		err = forEach(ctx, opts.parallel(), todo, func(ctx context.Context, r PackRef) error {
			if err := uploadPack(ctx, b, sn.PackPath(r.ID), r); err != nil {
				return err
			}
			sent.Add(r.Len)
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
	if opts.Keep > 0 {
		rep.Pruned, err = Prune(ctx, b, PruneOptions{Keep: opts.Keep, Log: opts.Log})
		if err != nil {
			return rep, fmt.Errorf("backup point %s is complete, but pruning failed: %w", m.Point, err)
		}
	}
	return rep, nil
}

// uploadPack uploads the first r.Len bytes of the pack file at path as r.Key.
func uploadPack(ctx context.Context, b *objstore.Bucket, path string, r PackRef) error {
	f, err := os.Open(path)
	if err != nil {
		return fmt.Errorf("pack %d: %w", r.ID, err)
	}
	defer f.Close()
	fi, err := f.Stat()
	if err != nil {
		return fmt.Errorf("pack %d: %w", r.ID, err)
	}
	if fi.Size() < r.Len {
		return fmt.Errorf("pack %d: %s is %d bytes, the snapshot names %d", r.ID, path, fi.Size(), r.Len)
	}
	return b.Put(ctx, r.Key, f, r.Len)
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
	for _, r := range m.Packs {
		refs[r.ID] = r
	}
	for id, t := range tails {
		r, ok := refs[id]
		if !ok {
			return fmt.Errorf("the snapshot has frames in pack %d, which the manifest does not name", id)
		}
		if t.End > r.Len {
			return fmt.Errorf("the snapshot has frames in pack %d up to %d, past the %d bytes of %s", id, t.End, r.Len, r.Key)
		}
	}
	sizes, err := objectSizes(ctx, b, m.Packs)
	if err != nil {
		return err
	}
	for _, r := range m.Packs {
		sz, ok := sizes[r.Key]
		if !ok {
			return fmt.Errorf("s3 %s: pack %d: %s: %w", b.Location(), r.ID, r.Key, objstore.ErrNotFound)
		}
		if sz != r.Len {
			return fmt.Errorf("s3 %s: pack %d: %s is %d bytes, the point needs %d", b.Location(), r.ID, r.Key, sz, r.Len)
		}
	}
	return nil
}

// objectSizes lists the sizes of the pack objects refs name: one listing per lineage.
func objectSizes(ctx context.Context, b *objstore.Bucket, refs []PackRef) (map[string]int64, error) {
	dirs := map[string]bool{}
	for _, r := range refs {
		parts := strings.SplitN(r.Key, "/", 3)
		if len(parts) < 3 {
			return nil, fmt.Errorf("pack %d: malformed key %q", r.ID, r.Key)
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

// sortPoints orders manifests oldest first.
func sortPoints(ms []*Manifest) {
	sort.Slice(ms, func(i, j int) bool { return ms[i].Point < ms[j].Point })
}
