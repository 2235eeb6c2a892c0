package store

import (
	"context"
	"errors"
	"slices"
	"testing"
)

// TestRealisationNotReplaced: registering a realisation again with the same
// output path merges signatures; with another output path it is refused and
// the first one stays (Nix's registerDrvOutput).
func TestRealisationNotReplaced(t *testing.T) {
	st := openStore(t)
	ctx := context.Background()
	for _, p := range []string{pathA, pathB} {
		if err := add(t, st, p, treeNAR(t, 10)); err != nil {
			t.Fatal(err)
		}
	}
	const id = "sha256:1f2bb2f1d0e8c7a8cbc0a68c1a2d0b3b0b7ba4c9c51b9e8b1a3c9d4e5f60718a!out"
	steps := []struct {
		name    string
		r       Realisation
		wantErr error
		want    Realisation
	}{
		{"first", Realisation{ID: id, OutPath: pathA, Signatures: []string{"k1:s1"}}, nil,
			Realisation{OutPath: pathA, Signatures: []string{"k1:s1"}}},
		{"same again", Realisation{ID: id, OutPath: pathA, Signatures: []string{"k1:s1"}}, nil,
			Realisation{OutPath: pathA, Signatures: []string{"k1:s1"}}},
		{"more signatures", Realisation{ID: id, OutPath: pathA, Signatures: []string{"k2:s2"}}, nil,
			Realisation{OutPath: pathA, Signatures: []string{"k1:s1", "k2:s2"}}},
		{"other output", Realisation{ID: id, OutPath: pathB, Signatures: []string{"k3:s3"}}, ErrRealisationConflict,
			Realisation{OutPath: pathA, Signatures: []string{"k1:s1", "k2:s2"}}},
	}
	for _, s := range steps {
		err := st.RegisterRealisation(ctx, &s.r)
		if !errors.Is(err, s.wantErr) || (s.wantErr == nil) != (err == nil) {
			t.Fatalf("%s: err %v, want %v", s.name, err, s.wantErr)
		}
		got, err := st.Realisation(ctx, id)
		if err != nil || got == nil {
			t.Fatalf("%s: read back: %v %v", s.name, got, err)
		}
		if got.OutPath != s.want.OutPath || !slices.Equal(got.Signatures, s.want.Signatures) {
			t.Fatalf("%s: stored %+v, want %+v", s.name, got, s.want)
		}
	}
}
