package binarycache

import (
	"bufio"
	"bytes"
	"context"
	"crypto/sha256"
	"fmt"
	"hash"
	"io"
	"os"
	"path/filepath"
	"runtime"
	"slices"
	"strings"
	"sync"
	"sync/atomic"

	"github.com/klauspost/compress/zstd"
	"github.com/ulikunitz/xz"
	"golang.org/x/sys/unix"

	"github.com/casnix/casnix/store"
)

// Exporter writes closures into a binary cache directory.
type Exporter struct {
	Store       *store.Store
	Dir         string
	StoreDir    string
	Compression string            // zstd, xz or none
	Level       zstd.EncoderLevel // for zstd
	Key         *store.SecretKey  // signs every exported path when set
	Jobs        int
	Progress    func(done, total int, narBytes int64)

	encoders sync.Pool
}

// ExportResult sums up an export.
type ExportResult struct {
	Exported, Present   int
	NarBytes, FileBytes int64
	Realisations        int // realisations/<id>.doi files written
}

// Export writes the closures of names (all valid) that the cache does not
// hold yet. References are written before their referrers, and a narinfo
// only after its NAR file is durable, so a reader never sees a narinfo
// pointing at nothing.
func (e *Exporter) Export(ctx context.Context, names []string) (*ExportResult, error) {
	if _, ok := extensions[e.Compression]; !ok || e.Compression == "bzip2" {
		return nil, fmt.Errorf("compression %q: use zstd, xz or none", e.Compression)
	}
	if err := mkdirDurable(e.Dir); err != nil {
		return nil, fmt.Errorf("create cache: %w", err)
	}
	if err := e.writeCacheInfo(); err != nil {
		return nil, err
	}
	closure, err := e.Store.Closure(ctx, names)
	if err != nil {
		return nil, err
	}
	res := &ExportResult{}
	var todo []string
	for _, n := range closure {
		if e.present(n) {
			res.Present++
		} else {
			todo = append(todo, n)
		}
	}
	infos := map[string]*store.PathInfo{}
	for _, n := range todo {
		if infos[n], err = e.Store.Info(ctx, n); err != nil {
			return res, err
		}
	}
	var done, narBytes, fileBytes atomic.Int64
	jobs := e.Jobs
	if jobs <= 0 {
		jobs = runtime.GOMAXPROCS(0)
	}
	cm := newCommitter(e.Dir)
	_, err = RunDAG(ctx, todo, func(n string) []string { return infos[n].References }, jobs, false,
		func(ctx context.Context, n string) error {
			fsize, narFile, ni, err := e.exportOne(ctx, infos[n])
			if err != nil {
				return err
			}
			// Handed over before this returns, so a reference's narinfo is
			// always queued (and written) before its referrers'.
			cm.add(narFile, filepath.Join(e.Dir, store.HashPart(n)+".narinfo"), ni)
			narBytes.Add(infos[n].NarSize)
			fileBytes.Add(fsize)
			d := done.Add(1)
			if e.Progress != nil {
				e.Progress(int(d), len(todo), narBytes.Load())
			}
			return nil
		})
	if cerr := cm.close(); err == nil {
		err = cerr
	}
	res.Exported, res.NarBytes, res.FileBytes = int(done.Load()), narBytes.Load(), fileBytes.Load()
	if err == nil {
		res.Realisations, err = e.exportRealisations(ctx, closure)
	}
	return res, err
}

// exportRealisations writes realisations/<id>.doi for every realisation
// the store has whose output path is in closure (all of which the cache
// holds by now, durably: a realisation never points at nothing), signed
// by Key too when set, as Nix's `nix copy --to` of a CA derivation's
// output writes its realisation. One already there with the same content
// is left alone. It returns how many it wrote.
func (e *Exporter) exportRealisations(ctx context.Context, closure []string) (int, error) {
	dir := filepath.Join(e.Dir, "realisations")
	n := 0
	for _, name := range closure {
		reals, err := e.Store.RealisationsOf(ctx, name)
		if err != nil {
			return n, err
		}
		for _, r := range reals {
			if e.Key != nil {
				if err := e.Key.SignRealisation(r); err != nil {
					return n, err
				}
				r.Signatures = slices.Compact(slices.Sorted(slices.Values(r.Signatures)))
			}
			body := []byte(r.JSON())
			p := filepath.Join(dir, r.ID+".doi")
			if old, err := os.ReadFile(p); err == nil && bytes.Equal(old, body) {
				continue
			}
			if n == 0 {
				if err := mkdirDurable(dir); err != nil {
					return n, fmt.Errorf("create %s: %w", dir, err)
				}
			}
			if err := writeFileRename(p, body, true); err != nil {
				return n, fmt.Errorf("write realisation %s: %w", r.ID, err)
			}
			n++
		}
	}
	if n > 0 {
		if err := syncFile(dir); err != nil {
			return n, err
		}
	}
	return n, nil
}

