package binarycache

import (
	"bufio"
	"bytes"
	"context"
	"crypto/sha256"
	"errors"
	"fmt"
	"hash"
	"io"
	"slices"
	"strings"
	"sync"
	"sync/atomic"
	"time"

	"github.com/casnix/casnix/store"
)

// Importer copies closures from a binary cache into the store.
type Importer struct {
	Store    *store.Store
	Src      Source
	StoreDir string
	// Keys are the trusted public keys: an input-addressed path needs a
	// valid signature by one of them (Nix's require-sigs, on by default),
	// so with none, only content-addressed paths whose address makes their
	// store path are taken.
	Keys store.PublicKeys
	// NoCheckSigs takes every path without looking at its signatures, for
	// caches the user trusts as a whole (Nix's --no-check-sigs).
	NoCheckSigs bool
	Jobs        int  // NARs fetched and imported at once
	Retries     int  // extra attempts after a transient failure
	KeepGoing   bool // import what can be imported when some paths fail
	// Progress, when set, is called as paths finish.
	Progress func(done, total int, narBytes int64)
}

// ImportResult sums up an import.
type ImportResult struct {
	Imported, Present, Failed int
	NarBytes                  int64
	Failures                  []error // one per failed path, in store path order
}

// Import imports the closures of the given store paths (basenames) or,
// with hashes, of the paths whose narinfo hash parts they are.
func (im *Importer) Import(ctx context.Context, names, hashes []string) (*ImportResult, error) {
	if err := readCacheInfo(ctx, im.Src, im.StoreDir); err != nil {
		return nil, err
	}
	res := &ImportResult{}
	infos, failed, err := im.resolve(ctx, names, hashes, res)
	if err != nil {
		return res, err
	}
	var todo []string
	for n := range infos {
		todo = append(todo, n)
	}
	slices.Sort(todo)
	var (
		done     atomic.Int64
		narBytes atomic.Int64
		total    = len(todo)
	)
	results, runErr := RunDAG(ctx, todo, func(n string) []string { return infos[n].References }, im.Jobs, im.KeepGoing,
		func(ctx context.Context, n string) error {
			err := im.fetchOne(ctx, infos[n])
			if err != nil && !strings.Contains(err.Error(), n) {
				err = fmt.Errorf("%s/%s: %w", im.StoreDir, n, err)
			}
			if err == nil {
				narBytes.Add(infos[n].NarSize)
			}
			if im.Progress != nil {
				im.Progress(int(done.Add(1)), total, narBytes.Load())
			}
			return err
		})
	res.NarBytes = narBytes.Load()
	named := map[string]bool{} // errors that name their path already
	for _, n := range todo {
		if err, ok := results[n]; ok && err != nil {
			failed[n] = err
			named[n] = !errors.Is(err, ErrDependency)
		} else if ok {
			res.Imported++
		}
	}
	res.Failed = len(failed)
	var fnames []string
	for n := range failed {
		fnames = append(fnames, n)
	}
	slices.Sort(fnames)
	for _, n := range fnames {
		if named[n] {
			res.Failures = append(res.Failures, failed[n])
		} else {
			res.Failures = append(res.Failures, fmt.Errorf("%s/%s: %w", im.StoreDir, n, failed[n]))
		}
	}
	if runErr != nil && !im.KeepGoing {
		return res, fmt.Errorf("%s: %w", im.Src, runErr)
	}
	return res, runErr
}

// target is one path to look up: by name, or by hash part alone (--all).
type target struct{ name, hash string }

