package store

import (
	"bytes"
	"errors"
	"fmt"
	"hash"
	"strconv"
)

// A content-addressed path that refers to itself ("fixed:r:sha256:…" with
// itself among its references, as content-addressed derivation outputs
// can) cannot contain its own hash when that hash is computed, so Nix
// hashes its NAR modulo its own hash part (HashModuloSink): every
// occurrence of the hash part is replaced by as many NUL bytes, and after
// the contents the offset of each occurrence is hashed as "|<offset>", so
// that a NAR with its self-references already zeroed does not hash the
// same. Occurrences are found left to right without overlap, across write
// boundaries.

// maxSelfRefs bounds the offsets remembered for one NAR (8 bytes each).
const maxSelfRefs = 1 << 20

// errTooManySelfRefs is returned for a NAR naming itself more than
// maxSelfRefs times.
var errTooManySelfRefs = errors.New("too many self-references")

// moduloHash is an io.Writer computing a hash modulo a self-reference.
type moduloHash struct {
	h       hash.Hash
	modulus []byte
	prev    []byte // the last len(modulus)-1 bytes, not hashed yet
	pos     int64  // stream offset of prev[0]
	matches []int64
	err     error
}

func newModuloHash(h hash.Hash, modulus string) *moduloHash {
	return &moduloHash{h: h, modulus: []byte(modulus)}
}

func (m *moduloHash) Write(p []byte) (int, error) {
	if m.err != nil {
		return 0, m.err
	}
	s := make([]byte, 0, len(m.prev)+len(p))
	s = append(append(s, m.prev...), p...)
	for j := 0; ; {
		k := bytes.Index(s[j:], m.modulus)
		if k < 0 {
			break
		}
		j += k
		if len(m.matches) == maxSelfRefs {
			m.err = errTooManySelfRefs
			return 0, m.err
		}
		m.matches = append(m.matches, m.pos+int64(j))
		clear(s[j : j+len(m.modulus)])
		j += len(m.modulus)
	}
	keep := min(len(s), len(m.modulus)-1)
	consumed := len(s) - keep
	m.h.Write(s[:consumed])
	m.pos += int64(consumed)
	m.prev = append(m.prev[:0], s[consumed:]...)
	return len(p), nil
}

// Sum finishes the hash (the writer cannot be used after).
func (m *moduloHash) Sum() ([]byte, error) {
	if m.err != nil {
		return nil, m.err
	}
	m.h.Write(m.prev)
	m.pos += int64(len(m.prev))
	m.prev = nil
	for _, p := range m.matches {
		m.h.Write([]byte("|" + strconv.FormatInt(p, 10)))
	}
	return m.h.Sum(nil), nil
}

// selfRef reports whether refs (basenames) include name.
func selfRef(name string, refs []string) bool {
	for _, r := range refs {
		if r == name {
			return true
		}
	}
	return false
}

// hashPart is the 32-character hash part of a basename.
func hashPart(name string) (string, error) {
	if len(name) < 33 {
		return "", fmt.Errorf("%q has no hash part", name)
	}
	return name[:32], nil
}