// present reports whether the cache holds n: its narinfo parses and the NAR
// file it names has the size it says (a crash can leave neither half-made,
// but this costs little and makes a re-run repair anything odd).
func (e *Exporter) present(n string) bool {
	f, err := os.Open(filepath.Join(e.Dir, store.HashPart(n)+".narinfo"))
	if err != nil {
		return false
	}
	defer f.Close()
	in, err := ParseNarinfo(f, e.StoreDir)
	if err != nil || in.Name != n {
		return false
	}
	st, err := os.Stat(filepath.Join(e.Dir, filepath.FromSlash(in.URL)))
	return err == nil && st.Mode().IsRegular() && (in.FileSize == 0 || st.Size() == in.FileSize)
}

// committer writes narinfos in batches, each only after its NAR file is
// durable: the batch's NAR files are fdatasynced in parallel (their
// writeback was started when they were written, and concurrent syncs share
// journal commits), then the nar directory, then the narinfos are renamed
// into place. The narinfos themselves are synced at the end; one torn by a
// crash before that fails to parse and is exported again.
type committer struct {
	dir      string
	ch       chan commitItem
	done     chan error
	batch    int
	narinfos []string
}

// commitItem is one exported path: its NAR file, still open on the
// descriptor that wrote it (the committer syncs through it, then closes
// it), and the narinfo to write once that sync succeeded.
type commitItem struct {
	nar     *os.File
	narinfo string
	data    []byte
}

func newCommitter(dir string) *committer {
	c := &committer{dir: dir, ch: make(chan commitItem, 256), done: make(chan error, 1), batch: 64}
	go c.run()
	return c
}

func (c *committer) add(nar *os.File, narinfo string, data []byte) {
	c.ch <- commitItem{nar: nar, narinfo: narinfo, data: data}
}

// fdatasync is unix.Fdatasync; tests wrap it to see which descriptors are
// synced.
var fdatasync = unix.Fdatasync

// syncFiles fsyncs (fdatasync for data only) the files in parallel.
func syncFiles(paths []string) error {
	var (
		wg    sync.WaitGroup
		mu    sync.Mutex
		first error
		sem   = make(chan struct{}, 16)
	)
	for _, p := range paths {
		wg.Go(func() {
			sem <- struct{}{}
			defer func() { <-sem }()
			err := syncFile(p)
			if err != nil {
				mu.Lock()
				if first == nil {
					first = err
				}
				mu.Unlock()
			}
		})
	}
	wg.Wait()
	return first
}

// syncNARs fdatasyncs NAR files in parallel through the descriptors that
// wrote them: a writeback error is reported on the descriptors open when it
// happened, so one opened afterwards could report success for lost data.
func syncNARs(files []*os.File) error {
	var (
		wg    sync.WaitGroup
		mu    sync.Mutex
		first error
		sem   = make(chan struct{}, 16)
	)
	for _, f := range files {
		wg.Go(func() {
			sem <- struct{}{}
			defer func() { <-sem }()
			if err := fdatasync(int(f.Fd())); err != nil {
				mu.Lock()
				if first == nil {
					first = fmt.Errorf("fdatasync %s: %w", f.Name(), err)
				}
				mu.Unlock()
			}
		})
	}
	wg.Wait()
	return first
}

func syncFile(p string) error {
	f, err := os.Open(p)
	if err != nil {
		return err
	}
	defer f.Close()
	if err := f.Sync(); err != nil {
		return fmt.Errorf("fsync %s: %w", p, err)
	}
	return nil
}

func (c *committer) run() {
	var firstErr error
	var pending []commitItem
	flush := func() {
		defer func() {
			for _, it := range pending {
				it.nar.Close()
			}
			pending = pending[:0]
		}()
		if len(pending) == 0 || firstErr != nil {
			return
		}
		nars := make([]*os.File, len(pending))
		for i, it := range pending {
			nars[i] = it.nar
		}
		err := syncNARs(nars)
		if err != nil {
			firstErr = err
			return
		}
		if err := syncFile(filepath.Join(c.dir, "nar")); err != nil {
			firstErr = err
			return
		}
		for _, it := range pending {
			if err := writeFileRename(it.narinfo, it.data, false); err != nil {
				firstErr = fmt.Errorf("write %s: %w", it.narinfo, err)
				return
			}
			c.narinfos = append(c.narinfos, it.narinfo)
		}
	}
	for {
		item, ok := <-c.ch
		if !ok {
			break
		}
		pending = append(pending, item)
		// Take what else is queued; flush when the queue runs dry or the
		// batch is full, so a slow export still publishes as it goes.
	drain:
		for len(pending) < c.batch {
			select {
			case item, ok := <-c.ch:
				if !ok {
					break drain
				}
				pending = append(pending, item)
			default:
				break drain
			}
		}
		if len(pending) >= c.batch || len(c.ch) == 0 {
			flush()
		}
	}
	flush()
	// The narinfos durable too before the command reports success.
	if firstErr == nil {
		firstErr = syncFiles(c.narinfos)
	}
	if firstErr == nil {
		firstErr = syncFile(c.dir)
	}
	c.done <- firstErr
}