// resolve fetches the narinfos of the closures that are not valid yet,
// breadth first, a level's lookups in parallel. Paths whose narinfo is
// missing or bad are returned in failed (with KeepGoing; without, the
// first such error is returned) along with every path that refers to them.
func (im *Importer) resolve(ctx context.Context, names, hashes []string, res *ImportResult) (map[string]*Info, map[string]error, error) {
	infos := map[string]*Info{}
	failed := map[string]error{}
	seen := map[string]bool{} // hash parts
	var level []target
	add := func(t target) {
		if t.hash == "" {
			t.hash = store.HashPart(t.name)
		}
		if !seen[t.hash] {
			seen[t.hash] = true
			level = append(level, t)
		}
	}
	for _, n := range names {
		add(target{name: n})
	}
	for _, h := range hashes {
		add(target{hash: h})
	}
	for len(level) > 0 {
		type answer struct {
			in      *Info
			present bool
			err     error
		}
		answers := make([]answer, len(level))
		sem := make(chan struct{}, max(im.Jobs, 8))
		var wg sync.WaitGroup
		for i, t := range level {
			wg.Go(func() {
				sem <- struct{}{}
				defer func() { <-sem }()
				a := &answers[i]
				a.in, a.present, a.err = im.lookup(ctx, t)
			})
		}
		wg.Wait()
		cur := level
		level = nil
		for i, a := range answers {
			t := cur[i]
			switch {
			case a.err != nil:
				name := t.name
				if name == "" {
					name = t.hash
				}
				if !im.KeepGoing {
					return nil, nil, fmt.Errorf("%s/%s: %w", im.StoreDir, name, a.err)
				}
				failed[name] = a.err
				if a.in != nil {
					// Refused (unsigned): what it refers to may still be fine.
					for _, r := range a.in.References {
						if r != a.in.Name {
							add(target{name: r})
						}
					}
				}
			case a.present:
				res.Present++
			default:
				infos[a.in.Name] = a.in
				for _, r := range a.in.References {
					if r != a.in.Name {
						add(target{name: r})
					}
				}
			}
		}
	}
	// A path whose reference failed cannot become valid.
	for changed := true; changed; {
		changed = false
		for n, in := range infos {
			for _, r := range in.References {
				if err, bad := failed[r]; bad && r != n {
					failed[n] = fmt.Errorf("%w: %s: %v", ErrDependency, r, err)
					delete(infos, n)
					changed = true
					break
				}
			}
		}
	}
	return infos, failed, nil
}

// lookup reports whether t is valid already and otherwise fetches and
// checks its narinfo.
func (im *Importer) lookup(ctx context.Context, t target) (*Info, bool, error) {
	if t.name != "" {
		if ok, err := im.Store.IsValid(ctx, t.name); err != nil || ok {
			return nil, ok, err
		}
	} else if n, err := im.Store.PathByHashPart(ctx, t.hash); err != nil || n != "" {
		return nil, n != "", err
	}
	var in *Info
	err := im.retry(ctx, func() error {
		rc, err := im.Src.Open(ctx, t.hash+".narinfo")
		if err != nil {
			return err
		}
		defer rc.Close()
		in, err = ParseNarinfo(rc, im.StoreDir)
		return err
	})
	if err != nil {
		return nil, false, err
	}
	if store.HashPart(in.Name) != t.hash || (t.name != "" && in.Name != t.name) {
		return nil, false, fmt.Errorf("%w: %s.narinfo describes %s/%s", ErrBadNarinfo, t.hash, im.StoreDir, in.Name)
	}
	if !im.NoCheckSigs {
		pi := in.PathInfo()
		if im.Keys.Verify(im.StoreDir, &pi) == 0 && !CAVerified(im.StoreDir, in) {
			return in, false, &UntrustedError{Sigs: len(in.Sigs), Keys: len(im.Keys)}
		}
	}
	return in, false, nil
}

// UntrustedError refuses an input-addressed path that carries no valid
// signature by a trusted key while signatures are checked.
type UntrustedError struct {
	Sigs int // signatures the narinfo carries
	Keys int // trusted keys given
}

func (e *UntrustedError) Error() string {
	msg := "refused: not signed, and a signature by a trusted key is required"
	if e.Sigs > 0 {
		msg = fmt.Sprintf("refused: no valid signature by a trusted key (%d signatures)", e.Sigs)
	}
	if e.Keys == 0 {
		msg += " (no trusted public keys given)"
	}
	return msg
}

