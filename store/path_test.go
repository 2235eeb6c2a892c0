package store

import (
	"errors"
	"strings"
	"testing"

	"github.com/nix-community/go-nix/pkg/storepath"
)

func TestValidateName(t *testing.T) {
	const hash = "0123456789abcdfghijklmnpqrsvwxyz" // every nixbase32 character
	for _, tc := range []struct {
		name string
		base string
		ok   bool
	}{
		{"plain", hash + "-hello-2.12.1", true},
		{"every name character", hash + "-aZ09+-._?=", true},
		{"derivation", hash + "-hello.drv", true},
		{"leading dot in the name (go-nix and Nix 2.34 accept it)", hash + "-.hidden", true},
		{"empty name (go-nix accepts it; Nix does not)", hash + "-", true},
		{"211 bytes", hash + "-" + strings.Repeat("a", 211-33), true},
		{"212 bytes", hash + "-" + strings.Repeat("a", 212-33), false},
		{"only a hash", hash, false},
		{"short hash", hash[1:] + "-x", false},
		{"empty", "", false},
		{"e is not nixbase32", "e" + hash[1:] + "-x", false},
		{"o is not nixbase32", hash[:31] + "o-x", false},
		{"u is not nixbase32", "u" + hash[1:] + "-x", false},
		{"t is not nixbase32", "t" + hash[1:] + "-x", false},
		{"upper case hash", "A" + hash[1:] + "-x", false},
		{"slash in the name", hash + "-a/b", false},
		{"trailing slash (go-nix cleans it away)", hash + "-a/", false},
		{"space", hash + "-a b", false},
		{"NUL", hash + "-a\x00", false},
		{"non-ASCII", hash + "-caf\u00e9", false},
		{"dot dot", "..", false},
	} {
		t.Run(tc.name, func(t *testing.T) {
			err := ValidateName(tc.base)
			if (err == nil) != tc.ok {
				t.Fatalf("ValidateName(%q) = %v, want ok=%v", tc.base, err, tc.ok)
			}
			if err != nil && !errors.Is(err, ErrBadPath) {
				t.Fatalf("error %v does not wrap ErrBadPath", err)
			}
		})
	}
}

// FuzzValidateName holds ValidateName to what go-nix's storepath.FromString
// (which it replaced) accepts, for every basename without a slash: with one,
// FromString cleans the joined path first and may accept what is not a
// basename ("<hash>-a/"), which ValidateName refuses.
func FuzzValidateName(f *testing.F) {
	for _, s := range []string{"0123456789abcdfghijklmnpqrsvwxyz-hello", "00000000000000000000000000000000-", "00000000000000000000000000000000", "e0000000000000000000000000000000-x", "00000000000000000000000000000000-a/", "00000000000000000000000000000000-\xff"} {
		f.Add(s)
	}
	f.Fuzz(func(t *testing.T, s string) {
		err := ValidateName(s)
		if strings.Contains(s, "/") {
			if err == nil {
				t.Fatalf("ValidateName(%q) accepted a slash", s)
			}
			return
		}
		_, ref := storepath.FromString(s)
		want := ref == nil && len(s) <= 211
		if (err == nil) != want {
			t.Fatalf("ValidateName(%q) = %v, go-nix FromString: %v", s, err, ref)
		}
	})
}
