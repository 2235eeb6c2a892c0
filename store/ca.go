package store

import (
	"crypto/md5"
	"crypto/sha1"
	"crypto/sha256"
	"crypto/sha512"
	"encoding/base64"
	"encoding/hex"
	"errors"
	"fmt"
	"hash"
	"slices"
	"strings"

	"github.com/nix-community/go-nix/pkg/nixbase32"
)

// ErrCAMismatch is wrapped when a path's content address does not match its
// contents or its name.
var ErrCAMismatch = errors.New("content address mismatch")

// CAMethod is how a content-addressed path's hash was taken.
type CAMethod int

// The content-address methods Nix knows (git is not supported by casnix).
const (
	CAText CAMethod = iota // "text:": flat file contents, references allowed
	CAFlat                 // "fixed:": flat file contents, no references
	CANAR                  // "fixed:r:": the NAR serialisation
)

// CA is a parsed content address ("text:sha256:…", "fixed:r:sha256:…").
type CA struct {
	Method CAMethod
	Algo   string // md5, sha1, sha256, sha512
	Hash   []byte
}

// NewCAHash returns a hasher for algo.
func NewCAHash(algo string) (hash.Hash, error) {
	switch algo {
	case "md5":
		return md5.New(), nil
	case "sha1":
		return sha1.New(), nil
	case "sha256":
		return sha256.New(), nil
	case "sha512":
		return sha512.New(), nil
	}
	return nil, fmt.Errorf("unknown hash algorithm %q", algo)
}

// ParseCAMethod parses the method-and-algorithm prefix the AddToStore op
// sends ("text:sha256", "fixed:r:sha256", "fixed:sha1", also "r:sha256"
// and "sha256" as newer Nix writes ContentAddressMethod).
func ParseCAMethod(s string) (CAMethod, string, error) {
	m := CAFlat
	rest := s
	switch {
	case strings.HasPrefix(s, "text:"):
		m, rest = CAText, s[len("text:"):]
	case strings.HasPrefix(s, "fixed:r:"):
		m, rest = CANAR, s[len("fixed:r:"):]
	case strings.HasPrefix(s, "fixed:git:"), strings.HasPrefix(s, "git:"):
		return 0, "", fmt.Errorf("content-address method %q: git hashing is not supported by casnix", s)
	case strings.HasPrefix(s, "fixed:"):
		rest = s[len("fixed:"):]
	case strings.HasPrefix(s, "r:"):
		m, rest = CANAR, s[len("r:"):]
	}
	if _, err := NewCAHash(rest); err != nil {
		return 0, "", fmt.Errorf("content-address method %q: %w", s, err)
	}
	if m == CAText && rest != "sha256" {
		return 0, "", fmt.Errorf("content-address method %q: text hashing needs sha256", s)
	}
	return m, rest, nil
}

// ParseCA parses a content address as Nix stores it.
func ParseCA(s string) (CA, error) {
	i := strings.LastIndexByte(s, ':')
	if i < 0 {
		return CA{}, fmt.Errorf("content address %q: no hash", s)
	}
	m, algo, err := ParseCAMethod(s[:i])
	if err != nil {
		return CA{}, err
	}
	h, err := parseHash(algo, s[i+1:])
	if err != nil {
		return CA{}, fmt.Errorf("content address %q: %w", s, err)
	}
	return CA{Method: m, Algo: algo, Hash: h}, nil
}

// parseHash decodes a hash in any encoding Nix accepts: base16, nix32 or
// base64 (told apart by length).
func parseHash(algo, s string) ([]byte, error) {
	h, _ := NewCAHash(algo)
	n := h.Size()
	var b []byte
	var err error
	switch len(s) {
	case 2 * n:
		b, err = hex.DecodeString(s)
	case nixbase32.EncodedLen(n):
		b, err = nixbase32.DecodeString(s)
	case base64.StdEncoding.EncodedLen(n):
		b, err = base64.StdEncoding.DecodeString(s)
	default:
		return nil, fmt.Errorf("hash %q has the wrong length for %s", s, algo)
	}
	if err != nil {
		return nil, fmt.Errorf("hash %q: %w", s, err)
	}
	// The encoded length alone does not fix the decoded one: 44 base64
	// characters without padding are 33 bytes, not sha256's 32.
	if len(b) != n {
		return nil, fmt.Errorf("hash %q decodes to %d bytes, %s has %d", s, len(b), algo, n)
	}
	return b, nil
}

// String renders the content address the way Nix stores it.
func (c CA) String() string {
	prefix := "fixed:"
	switch c.Method {
	case CAText:
		prefix = "text:"
	case CANAR:
		prefix = "fixed:r:"
	}
	return prefix + c.Algo + ":" + nixbase32.EncodeToString(c.Hash)
}

// Path computes the basename of the store path with this content address,
// name and references (basenames; selfRef if the path refers to itself),
// as Nix's makeFixedOutputPathFromCA does.
func (c CA) Path(storeDir, name string, refs []string, selfRef bool) (string, error) {
	switch c.Method {
	case CAText:
		if selfRef {
			return "", errors.New("text paths cannot refer to themselves")
		}
		return makeStorePath(storeDir, makeType(storeDir, "text", refs, false), "sha256", c.Hash, name), nil
	case CANAR:
		if c.Algo == "sha256" {
			return makeStorePath(storeDir, makeType(storeDir, "source", refs, selfRef), "sha256", c.Hash, name), nil
		}
	}
	if len(refs) > 0 || selfRef {
		return "", errors.New("fixed-output paths other than NAR-hashed sha256 cannot have references")
	}
	method := ""
	if c.Method == CANAR {
		method = "r:"
	}
	inner := sha256.Sum256([]byte("fixed:out:" + method + c.Algo + ":" + hex.EncodeToString(c.Hash) + ":"))
	return makeStorePath(storeDir, "output:out", "sha256", inner[:], name), nil
}

// PathOf is Path for the store path base claims to be: its name part, and
// its references (basenames) with base itself among them for a
// self-reference. The result equals base when the claim holds.
func (c CA) PathOf(storeDir, base string, refs []string) (string, error) {
	self := false
	others := make([]string, 0, len(refs))
	for _, r := range refs {
		if r == base {
			self = true
		} else {
			others = append(others, r)
		}
	}
	return c.Path(storeDir, nameOf(base), others, self)
}

func makeType(storeDir, typ string, refs []string, selfRef bool) string {
	sorted := slices.Clone(refs)
	slices.Sort(sorted)
	for _, r := range sorted {
		typ += ":" + storeDir + "/" + r
	}
	if selfRef {
		typ += ":self"
	}
	return typ
}

func makeStorePath(storeDir, typ, algo string, h []byte, name string) string {
	s := typ + ":" + algo + ":" + hex.EncodeToString(h) + ":" + storeDir + ":" + name
	full := sha256.Sum256([]byte(s))
	var short [20]byte
	for i, b := range full {
		short[i%20] ^= b
	}
	return nixbase32.EncodeToString(short[:]) + "-" + name
}

// nameOf is the name part of a basename ("hello-2.12" of "<hash>-hello-2.12").
func nameOf(base string) string {
	if len(base) > 33 {
		return base[33:]
	}
	return ""
}
