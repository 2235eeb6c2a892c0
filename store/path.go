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

// ValidateName checks a store path basename "<32 nixbase32 chars>-<name>"
// as Nix 2.34 does (libstore's StorePath and checkName): a hash part of
// nixbase32 characters, then any one character (Nix does not look at it;
// go-nix, which casnix used before, takes any name character), then a name
// of 1 to 211 of the characters Nix allows ([a-zA-Z0-9+-._?=]) that is not
// "." or ".." and does not start with ".-" or "..-". Nix clients refuse to
// parse any other path, so a store holding one (added by one user) would
// break every other user's `nix path-info --all`; nix-daemon refuses to add
// them. It is a table lookup, not go-nix's storepath.FromString (which
// joined the path, cleaned it and searched the alphabet per character,
// twice: 15% of serve's CPU answering QueryPathInfo, bench/daemon.sh);
// FuzzValidateName holds the two together outside those rules.
func ValidateName(base string) error {
	if len(base) < hashLen+2 {
		return fmt.Errorf("%w: %q is too short for a hash part, a dash and a name", ErrBadPath, base)
	}
	name := base[hashLen+1:]
	if len(name) > maxNameLen {
		return fmt.Errorf("%w: %q: the name is longer than %d bytes", ErrBadPath, base, maxNameLen)
	}
	for i := range hashLen {
		if pathChars[base[i]]&hashChar == 0 {
			return fmt.Errorf("%w: %q: character %q is not allowed in a store path's nixbase32 hash part", ErrBadPath, base, base[i])
		}
	}
	// The character after the hash part is the name's as far as this goes.
	for i := hashLen; i < len(base); i++ {
		if pathChars[base[i]]&nameChar == 0 {
			return fmt.Errorf("%w: %q: character %q is not allowed in a store path's name", ErrBadPath, base, base[i])
		}
	}
	// Nix 2.34's checkName: "." and ".." may not be the name's first
	// dash-separated component.
	if first, _, _ := strings.Cut(name, "-"); first == "." || first == ".." {
		return fmt.Errorf("%w: %q: the name's first dash-separated component must not be %q", ErrBadPath, base, first)
	}
	return nil
}

// maxNameLen is Nix's StorePath::MaxPathLen: the longest name, after the
// hash part and its dash.
const maxNameLen = 211

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
