package store

import (
	"errors"
	"fmt"
	"strings"

	"github.com/nix-community/go-nix/pkg/storepath"
)

// DefaultStoreDir is Nix's default store directory.
const DefaultStoreDir = "/nix/store"

// ErrBadPath is wrapped by errors about malformed store paths.
var ErrBadPath = errors.New("invalid store path")

// ValidateName checks a store path basename "<32 nixbase32 chars>-<name>".
func ValidateName(base string) error {
	if len(base) > 211 {
		return fmt.Errorf("%w: %q is longer than 211 bytes", ErrBadPath, base)
	}
	if _, err := storepath.FromString(base); err != nil {
		return fmt.Errorf("%w: %q: %v", ErrBadPath, base, err)
	}
	return nil
}

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
