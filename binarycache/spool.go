package binarycache

import (
	"bufio"
	"context"
	"crypto/sha256"
	"errors"
	"fmt"
	"hash"
	"io"
	"os"
	"sync"

	"github.com/casnix/casnix/store"
)

// Spool is one download of a NAR from a binary cache into a temporary
// file, checked as FetchNAR checks it (NarHash, NarSize, FileHash,
// FileSize, nothing after the NAR), that any number of readers follow
// while it arrives: the HTTP pull-through cache streams it to its clients
// and the store ingests it, from one upstream request.
//
// A reader of the NAR gets the bytes as they are written, except the
// NAR's last SpoolHoldBack bytes, which it gets only once the whole
// download checked out; a download that fails fails every reader instead.
// So a reader never sees a complete NAR that is not the one the narinfo
// describes: a NAR that is cut off, too long or of the wrong hash is
// missing its end, and its readers get the error. (A raw reader, of the
// file as downloaded, is released by the file's length: NewRawReader.)
//
// The file is unlinked as soon as it is created (nothing to clean up after
// a crash) and closed when the download and every reader are done with it
// (Retain/Release count the other holders). Memory stays bounded whatever
// the NAR's size: the bytes live in the file (the page cache), not in the
// process.
type Spool struct {
	Info *Info

	f    *os.File // the decoded NAR, made by its first decode (createNARFile)
	mu   sync.Mutex
	n    int64 // NAR bytes written
	done bool  // the download ended
	err  error // why it failed (done)
	wake chan struct{}
	refs int // the download, each reader and each Retain; the file is closed at 0

	// keep, if set, gets a copy of the file as downloaded (the compressed
	// NAR), kept only if the download checked out.
	keep NARCopy
	// keepIsRaw: the copy's file is raw itself (adoptKeep), so the
	// download writes it once.
	keepIsRaw bool

	// raw, if set (EnableRaw), holds the file as downloaded (the
	// compressed NAR), written as it arrives by a goroutine of its own, so
	// that readers of it (NewRawReader) follow the upstream at its pace,
	// not at the decompressor's, and the NAR's check decodes from it.
	raw    *os.File
	rawN   int64 // bytes of raw written
	rawEnd bool  // the download of raw ended (rawErr: how)
	rawErr error
	// rawOK: raw is whole and may be read to its end: the body ended
	// cleanly at the narinfo's FileSize (lazy), or the whole download
	// checked out.
	rawOK bool
	dir   string

	// lazy (EnableRaw with a FileSize): the download only writes the
	// file (its length, a clean end at FileSize, releases raw readers);
	// the NAR is decoded and checked, and the file's FileHash with it,
	// only when a NAR reader asks for it (startCheck), or by whoever
	// ingests from a raw reader (FetchNAR over it, then NARChecked). So a
	// pull whose clients take the file verbatim and whose ingest runs at
	// idle priority decodes and hashes nothing on an ordinary thread (Go's
	// xz decoder costs several times what the client's liblzma does, and
	// the FileHash's SHA-256 alone was a quarter of a pull-through's CPU
	// while its client copied).
	lazy         bool
	checkStarted bool
	// nDone, nErr: the NAR check ended, and how (what NAR readers get);
	// for a spool that is not lazy, the download's end.
	nDone bool
	nErr  error
	// keepDone: the copy was committed or aborted.
	keepDone bool
}

// NARKeeper keeps the files (compressed NARs) spools download, so that the
// upstream's own compression can be served again later without rendering
// and recompressing the NAR (Server.KeepNAR: the HTTP NAR cache).
type NARKeeper interface {
	// KeepNAR returns where a copy of in's downloaded file goes, or nil
	// to keep none.
	KeepNAR(in *Info) NARCopy
}

// NARCopy is a copy of a downloaded file being written. Write never
// fails the download; Commit keeps the copy (the file checked out against
// the narinfo: NarHash, NarSize, FileHash, FileSize, nothing after the
// NAR), Abort drops it.
type NARCopy interface {
	io.Writer
	Commit()
	Abort()
}