func (c *committer) close() error {
	close(c.ch)
	return <-c.done
}

// mkdirDurable creates dir/nar and whatever parents it lacks, and fsyncs the parent of
// every directory it created and dir's parent every time: the committer syncs only the
// entries inside dir, and a name not synced into its parent may vanish in a power cut with
// everything under it (an earlier run that created dir may have stopped before syncing it,
// so that dir existing proves nothing).
func mkdirDurable(dir string) error {
	dir = filepath.Clean(dir)
	parents := []string{filepath.Dir(dir)}
	for d := dir; ; d = filepath.Dir(d) {
		if _, err := os.Stat(d); err == nil || filepath.Dir(d) == d {
			break
		}
		if up := filepath.Dir(d); up != parents[0] {
			parents = append(parents, up)
		}
	}
	if err := os.MkdirAll(filepath.Join(dir, "nar"), 0o755); err != nil {
		return err
	}
	return syncFiles(parents)
}

func (e *Exporter) writeCacheInfo() error {
	p := filepath.Join(e.Dir, "nix-cache-info")
	if data, err := os.ReadFile(p); err == nil {
		for line := range strings.SplitSeq(string(data), "\n") {
			if v, ok := strings.CutPrefix(line, "StoreDir:"); ok && strings.TrimSpace(v) != e.StoreDir {
				return fmt.Errorf("%s holds paths of the store directory %s, not %s", e.Dir, strings.TrimSpace(v), e.StoreDir)
			}
		}
		return nil
	}
	return writeFileRename(p, []byte(CacheInfo(e.StoreDir, 40)), true)
}

// CacheInfo is the nix-cache-info of a cache of storeDir.
func CacheInfo(storeDir string, priority int) string {
	return fmt.Sprintf("StoreDir: %s\nWantMassQuery: 1\nPriority: %d\n", storeDir, priority)
}

// counter counts and hashes what is written through it.
type counter struct {
	w io.Writer
	h hash.Hash
	n int64
}

func (c *counter) Write(p []byte) (int, error) {
	n, err := c.w.Write(p)
	c.h.Write(p[:n])
	c.n += int64(n)
	return n, err
}

type hashOnly struct {
	h hash.Hash
	n int64
}

func (c *hashOnly) Write(p []byte) (int, error) {
	c.h.Write(p)
	c.n += int64(len(p))
	return len(p), nil
}

// renderTo writes the NAR of name through comp, closed at the end, and to
// nar.
func renderTo(ctx context.Context, st *store.Store, name string, comp io.WriteCloser, nar io.Writer) error {
	if _, err := st.NarRender(ctx, name, io.MultiWriter(comp, nar)); err != nil {
		return err
	}
	if err := comp.Close(); err != nil {
		return fmt.Errorf("compress: %w", err)
	}
	return nil
}

