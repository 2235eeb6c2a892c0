package db

import (
	"bytes"
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