// bufs holds the copy buffers of downloads, NAR checks and streams: one
// per NAR, freed as each ends, was most of a pull-through's garbage.
var bufs = sync.Pool{New: func() any { return new([256 << 10]byte) }}

func getBuf() []byte  { return bufs.Get().(*[256 << 10]byte)[:] }
func putBuf(b []byte) { bufs.Put((*[256 << 10]byte)(b)) }

// Keep makes the download copy its file to c (nil: none); call it before
// Fetch, and before EnableRaw where both are called (else a file is made
// for nothing).
func (sp *Spool) Keep(c NARCopy) {
	sp.keep = c
	if sp.raw != nil {
		sp.adoptKeep()
	}
}

// fileCopy is a NARCopy that is a file on disk the spool may write itself,
// so a spool that keeps the downloaded file (EnableRaw) writes it once
// instead of to its own file and again to the copy: every byte written
// is a copy into the page cache, and for a pull-through streaming to a
// client that was the largest part of its CPU. adopt opens the copy's file
// for the spool: a descriptor of its own, which stays valid after Commit
// closes and renames the copy or Abort removes it.
type fileCopy interface {
	NARCopy
	adopt() (*os.File, error)
}

// adoptKeep makes the copy the spool's raw file where it can be one, and
// reports whether the copy is the raw file.
func (sp *Spool) adoptKeep() bool {
	fc, ok := sp.keep.(fileCopy)
	if !ok || sp.keepIsRaw {
		return sp.keepIsRaw
	}
	f, err := fc.adopt()
	if err != nil {
		return false // the copy is written apart, as by a spool without a file of its own
	}
	if sp.raw != nil {
		sp.raw.Close()
	}
	sp.raw, sp.keepIsRaw = f, true
	return true
}

// SpoolHoldBack is how many of the NAR's last bytes readers get only once
// the download checked out: a NAR ends with at least this many bytes of
// closing tokens, so a reader held back short of them cannot take what it
// has for a whole NAR.
const SpoolHoldBack = 16

// NewSpool creates the spool of in's NAR in dir (a directory on disk,
// not tmpfs: the NAR goes there). Start the download with Fetch; the
// caller's own reference is the download's, which Fetch drops.
func NewSpool(dir string, in *Info) (*Spool, error) {
	if err := os.MkdirAll(dir, 0o700); err != nil {
		return nil, fmt.Errorf("spool: %w", err)
	}
	return &Spool{Info: in, wake: make(chan struct{}), refs: 1, dir: dir}, nil
}

// createNARFile creates the file the decoded NAR goes to, when the NAR is
// first decoded: a lazy spool whose clients take the file verbatim and
// whose ingest reads the file never needs one, and a file created and
// unlinked per NAR was a good part of a pull-through's system time.
// Readers use it only once bytes were written (sp.n, under sp.mu).
func (sp *Spool) createNARFile() error {
	f, err := os.CreateTemp(sp.dir, "nar-*")
	if err != nil {
		return fmt.Errorf("spool: %w", err)
	}
	os.Remove(f.Name()) // nothing to clean up after a crash
	sp.mu.Lock()
	sp.f = f
	sp.mu.Unlock()
	return nil
}

// RawHoldBack is how many of the downloaded file's last bytes raw readers
// get only once the file is known whole. Withheld bytes of a
// compressed stream withhold at least as many bytes of the NAR (a zstd
// block is at most 128 KiB and decodes only whole; an xz stream's index
// and footer are far smaller), so a raw reader held back short of them
// cannot decode a NAR that looks complete.
const RawHoldBack = 256 << 10

// EnableRaw makes the spool keep the file as downloaded for raw readers
// (NewRawReader); call it before Fetch.
func (sp *Spool) EnableRaw() error {
	// Without a FileSize the file's length proves nothing (a body cut
	// off can end cleanly), so its raw readers wait for the NAR's check.
	sp.lazy = sp.Info.FileSize > 0
	if sp.adoptKeep() {
		return nil
	}
	f, err := os.CreateTemp(sp.dir, "file-*")
	if err != nil {
		return fmt.Errorf("spool: %w", err)
	}
	os.Remove(f.Name())
	sp.raw = f
	return nil
}

