package db

import (
	"bytes"
	"context"
	"path/filepath"
	"testing"
)

// TestRootSum: RootSum covers every field a render depends on, so a row
// with any of them changed is not sealed; the fields it leaves out do not
// unseal it.
func TestRootSum(t *testing.T) {
	base := func() *PathRow {
		return &PathRow{
			Name: "00000000000000000000000000000000-x", Kind: 1, Digest: bytes.Repeat([]byte{1}, 32), Size: 100,
			NarHash: bytes.Repeat([]byte{2}, 32), NarSize: 4096, Registered: 5, Deriver: "d", CA: "",
		}
	}
	sealed := base()
	sealed.RootSum = RootSum(sealed)
	if !sealed.RootSealed() {
		t.Fatal("a row with its own RootSum is not sealed")
	}
	for _, tc := range []struct {
		name   string
		change func(p *PathRow)
		sealed bool
	}{
		{"name", func(p *PathRow) { p.Name = "1" + p.Name[1:] }, false},
		{"kind", func(p *PathRow) { p.Kind = 2 }, false},
		{"digest", func(p *PathRow) { p.Digest[31] ^= 1 }, false},
		{"size", func(p *PathRow) { p.Size++ }, false},
		{"executable", func(p *PathRow) { p.Executable = true }, false},
		{"target", func(p *PathRow) { p.Target = []byte("t") }, false},
		{"target moved into digest", func(p *PathRow) { p.Target, p.Digest = p.Digest[:1], p.Digest[1:] }, false},
		{"NAR hash", func(p *PathRow) { p.NarHash[0] ^= 0x80 }, false},
		{"NAR size", func(p *PathRow) { p.NarSize-- }, false},
		{"root_sum", func(p *PathRow) { p.RootSum[0] ^= 1 }, false},
		{"no root_sum", func(p *PathRow) { p.RootSum = nil }, false},
		{"registration time", func(p *PathRow) { p.Registered++ }, true},
		{"deriver", func(p *PathRow) { p.Deriver = "e" }, true},
	} {
		t.Run(tc.name, func(t *testing.T) {
			p := base()
			p.RootSum = RootSum(p)
			tc.change(p)
			if got := p.RootSealed(); got != tc.sealed {
				t.Errorf("RootSealed = %v, want %v", got, tc.sealed)
			}
		})
	}
}

// TestSealRoot: InsertPath seals what it writes; SealRoot seals a row
// without a root_sum only if the row is still the one whose sum it is
// given, and never writes a sealed row again.
func TestSealRoot(t *testing.T) {
	ctx := context.Background()
	d, err := Open(ctx, filepath.Join(t.TempDir(), "t.db"))
	if err != nil {
		t.Fatal(err)
	}
	defer d.Close()
	const name = "00000000000000000000000000000000-a"
	row := &PathRow{Name: name, Kind: 3, Target: []byte("x"), NarHash: make([]byte, 32), NarSize: 1}
	seal := func(want []byte) bool {
		t.Helper()
		var ok bool
		if err := d.Write(ctx, func(tx *Tx) (err error) {
			ok, err = tx.SealRoot(ctx, name, want)
			return err
		}); err != nil {
			t.Fatal(err)
		}
		return ok
	}
	sealed := func() bool {
		t.Helper()
		p, err := d.Path(ctx, name)
		if err != nil {
			t.Fatal(err)
		}
		return p.RootSealed()
	}
	if err := d.Write(ctx, func(tx *Tx) error { _, err := tx.InsertPath(ctx, row); return err }); err != nil {
		t.Fatal(err)
	}
	if !sealed() || seal(RootSum(row)) {
		t.Fatal("an inserted row is not sealed, or was sealed again")
	}
	// A row from before migration 0008.
	if _, err := d.w.ExecContext(ctx, "UPDATE paths SET root_sum = NULL"); err != nil {
		t.Fatal(err)
	}
	other := *row
	other.Target = []byte("y") // the row some other check saw
	if sealed() || seal(RootSum(&other)) || sealed() {
		t.Fatal("a row was sealed with the sum of another row")
	}
	if !seal(RootSum(row)) || !sealed() {
		t.Fatal("a checked row was not sealed")
	}
}
