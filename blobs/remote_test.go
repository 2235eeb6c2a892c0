package blobs

import (
	"bytes"
	"context"
	"errors"
	"io"
	"io/fs"
	"math/rand"
	"os"
	"path/filepath"
	"slices"
	"strings"
	"testing"
	"time"

	"github.com/casnix/casnix/blobs/pack"
	"github.com/casnix/casnix/db"
	"github.com/casnix/casnix/digest"
	"github.com/casnix/casnix/objstore"
	"github.com/casnix/casnix/tests/nixtest"
)

// remoteEnv is a data dir (database and packs) whose packs go to a real S3
// server's bucket.
type remoteEnv struct {
	srv    *nixtest.S3
	bucket *objstore.Bucket
	dir    string
}

func newRemoteEnv(t *testing.T) *remoteEnv {
	t.Helper()
	srv := nixtest.StartS3(t)
	srv.SetEnv(t)
	loc, err := objstore.ParseURL(srv.URL(t.Name()))
	if err != nil {
		t.Fatal(err)
	}
	b, err := objstore.Open(context.Background(), loc, objstore.Options{})
	if err != nil {
		t.Fatal(err)
	}
	return &remoteEnv{srv: srv, bucket: b, dir: t.TempDir()}
}

// open opens the data dir as a new process would (its own database
// handle and blob store), with the given block cache directory.
func (e *remoteEnv) open(t *testing.T, cacheDir string, opts Options) (*Store, *db.DB) {
	t.Helper()
	d, err := db.Open(context.Background(), filepath.Join(e.dir, "test.db"))
	if err != nil {
		t.Fatal(err)
	}
	opts.Remote = e.bucket
	opts.RemoteCacheDir = cacheDir
	s, err := Open(filepath.Join(e.dir, "packs"), d, opts)
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { s.Close(); d.Close() })
	return s, d
}

func randomBlobs(seed int64, sizes ...int) [][]byte {
	r := rand.New(rand.NewSource(seed))
	var out [][]byte
	for _, n := range sizes {
		b := make([]byte, n)
		r.Read(b)
		out = append(out, b)
	}
	return out
}

func readBlob(s *Store, d digest.Digest) ([]byte, error) {
	br, err := s.Open(context.Background(), d)
	if err != nil {
		return nil, err
	}
	return io.ReadAll(br)
}

func checkBlobs(t *testing.T, s *Store, ds []digest.Digest, want [][]byte) {
	t.Helper()
	for i, d := range ds {
		got, err := readBlob(s, d)
		if err != nil {
			t.Fatalf("blob %d: %v", i, err)
		}
		if !bytes.Equal(got, want[i]) {
			t.Fatalf("blob %d: read back differs", i)
		}
	}
}

// packIDs lists the packs holding committed frames.
func packIDs(t *testing.T, d *db.DB) []int64 {
	t.Helper()
	ends, err := d.PackEnds(context.Background())
	if err != nil {
		t.Fatal(err)
	}
	var ids []int64
	for id := range ends {
		ids = append(ids, id)
	}
	return ids
}

