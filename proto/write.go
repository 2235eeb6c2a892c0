package proto

import (
	"bufio"
	"bytes"
	"errors"
	"fmt"
	"io"
	"os"
	"path/filepath"
	"strings"
	"time"

	"github.com/casnix/casnix/castore"
	"github.com/casnix/casnix/digest"
	"github.com/casnix/casnix/nar"
	"github.com/casnix/casnix/store"
	"github.com/casnix/casnix/subst"
)

// The write ops. Every path is ingested as its NAR arrives (chunks go to
// pack files at once) and becomes valid only when its batch commits, after
// the NAR hash and size the client claimed were checked. A failure leaves
// the store as it was; the rest of the upload is drained so the
// connection stays usable, and the client sees the error.

// upload is the data of a write op: a framed stream (protocol ≥ 1.23) or
// STDERR_READ pulls (1.21-1.22).
type upload interface {
	io.Reader
	// finish consumes what the client still has to send for this op.
	finish() error
	// broken is the transport error that ended the upload, if any: after
	// it the connection cannot go on.
	broken() error
	// rest counts the bytes left in the upload, reading them.
	rest() (int64, error)
}

func (f *framedReader) rest() (int64, error) { return io.Copy(io.Discard, f) }

// rest is 0: the client sends only what the server pulls, so nothing can
// follow the NAR.
func (p *pullReader) rest() (int64, error) { return 0, nil }

func (f *framedReader) finish() error { return f.drain() }

func (f *framedReader) broken() error {
	if f.err != nil && !errors.Is(f.err, io.EOF) {
		return f.err
	}
	return nil
}

func (p *pullReader) finish() error { return nil } // the client sends only what is asked for

func (p *pullReader) broken() error { return p.err }

// openUpload starts reading an op's data in the negotiated form.
func (c *conn) openUpload() upload {
	if c.minor >= 23 {
		return &framedReader{w: &c.r}
	}
	return &pullReader{c: c}
}

// failUpload turns an error met while ingesting into the op's result:
// transport failures end the connection, anything else is reported after
// the rest of the upload is drained.
func (c *conn) failUpload(u upload, err error) error {
	if b := u.broken(); b != nil {
		return b
	}
	if ferr := u.finish(); ferr != nil {
		return ferr
	}
	if isOpError(err) {
		return err
	}
	return c.addErr(err)
}

// addErr words a store error from adding paths the way Nix's would read.
func (c *conn) addErr(err error) error {
	if errors.Is(err, store.ErrHashMismatch) || errors.Is(err, store.ErrSizeMismatch) ||
		errors.Is(err, store.ErrMissingRef) || errors.Is(err, store.ErrCAMismatch) ||
		errors.Is(err, nar.ErrInvalid) || errors.Is(err, store.ErrBadPath) {
		return errorf("%v", err)
	}
	return c.storeErr(err)
}

// pathInfoWire is ValidPathInfo as the write ops send it.
type pathInfoWire struct {
	info        store.PathInfo
	hasNarHash  bool
	ultimateRaw bool
}

// readPathInfo reads a path and its unkeyed info (deriver, narHash,
// references, registrationTime, narSize, ultimate, sigs, ca): the form of
// AddToStoreNar and of each entry of AddMultipleToStore. r is where it
// comes from (the connection, or the framed stream of AddMultipleToStore).
func readPathInfo(r *wireReader, parse func(string) (string, error)) (*pathInfoWire, error) {
	var bad error
	note := func(err error) {
		if bad == nil {
			bad = err
		}
	}
	p, err := r.str(maxPath)
	if err != nil {
		return nil, err
	}
	name, err := parse(p)
	note(err)
	deriver, err := r.str(maxPath)
	if err != nil {
		return nil, err
	}
	pw := &pathInfoWire{info: store.PathInfo{Name: name}}
	if deriver != "" {
		d, err := parse(deriver)
		note(err)
		pw.info.Deriver = d
	}
	narHash, err := r.str(maxPath)
	if err != nil {
		return nil, err
	}
	if narHash != "" {
		h, err := parseNarHash(narHash)
		if err != nil {
			note(errorf("path '%s': %v", p, err))
		} else {
			pw.info.NarHash = h
			pw.hasNarHash = true
		}
	}
	refs, err := r.strings(maxPath)
	if err != nil {
		return nil, err
	}
	for _, ref := range refs {
		n, err := parse(ref)
		note(err)
		pw.info.References = append(pw.info.References, n)
	}
	registered, err := r.u64()
	if err != nil {
		return nil, err
	}
	if registered != 0 {
		pw.info.Registered = time.Unix(int64(registered&(1<<62-1)), 0)
	}
	size, err := r.u64()
	if err != nil {
		return nil, err
	}
	if size > 1<<62 {
		note(errorf("path '%s': NAR size %d is out of range", p, size))
	}
	pw.info.NarSize = int64(size & (1<<62 - 1))
	if pw.ultimateRaw, err = r.boolean(); err != nil {
		return nil, err
	}
	if pw.info.Sigs, err = r.strings(maxString); err != nil {
		return nil, err
	}
	if pw.info.CA, err = r.str(maxString); err != nil {
		return nil, err
	}
	return pw, bad
}

