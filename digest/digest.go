// Package digest defines casnix's content address: a BLAKE3-256 hash, used for
// chunks, blobs (whole file contents) and castore directories alike.
//
// It is its own package so that blobs and castore, which both address content
// this way, agree on one type and one hash implementation without depending on
// each other. The implementation is github.com/zeebo/blake3, chosen by
// BenchmarkBLAKE3 in this package (see bench/RESULTS.md).
package digest

import (
	"encoding/hex"
	"fmt"
	"hash"

	"github.com/zeebo/blake3"
)

// Size is the length of a digest in bytes.
const Size = 32

// Digest is a BLAKE3-256 hash.
type Digest [Size]byte

// Sum returns the digest of b.
func Sum(b []byte) Digest {
	return Digest(blake3.Sum256(b))
}

// New returns a streaming hasher whose Sum(nil) is a 32-byte Digest.
func New() hash.Hash {
	return blake3.New()
}

// FromHash finishes h (made by New) into a Digest.
func FromHash(h hash.Hash) Digest {
	var d Digest
	h.Sum(d[:0])
	return d
}

// FromBytes converts a 32-byte slice into a Digest.
func FromBytes(b []byte) (Digest, error) {
	var d Digest
	if len(b) != Size {
		return d, fmt.Errorf("digest must be %d bytes, got %d", Size, len(b))
	}
	copy(d[:], b)
	return d, nil
}

// Parse parses a hex-encoded digest.
func Parse(s string) (Digest, error) {
	b, err := hex.DecodeString(s)
	if err != nil {
		return Digest{}, fmt.Errorf("parse digest %q: %w", s, err)
	}
	return FromBytes(b)
}

// String returns the lowercase hex encoding.
func (d Digest) String() string { return hex.EncodeToString(d[:]) }

// Empty is the digest of zero bytes: the empty file and the empty directory.
var Empty = Sum(nil)
