// Package pack is the byte layout of casnix pack files, and nothing else:
// which pack is open, fsync, the index and GC live in package blobs.
//
// A pack file is a header followed by frame records, appended and never
// rewritten in place:
//
//	header:  "CASNIXPK" | u32 version (1) | u32 zero           (16 bytes)
//	record:  u32 magic "FRM1" | u32 nchunks | u32 clen | u32 rawlen |
//	         nchunks × (32-byte BLAKE3 chunk digest | u32 chunk length) |
//	         u32 CRC-32C of everything above in this record |
//	         clen bytes: one zstd frame whose content is the chunks, in order
//
// All integers are little-endian. Each record names the chunks it holds, so a
// pack can be listed, verified and re-indexed from its bytes alone.
package pack

import (
	"bytes"
	"encoding/binary"
	"errors"
	"fmt"
	"hash/crc32"
	"io"

	"github.com/casnix/casnix/digest"
)

// Layout constants.
const (
	HeaderSize    = 16
	Version       = 1
	recordFixed   = 16
	entrySize     = digest.Size + 4
	MaxChunks     = 1 << 16 // per frame: bounds what a hostile record can make us allocate
	MaxFrameBytes = 64 << 20
)

var (
	fileMagic  = []byte("CASNIXPK")
	frameMagic = []byte("FRM1")
	castagnoli = crc32.MakeTable(crc32.Castagnoli)
)

// ErrCorrupt is wrapped by every error about malformed pack bytes.
var ErrCorrupt = errors.New("corrupt pack")

// Header returns the 16-byte file header.
func Header() []byte {
	h := make([]byte, HeaderSize)
	copy(h, fileMagic)
	binary.LittleEndian.PutUint32(h[8:], Version)
	return h
}

// CheckHeader validates a file header.
func CheckHeader(h []byte) error {
	if len(h) < HeaderSize || !bytes.Equal(h[:8], fileMagic) {
		return fmt.Errorf("%w: bad file magic", ErrCorrupt)
	}
	if v := binary.LittleEndian.Uint32(h[8:]); v != Version {
		return fmt.Errorf("%w: unsupported pack version %d", ErrCorrupt, v)
	}
	return nil
}

// Entry is one chunk in a frame.
type Entry struct {
	Digest digest.Digest
	Len    uint32
}

// RecordHeader builds the record header for a frame holding entries with
// clen compressed bytes.
func RecordHeader(entries []Entry, clen int) []byte {
	raw := 0
	for _, e := range entries {
		raw += int(e.Len)
	}
	b := make([]byte, 0, recordFixed+len(entries)*entrySize+4)
	b = append(b, frameMagic...)
	b = binary.LittleEndian.AppendUint32(b, uint32(len(entries)))
	b = binary.LittleEndian.AppendUint32(b, uint32(clen))
	b = binary.LittleEndian.AppendUint32(b, uint32(raw))
	for _, e := range entries {
		b = append(b, e.Digest[:]...)
		b = binary.LittleEndian.AppendUint32(b, e.Len)
	}
	return binary.LittleEndian.AppendUint32(b, crc32.Checksum(b, castagnoli))
}

// Record is a parsed record header.
type Record struct {
	Entries []Entry
	CLen    int64
	RawLen  int64
	HdrLen  int64 // bytes before the zstd frame
}

// ReadRecord parses one record header from r. It returns io.EOF at a clean
// end of file and io.ErrUnexpectedEOF for a torn record.
func ReadRecord(r io.Reader) (Record, error) {
	var fixed [recordFixed]byte
	if _, err := io.ReadFull(r, fixed[:]); err != nil {
		return Record{}, err
	}
	if !bytes.Equal(fixed[:4], frameMagic) {
		return Record{}, fmt.Errorf("%w: bad frame magic %q", ErrCorrupt, fixed[:4])
	}
	n := binary.LittleEndian.Uint32(fixed[4:])
	clen := binary.LittleEndian.Uint32(fixed[8:])
	raw := binary.LittleEndian.Uint32(fixed[12:])
	if n == 0 || n > MaxChunks || clen > MaxFrameBytes || raw > MaxFrameBytes {
		return Record{}, fmt.Errorf("%w: implausible frame (%d chunks, %d/%d bytes)", ErrCorrupt, n, clen, raw)
	}
	rest := make([]byte, int(n)*entrySize+4)
	if _, err := io.ReadFull(r, rest); err != nil {
		if errors.Is(err, io.EOF) {
			err = io.ErrUnexpectedEOF
		}
		return Record{}, err
	}
	crc := crc32.Update(crc32.Checksum(fixed[:], castagnoli), castagnoli, rest[:len(rest)-4])
	if crc != binary.LittleEndian.Uint32(rest[len(rest)-4:]) {
		return Record{}, fmt.Errorf("%w: record header checksum mismatch", ErrCorrupt)
	}
	rec := Record{CLen: int64(clen), RawLen: int64(raw), HdrLen: int64(recordFixed + len(rest))}
	var sum int64
	for i := 0; i < int(n); i++ {
		e := rest[i*entrySize:]
		var en Entry
		copy(en.Digest[:], e[:digest.Size])
		en.Len = binary.LittleEndian.Uint32(e[digest.Size:])
		sum += int64(en.Len)
		rec.Entries = append(rec.Entries, en)
	}
	if sum != rec.RawLen {
		return Record{}, fmt.Errorf("%w: chunk lengths sum to %d, frame says %d", ErrCorrupt, sum, rec.RawLen)
	}
	return rec, nil
}
