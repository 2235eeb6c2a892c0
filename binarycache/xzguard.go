package binarycache

import (
	"bufio"
	"bytes"
	"errors"
	"fmt"
	"io"
)

// maxXzDict is the largest LZMA2 dictionary an xz block of a cache may ask
// for: xz -9's 64 MiB (Nix writes xz at the default preset, 8 MiB).
// ulikunitz/xz allocates the whole dictionary a block header names, even
// past ReaderConfig.DictCap (a minimum, not a cap), so without this a few
// header bytes cost up to 4 GiB per block.
const maxXzDict = 64 << 20

// xzGuard passes an xz file through unchanged, and fails before handing
// on a block header whose LZMA2 dictionary exceeds maxXzDict. It walks
// the container without decoding: stream header, per block its header,
// LZMA2 chunk headers (whose sizes say where the next one is), padding and
// check, then the index, stream footer and stream padding. Anything that
// is not a well-formed xz container is refused too.
type xzGuard struct {
	r     *bufio.Reader
	out   []byte // checked bytes not yet read
	buf   []byte
	state int
	check int   // size of the check field in the current stream
	block int64 // bytes of the current block so far (header and chunks)
	left  int   // payload bytes of the current chunk still to pass on
	// records is how many index records are still to come; index counts
	// the index's bytes so far (for its padding).
	records uint64
	index   int64
	err     error
}

const (
	xzStreamHeader = iota
	xzBlockOrIndex
	xzChunk
	xzPayload
	xzBlockEnd
	xzIndex
	xzIndexRecords
	xzIndexEnd
	xzFooter
	xzStreamPadding
	xzDone
)

var xzMagic = []byte{0xFD, '7', 'z', 'X', 'Z', 0x00}

func newXzGuard(r io.Reader) *xzGuard {
	return &xzGuard{r: bufio.NewReaderSize(r, 64<<10), buf: make([]byte, 0, 64<<10)}
}

func (g *xzGuard) Read(p []byte) (int, error) {
	for len(g.out) == 0 {
		if g.err != nil {
			return 0, g.err
		}
		g.out, g.err = g.step(g.buf[:0])
		if g.err == io.EOF && g.state != xzDone {
			g.err = fmt.Errorf("xz: %w", io.ErrUnexpectedEOF)
		}
	}
	n := copy(p, g.out)
	g.out = g.out[n:]
	return n, nil
}

func xzErr(format string, args ...any) error {
	return fmt.Errorf("xz: "+format, args...)
}

// full appends n bytes of input to b.
func (g *xzGuard) full(b []byte, n int) ([]byte, error) {
	start := len(b)
	b = append(b, make([]byte, n)...)
	_, err := io.ReadFull(g.r, b[start:])
	if err == io.ErrUnexpectedEOF {
		err = io.EOF
	}
	return b, err
}

// varint appends an xz multibyte integer to b and returns its value.
func (g *xzGuard) varint(b []byte) ([]byte, uint64, error) {
	var v uint64
	for i := 0; i < 9; i++ {
		c, err := g.r.ReadByte()
		if err != nil {
			return b, 0, err
		}
		b = append(b, c)
		v |= uint64(c&0x7F) << (7 * i)
		if c&0x80 == 0 {
			if c == 0 && i > 0 {
				return b, 0, xzErr("non-minimal integer")
			}
			return b, v, nil
		}
	}
	return b, 0, xzErr("integer too long")
}