// parseNarHash reads the NAR hash of a write op: base16 in the protocol,
// though Nix's reader takes any encoding, with or without "sha256:".
func parseNarHash(s string) ([32]byte, error) {
	var h [32]byte
	s = strings.TrimPrefix(s, "sha256:")
	ca, err := store.ParseCA("fixed:r:sha256:" + s)
	if err != nil {
		return h, fmt.Errorf("bad NAR hash %q", s)
	}
	copy(h[:], ca.Hash)
	return h, nil
}

// readAddFlags reads the repair and dontCheckSigs flags of AddToStoreNar
// and AddMultipleToStore. Repair is moot: casnix re-adds nothing it has
// (verify names damage; a backup restores it).
func (c *conn) readAddFlags() (dontCheckSigs bool, err error) {
	if _, err := c.r.boolean(); err != nil {
		return false, err
	}
	return c.r.boolean()
}

// checkAdd applies Nix's rules for adding a path with given info: a NAR
// hash is required, and unless the client is trusted and asked for no
// signature check, a path must be content-addressed (its address is then
// verified against its contents at ingest) or signed by a trusted key.
func (c *conn) checkAdd(pi *store.PathInfo, hasNarHash, dontCheckSigs bool) error {
	full := c.full(pi.Name)
	if !hasNarHash {
		return errorf("cannot add path '%s' because it lacks a hash", full)
	}
	if !c.trusted {
		dontCheckSigs = false
	}
	if dontCheckSigs || !c.s.RequireSigs || pi.CA != "" {
		return nil
	}
	if c.s.PublicKeys.Verify(c.s.StoreDir, pi) == 0 {
		return errorf("cannot add path '%s' because it lacks a signature by a trusted key", full)
	}
	return nil
}

// ingestOne adds one path from nr (exactly its NAR) to b, or skips it if
// it is valid already. It returns whether the path went into the batch.
func (c *conn) ingestOne(b *store.Batch, nr io.Reader, pi store.PathInfo) (bool, error) {
	ok, err := c.s.Store.IsValid(c.ctx, pi.Name)
	if err != nil {
		return false, err
	}
	if ok {
		// Like Nix: adding a valid path is a no-op (its data is read and
		// dropped).
		if _, err := io.Copy(io.Discard, nr); err != nil {
			return false, err
		}
		return false, nil
	}
	if err := c.lazyRefs(b, pi); err != nil {
		return false, err
	}
	if _, err := b.Add(nr, pi); err != nil {
		return false, err
	}
	return true, nil
}

// lazyRefs fetches, under a lazy store, the references of pi that the
// store lacks and the batch does not hold: the client was told they are
// valid, so it did not send them.
func (c *conn) lazyRefs(b *store.Batch, pi store.PathInfo) error {
	if c.s.Lazy == nil {
		return nil
	}
	for _, r := range pi.References {
		if r == pi.Name || b.Has(r) {
			continue
		}
		ok, err := c.s.Store.IsValid(c.ctx, r)
		if err != nil || ok {
			if err != nil {
				return err
			}
			continue
		}
		if err := c.addTempWithin(b, r); err != nil {
			return err
		}
		if err := c.s.Lazy.Ensure(c.ctx, r); err != nil && !errors.Is(err, subst.ErrNoSubstitute) {
			return fmt.Errorf("fetching reference %s: %w", c.full(r), err)
		}
	}
	return nil
}