// HasRaw reports whether the spool keeps the downloaded file.
func (sp *Spool) HasRaw() bool { return sp.raw != nil }

// download copies the body to the raw file as fast as it arrives (capped
// at what the narinfo allows), so that a lazy spool's raw readers are
// released by the file's length without waiting for the NAR's check.
type download struct {
	sp   *Spool
	rc   io.ReadCloser
	done chan struct{}
	off  int64 // the follower's position
	// check: the follower is a lazy spool's NAR check, which stops as
	// soon as the download failed (its result would be dropped).
	check bool
}

func (sp *Spool) startDownload(rc io.ReadCloser) *download {
	d := &download{sp: sp, rc: rc, done: make(chan struct{})}
	go d.run()
	return d
}

func (d *download) run() {
	defer close(d.done)
	sp, in := d.sp, d.sp.Info
	limit := in.fileLimit()
	buf := getBuf()
	defer putBuf(buf)
	var n int64
	var err error
	for {
		k, rerr := d.rc.Read(buf)
		if k > 0 {
			if n+int64(k) > limit {
				err = fmt.Errorf("%s: file %w: over %d bytes", in.URL, ErrTooLong, limit)
				break
			}
			if _, werr := sp.raw.WriteAt(buf[:k], n); werr != nil {
				err = fmt.Errorf("spool: %w", werr)
				break
			}
			n += int64(k)
			sp.advanceRaw(n)
			if sp.keep != nil && !sp.keepIsRaw {
				sp.keep.Write(buf[:k])
			}
		}
		if rerr == io.EOF {
			break
		}
		if rerr != nil {
			err = rerr
			break
		}
	}
	// The file is not hashed here: its FileHash is checked by the NAR's
	// check (the ingest's or startCheck's decode), before the store or
	// the NAR cache keeps anything. A raw reader gets the end of a file
	// of the right length before that, as a client of the upstream
	// would: the narinfo's signature covers the NAR (its hash and size),
	// not the file, and Nix checks the NAR's hash of every NAR it
	// substitutes, not the file's (nor do casnix's own narinfos name it).
	// The file's length still keeps a cut-off or overlong file's end from
	// every reader.
	ok := err == nil && in.FileSize > 0 && n == in.FileSize
	sp.mu.Lock()
	sp.rawEnd, sp.rawErr, sp.rawOK = true, err, ok
	sp.wakeLocked()
	sp.mu.Unlock()
}

// Read is the NAR check's view of the download: the raw file as it
// grows, then the download's error or io.EOF.
func (d *download) Read(p []byte) (int, error) {
	sp := d.sp
	for {
		sp.mu.Lock()
		n, end, err, wake := sp.rawN, sp.rawEnd, sp.rawErr, sp.wake
		if d.check && sp.done && sp.err != nil {
			n, end, err = d.off, true, sp.err
		}
		sp.mu.Unlock()
		if d.off < n {
			k, rerr := sp.raw.ReadAt(p[:min(int64(len(p)), n-d.off)], d.off)
			d.off += int64(k)
			if rerr == io.EOF {
				rerr = nil
			}
			return k, rerr
		}
		if end {
			if err == nil {
				err = io.EOF
			}
			return 0, err
		}
		<-wake
	}
}

// stop ends the download (the check is over, whichever way) and waits
// for its goroutine.
func (d *download) stop() {
	d.rc.Close()
	<-d.done
}