func TestRemoteWriteUploadEvictRead(t *testing.T) {
	e := newRemoteEnv(t)
	ctx := context.Background()
	cache := filepath.Join(e.dir, "cache1")
	// A budget of one byte: every uploaded pack's local file is evicted at once.
	s, d := e.open(t, cache, Options{FrameSize: MaxChunk, PackSize: 1 << 20, RemoteCacheBytes: 1})
	blobs := randomBlobs(1, 100, MaxChunk+7, 3<<20, 700<<10)
	ds := writeBlobs(t, s, d, blobs...)
	ids := packIDs(t, d)
	if len(ids) < 2 {
		t.Fatalf("want several packs, got %v", ids)
	}
	if err := s.UploadAll(ctx); err != nil {
		t.Fatal(err)
	}
	for _, id := range ids {
		if _, err := os.Stat(s.PackPath(id)); !errors.Is(err, fs.ErrNotExist) {
			t.Fatalf("pack %d: local file still there after upload under a 1-byte budget (%v)", id, err)
		}
		sealed, uploaded, err := d.PackSealedState(ctx, id)
		if err != nil || !sealed || !uploaded {
			t.Fatalf("pack %d: sealed %v uploaded %v (%v)", id, sealed, uploaded, err)
		}
	}
	gets := e.bucket.Stats().Gets.Load()
	checkBlobs(t, s, ds, blobs)
	if e.bucket.Stats().Gets.Load() == gets {
		t.Fatal("blobs read back without a GET: not from the bucket")
	}
	if st := s.RemoteStats(); st.UploadedPacks != int64(len(ids)) || st.CacheMisses == 0 {
		t.Fatalf("stats %+v, want %d packs uploaded and cache misses", st, len(ids))
	}

	// A new process with an empty cache reads everything back from the
	// bucket, and verify checks the bucket's bytes.
	s.Close()
	d.Close()
	s2, _ := e.open(t, filepath.Join(e.dir, "cache2"), Options{})
	checkBlobs(t, s2, ds, blobs)
	gets = e.bucket.Stats().Gets.Load()
	damage, err := s2.Verify(ctx, nil)
	if err != nil || len(damage) != 0 {
		t.Fatalf("verify: %v %v", damage, err)
	}
	if pd, err := s2.VerifyHeaders(ctx); err != nil || len(pd) != 0 {
		t.Fatalf("verify headers: %v %v", pd, err)
	}
	if e.bucket.Stats().Gets.Load() == gets {
		t.Fatal("verify read nothing from the bucket")
	}
}

// TestRemoteSealedNotReused: once sealed, a pack (whose local file is still
// there) takes no frame more, neither from this process's writers (it was
// on their free list) nor from a new process's reuse of the newest packs.
func TestRemoteSealedNotReused(t *testing.T) {
	e := newRemoteEnv(t)
	ctx := context.Background()
	s, d := e.open(t, filepath.Join(e.dir, "c1"), Options{})
	blobs := randomBlobs(7, 300<<10)
	ds := writeBlobs(t, s, d, blobs...)
	sealed := packIDs(t, d)
	if err := s.UploadAll(ctx); err != nil {
		t.Fatal(err)
	}
	more := randomBlobs(8, 200<<10)
	mds := writeBlobs(t, s, d, more...)
	checkSealed(t, e, s, d, sealed)
	// Seal the second pack too, so that the newest packs a new process
	// considers for reuse are all sealed (with their files here).
	if err := s.UploadAll(ctx); err != nil {
		t.Fatal(err)
	}
	sealed = packIDs(t, d)
	s.Close()
	d.Close()
	s2, d2 := e.open(t, filepath.Join(e.dir, "c2"), Options{})
	more2 := randomBlobs(9, 200<<10)
	mds2 := writeBlobs(t, s2, d2, more2...)
	checkSealed(t, e, s2, d2, sealed)
	checkBlobs(t, s2, ds, blobs)
	checkBlobs(t, s2, mds, more)
	checkBlobs(t, s2, mds2, more2)
}

// checkSealed checks that the sealed packs' local files and objects end
// where their committed frames do.
func checkSealed(t *testing.T, e *remoteEnv, s *Store, d *db.DB, sealed []int64) {
	t.Helper()
	ctx := context.Background()
	for _, id := range sealed {
		end, err := d.PackEnd(ctx, id)
		if err != nil {
			t.Fatal(err)
		}
		fi, err := os.Stat(s.PackPath(id))
		if err != nil {
			t.Fatalf("sealed pack %d: local file gone under a 10 GiB budget: %v", id, err)
		}
		rc, err := e.bucket.Get(ctx, PackObject(id))
		if err != nil {
			t.Fatal(err)
		}
		obj, _ := io.ReadAll(rc)
		rc.Close()
		if int64(len(obj)) != end || fi.Size() != end {
			t.Fatalf("sealed pack %d: object %d bytes, file %d, frames end at %d: appended to after sealing", id, len(obj), fi.Size(), end)
		}
	}
}

