package store

import (
	"errors"
	"fmt"
	"strings"
)

// DefaultStoreDir is Nix's default store directory.
const DefaultStoreDir = "/nix/store"

// ErrBadPath is wrapped by errors about malformed store paths.
var ErrBadPath = errors.New("invalid store path")

// ValidateName checks a store path basename "<32 nixbase32 chars>-<name>":
// at most 211 bytes, a hash part of nixbase32 characters, and after it only
// the characters Nix allows in names ([a-zA-Z0-9+-._?=]). It accepts what
// go-nix's storepath.FromString accepts (FuzzValidateName holds the two
// to that); it is its own table lookup because every daemon request checks
// the paths it names, and FromString (path.Join, then a search of the
// alphabet per character, twice) was 15% of serve's CPU answering
// QueryPathInfo (bench/daemon.sh).
func ValidateName(base string) error {
	switch {
	case len(base) > 211:
		return fmt.Errorf("%w: %q is longer than 211 bytes", ErrBadPath, base)
	case len(base) < hashLen+1:
		return fmt.Errorf("%w: %q is shorter than a hash part and a dash", ErrBadPath, base)
	}
	for i := 0; i < len(base); i++ {
		want := nameChar
		if i < hashLen {
			want = hashChar
		}
		if pathChars[base[i]]&want == 0 {
			what := "name"
			if i < hashLen {
				what = "nixbase32 hash part"
			}
			return fmt.Errorf("%w: %q: character %q is not allowed in a store path's %s", ErrBadPath, base, base[i], what)
		}
	}
	return nil
}

// hashLen is the length of a store path's hash part: 160 bits in nixbase32.
const hashLen = 32

// pathChars classifies bytes for ValidateName: hashChar for nixbase32
// (digits and lower-case letters but e, o, u and t), nameChar for what Nix
// allows in a name (letters, digits and +-._?=).
var pathChars = func() (t [256]uint8) {
	for c := range 256 {
		b := byte(c)
		alnum := b >= '0' && b <= '9' || b >= 'a' && b <= 'z' || b >= 'A' && b <= 'Z'
		if alnum || strings.IndexByte("+-._?=", b) >= 0 {
			t[c] |= nameChar
		}
		if (b >= '0' && b <= '9' || b >= 'a' && b <= 'z') && strings.IndexByte("eout", b) < 0 {
			t[c] |= hashChar
		}
	}
	return t
}()

const (
	hashChar uint8 = 1 << iota
	nameChar
)

// Split parses a user-supplied path: a full store path optionally followed
// by a path inside it ("/nix/store/<base>/bin/sh"), or a bare basename. It
// returns the basename and the inner path without leading slash.
func Split(storeDir, p string) (base, sub string, err error) {
	rest := p
	if strings.HasPrefix(p, "/") {
		prefix := strings.TrimSuffix(storeDir, "/") + "/"
		if !strings.HasPrefix(p, prefix) {
			return "", "", fmt.Errorf("%w: %q is not in the store directory %s", ErrBadPath, p, storeDir)
		}
		rest = p[len(prefix):]
	}
	base, sub, _ = strings.Cut(rest, "/")
	if err := ValidateName(base); err != nil {
		return "", "", err
	}
	return base, strings.Trim(sub, "/"), nil
}

// ParseName parses a full store path (or a bare basename) with nothing
// below it, returning the basename.
func ParseName(storeDir, p string) (string, error) {
	base, sub, err := Split(storeDir, p)
	if err != nil {
		return "", err
	}
	if sub != "" {
		return "", fmt.Errorf("%w: %q points inside a store path", ErrBadPath, p)
	}
	return base, nil
}

// HashPart returns the 32-character hash part of a basename.
func HashPart(base string) string {
	h, _, _ := strings.Cut(base, "-")
	return h
}