// Fetch downloads the NAR from src into the spool and checks it; its
// error is also what readers get. It must be called once. A lazy spool's
// Fetch checks the file's length only (FileSize); its NAR and the file's
// FileHash are checked by startCheck or by the ingest.
func (sp *Spool) Fetch(ctx context.Context, src Source) (err error) {
	defer func() {
		sp.finish(err)
		// After the readers were let go: committing syncs the copy. A
		// lazy spool's copy waits for its NAR check (endKeep).
		if err != nil || !sp.lazy {
			sp.endKeep(err == nil)
		}
	}()
	in := sp.Info
	rc, err := src.Open(ctx, in.URL)
	if err != nil {
		return err
	}
	defer rc.Close()
	var raw io.Reader = rc
	if sp.lazy {
		d := sp.startDownload(rc)
		<-d.done
		sp.mu.Lock()
		rawErr, ok := sp.rawErr, sp.rawOK
		sp.mu.Unlock()
		if rawErr != nil {
			return fmt.Errorf("%s: %w", in.URL, rawErr) // a transient error stays one
		}
		if !ok {
			return fmt.Errorf("%s: file size mismatch: the body ended short of the narinfo's FileSize %d", in.URL, in.FileSize)
		}
		return nil
	}
	if sp.raw != nil {
		// The download runs ahead on its own; the check below decodes
		// what it wrote. (The copy is the download's too.)
		d := sp.startDownload(rc)
		defer d.stop()
		raw = d
	} else if sp.keep != nil {
		// The copy is of the very bytes the checks below read (the
		// decompressor reads the body to its end, and anything after the
		// NAR fails the download), so a kept file decodes to the NAR
		// checked against NarHash.
		raw = io.TeeReader(rc, sp.keep)
	}
	return sp.decode(&readErr{r: raw})
}

// decode decompresses the file body gives into the spool's NAR file and
// checks it against the narinfo.
func (sp *Spool) decode(body *readErr) error {
	in := sp.Info
	file, fileCapped, narCapped, closeDec, err := openNAR(body, in)
	if err != nil {
		return body.transient(err)
	}
	defer closeDec()
	if err := sp.createNARFile(); err != nil {
		return err
	}
	check := func(err error) error { return body.transient(fileCapped.check(narCapped.check(err))) }
	h := sha256.New()
	buf := getBuf()
	defer putBuf(buf)
	var n int64
	for {
		k, rerr := narCapped.Read(buf)
		if k > 0 {
			if _, err := sp.f.Write(buf[:k]); err != nil {
				return fmt.Errorf("spool: %w", err)
			}
			h.Write(buf[:k])
			n += int64(k)
			sp.advance(n)
		}
		if rerr == io.EOF {
			break
		}
		if rerr != nil {
			return check(fmt.Errorf("%s: %w", in.URL, rerr))
		}
	}
	if n != in.NarSize {
		return body.transient(fmt.Errorf("%s: NAR cut off: %w: got %d bytes, narinfo says %d", in.URL, io.ErrUnexpectedEOF, n, in.NarSize))
	}
	if sum := h.Sum(nil); [sha256.Size]byte(sum) != in.NarHash {
		return body.transient(fmt.Errorf("%s: %w: got sha256:%s, narinfo says sha256:%s", in.URL, store.ErrHashMismatch,
			store.NixBase32(sum), store.NixBase32(in.NarHash[:])))
	}
	return check(checkFile(in, file))
}

func (sp *Spool) advance(n int64) {
	sp.mu.Lock()
	defer sp.mu.Unlock()
	sp.n = n
	sp.wakeLocked()
}

func (sp *Spool) advanceRaw(n int64) {
	sp.mu.Lock()
	defer sp.mu.Unlock()
	sp.rawN = n
	sp.wakeLocked()
}

// wakeLocked wakes every waiting reader; sp.mu is held.
func (sp *Spool) wakeLocked() {
	close(sp.wake)
	sp.wake = make(chan struct{})
}

func (sp *Spool) finish(err error) {
	sp.mu.Lock()
	defer sp.mu.Unlock()
	sp.done, sp.err = true, err
	if err == nil && sp.raw != nil {
		sp.rawOK = true // the file decoded to the NAR, which checked out (or, lazy, is of its FileSize)
	}
	if !sp.lazy || err != nil {
		// A failed download fails the NAR's readers too, checked or not.
		sp.nDone, sp.nErr = true, err
	}
	sp.wakeLocked()
	sp.unref()
}