// exportOne writes pi's NAR file (not yet synced: the committer does that
// for many at once) and returns its size, the file still open (the
// committer syncs through this descriptor and closes it) and its narinfo.
func (e *Exporter) exportOne(ctx context.Context, pi *store.PathInfo) (_ int64, _ *os.File, _ []byte, err error) {
	full := e.StoreDir + "/" + pi.Name
	narDir := filepath.Join(e.Dir, "nar")
	tmp, err := os.CreateTemp(narDir, ".tmp-*")
	if err != nil {
		return 0, nil, nil, fmt.Errorf("export %s: %w", full, err)
	}
	defer func() {
		if err != nil {
			tmp.Close()
			os.Remove(tmp.Name()) // gone already after the rename
		}
	}()
	if err := tmp.Chmod(0o644); err != nil {
		return 0, nil, nil, fmt.Errorf("export %s: %w", full, err)
	}
	bw := bufio.NewWriterSize(tmp, 256<<10)
	file := &counter{w: bw, h: sha256.New()}
	// The NAR is hashed on its way out: what the cache gets must be what
	// the path-info (and its signatures) vouch for.
	nar := &hashOnly{h: sha256.New()}
	switch e.Compression {
	case "zstd":
		enc, _ := e.encoders.Get().(*zstd.Encoder)
		if enc == nil {
			level := e.Level
			if level == 0 {
				level = zstd.SpeedDefault
			}
			if enc, err = zstd.NewWriter(nil, zstd.WithEncoderLevel(level), zstd.WithEncoderConcurrency(1)); err != nil {
				return 0, nil, nil, err
			}
		}
		defer e.encoders.Put(enc)
		// Stored frames go into the file as they are (zstdSplicer), at the
		// level they were stored at: ingest's level 1, or repack's best
		// (a frame ingest stored uncompressed is compressed at level).
		if _, err := writeNARZstd(ctx, e.Store, pi.Name, enc, file, nar); err != nil {
			return 0, nil, nil, fmt.Errorf("export %s: %w", full, err)
		}
	case "xz":
		comp, err := xz.NewWriter(file)
		if err != nil {
			return 0, nil, nil, fmt.Errorf("export %s: xz: %w", full, err)
		}
		if err := renderTo(ctx, e.Store, pi.Name, comp, nar); err != nil {
			return 0, nil, nil, fmt.Errorf("export %s: %w", full, err)
		}
	default:
		if err := renderTo(ctx, e.Store, pi.Name, nopCloser{file}, nar); err != nil {
			return 0, nil, nil, fmt.Errorf("export %s: %w", full, err)
		}
	}
	if nar.n != pi.NarSize || string(nar.h.Sum(nil)) != string(pi.NarHash[:]) {
		return 0, nil, nil, fmt.Errorf("export %s: %w: the rendered NAR does not match the stored NAR hash", full, store.ErrHashMismatch)
	}
	if err := bw.Flush(); err != nil {
		return 0, nil, nil, fmt.Errorf("export %s: %w", full, err)
	}
	// Start writeback now, so the committer's fdatasync finds little to do.
	_ = unix.SyncFileRange(int(tmp.Fd()), 0, 0, unix.SYNC_FILE_RANGE_WRITE)
	in := InfoFrom(pi)
	in.Compression = e.Compression
	in.FileHash = file.h.Sum(nil)
	in.FileSize = file.n
	in.URL = "nar/" + store.NixBase32(in.FileHash) + ".nar" + extensions[e.Compression]
	narFile, err := placeNAR(tmp, filepath.Join(e.Dir, in.URL), in.FileHash)
	if err != nil {
		return 0, nil, nil, fmt.Errorf("export %s: %w", full, err)
	}
	if e.Key != nil {
		in.Sigs = addSig(in.Sigs, e.Key, e.StoreDir, pi)
		if in.Sigs == nil {
			narFile.Close()
			return 0, nil, nil, fmt.Errorf("export %s: signing failed", full)
		}
	}
	return file.n, narFile, in.Format(e.StoreDir), nil
}

// placeNAR moves the written temp file to target, its name by content, and returns the
// open file the committer syncs before a narinfo may point at target. A file already
// there with the bytes its name promises (another path with the same NAR, exported
// earlier) is kept and the temp file dropped: renaming over it would swap a file an
// earlier export made durable and acknowledged for one whose data is not synced yet, and
// a power cut in between would leave that export's narinfo pointing at lost bytes. A
// file there with other bytes (a crash's leftover) is replaced.
func placeNAR(tmp *os.File, target string, fileHash []byte) (*os.File, error) {
	if old, err := os.Open(target); err == nil {
		h := sha256.New()
		_, err := io.Copy(h, old)
		if err == nil && string(h.Sum(nil)) == string(fileHash) {
			tmp.Close()
			os.Remove(tmp.Name())
			return old, nil
		}
		old.Close()
	}
	if err := os.Rename(tmp.Name(), target); err != nil {
		return nil, err
	}
	return tmp, nil
}

// addSig returns sigs with the key's signature of pi (replacing an older
// one by the same key name), or nil if signing fails.
func addSig(sigs []string, k *store.SecretKey, storeDir string, pi *store.PathInfo) []string {
	sig, err := k.Sign(storeDir, pi)
	if err != nil {
		return nil
	}
	out := slices.DeleteFunc(slices.Clone(sigs), func(s string) bool { return strings.HasPrefix(s, k.Name()+":") })
	return append(out, sig)
}

type nopCloser struct{ io.Writer }

func (nopCloser) Close() error { return nil }

// writeFileRename writes a small file via a temporary file and a rename,
// so readers see all of it or nothing. With sync the file's data is
// fsynced before the rename; without it durability is the caller's.
func writeFileRename(path string, data []byte, sync bool) error {
	tmp, err := os.CreateTemp(filepath.Dir(path), ".tmp-*")
	if err != nil {
		return err
	}
	defer os.Remove(tmp.Name())
	if _, err := tmp.Write(data); err != nil {
		tmp.Close()
		return err
	}
	if err := tmp.Chmod(0o644); err != nil {
		tmp.Close()
		return err
	}
	if sync {
		if err := tmp.Sync(); err != nil {
			tmp.Close()
			return err
		}
	}
	if err := tmp.Close(); err != nil {
		return err
	}
	return os.Rename(tmp.Name(), path)
}