func (c *conn) addToStoreNar() error {
	pw, bad := readPathInfo(&c.r, c.parsePath)
	if pw == nil {
		return bad
	}
	dontCheckSigs, err := c.readAddFlags()
	if err != nil {
		return err
	}
	pi := pw.info
	pi.Ultimate = pw.ultimateRaw && c.trusted
	if bad == nil {
		bad = c.checkAdd(&pi, pw.hasNarHash, dontCheckSigs)
	}
	if bad == nil {
		bad = c.addTemp(pi.Name)
	}
	u := c.openUpload()
	if bad != nil {
		return c.failUpload(u, bad)
	}
	b := c.s.Store.NewBatch(c.ctx)
	defer b.Abort()
	// The NAR must be exactly narSize bytes: read at most that many, and
	// check nothing follows.
	lr := &io.LimitedReader{R: u, N: pi.NarSize}
	added, err := c.ingestOne(b, bufio.NewReaderSize(lr, 64<<10), pi)
	if err != nil {
		return c.failUpload(u, err)
	}
	if lr.N != 0 {
		return c.failUpload(u, errorf("NAR of '%s' is shorter than its narSize %d", c.full(pi.Name), pi.NarSize))
	}
	if n, err := u.rest(); err != nil || n != 0 {
		if err == nil {
			err = errorf("NAR of '%s' is longer than its narSize %d", c.full(pi.Name), pi.NarSize)
		}
		return c.failUpload(u, err)
	}
	if added {
		if _, err := b.Commit(); err != nil {
			return c.addErr(err)
		}
	}
	c.last()
	return nil
}

// multiBatchBytes bounds how much NAR data one batch of an
// AddMultipleToStore collects before it is committed: fewer fsyncs and
// transactions for many small paths, and a bounded amount of work lost
// (never acknowledged) if the upload fails.
const multiBatchBytes = 256 << 20

func (c *conn) addMultipleToStore() error {
	dontCheckSigs, err := c.readAddFlags()
	if err != nil {
		return err
	}
	f := &framedReader{w: &c.r}
	// Inside the framed stream, values are encoded as on the wire.
	inner := &wireReader{r: bufio.NewReaderSize(f, 64<<10)}
	var b *store.Batch
	commit := func() error {
		if b == nil {
			return nil
		}
		defer func() { b = nil }()
		_, err := b.Commit()
		return err
	}
	defer func() {
		if b != nil {
			b.Abort()
		}
	}()
	err = func() error {
		count, err := inner.u64()
		if err != nil {
			return err
		}
		for i := uint64(0); i < count; i++ {
			pw, bad := readPathInfo(inner, c.parsePath)
			if pw == nil {
				return bad
			}
			if bad != nil {
				return bad
			}
			pi := pw.info
			pi.Ultimate = false // as nix-daemon: copied paths are never ultimate
			if err := c.checkAdd(&pi, pw.hasNarHash, dontCheckSigs); err != nil {
				return err
			}
			if err := c.addTempWithin(b, pi.Name); err != nil {
				return err
			}
			if b == nil {
				b = c.s.Store.NewBatch(c.ctx)
			}
			lr := &io.LimitedReader{R: inner.r, N: pi.NarSize}
			if _, err := c.ingestOne(b, bufio.NewReaderSize(lr, 64<<10), pi); err != nil {
				return err
			}
			if lr.N != 0 {
				return errorf("NAR of '%s' is shorter than its narSize %d", c.full(pi.Name), pi.NarSize)
			}
			if b.NarBytes >= multiBatchBytes {
				if err := commit(); err != nil {
					return err
				}
			}
		}
		if n, err := io.Copy(io.Discard, inner.r); err != nil || n != 0 {
			if err == nil {
				err = errorf("AddMultipleToStore: %d bytes after the last path", n)
			}
			return err
		}
		return commit()
	}()
	if err != nil {
		return c.failUpload(f, err)
	}
	c.last()
	return nil
}

// spoolTemp creates the temporary file an upload is spooled to; tests swap
// it for /dev/full.
var spoolTemp = os.CreateTemp

// stickyWriter passes writes on until one fails, then keeps that error and
// swallows the rest, so the stream being copied is still read to its end.
type stickyWriter struct {
	w   io.Writer
	err error
}

func (s *stickyWriter) Write(p []byte) (int, error) {
	if s.err == nil {
		_, s.err = s.w.Write(p)
	}
	return len(p), nil
}

// spool copies an op's data to a temporary file in the data directory,
// hashing it on the way, so a content-addressed path's name (which
// depends on the hash) is known before it is ingested.
func (c *conn) spool(r io.Reader, algo string) (*os.File, int64, []byte, error) {
	h, err := store.NewCAHash(algo)
	if err != nil {
		return nil, 0, nil, errorf("%v", err)
	}
	dir := filepath.Join(c.s.Store.Dir(), "tmp")
	if err := os.MkdirAll(dir, 0o700); err != nil {
		return nil, 0, nil, fmt.Errorf("spool: %w", err)
	}
	f, err := spoolTemp(dir, "add-*")
	if err != nil {
		return nil, 0, nil, fmt.Errorf("spool: %w", err)
	}
	os.Remove(f.Name()) // nothing to clean up after a crash
	n, err := io.Copy(io.MultiWriter(f, h), r)
	if err != nil {
		f.Close()
		return nil, 0, nil, err
	}
	if _, err := f.Seek(0, io.SeekStart); err != nil {
		f.Close()
		return nil, 0, nil, fmt.Errorf("spool: %w", err)
	}
	return f, n, h.Sum(nil), nil
}