func TestRemoteCacheBudget(t *testing.T) {
	e := newRemoteEnv(t)
	ctx := context.Background()
	s, d := e.open(t, filepath.Join(e.dir, "c1"), Options{PackSize: 4 << 20, RemoteCacheBytes: 1})
	blobs := randomBlobs(4, 12<<20, 9<<20, 5<<20) // 26 MiB, incompressible
	ds := writeBlobs(t, s, d, blobs...)
	if err := s.UploadAll(ctx); err != nil {
		t.Fatal(err)
	}
	s.Close()
	d.Close()
	const budget = 10 << 20
	cache := filepath.Join(e.dir, "c2")
	s2, _ := e.open(t, cache, Options{RemoteCacheBytes: budget, CacheBytes: 8 << 20})
	for round := 0; round < 2; round++ {
		for i, dg := range ds {
			got, err := readBlob(s2, dg)
			if err != nil || !bytes.Equal(got, blobs[i]) {
				t.Fatalf("round %d blob %d: differs (%v)", round, i, err)
			}
			if used := s2.RemoteStats().CacheBytes; used > budget {
				t.Fatalf("cache holds %d bytes, budget %d", used, budget)
			}
			if n := dirBytes(t, cache); n > budget+maxFetches*(blockSize+4) {
				t.Fatalf("cache dir holds %d bytes, budget %d", n, budget)
			}
		}
	}
	if st := s2.RemoteStats(); st.EvictedBlocks == 0 {
		t.Fatalf("a read of 26 MiB through a 10 MiB cache evicted nothing: %+v", st)
	}
}

func dirBytes(t *testing.T, dir string) int64 {
	t.Helper()
	var n int64
	filepath.WalkDir(dir, func(_ string, de fs.DirEntry, err error) error {
		if err == nil && !de.IsDir() {
			if fi, err := de.Info(); err == nil {
				n += fi.Size()
			}
		}
		return nil
	})
	return n
}

func TestRemoteServerDown(t *testing.T) {
	e := newRemoteEnv(t)
	ctx := context.Background()
	s, d := e.open(t, filepath.Join(e.dir, "c"), Options{
		PackSize: 1 << 20, Upload: true, UploadWithin: 200 * time.Millisecond, UploadRetryMax: time.Second,
		RemoteCacheBytes: 1,
	})
	first := randomBlobs(5, 1<<20)
	written := time.Now()
	fds := writeBlobs(t, s, d, first...)
	waitUploaded(t, s, d, 30*time.Second)
	// The window: UploadWithin, plus up to a tick before the uploader sees
	// the frames, plus the upload (slack for a loaded machine).
	if took := time.Since(written); took > 200*time.Millisecond+uploadTick+5*time.Second {
		t.Fatalf("committed frames uploaded %v after the write, UploadWithin 200ms", took)
	}

	e.srv.Stop()
	// Writes go on (the local promise), and so do reads of local data.
	var blobs [][]byte
	var ds []digest.Digest
	for i := 0; i < 4; i++ {
		b := randomBlobs(int64(10+i), 600<<10)
		ds = append(ds, writeBlobs(t, s, d, b...)...)
		blobs = append(blobs, b...)
		checkBlobs(t, s, ds, blobs)
		time.Sleep(300 * time.Millisecond)
	}
	if err := s.UploadAll(ctx); err == nil {
		t.Fatal("UploadAll succeeded with the S3 server down")
	}
	if st := s.RemoteStats(); st.QueuedPacks == 0 || st.UploadFailures == 0 || st.OldestPending < time.Second || st.LastError == "" {
		t.Fatalf("stats with the server down: %+v", st)
	}
	checkBlobs(t, s, ds, blobs)

	e.srv.Start(t)
	waitUploaded(t, s, d, 60*time.Second)
	checkBlobs(t, s, ds, blobs)
	checkBlobs(t, s, fds, first)
	for _, id := range packIDs(t, d) {
		if _, err := os.Stat(s.PackPath(id)); !errors.Is(err, fs.ErrNotExist) {
			t.Fatalf("pack %d still local after upload under a 1-byte budget", id)
		}
	}
}

// waitUploaded waits until every pack with committed frames is uploaded.
func waitUploaded(t *testing.T, s *Store, d *db.DB, timeout time.Duration) {
	t.Helper()
	deadline := time.Now().Add(timeout)
	for {
		ps, err := d.PacksToUpload(context.Background())
		if err != nil {
			t.Fatal(err)
		}
		left := 0
		for _, p := range ps {
			if p.End > pack.HeaderSize {
				left++
			}
		}
		if left == 0 {
			return
		}
		if time.Now().After(deadline) {
			t.Fatalf("%d packs not uploaded after %v: %+v", left, timeout, s.RemoteStats())
		}
		time.Sleep(100 * time.Millisecond)
	}
}