// startCheck starts the NAR check of a lazy spool, once: a reader of the
// NAR (not of the file) needs it.
func (sp *Spool) startCheck() {
	sp.mu.Lock()
	if !sp.lazy || sp.checkStarted || sp.nDone || sp.refs == 0 {
		sp.mu.Unlock()
		return
	}
	sp.checkStarted = true
	sp.refs++ // the check's
	sp.mu.Unlock()
	go func() {
		err := sp.decode(&readErr{r: &download{sp: sp, check: true}})
		sp.mu.Lock()
		ok := false
		if !sp.nDone { // else the download failed first
			sp.nDone, sp.nErr = true, err
			ok = err == nil
		}
		sp.wakeLocked()
		sp.mu.Unlock()
		if ok {
			sp.endKeep(true)
		}
		sp.Release()
	}()
}

// NARChecked tells a lazy spool that its NAR checked out against the
// narinfo (an ingest from a raw reader committed it), so the copy of its
// file is kept.
func (sp *Spool) NARChecked() { sp.endKeep(true) }

// Lazy reports whether the spool checks its NAR only on demand: an ingest
// from it should read the file (NewRawReader) and check the NAR itself
// (FetchNAR), then call NARChecked.
func (sp *Spool) Lazy() bool { return sp.lazy }

// endKeep commits (ok) or aborts the copy of the file, once.
func (sp *Spool) endKeep(ok bool) {
	sp.mu.Lock()
	if sp.keep == nil || sp.keepDone {
		sp.mu.Unlock()
		return
	}
	sp.keepDone = true
	sp.mu.Unlock()
	if ok {
		sp.keep.Commit()
	} else {
		sp.keep.Abort()
	}
}

// unref drops a reference; sp.mu is held.
func (sp *Spool) unref() {
	if sp.refs--; sp.refs == 0 {
		if sp.f != nil {
			sp.f.Close()
		}
		if sp.raw != nil {
			sp.raw.Close()
		}
		if sp.keep != nil && !sp.keepDone {
			// A lazy spool whose NAR nobody checked: its copy goes.
			sp.keepDone = true
			go sp.keep.Abort()
		}
	}
}

// Retain adds a holder (a table of spools others may join), so the file
// stays open after the download and its readers are done; false if it is
// closed already.
func (sp *Spool) Retain() bool {
	sp.mu.Lock()
	defer sp.mu.Unlock()
	if sp.refs == 0 {
		return false
	}
	sp.refs++
	return true
}

// Release drops what Retain added.
func (sp *Spool) Release() {
	sp.mu.Lock()
	defer sp.mu.Unlock()
	sp.unref()
}

// WaitDone waits until the download ended (State) or ctx is done.
func (sp *Spool) WaitDone(ctx context.Context) {
	for {
		sp.mu.Lock()
		done, wake := sp.done, sp.wake
		sp.mu.Unlock()
		if done {
			return
		}
		select {
		case <-wake:
		case <-ctx.Done():
			return
		}
	}
}

// State reports whether the download ended and, if so, how.
func (sp *Spool) State() (done bool, err error) {
	sp.mu.Lock()
	defer sp.mu.Unlock()
	return sp.done, sp.err
}

// limit is how far readers may read: the bytes written short of the held
// back end, or all of them once checked; with the download's error.
func (sp *Spool) limit() (lim int64, done bool, err error, wake <-chan struct{}) {
	sp.mu.Lock()
	defer sp.mu.Unlock()
	if sp.nDone {
		return sp.n, true, sp.nErr, sp.wake
	}
	return min(sp.n, sp.Info.NarSize-SpoolHoldBack), false, nil, sp.wake
}

// rawLimit is limit for raw readers: the file's bytes written short of
// the held back end, or all of them once the file is known right; done
// once they may read to its end.
func (sp *Spool) rawLimit() (lim int64, done bool, err error, wake <-chan struct{}) {
	sp.mu.Lock()
	defer sp.mu.Unlock()
	if sp.done && sp.err != nil {
		return 0, true, sp.err, sp.wake
	}
	if sp.rawOK {
		return sp.rawN, true, nil, sp.wake
	}
	return max(sp.rawN-RawHoldBack, 0), false, nil, sp.wake
}