// addCA adds a content-addressed path from its dump (flat contents, or a
// NAR for CANAR) and returns its path-info.
func (c *conn) addCA(dump io.Reader, method store.CAMethod, algo, name string, refs []string) (*store.PathInfo, error) {
	if err := store.ValidateName(strings.Repeat("0", 32) + "-" + name); err != nil {
		return nil, errorf("invalid name '%s': %v", name, err)
	}
	f, size, sum, err := c.spool(dump, algo)
	if err != nil {
		return nil, err
	}
	defer f.Close()
	ca := store.CA{Method: method, Algo: algo, Hash: sum}
	base, err := ca.Path(c.s.StoreDir, name, refs, false)
	if err != nil {
		return nil, errorf("cannot add '%s': %v", name, err)
	}
	var nr io.Reader = f
	if method != store.CANAR {
		nr = nar.File(f, size, false)
	}
	pi := store.PathInfo{Name: base, References: refs, CA: ca.String()}
	if err := c.addTemp(base); err != nil {
		return nil, err
	}
	b := c.s.Store.NewBatch(c.ctx)
	defer b.Abort()
	added, err := c.ingestOne(b, nr, pi)
	if err != nil {
		return nil, c.addErr(err)
	}
	if added {
		if _, err := b.Commit(); err != nil {
			return nil, c.addErr(err)
		}
	}
	info, err := c.s.Store.Info(c.ctx, base)
	if err != nil {
		return nil, c.storeErr(err)
	}
	return info, nil
}

// readRefs reads the references of an AddToStore/AddTextToStore; all must
// be valid.
func (c *conn) readRefs() ([]string, error) {
	refs, err := c.readPaths()
	if err != nil {
		return refs, err
	}
	for _, r := range refs {
		ok, err := c.s.Store.IsValid(c.ctx, r)
		if err == nil && !ok && c.s.Lazy != nil {
			// Valid to the client, which was told so: fetch it.
			if err = c.addTemp(r); err == nil {
				if err = c.s.Lazy.Ensure(c.ctx, r); err == nil {
					ok = true
				} else if errors.Is(err, subst.ErrNoSubstitute) {
					err = nil
				}
			}
		}
		if err != nil {
			return refs, c.storeErr(err)
		}
		if !ok {
			return refs, errorf("reference '%s' is not valid", c.full(r))
		}
	}
	return refs, nil
}

func (c *conn) addToStore() error {
	if c.minor < 25 {
		return c.addToStoreOld()
	}
	name, err := c.r.str(maxPath)
	if err != nil {
		return err
	}
	camStr, err := c.r.str(maxPath)
	if err != nil {
		return err
	}
	refs, bad := c.readRefs()
	if bad != nil && !isOpError(bad) {
		return bad
	}
	if _, err := c.r.boolean(); err != nil { // repair
		return err
	}
	u := c.openUpload()
	method, algo, err := store.ParseCAMethod(camStr)
	if err != nil && bad == nil {
		bad = errorf("%v", err)
	}
	if bad == nil && method == store.CAFlat && len(refs) > 0 {
		bad = errorf("cannot add '%s': a flat fixed-output path cannot have references", name)
	}
	if bad != nil {
		return c.failUpload(u, bad)
	}
	pi, err := c.addCA(u, method, algo, name, refs)
	if err != nil {
		return c.failUpload(u, err)
	}
	if err := u.finish(); err != nil {
		return err
	}
	c.last()
	c.writePath(pi.Name)
	c.writeUnkeyedInfo(pi)
	return nil
}

