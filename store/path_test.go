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
		{"leading dot (Nix 2.34 takes it)", hash + "-.hidden", true},
		{"dot dot then more", hash + "-..x", true},
		{"dot then name character", hash + "-.x-1", true},
		{"any separator character (as Nix and go-nix)", hash + "xhello", true},
		{"name of 211 bytes", hash + "-" + strings.Repeat("a", 211), true},
		{"name of 212 bytes", hash + "-" + strings.Repeat("a", 212), false},
		{"empty name", hash + "-", false},
		{"name .", hash + "-.", false},
		{"name ..", hash + "-..", false},
		{"name .-x", hash + "-.-x", false},
		{"name ..-x", hash + "-..-x", false},
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
// (which it replaced) accepts, but for Nix 2.34's own rules, which go-nix
// does not have: a name of 1 to 211 bytes whose first dash-separated
// component is not "." or "..". And a basename with a slash is refused: go-nix cleaned the
// joined path first and so took "<hash>-a/", which is no basename.
func FuzzValidateName(f *testing.F) {
	for _, s := range []string{"0123456789abcdfghijklmnpqrsvwxyz-hello", "00000000000000000000000000000000-", "00000000000000000000000000000000-..",
		"00000000000000000000000000000000-.-x", "00000000000000000000000000000000", "e0000000000000000000000000000000-x",
		"00000000000000000000000000000000-a/", "00000000000000000000000000000000-\xff"} {
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
		want := ref == nil
		if want {
			name := s[33:]
			first, _, _ := strings.Cut(name, "-")
			want = len(name) >= 1 && len(name) <= 211 && first != "." && first != ".."
		}
		if (err == nil) != want {
			t.Fatalf("ValidateName(%q) = %v, want ok=%v (go-nix FromString: %v)", s, err, want, ref)
		}
	})
}