// NewRawReader opens a reader of the file as downloaded (the compressed
// NAR, Info.Compression), for sending it on verbatim: it follows the
// download as it arrives and gets the file's last RawHoldBack bytes only
// once the body ended cleanly at the narinfo's FileSize (a lazy spool:
// the reader's client checks the NAR's hash, as it would from the
// upstream, and the store and the NAR cache keep the file only once its
// NAR and FileHash checked out) or, without a FileSize, once the whole
// NAR checked out; a download that fails fails it instead. Nil if the
// spool keeps no file (EnableRaw) or is closed.
func (sp *Spool) NewRawReader(ctx context.Context) *SpoolReader {
	if sp.raw == nil {
		return nil
	}
	r := sp.newReader(ctx)
	if r != nil {
		r.raw = true
	}
	return r
}

// NewReader opens a reader at the start of the NAR; ctx bounds its
// blocking reads. Nil if the spool is closed already. On a lazy spool it
// starts the NAR's check (startCheck).
func (sp *Spool) NewReader(ctx context.Context) *SpoolReader {
	r := sp.newReader(ctx)
	if r != nil {
		sp.startCheck()
	}
	return r
}

func (sp *Spool) newReader(ctx context.Context) *SpoolReader {
	if !sp.Retain() {
		return nil
	}
	return &SpoolReader{sp: sp, ctx: ctx}
}

// NewCheckedReader is NewReader for a reader that hashes what it reads
// back from the file itself and gives the NAR's last SpoolHoldBack bytes
// only if that matches NarHash: the download's check covers the bytes it
// wrote, this one the bytes a client gets (as a rendered NAR's own check
// does), so a spool file damaged on disk fails the reader before the end.
// (The ingest needs none: its batch checks the hash itself.)
func (sp *Spool) NewCheckedReader(ctx context.Context) *SpoolReader {
	r := sp.NewReader(ctx)
	if r != nil {
		r.h = sha256.New()
	}
	return r
}

// SpoolReader follows a Spool from the start of the NAR.
type SpoolReader struct {
	sp     *Spool
	ctx    context.Context
	off    int64
	closed bool

	// Checked readers (h set): the NAR's end, read at once and checked.
	h    hash.Hash
	tail []byte
	// raw: a reader of the downloaded file (NewRawReader), not the NAR.
	raw bool
}

// Whole returns, for a raw reader that has read nothing yet, a descriptor
// of its own on the downloaded file when the download is over and the
// file checked out (what the reader would give in full now), so the
// caller can send it whole with sendfile and its length; nil otherwise
// (still downloading, failed, or the file cannot be opened again). The
// caller closes it; the reader stays open until Close as before.
func (r *SpoolReader) Whole() *os.File {
	sp := r.sp
	if !r.raw || r.off != 0 || r.closed {
		return nil
	}
	sp.mu.Lock()
	ok := sp.rawOK && !(sp.done && sp.err != nil)
	sp.mu.Unlock()
	if !ok {
		return nil
	}
	// A file description of its own (not a dup): sendfile moves its offset.
	f, err := os.Open(fmt.Sprintf("/proc/self/fd/%d", sp.raw.Fd()))
	if err != nil {
		return nil
	}
	return f
}

// Raw reports whether the reader gives the downloaded file (compressed
// as Info().Compression says) rather than the NAR.
func (r *SpoolReader) Raw() bool { return r.raw }

// Info is the narinfo the spool's NAR is checked against.
func (r *SpoolReader) Info() *Info { return r.sp.Info }

// limit is the spool's limit for what the reader reads: the file or the NAR.
func (r *SpoolReader) limit() (lim int64, done bool, err error, wake <-chan struct{}) {
	if r.raw {
		return r.sp.rawLimit()
	}
	return r.sp.limit()
}