// addToStoreOld is AddToStore before protocol 1.25: the data is a NAR
// sent straight on the connection, whatever the hashing method.
func (c *conn) addToStoreOld() error {
	name, err := c.r.str(maxPath)
	if err != nil {
		return err
	}
	fixed, err := c.r.boolean()
	if err != nil {
		return err
	}
	recursive, err := c.r.u64()
	if err != nil {
		return err
	}
	algo, err := c.r.str(maxPath)
	if err != nil {
		return err
	}
	method := store.CAFlat
	if recursive == 1 {
		method = store.CANAR
	}
	if !fixed {
		method, algo = store.CANAR, "sha256"
	}
	// The NAR is parsed to find its end whatever happens next.
	tmp, err := spoolTemp(filepath.Join(c.s.Store.Dir()), ".addold-*")
	if err != nil {
		return fmt.Errorf("spool: %w", err)
	}
	os.Remove(tmp.Name())
	defer tmp.Close()
	// A spool file that cannot be written (a full disk) must not stop the
	// NAR from being read to its end: the connection would be out of step,
	// and the client would see it closed instead of the reason.
	sw := &stickyWriter{w: tmp}
	if _, err := nar.Copy(sw, c.r.r); err != nil {
		if errors.Is(err, nar.ErrInvalid) {
			return fmt.Errorf("%w: AddToStore: %v", errProtocol, err)
		}
		return err
	}
	if sw.err != nil {
		return c.storeErr(fmt.Errorf("cannot add '%s': spool: %w", name, sw.err))
	}
	if recursive > 1 {
		return errorf("unsupported FileIngestionMethod with value of %d", recursive)
	}
	if _, err := tmp.Seek(0, io.SeekStart); err != nil {
		return fmt.Errorf("spool: %w", err)
	}
	var dump io.Reader = tmp
	if method == store.CAFlat {
		// The flat contents are the NAR's one regular file, taken out by
		// the NAR parser as it streams.
		pr, pw := io.Pipe()
		defer pr.Close()
		go func() {
			res, err := nar.Ingest(tmp, fileContents{pw})
			if err == nil && res.Root.Kind != castore.KindFile {
				err = errNotFlat
			}
			if err != nil {
				err = errorf("cannot add '%s': %v", name, err)
			}
			pw.CloseWithError(err)
		}()
		dump = pr
	}
	pi, err := c.addCA(dump, method, algo, name, nil)
	if err != nil {
		return err
	}
	c.last()
	c.writePath(pi.Name)
	return nil
}

// errNotFlat refuses a flat add whose NAR is not a regular file.
var errNotFlat = errors.New("a flat add needs the NAR of a regular file")

// fileContents is the nar.Sink of a flat add's NAR: the root file's
// contents go to w; a directory is refused.
type fileContents struct{ w io.Writer }

func (f fileContents) WriteBlob(r io.Reader, size int64) (digest.Digest, error) {
	_, err := io.CopyN(f.w, r, size)
	return digest.Digest{}, err
}

func (fileContents) PutDirectory(*castore.Directory) (digest.Digest, error) {
	return digest.Digest{}, errNotFlat
}

func (c *conn) addTextToStore() error {
	name, err := c.r.str(maxPath)
	if err != nil {
		return err
	}
	// The text comes before the references, which make its path: it is
	// spooled (in memory only while small), never allocated from the
	// announced length.
	text := &spoolBuf{dir: filepath.Join(c.s.Store.Dir(), "tmp")}
	defer text.Close()
	if _, err := c.r.copyTo(text, maxText); err != nil {
		return fmt.Errorf("AddTextToStore text: %w", err)
	}
	refs, err := c.readRefs()
	if err != nil {
		return err
	}
	tr, err := text.reader()
	if err != nil {
		return err
	}
	pi, err := c.addCA(tr, store.CAText, "sha256", name, refs)
	if err != nil {
		return err
	}
	c.last()
	c.writePath(pi.Name)
	return nil
}

// spoolBuf holds what is written to it in memory up to readStep bytes,
// then in an unlinked temporary file in dir.
type spoolBuf struct {
	dir string
	mem bytes.Buffer
	f   *os.File
}

func (s *spoolBuf) Write(p []byte) (int, error) {
	if s.f == nil && s.mem.Len()+len(p) <= readStep {
		return s.mem.Write(p)
	}
	if s.f == nil {
		if err := os.MkdirAll(s.dir, 0o700); err != nil {
			return 0, fmt.Errorf("spool: %w", err)
		}
		f, err := os.CreateTemp(s.dir, "text-*")
		if err != nil {
			return 0, fmt.Errorf("spool: %w", err)
		}
		os.Remove(f.Name()) // nothing to clean up after a crash
		s.f = f
		if _, err := s.mem.WriteTo(f); err != nil {
			return 0, fmt.Errorf("spool: %w", err)
		}
	}
	n, err := s.f.Write(p)
	if err != nil {
		err = fmt.Errorf("spool: %w", err)
	}
	return n, err
}

// reader reads back what was written.
func (s *spoolBuf) reader() (io.Reader, error) {
	if s.f == nil {
		return &s.mem, nil
	}
	if _, err := s.f.Seek(0, io.SeekStart); err != nil {
		return nil, fmt.Errorf("spool: %w", err)
	}
	return s.f, nil
}

func (s *spoolBuf) Close() error {
	if s.f == nil {
		return nil
	}
	return s.f.Close()
}