func TestRemoteCorruptObject(t *testing.T) {
	e := newRemoteEnv(t)
	ctx := context.Background()
	s, d := e.open(t, filepath.Join(e.dir, "c1"), Options{RemoteCacheBytes: 1})
	blobs := randomBlobs(6, 2<<20)
	ds := writeBlobs(t, s, d, blobs...)
	if err := s.UploadAll(ctx); err != nil {
		t.Fatal(err)
	}
	ids := packIDs(t, d)
	s.Close()
	d.Close()
	// Flip a byte in the middle of the pack object (inside frame data).
	name := PackObject(ids[0])
	rc, err := e.bucket.Get(ctx, name)
	if err != nil {
		t.Fatal(err)
	}
	obj, _ := io.ReadAll(rc)
	rc.Close()
	obj[len(obj)/2] ^= 0x40
	if err := e.bucket.Put(ctx, name, bytes.NewReader(obj), int64(len(obj))); err != nil {
		t.Fatal(err)
	}
	s2, _ := e.open(t, filepath.Join(e.dir, "c2"), Options{})
	if _, err := readBlob(s2, ds[0]); !errors.Is(err, ErrCorrupt) {
		t.Fatalf("read of a flipped object: %v, want ErrCorrupt", err)
	}
	damage, err := s2.Verify(ctx, nil)
	if err != nil || len(damage) == 0 {
		t.Fatalf("verify of a flipped object: %v %v", damage, err)
	}
}

// TestRemoteCompactKeepsObjects: compaction never rewrites an uploaded pack
// (a mostly dead one keeps its row and object), and drops one no chunk
// points into from the index only: it is recorded dead, and its object
// stays in the bucket.
func TestRemoteCompactKeepsObjects(t *testing.T) {
	e := newRemoteEnv(t)
	ctx := context.Background()
	s, d := e.open(t, filepath.Join(e.dir, "c"), Options{})
	// Below MinChunk: one chunk each, whose digest is the blob's.
	a := randomBlobs(11, 10<<10)
	da := writeBlobs(t, s, d, a...)
	if err := s.UploadAll(ctx); err != nil {
		t.Fatal(err)
	}
	p1 := packIDs(t, d)
	bc := randomBlobs(12, 10<<10, 12<<10)
	dbc := writeBlobs(t, s, d, bc...)
	if err := s.UploadAll(ctx); err != nil {
		t.Fatal(err)
	}
	var p2 int64
	for _, id := range packIDs(t, d) {
		if id != p1[0] {
			p2 = id
		}
	}
	// A collection's sweep: blob a, and c, go.
	err := d.Write(ctx, func(tx *db.Tx) error {
		for _, dg := range []digest.Digest{da[0], dbc[1]} {
			if err := tx.DeleteBlob(ctx, dg); err != nil {
				return err
			}
			if err := tx.DeleteChunk(ctx, dg); err != nil {
				return err
			}
		}
		_, err := tx.DeleteEmptyFrames(ctx)
		return err
	})
	if err != nil {
		t.Fatal(err)
	}
	st, err := s.Compact(ctx, 0.01)
	if err != nil {
		t.Fatal(err)
	}
	if _, _, err := d.PackSealedState(ctx, p1[0]); !errors.Is(err, db.ErrNotFound) {
		t.Fatalf("emptied uploaded pack %d still indexed (%v); compaction %+v", p1[0], err, st)
	}
	dead, err := d.DeadPacks(ctx)
	if err != nil || len(dead) != 1 || dead[0] != p1[0] {
		t.Fatalf("dead packs %v (%v), want [%d]", dead, err, p1[0])
	}
	for _, id := range []int64{p1[0], p2} {
		rc, err := e.bucket.Get(ctx, PackObject(id))
		if err != nil {
			t.Fatalf("pack %d's object: %v", id, err)
		}
		rc.Close()
	}
	if sealed, uploaded, err := d.PackSealedState(ctx, p2); err != nil || !sealed || !uploaded {
		t.Fatalf("half-dead uploaded pack %d: sealed %v uploaded %v (%v): rewritten?", p2, sealed, uploaded, err)
	}
	if st.PacksWritten != 0 {
		t.Fatalf("compaction wrote %d packs: an uploaded pack was rewritten", st.PacksWritten)
	}
	checkBlobs(t, s, dbc[:1], bc[:1])
	if damage, err := s.Verify(ctx, nil); err != nil || len(damage) != 0 {
		t.Fatalf("verify after compaction: %v %v", damage, err)
	}
}

