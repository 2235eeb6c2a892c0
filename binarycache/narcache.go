package binarycache

import (
	"os"
	"path/filepath"
	"slices"
	"strings"
	"sync"
	"sync/atomic"
	"time"
)

// narCache keeps compressed NARs the server rendered in a directory, so
// that the next request for one is a plain file sent with sendfile instead
// of a render and a compression. Files are named by NAR hash (a path's NAR
// never changes) and evicted oldest-used first beyond max bytes.
type narCache struct {
	dir      string
	max      int64
	size     atomic.Int64
	mu       sync.Mutex
	inflight map[string]bool
}

func newNarCache(dir string, max int64) (*narCache, error) {
	if err := os.MkdirAll(dir, 0o755); err != nil {
		return nil, err
	}
	c := &narCache{dir: dir, max: max, inflight: map[string]bool{}}
	ents, err := os.ReadDir(dir)
	if err != nil {
		return nil, err
	}
	for _, e := range ents {
		if strings.HasPrefix(e.Name(), ".tmp-") {
			os.Remove(filepath.Join(dir, e.Name())) // left by a crash
		} else if fi, err := e.Info(); err == nil {
			c.size.Add(fi.Size())
		}
	}
	return c, nil
}

// open returns the cached file for key, or nil.
func (c *narCache) open(key string) *os.File {
	p := filepath.Join(c.dir, key)
	f, err := os.Open(p)
	if err != nil {
		return nil
	}
	// Recency for eviction, at most hourly: a metadata write per hit would
	// cost more than the hit.
	if fi, err := f.Stat(); err == nil && time.Since(fi.ModTime()) > time.Hour {
		now := time.Now()
		os.Chtimes(p, now, now)
	}
	return f
}

// fill returns a writer that becomes the cached file for key when commit is
// called, or nil when another request is filling it already.
func (c *narCache) fill(key string) *cacheFill {
	c.mu.Lock()
	if c.inflight[key] {
		c.mu.Unlock()
		return nil
	}
	c.inflight[key] = true
	c.mu.Unlock()
	f, err := os.CreateTemp(c.dir, ".tmp-*")
	if err != nil {
		c.done(key)
		return nil
	}
	return &cacheFill{c: c, key: key, f: f}
}

func (c *narCache) done(key string) {
	c.mu.Lock()
	delete(c.inflight, key)
	c.mu.Unlock()
}

// cacheFill is a cache file being written alongside a response.
type cacheFill struct {
	c   *narCache
	key string
	f   *os.File
	n   int64
	err error
	// adopted: a spool writes the file itself (adopt), not Write.
	adopted bool
}

// adopt opens the file being filled for a spool to write the download
// into (fileCopy); Commit then keeps what it wrote.
func (w *cacheFill) adopt() (*os.File, error) {
	f, err := os.OpenFile(w.f.Name(), os.O_RDWR, 0)
	if err != nil {
		return nil, err
	}
	w.adopted = true
	return f, nil
}

func (w *cacheFill) Write(p []byte) (int, error) {
	if w.err == nil {
		var n int
		n, w.err = w.f.Write(p)
		w.n += int64(n)
	}
	return len(p), nil // a failing cache never fails the response
}

// Commit publishes the file (synced first: a torn file would be served as a
// corrupt NAR after a crash) and evicts beyond the size bound.
func (w *cacheFill) Commit() {
	defer w.c.done(w.key)
	if w.err == nil {
		// Syncs the file's data whichever descriptor wrote it.
		w.err = w.f.Sync()
	}
	if w.err == nil && w.adopted {
		var fi os.FileInfo
		if fi, w.err = w.f.Stat(); w.err == nil {
			w.n = fi.Size()
		}
	}
	if err := w.f.Close(); w.err == nil {
		w.err = err
	}
	if w.err == nil {
		w.err = os.Rename(w.f.Name(), filepath.Join(w.c.dir, w.key))
	}
	if w.err != nil {
		os.Remove(w.f.Name())
		return
	}
	if w.c.size.Add(w.n) > w.c.max {
		w.c.evict()
	}
}

// Abort drops the file.
func (w *cacheFill) Abort() {
	defer w.c.done(w.key)
	w.f.Close()
	os.Remove(w.f.Name())
}

// evict removes the least recently used files until the cache is at 90% of
// its bound, recounting its size from the directory.
func (c *narCache) evict() {
	c.mu.Lock()
	defer c.mu.Unlock()
	ents, err := os.ReadDir(c.dir)
	if err != nil {
		return
	}
	type file struct {
		name string
		size int64
		used time.Time
	}
	var files []file
	var total int64
	for _, e := range ents {
		if strings.HasPrefix(e.Name(), ".tmp-") {
			continue
		}
		if fi, err := e.Info(); err == nil {
			files = append(files, file{e.Name(), fi.Size(), fi.ModTime()})
			total += fi.Size()
		}
	}
	slices.SortFunc(files, func(a, b file) int { return a.used.Compare(b.used) })
	for _, f := range files {
		if total <= c.max*9/10 {
			break
		}
		if os.Remove(filepath.Join(c.dir, f.name)) == nil {
			total -= f.size
		}
	}
	c.size.Store(total)
}

var _ fileCopy = (*cacheFill)(nil)
