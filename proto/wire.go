package proto

import (
	"bufio"
	"encoding/binary"
	"encoding/hex"
	"errors"
	"fmt"
	"io"
	"slices"
)

// Limits on what a client may make the server allocate or read.
const (
	maxString     = 1 << 20 // a single string (SetOptions values are the longest)
	maxPath       = 4096
	maxListLen    = 1 << 24  // items in one list
	maxFrameChunk = 1 << 26  // one chunk of a framed upload
	maxListBytes  = 64 << 20 // memory of one list of strings (paths, signatures)
	// maxText caps AddTextToStore's text, which is spooled to a file, not
	// held in memory.
	maxText = 1 << 30
)

// errProtocol wraps errors in the bytes a client sent; the connection is
// closed after reporting them.
var errProtocol = errors.New("protocol error")

// wireReader reads protocol values.
type wireReader struct {
	r   *bufio.Reader
	buf [8]byte
}

func (w *wireReader) u64() (uint64, error) {
	if _, err := io.ReadFull(w.r, w.buf[:]); err != nil {
		if errors.Is(err, io.EOF) {
			err = io.ErrUnexpectedEOF
		}
		return 0, err
	}
	return binary.LittleEndian.Uint64(w.buf[:]), nil
}

func (w *wireReader) boolean() (bool, error) {
	v, err := w.u64()
	return v != 0, err
}

// readStep is how much a string read from a client may grow its buffer
// before the bytes behind it have arrived: a length announced by the
// client is never allocated up front.
const readStep = 64 << 10

// length reads a string's length and checks it against max.
func (w *wireReader) length(max uint64) (uint64, error) {
	n, err := w.u64()
	if err != nil {
		return 0, err
	}
	if n > max {
		return 0, fmt.Errorf("%w: string of %d bytes exceeds the limit of %d", errProtocol, n, max)
	}
	return n, nil
}

// bytes reads a string of at most max bytes. Its buffer grows by at most
// readStep beyond the bytes received, so memory follows what the client
// sends, not what it announces.
func (w *wireReader) bytes(max uint64) ([]byte, error) {
	n, err := w.length(max)
	if err != nil {
		return nil, err
	}
	b := make([]byte, 0, min(n, readStep))
	for uint64(len(b)) < n {
		step := int(min(n-uint64(len(b)), readStep))
		b = slices.Grow(b, step)
		got, err := io.ReadFull(w.r, b[len(b):len(b)+step])
		b = b[:len(b)+got]
		if err != nil {
			return nil, unexpected(err)
		}
	}
	return b, w.padding(n)
}

// copyTo copies a string of at most max bytes to dst, in bounded steps,
// and returns its length: how big payloads (AddTextToStore's text) are
// spooled instead of held in memory.
func (w *wireReader) copyTo(dst io.Writer, max uint64) (int64, error) {
	n, err := w.length(max)
	if err != nil {
		return 0, err
	}
	got, err := io.CopyN(dst, w.r, int64(n))
	if err != nil {
		return got, unexpected(err)
	}
	return got, w.padding(n)
}

// into reads a string of at most len(p) bytes into p: the reply to
// STDERR_READ, read without a buffer of its own.
func (w *wireReader) into(p []byte) (int, error) {
	n, err := w.length(uint64(len(p)))
	if err != nil {
		return 0, err
	}
	if _, err := io.ReadFull(w.r, p[:n]); err != nil {
		return 0, unexpected(err)
	}
	return int(n), w.padding(n)
}

// skip reads and drops a string of at most max bytes.
func (w *wireReader) skip(max uint64) error {
	_, err := w.copyTo(io.Discard, max)
	return err
}

// padding reads the zeros that pad a string of n bytes to 8.
func (w *wireReader) padding(n uint64) error {
	pad := w.buf[:(8-n%8)%8]
	if _, err := io.ReadFull(w.r, pad); err != nil {
		return unexpected(err)
	}
	for _, c := range pad {
		if c != 0 {
			return fmt.Errorf("%w: non-zero string padding", errProtocol)
		}
	}
	return nil
}

// unexpected makes an end of input in the middle of a value an
// unexpected one.
func unexpected(err error) error {
	if errors.Is(err, io.EOF) {
		return io.ErrUnexpectedEOF
	}
	return err
}

func (w *wireReader) str(max uint64) (string, error) {
	b, err := w.bytes(max)
	return string(b), err
}

// listOverhead is what one list item costs beyond its bytes (a string
// header and its share of the slice), counted against maxListBytes.
const listOverhead = 24