// TestRemoteSealOnCommit: under the bucket promise, a commit seals the packs it wrote to,
// WaitUploaded returns once they are in the bucket (the uploader itself would wait an
// hour), a later writer never appends to them, and with the server down the wait fails
// naming the upload error and writes see UploadFailing.
func TestRemoteSealOnCommit(t *testing.T) {
	e := newRemoteEnv(t)
	ctx := context.Background()
	s, d := e.open(t, filepath.Join(e.dir, "c"), Options{
		PackSize: 1 << 20, Upload: true, UploadWithin: time.Hour, UploadRetryMax: 20 * time.Second, SealOnCommit: true,
	})
	mark := func() int64 {
		id, err := d.MaxFrameID(ctx)
		if err != nil {
			t.Fatal(err)
		}
		return id
	}
	var all [][]byte
	var ds []digest.Digest
	for i := range 3 {
		b := randomBlobs(int64(20+i), 300<<10)
		ds = append(ds, writeBlobs(t, s, d, b...)...)
		all = append(all, b...)
		wctx, cancel := context.WithTimeout(ctx, 30*time.Second)
		if err := s.WaitUploaded(wctx, mark()); err != nil {
			t.Fatalf("write %d: %v", i, err)
		}
		cancel()
		if first, ok, err := d.FirstFrameNotUploaded(ctx); err != nil || ok {
			t.Fatalf("write %d: a frame (%d) is in a pack not uploaded after WaitUploaded (%v)", i, first, err)
		}
	}
	ids := packIDs(t, d)
	if len(ids) != 3 {
		t.Fatalf("3 writes under SealOnCommit made packs %v, want one each (a sealed pack reused?)", ids)
	}
	for _, id := range ids {
		if _, err := e.bucket.Head(ctx, PackObject(id)); err != nil {
			t.Fatalf("pack %d not in the bucket: %v", id, err)
		}
	}
	checkBlobs(t, s, ds, all)

	e.srv.Stop()
	b := randomBlobs(30, 200<<10)
	writeBlobs(t, s, d, b...)
	wctx, cancel := context.WithTimeout(ctx, 3*time.Second)
	defer cancel()
	err := s.WaitUploaded(wctx, mark())
	if err == nil || !errors.Is(err, context.DeadlineExceeded) || !strings.Contains(err.Error(), "last upload error") {
		t.Fatalf("WaitUploaded with the server down: %v", err)
	}
	if s.UploadFailing() == nil {
		t.Fatal("UploadFailing is nil after failed uploads")
	}
	e.srv.Start(t)
	wctx2, cancel2 := context.WithTimeout(ctx, 60*time.Second)
	defer cancel2()
	if err := s.WaitUploaded(wctx2, mark()); err != nil {
		t.Fatalf("after the server came back: %v", err)
	}
	if err := s.UploadFailing(); err != nil {
		t.Fatalf("UploadFailing after a successful upload: %v", err)
	}
}

