package blobs

import (
	"errors"
	"fmt"
	"io"
)

// Chunking parameters. Changing them (or the gear table) never breaks
// stored data, it only stops new chunks from deduplicating against old ones.
const (
	MinChunk = 16 << 10
	AvgChunk = 48 << 10
	MaxChunk = 256 << 10
)

// gear is FastCDC's table of 256 pseudo-random 64-bit values, made by
// splitmix64 from a fixed seed so boundaries are stable across builds.
var gear = func() (t [256]uint64) {
	x := uint64(0x6361736e69780001) // "casnix" + version 1
	for i := range t {
		x += 0x9e3779b97f4a7c15
		z := x
		z = (z ^ (z >> 30)) * 0xbf58476d1ce4e5b9
		z = (z ^ (z >> 27)) * 0x94d049bb133111eb
		t[i] = z ^ (z >> 31)
	}
	return
}()

// Chunker splits a stream into content-defined chunks with FastCDC
// (Xia et al., 2016) using normalized chunking: a stricter mask before the
// average size and a looser one after it, which narrows the size
// distribution around the average.
type Chunker struct {
	r             io.Reader
	buf           []byte
	start, end    int
	eof           bool
	min, avg, max int
	maskS, maskL  uint64
}

// NewChunker returns a chunker over r with the default sizes.
func NewChunker(r io.Reader) *Chunker {
	c, _ := NewChunkerSizes(r, MinChunk, AvgChunk, MaxChunk)
	return c
}

// NewChunkerSizes returns a chunker with explicit sizes (min < avg < max).
func NewChunkerSizes(r io.Reader, min, avg, max int) (*Chunker, error) {
	if !(0 < min && min < avg && avg < max) {
		return nil, fmt.Errorf("chunker sizes must satisfy 0 < min < avg < max, got %d %d %d", min, avg, max)
	}
	bits := 0
	for 1<<bits < avg {
		bits++
	}
	return &Chunker{
		r: r, buf: make([]byte, 2*max),
		min: min, avg: avg, max: max,
		maskS: spreadMask(bits + 2),
		maskL: spreadMask(bits - 2),
	}, nil
}

// spreadMask returns a mask with n one bits spread over the top of the
// word: gear hashing shifts left, so high bits carry the most history.
func spreadMask(n int) uint64 {
	var m uint64
	for i := 0; i < n; i++ {
		m |= 1 << (63 - i*48/n)
	}
	return m
}

// Reset starts chunking a new stream, keeping the buffer.
func (c *Chunker) Reset(r io.Reader) {
	c.r, c.start, c.end, c.eof = r, 0, 0, false
}

// Next returns the next chunk, valid until the next call, or io.EOF.
func (c *Chunker) Next() ([]byte, error) {
	if c.end-c.start < c.max && !c.eof {
		if err := c.fill(); err != nil {
			return nil, err
		}
	}
	n := c.end - c.start
	if n == 0 {
		return nil, io.EOF
	}
	cut := c.boundary(c.buf[c.start:c.end])
	chunk := c.buf[c.start : c.start+cut]
	c.start += cut
	return chunk, nil
}

func (c *Chunker) fill() error {
	if c.start > 0 {
		c.end = copy(c.buf, c.buf[c.start:c.end])
		c.start = 0
	}
	for c.end < len(c.buf) {
		n, err := c.r.Read(c.buf[c.end:])
		c.end += n
		if errors.Is(err, io.EOF) {
			c.eof = true
			return nil
		}
		if err != nil {
			return err
		}
	}
	return nil
}

// boundary returns the length of the first chunk of b.
func (c *Chunker) boundary(b []byte) int {
	n := len(b)
	if n <= c.min {
		return n
	}
	if n > c.max {
		n = c.max
	}
	normal := c.avg
	if normal > n {
		normal = n
	}
	var fp uint64
	i := c.min
	for ; i < normal; i++ {
		fp = (fp << 1) + gear[b[i]]
		if fp&c.maskS == 0 {
			return i + 1
		}
	}
	for ; i < n; i++ {
		fp = (fp << 1) + gear[b[i]]
		if fp&c.maskL == 0 {
			return i + 1
		}
	}
	return n
}