// retry runs f until it succeeds, fails for good, or ran out of attempts.
func (im *Importer) retry(ctx context.Context, f func() error) error {
	var err error
	for attempt := 0; ; attempt++ {
		err = f()
		var te *TransientError
		if err == nil || !errors.As(err, &te) || attempt >= im.Retries || ctx.Err() != nil {
			return err
		}
		select {
		case <-time.After(time.Duration(250<<attempt) * time.Millisecond):
		case <-ctx.Done():
			return err
		}
	}
}

// fetchOne downloads, checks and commits one path.
func (im *Importer) fetchOne(ctx context.Context, in *Info) error {
	return im.retry(ctx, func() error { return FetchNAR(ctx, im.Store, im.Src, in) })
}

// hashCounter hashes and counts what is read through it.
type hashCounter struct {
	r io.Reader
	h hash.Hash
	n int64
}

func (c *hashCounter) Read(p []byte) (int, error) {
	n, err := c.r.Read(p)
	c.h.Write(p[:n])
	c.n += int64(n)
	return n, err
}

// ErrTooLong means a cache file or the NAR inside it went on past the size
// its narinfo gave; reading stops at the first byte too many.
var ErrTooLong = errors.New("longer than its narinfo says")

// cappedReader passes on the first left bytes of r and fails with err
// (rather than io.EOF) when r has more: a cache cannot make the importer
// read, decompress or hash more than the narinfo announced.
type cappedReader struct {
	r    io.Reader
	left int64
	err  error
	over bool // r went on past the limit
}

// check returns c.err if r went on past the limit, whatever a reader above
// made of it (a decoder may report a failed read as a truncated frame),
// else err.
func (c *cappedReader) check(err error) error {
	if c.over {
		return c.err
	}
	return err
}

func (c *cappedReader) Read(p []byte) (int, error) {
	if len(p) == 0 {
		return 0, nil
	}
	if c.left <= 0 {
		// At the limit: the stream must end here. One byte tells.
		var b [1]byte
		n, err := c.r.Read(b[:])
		if n > 0 {
			c.over = true
			return 0, c.err
		}
		return 0, err
	}
	if int64(len(p)) > c.left {
		p = p[:c.left]
	}
	n, err := c.r.Read(p)
	c.left -= int64(n)
	return n, err
}

// maxFileSize bounds a compressed cache file (a narinfo's FileSize, or the
// download when it gives none): none, xz, bzip2 and zstd all expand
// incompressible data by far less than a quarter, so anything longer is not
// an honest compression of a NAR of narSize bytes (it could be endless
// padding or skippable frames).
func maxFileSize(narSize int64) int64 { return narSize + narSize/4 + 1<<20 }

// fileLimit is how many bytes a download of in's cache file may take: its
// FileSize, or without one what any compression of its NarSize makes (the
// narinfo parser refuses a FileSize above that).
func (in *Info) fileLimit() int64 {
	if in.FileSize == 0 {
		return maxFileSize(in.NarSize)
	}
	return in.FileSize
}

// FetchNAR downloads in's NAR from src, once, and commits it to st if the
// NAR and the file it came in are what the narinfo says (NarHash, NarSize,
// FileHash, FileSize; references and content address are checked by the
// store's batch): nothing of a failed attempt stays in the store. The
// caller checks signatures and retries transient errors.
func FetchNAR(ctx context.Context, st *store.Store, src Source, in *Info) error {
	rc, err := src.Open(ctx, in.URL)
	if err != nil {
		return err
	}
	defer rc.Close()
	return IngestFile(ctx, st, rc, in)
}

// IngestFile is FetchNAR of the cache file r gives (compressed as in
// says): decoded on the calling goroutine, checked against the narinfo
// (FileHash, FileSize, NarHash, NarSize, nothing after the NAR) and
// committed as in's path in a batch of its own, or nothing of it stays.
func IngestFile(ctx context.Context, st *store.Store, r io.Reader, in *Info) error {
	body := &readErr{r: r}
	file, fileCapped, narCapped, closeDec, err := openNAR(body, in)
	if err != nil {
		return body.transient(err)
	}
	defer closeDec()
	br := bufio.NewReaderSize(narCapped, 256<<10)
	err = ingest(ctx, st, in, file, br)
	return body.transient(fileCapped.check(narCapped.check(err)))
}

