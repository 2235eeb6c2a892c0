package nixtest

import (
	"crypto/sha256"
	"encoding/base64"
	"encoding/hex"
	"fmt"
	"hash"
	"strings"
)

// Digest is the sha256 and length of a byte stream, typically a NAR.
type Digest struct {
	SHA256 [32]byte
	Size   int64
}

// NixHash is the digest in Nix's "sha256:<nixbase32>" form, as narHash is printed.
func (d Digest) NixHash() string { return "sha256:" + NixBase32Encode(d.SHA256[:]) }

func (d Digest) String() string { return fmt.Sprintf("%s (%d bytes)", d.NixHash(), d.Size) }

// DigestWriter hashes and counts what is written to it.
type DigestWriter struct {
	h hash.Hash
	n int64
}

// NewDigestWriter returns an empty DigestWriter.
func NewDigestWriter() *DigestWriter { return &DigestWriter{h: sha256.New()} }

func (w *DigestWriter) Write(p []byte) (int, error) {
	w.h.Write(p)
	w.n += int64(len(p))
	return len(p), nil
}

// Digest is the digest of everything written so far.
func (w *DigestWriter) Digest() Digest {
	var d Digest
	copy(d.SHA256[:], w.h.Sum(nil))
	d.Size = w.n
	return d
}

// NormalizeSHA256 turns a sha256 hash as Nix prints it in any encoding ("sha256:<nixbase32>",
// "sha256:<base16>", SRI "sha256-<base64>", or the bare digest in base16 or nixbase32) into
// "sha256:<nixbase32>", so that hashes from different Nix versions and casnix compare as
// strings.
func NormalizeSHA256(s string) (string, error) {
	raw, err := ParseSHA256(s)
	if err != nil {
		return "", err
	}
	return "sha256:" + NixBase32Encode(raw), nil
}

// ParseSHA256 decodes a sha256 hash in any of the encodings NormalizeSHA256 accepts.
func ParseSHA256(s string) ([]byte, error) {
	var body string
	switch {
	case strings.HasPrefix(s, "sha256:"):
		body = strings.TrimPrefix(s, "sha256:")
	case strings.HasPrefix(s, "sha256-"):
		raw, err := base64.StdEncoding.DecodeString(strings.TrimPrefix(s, "sha256-"))
		if err != nil {
			return nil, fmt.Errorf("hash %q: %w", s, err)
		}
		if len(raw) != sha256.Size {
			return nil, fmt.Errorf("hash %q: %d bytes, want %d", s, len(raw), sha256.Size)
		}
		return raw, nil
	case !strings.Contains(s, ":"):
		body = s
	default:
		return nil, fmt.Errorf("hash %q: not sha256", s)
	}
	switch len(body) {
	case 64:
		return hex.DecodeString(body)
	case 52:
		return NixBase32Decode(body)
	}
	return nil, fmt.Errorf("hash %q: unrecognised encoding", s)
}
