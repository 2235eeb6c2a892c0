package cli

import (
	"slices"
	"testing"
)

func TestPinNames(t *testing.T) {
	const a, b = "00000000000000000000000000000000-a", "11111111111111111111111111111111-b"
	for _, tc := range []struct {
		name string
		in   []string
		want []string
		bad  bool
	}{
		{"store paths", []string{"/nix/store/" + a, "/nix/store/" + b}, []string{a, b}, false},
		{"basename and a file inside", []string{a, "/nix/store/" + b + "/bin/x"}, []string{a, b}, false},
		{"several in one value (CASNIX_PIN)", []string{"/nix/store/" + a + " " + b}, []string{a, b}, false},
		{"not a store path", []string{"/etc/passwd"}, nil, true},
		{"another store dir", []string{"/gnu/store/" + a}, nil, true},
	} {
		t.Run(tc.name, func(t *testing.T) {
			got, err := pinNames("/nix/store", tc.in)
			if (err != nil) != tc.bad || !slices.Equal(got, tc.want) {
				t.Fatalf("pinNames(%q) = %q, %v; want %q (error %v)", tc.in, got, err, tc.want, tc.bad)
			}
		})
	}
}