// strings reads a list of strings of at most max bytes each. The count
// is capped by maxListLen, and the memory of the whole list by
// maxListBytes, so a list of many long strings cannot add up.
func (w *wireReader) strings(max uint64) ([]string, error) {
	n, err := w.u64()
	if err != nil {
		return nil, err
	}
	if n > maxListLen {
		return nil, fmt.Errorf("%w: list of %d items exceeds the limit of %d", errProtocol, n, maxListLen)
	}
	// Grow as items arrive: a huge count with no data behind it allocates
	// nothing.
	var out []string
	total := uint64(0)
	for i := uint64(0); i < n; i++ {
		s, err := w.str(min(max, maxListBytes-total))
		if err != nil {
			return nil, err
		}
		total += uint64(len(s)) + listOverhead
		if total > maxListBytes {
			return nil, fmt.Errorf("%w: list of %d items exceeds the limit of %d bytes", errProtocol, n, maxListBytes)
		}
		out = append(out, s)
	}
	return out, nil
}

// wireWriter writes protocol values; errors stick in the bufio.Writer and
// surface at Flush.
type wireWriter struct {
	w   *bufio.Writer
	buf [8]byte
}

var zeros [8]byte

func (w *wireWriter) u64(v uint64) {
	binary.LittleEndian.PutUint64(w.buf[:], v)
	w.w.Write(w.buf[:])
}

func (w *wireWriter) boolean(v bool) {
	if v {
		w.u64(1)
	} else {
		w.u64(0)
	}
}

func (w *wireWriter) str(s string) {
	w.u64(uint64(len(s)))
	w.w.WriteString(s)
	w.pad(len(s))
}

// pad writes the zeros that bring a string of n bytes to a multiple of 8.
func (w *wireWriter) pad(n int) { w.w.Write(zeros[:(8-n%8)%8]) }

// storePath writes dir + "/" + name as one string without building it:
// replies name every path they hold, and the concatenation was 5% of
// serve's CPU answering QueryPathInfo. An empty name (no deriver) is the
// empty string.
func (w *wireWriter) storePath(dir, name string) {
	if name == "" {
		w.str("")
		return
	}
	n := len(dir) + 1 + len(name)
	w.u64(uint64(n))
	w.w.WriteString(dir)
	w.w.WriteByte('/')
	w.w.WriteString(name)
	w.pad(n)
}

// storePaths writes names as a list of full store paths (storePath).
func (w *wireWriter) storePaths(dir string, names []string) {
	w.u64(uint64(len(names)))
	for _, n := range names {
		w.storePath(dir, n)
	}
}

// hexStr writes b hex-encoded as a string, without allocating one.
func (w *wireWriter) hexStr(b []byte) {
	var buf [128]byte
	if len(b) > len(buf)/2 {
		w.str(hex.EncodeToString(b))
		return
	}
	e := hex.AppendEncode(buf[:0], b)
	w.u64(uint64(len(e)))
	w.w.Write(e)
	w.pad(len(e))
}

func (w *wireWriter) strings(ss []string) {
	w.u64(uint64(len(ss)))
	for _, s := range ss {
		w.str(s)
	}
}

func (w *wireWriter) flush() error { return w.w.Flush() }

// framedReader reads a framed upload: u64 length, bytes, ..., u64 0.
type framedReader struct {
	w    *wireReader
	left uint64
	eof  bool
	err  error
}

func (f *framedReader) Read(p []byte) (int, error) {
	if f.err != nil {
		return 0, f.err
	}
	for f.left == 0 {
		if f.eof {
			return 0, io.EOF
		}
		n, err := f.w.u64()
		if err != nil {
			f.err = err
			return 0, err
		}
		if n == 0 {
			f.eof = true
			return 0, io.EOF
		}
		if n > maxFrameChunk {
			f.err = fmt.Errorf("%w: framed chunk of %d bytes exceeds %d", errProtocol, n, maxFrameChunk)
			return 0, f.err
		}
		f.left = n
	}
	if uint64(len(p)) > f.left {
		p = p[:f.left]
	}
	n, err := f.w.r.Read(p)
	f.left -= uint64(n)
	if err != nil {
		if errors.Is(err, io.EOF) {
			err = io.ErrUnexpectedEOF
		}
		f.err = err
	}
	return n, err
}

// drain reads to the end of the upload, so the connection stays in step
// after an op refuses its data.
func (f *framedReader) drain() error {
	_, err := io.Copy(io.Discard, f)
	return err
}