// step reads and checks the next piece of the container, appending it to b.
func (g *xzGuard) step(b []byte) ([]byte, error) {
	switch g.state {
	case xzStreamHeader:
		b, err := g.full(b, 12)
		if err != nil {
			return nil, err
		}
		if !bytes.Equal(b[:6], xzMagic) || b[6] != 0 || b[7]&0xF0 != 0 {
			return nil, xzErr("bad stream header")
		}
		g.check = xzCheckSize(b[7] & 0x0F)
		g.state = xzBlockOrIndex
		return b, nil
	case xzBlockOrIndex:
		c, err := g.r.Peek(1)
		if err != nil {
			return nil, err
		}
		if c[0] == 0 {
			g.state = xzIndex
			return b, nil
		}
		size := (int(c[0]) + 1) * 4
		if b, err = g.full(b, size); err != nil {
			return nil, err
		}
		if err := checkXzBlockHeader(b); err != nil {
			return nil, err
		}
		g.block = int64(size)
		g.state = xzChunk
		return b, nil
	case xzChunk:
		c, err := g.r.ReadByte()
		if err != nil {
			return nil, err
		}
		b = append(b, c)
		g.block++
		switch {
		case c == 0:
			g.state = xzBlockEnd
			return b, nil
		case c == 1 || c == 2: // uncompressed chunk: 2 bytes of size - 1
			if b, err = g.full(b, 2); err != nil {
				return nil, err
			}
			g.left = int(b[1])<<8 | int(b[2]) + 1
		case c >= 0x80: // LZMA chunk: unpacked size, packed size, props when c >= 0xC0
			n := 4
			if c >= 0xC0 {
				n = 5
			}
			if b, err = g.full(b, n); err != nil {
				return nil, err
			}
			g.left = int(b[3])<<8 | int(b[4]) + 1
		default:
			return nil, xzErr("bad LZMA2 chunk control byte %#x", c)
		}
		g.block += int64(len(b) - 1)
		g.state = xzPayload
		return b, nil
	case xzPayload:
		n := min(g.left, cap(b)-len(b))
		b, err := g.full(b, n)
		if err != nil {
			return nil, err
		}
		g.left -= n
		g.block += int64(n)
		if g.left == 0 {
			g.state = xzChunk
		}
		return b, nil
	case xzBlockEnd:
		pad := int((4 - g.block%4) % 4)
		b, err := g.full(b, pad+g.check)
		if err != nil {
			return nil, err
		}
		for _, c := range b[:pad] {
			if c != 0 {
				return nil, xzErr("non-zero block padding")
			}
		}
		g.state = xzBlockOrIndex
		return b, nil
	case xzIndex: // indicator and record count
		c, err := g.r.ReadByte()
		if err != nil {
			return nil, err
		}
		b = append(b, c)
		b, g.records, err = g.varint(b)
		if err != nil {
			return nil, err
		}
		g.index = int64(len(b))
		g.state = xzIndexRecords
		return b, nil
	case xzIndexRecords: // up to a buffer of records (two integers each)
		for ; g.records > 0 && len(b) < cap(b)-32; g.records-- {
			for range 2 {
				var err error
				if b, _, err = g.varint(b); err != nil {
					return nil, err
				}
			}
		}
		g.index += int64(len(b))
		if g.records == 0 {
			g.state = xzIndexEnd
		}
		return b, nil
	case xzIndexEnd: // padding to a multiple of four, CRC32
		pad := int((4 - g.index%4) % 4)
		b, err := g.full(b, pad+4)
		if err != nil {
			return nil, err
		}
		for _, c := range b[:pad] {
			if c != 0 {
				return nil, xzErr("non-zero index padding")
			}
		}
		g.state = xzFooter
		return b, nil
	case xzFooter:
		b, err := g.full(b, 12)
		if err != nil {
			return nil, err
		}
		if b[10] != 'Y' || b[11] != 'Z' || b[8] != 0 || b[9]&0xF0 != 0 {
			return nil, xzErr("bad stream footer")
		}
		g.state = xzStreamPadding
		return b, nil
	case xzStreamPadding:
		c, err := g.r.Peek(4)
		if err == io.EOF && len(c) == 0 {
			g.state = xzDone
			return nil, io.EOF
		}
		if err != nil {
			return nil, xzErr("stream padding: %w", io.ErrUnexpectedEOF)
		}
		if bytes.Equal(c, []byte{0, 0, 0, 0}) {
			return g.full(b, 4)
		}
		g.state = xzStreamHeader
		return b, nil
	}
	return nil, io.EOF
}

func xzCheckSize(id byte) int {
	switch {
	case id == 0:
		return 0
	case id <= 3:
		return 4
	case id <= 6:
		return 8
	case id <= 9:
		return 16
	case id <= 12:
		return 32
	}
	return 64
}

// checkXzBlockHeader parses a block header (h holds all of it) and refuses
// an LZMA2 dictionary over maxXzDict.
func checkXzBlockHeader(h []byte) error {
	flags := h[1]
	if flags&0x3C != 0 {
		return xzErr("reserved block flags set")
	}
	p := 2
	uvarint := func() (uint64, bool) {
		var v uint64
		for i := 0; i < 9 && p < len(h)-4; i++ {
			c := h[p]
			p++
			v |= uint64(c&0x7F) << (7 * i)
			if c&0x80 == 0 {
				return v, true
			}
		}
		return 0, false
	}
	for _, present := range []bool{flags&0x40 != 0, flags&0x80 != 0} {
		if present {
			if _, ok := uvarint(); !ok {
				return xzErr("bad block header")
			}
		}
	}
	filters := int(flags&3) + 1
	for i := range filters {
		id, ok1 := uvarint()
		n, ok2 := uvarint()
		if !ok1 || !ok2 || n > uint64(len(h)-4-p) {
			return xzErr("bad block header")
		}
		props := h[p : p+int(n)]
		p += int(n)
		if i == filters-1 {
			if id != 0x21 || n != 1 {
				return xzErr("last filter %#x is not LZMA2", id)
			}
			d := props[0]
			if d > 40 {
				return xzErr("bad LZMA2 dictionary size %d", d)
			}
			dict := uint64(2|d&1) << (d/2 + 11)
			if d == 40 {
				dict = 1<<32 - 1
			}
			if dict > maxXzDict {
				return fmt.Errorf("xz: %w: LZMA2 dictionary of %d MiB, at most %d MiB allowed", ErrXzDict, dict>>20, maxXzDict>>20)
			}
		}
	}
	return nil
}

// ErrXzDict refuses an xz block asking for a larger dictionary than maxXzDict.
var ErrXzDict = errors.New("xz dictionary too large")