// openNAR wraps the cache file rc in the readers that check it against in:
// the file capped at its FileSize (or what any compression of NarSize
// bytes takes) and hashed, decompressed, the NAR capped at NarSize. Errors
// of readers above them go through the capped readers' check.
func openNAR(rc io.Reader, in *Info) (file *hashCounter, fileCapped, narCapped *cappedReader, closeDec func(), err error) {
	fileCapped = &cappedReader{r: rc, left: in.fileLimit(),
		err: fmt.Errorf("%s: file %w (FileSize %d)", in.URL, ErrTooLong, in.FileSize)}
	if in.FileSize == 0 {
		fileCapped.err = fmt.Errorf("%s: file %w: over %d bytes, more than any compression of its NarSize %d takes",
			in.URL, ErrTooLong, fileCapped.left, in.NarSize)
	}
	file = &hashCounter{r: fileCapped, h: sha256.New()}
	narR, closeDec, err := decompress(file, in.Compression)
	if err != nil {
		return nil, nil, nil, nil, fileCapped.check(fmt.Errorf("%s: %w", in.URL, err))
	}
	narCapped = &cappedReader{r: narR, left: in.NarSize,
		err: fmt.Errorf("%s: NAR %w (NarSize %d)", in.URL, ErrTooLong, in.NarSize)}
	return file, fileCapped, narCapped, closeDec, nil
}

// transient makes err, the failure of a download read through e, a failure
// worth retrying if the download itself broke off: whatever the
// decompressor or the NAR parser concluded from the short stream (a
// truncated frame or file, a hash mismatch) does not pass the transport's
// error on.
func (e *readErr) transient(err error) error {
	var te *TransientError
	if cause := e.failed(); err != nil && errors.As(cause, &te) && !errors.As(err, &te) {
		return &TransientError{fmt.Errorf("%w (the download broke off: %v)", err, cause)}
	}
	return err
}

// readErr remembers the first error other than io.EOF that reading r
// returned.
type readErr struct {
	r   io.Reader
	mu  sync.Mutex // a decoder may read from a goroutine of its own
	err error
}

func (e *readErr) Read(p []byte) (int, error) {
	n, err := e.r.Read(p)
	if err != nil && err != io.EOF {
		e.mu.Lock()
		if e.err == nil {
			e.err = err
		}
		e.mu.Unlock()
	}
	return n, err
}

func (e *readErr) failed() error {
	e.mu.Lock()
	defer e.mu.Unlock()
	return e.err
}

// checkFile reads the rest of the cache file (after the NAR) and checks
// it against the narinfo's FileSize and FileHash.
func checkFile(in *Info, file *hashCounter) error {
	if _, err := io.Copy(io.Discard, file); err != nil {
		return fmt.Errorf("%s: %w", in.URL, err)
	}
	if in.FileSize != 0 && file.n != in.FileSize {
		return fmt.Errorf("%s: file size mismatch: got %d bytes, narinfo says %d", in.URL, file.n, in.FileSize)
	}
	if sum := file.h.Sum(nil); in.FileHash != nil && !bytes.Equal(sum, in.FileHash) {
		return fmt.Errorf("%s: file hash mismatch: got sha256:%s, narinfo says sha256:%s", in.URL,
			store.NixBase32(sum), store.NixBase32(in.FileHash))
	}
	return nil
}

// ingest reads the NAR from br into a batch of its own and commits it if
// the NAR, and the file it came in, are what the narinfo says.
func ingest(ctx context.Context, st *store.Store, in *Info, file *hashCounter, br *bufio.Reader) error {
	b := st.NewBatch(ctx)
	if err := addNAR(b, br, in); err != nil {
		b.Abort()
		return err
	}
	// The file must hold exactly the NAR, and be what the narinfo says.
	if err := checkFile(in, file); err != nil {
		b.Abort()
		return err
	}
	_, err := b.Commit()
	return err
}
