package proto

import (
	"bufio"
	"encoding/binary"
	"errors"
	"fmt"
	"io"
)

// Limits on what a client may make the server allocate or read.
const (
	maxString     = 1 << 20 // a single string (SetOptions values are the longest)
	maxPath       = 4096
	maxListLen    = 1 << 24 // items in one list
	maxFrameChunk = 1 << 26 // one chunk of a framed upload
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

func (w *wireReader) bytes(max uint64) ([]byte, error) {
	n, err := w.u64()
	if err != nil {
		return nil, err
	}
	if n > max {
		return nil, fmt.Errorf("%w: string of %d bytes exceeds the limit of %d", errProtocol, n, max)
	}
	b := make([]byte, n+(8-n%8)%8)
	if _, err := io.ReadFull(w.r, b); err != nil {
		if errors.Is(err, io.EOF) {
			err = io.ErrUnexpectedEOF
		}
		return nil, err
	}
	for _, c := range b[n:] {
		if c != 0 {
			return nil, fmt.Errorf("%w: non-zero string padding", errProtocol)
		}
	}
	return b[:n], nil
}

func (w *wireReader) str(max uint64) (string, error) {
	b, err := w.bytes(max)
	return string(b), err
}

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
	for i := uint64(0); i < n; i++ {
		s, err := w.str(max)
		if err != nil {
			return nil, err
		}
		out = append(out, s)
	}
	return out, nil
}

// skipPairs reads and drops a list of string pairs (a count, then pairs).
func (w *wireReader) skipPairs(maxA, maxB uint64) error {
	n, err := w.u64()
	if err != nil {
		return err
	}
	if n > maxListLen {
		return fmt.Errorf("%w: list of %d pairs exceeds the limit of %d", errProtocol, n, maxListLen)
	}
	for i := uint64(0); i < n; i++ {
		if _, err := w.str(maxA); err != nil {
			return err
		}
		if _, err := w.str(maxB); err != nil {
			return err
		}
	}
	return nil
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
	w.w.Write(zeros[:(8-len(s)%8)%8])
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
