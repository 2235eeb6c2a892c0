package store

import (
	"slices"

	"github.com/nix-community/go-nix/pkg/nixbase32"
)

// NixBase32 encodes a hash the way Nix prints it.
func NixBase32(b []byte) string { return nixbase32.EncodeToString(b) }

func sortStrings(s []string) { slices.Sort(s) }

func sortDamaged(d []Damaged) {
	slices.SortFunc(d, func(a, b Damaged) int {
		switch {
		case a.Name < b.Name:
			return -1
		case a.Name > b.Name:
			return 1
		}
		return 0
	})
}