// TryRead reads what is there without waiting: 0, nil when nothing new is
// yet; io.EOF after the whole NAR, once it checked out; the download's
// error if it failed.
func (r *SpoolReader) TryRead(p []byte) (int, error) {
	if r.closed {
		return 0, os.ErrClosed
	}
	if len(r.tail) > 0 {
		n := copy(p, r.tail)
		r.tail = r.tail[n:]
		return n, nil
	}
	lim, done, err, _ := r.limit()
	if err != nil {
		return 0, err
	}
	if r.off < lim && len(p) > 0 {
		// (Only checked readers, of the NAR, hash and hold their tail.)
		end := max(r.sp.Info.NarSize-SpoolHoldBack, 0)
		if r.h != nil && r.off >= end {
			return r.readTail(p)
		}
		k := min(int64(len(p)), lim-r.off)
		if r.h != nil {
			k = min(k, end-r.off)
		}
		f := r.sp.f
		if r.raw {
			f = r.sp.raw
		}
		n, err := f.ReadAt(p[:k], r.off)
		r.off += int64(n)
		if r.h != nil {
			r.h.Write(p[:n])
		}
		if n == int(k) {
			err = nil
		}
		return n, err
	}
	if done {
		return 0, io.EOF
	}
	return 0, nil
}

// readTail reads the rest of the NAR (its held back end, released since
// the download checked out) and gives it only if the whole NAR read back
// hashes to NarHash.
func (r *SpoolReader) readTail(p []byte) (int, error) {
	in := r.sp.Info
	tail := make([]byte, in.NarSize-r.off)
	if _, err := r.sp.f.ReadAt(tail, r.off); err != nil {
		return 0, fmt.Errorf("spool: %w", err)
	}
	r.h.Write(tail)
	if sum := r.h.Sum(nil); [sha256.Size]byte(sum) != in.NarHash {
		return 0, fmt.Errorf("spool of %s: %w: read back sha256:%s, narinfo says sha256:%s", in.Name, store.ErrHashMismatch,
			store.NixBase32(sum), store.NixBase32(in.NarHash[:]))
	}
	r.off = in.NarSize
	n := copy(p, tail)
	r.tail = tail[n:]
	return n, nil
}

// Wait waits until TryRead has something to say: new bytes, the end or
// the download's error.
func (r *SpoolReader) Wait(ctx context.Context) error {
	for {
		lim, done, err, wake := r.limit()
		if r.off < lim || done || err != nil {
			return nil
		}
		select {
		case <-wake:
		case <-ctx.Done():
			return ctx.Err()
		}
	}
}

// Read reads, waiting for bytes as they arrive.
func (r *SpoolReader) Read(p []byte) (int, error) {
	for {
		n, err := r.TryRead(p)
		if n > 0 || err != nil || len(p) == 0 {
			return n, err
		}
		if err := r.Wait(r.ctx); err != nil {
			return 0, err
		}
	}
}

// Close lets go of the spool.
func (r *SpoolReader) Close() error {
	if !r.closed {
		r.closed = true
		r.sp.Release()
	}
	return nil
}

// IngestFrom commits the NAR r gives (a SpoolReader, whose end comes only
// once the download checked out) as in's path, in a batch of its own:
// nothing of it stays in the store if r fails or the NAR is not what in
// says.
func IngestFrom(ctx context.Context, st *store.Store, r io.Reader, in *Info) error {
	br := bufio.NewReaderSize(r, 256<<10)
	b := st.NewBatch(ctx)
	if err := addNAR(b, br, in); err != nil {
		b.Abort()
		return err
	}
	_, err := b.Commit()
	return err
}

// addNAR adds the NAR br gives to b and checks that it is what in says
// and that nothing follows it.
func addNAR(b *store.Batch, br *bufio.Reader, in *Info) error {
	pi, err := b.Add(br, in.PathInfo())
	if err != nil {
		return err
	}
	// Batch.Add skips checks of zero values; a narinfo must not.
	if pi.NarHash != in.NarHash || pi.NarSize != in.NarSize {
		return fmt.Errorf("%s: %w: got sha256:%s (%d bytes), narinfo says sha256:%s (%d bytes)", in.URL, store.ErrHashMismatch,
			store.NixBase32(pi.NarHash[:]), pi.NarSize, store.NixBase32(in.NarHash[:]), in.NarSize)
	}
	if _, err := br.ReadByte(); err != io.EOF {
		if err != nil {
			return fmt.Errorf("%s: after the NAR: %w", in.URL, err)
		}
		return errors.New(in.URL + ": data after the end of the NAR")
	}
	return nil
}

// Spool is the spool the reader follows.
func (r *SpoolReader) Spool() *Spool { return r.sp }