// TestRemoteRepackUploadsFirst: on a store whose packs are in a bucket, a repack's packs
// are in the bucket (sealed, recorded uploaded) by the time its chunks point into them,
// so no frame any chunk uses is ever in a pack the bucket lacks; the data reads back from
// the bucket alone; and a compaction leaves a pack not uploaded yet as it is.
func TestRemoteRepackUploadsFirst(t *testing.T) {
	e := newRemoteEnv(t)
	ctx := context.Background()
	s, d := e.open(t, filepath.Join(e.dir, "c"), Options{RemoteCacheBytes: 1})
	blobs := randomBlobs(40, 300<<10, 200<<10, 500<<10, 100<<10)
	ds := writeBlobs(t, s, d, blobs...)
	if err := s.UploadAll(ctx); err != nil {
		t.Fatal(err)
	}
	before := packIDs(t, d)
	var steps []string
	rp, err := s.NewRepacker(ctx, RepackOptions{RoundBytes: 400 << 10, FrameSize: MaxChunk, Step: func(name string) {
		if name == "packs uploaded" || name == "round committed" {
			steps = append(steps, name)
			// Between the upload and the record, and after it: no chunk may
			// point into a pack not uploaded.
			if first, ok, err := d.FirstFrameNotUploaded(ctx); err != nil || ok {
				t.Errorf("after %q: frame %d is in a pack not uploaded (%v)", name, first, err)
			}
		}
	}})
	if err != nil {
		t.Fatal(err)
	}
	if err := rp.Add(ds); err != nil {
		t.Fatal(err)
	}
	st, err := rp.Finish()
	if err != nil {
		t.Fatal(err)
	}
	if st.Rounds < 2 || st.ChunksMoved == 0 {
		t.Fatalf("repack %+v: want several rounds that moved chunks", st)
	}
	if len(steps) < 2*st.Rounds {
		t.Fatalf("steps %v for %d rounds", steps, st.Rounds)
	}
	var repacked []int64
	for _, id := range packIDs(t, d) {
		if !slices.Contains(before, id) {
			repacked = append(repacked, id)
		}
	}
	if len(repacked) < st.Rounds {
		t.Fatalf("repack wrote packs %v in %d rounds: one per round at least", repacked, st.Rounds)
	}
	for _, id := range repacked {
		if sealed, uploaded, err := d.PackSealedState(ctx, id); err != nil || !sealed || !uploaded {
			t.Fatalf("repacked pack %d: sealed %v uploaded %v (%v)", id, sealed, uploaded, err)
		}
		if _, err := e.bucket.Head(ctx, PackObject(id)); err != nil {
			t.Fatalf("repacked pack %d not in the bucket: %v", id, err)
		}
	}
	// The old packs are empty now: compaction drops them (dead, their objects kept).
	if _, err := s.Compact(ctx, 0.01); err != nil {
		t.Fatal(err)
	}
	for _, id := range before {
		if _, _, err := d.PackSealedState(ctx, id); !errors.Is(err, db.ErrNotFound) {
			t.Fatalf("emptied pack %d still indexed (%v)", id, err)
		}
	}
	// A new process with an empty cache and no local pack files reads it all from the bucket.
	s.Close()
	d.Close()
	if err := os.RemoveAll(filepath.Join(e.dir, "packs")); err != nil {
		t.Fatal(err)
	}
	s2, d2 := e.open(t, filepath.Join(e.dir, "c2"), Options{})
	checkBlobs(t, s2, ds, blobs)

	// A pack not uploaded yet, half dead: compaction leaves it whole.
	more := randomBlobs(41, 200<<10, 200<<10)
	dm := writeBlobs(t, s2, d2, more...)
	var fresh int64
	for _, id := range packIDs(t, d2) {
		if _, uploaded, err := d2.PackSealedState(ctx, id); err == nil && !uploaded {
			fresh = id
		}
	}
	if fresh == 0 {
		t.Fatal("no pack left to upload after a write")
	}
	err = d2.Write(ctx, func(tx *db.Tx) error {
		if err := tx.DeleteBlob(ctx, dm[0]); err != nil {
			return err
		}
		if err := tx.DeleteChunk(ctx, dm[0]); err != nil {
			return err
		}
		_, err := tx.DeleteEmptyFrames(ctx)
		return err
	})
	if err != nil {
		t.Fatal(err)
	}
	cst, err := s2.Compact(ctx, 0.01)
	if err != nil {
		t.Fatal(err)
	}
	if cst.PacksWritten != 0 {
		t.Fatalf("compaction wrote %d packs on a bucket store: %+v", cst.PacksWritten, cst)
	}
	if _, _, err := d2.PackSealedState(ctx, fresh); err != nil {
		t.Fatalf("pack %d not uploaded yet was compacted away: %v", fresh, err)
	}
	checkBlobs(t, s2, dm[1:], more[1:])
}
