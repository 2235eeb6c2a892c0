package store

import (
	"bytes"
	"context"
	"testing"
)

// TestSealedRows: a path added now has a root_sum that matches its row
// (NarRender renders it without hashing the NAR), a row without one (from
// before migration 0008) or with a damaged one renders hashed and right,
// verify hashes either way and seals the rows it checked that were not
// sealed.
func TestSealedRows(t *testing.T) {
	const name = "55555555555555555555555555555555-sealed"
	ctx := context.Background()
	for _, tc := range []struct {
		name   string
		sql    string // applied to the path's row
		sealed bool
	}{
		{"as added", "", true},
		{"no root_sum", `UPDATE paths SET root_sum = NULL WHERE name = '` + name + `'`, false},
		{"root_sum damaged", `UPDATE paths SET root_sum = zeroblob(32) WHERE name = '` + name + `'`, false},
		{"root_sum cut short", `UPDATE paths SET root_sum = substr(root_sum, 1, 31) WHERE name = '` + name + `'`, false},
		{"registration time changed (not sealed, not rendered)", `UPDATE paths SET registered = registered + 1 WHERE name = '` + name + `'`, true},
	} {
		t.Run(tc.name, func(t *testing.T) {
			fx := newRepairFixture(t)
			st, err := Open(ctx, fx.dir, repairOptions())
			if err != nil {
				t.Fatal(err)
			}
			want := manyFilesNAR(t, 20, 100, 300<<10, 7)
			if err := add(t, st, name, want); err != nil {
				t.Fatal(err)
			}
			st.Close()
			if tc.sql != "" {
				raw := fx.raw(t)
				if _, err := raw.Exec(tc.sql); err != nil {
					t.Fatal(err)
				}
				raw.Close()
			}
			st, err = Open(ctx, fx.dir, repairOptions())
			if err != nil {
				t.Fatal(err)
			}
			defer st.Close()
			pi, err := st.Info(ctx, name)
			if err != nil {
				t.Fatal(err)
			}
			if pi.sealed != tc.sealed {
				t.Errorf("sealed = %v, want %v", pi.sealed, tc.sealed)
			}
			var got bytes.Buffer
			if _, err := st.NarRender(ctx, name, &got); err != nil || !bytes.Equal(got.Bytes(), want) {
				t.Fatalf("render: %d bytes (want %d), err %v", got.Len(), len(want), err)
			}
			// Verify checks every path hashed, and seals the rows it
			// checked that were not.
			rep, err := st.Verify(ctx, nil)
			if err != nil || !rep.OK() {
				t.Fatalf("verify: %+v, %v", rep, err)
			}
			if want := map[bool]int{true: 0, false: 1}[tc.sealed]; rep.Sealed != want {
				t.Errorf("verify sealed %d rows, want %d", rep.Sealed, want)
			}
			if pi, err = st.Info(ctx, name); err != nil || !pi.sealed {
				t.Fatalf("after verify: sealed %v, err %v", pi != nil && pi.sealed, err)
			}
			got.Reset()
			if _, err := st.NarRender(ctx, name, &got); err != nil || !bytes.Equal(got.Bytes(), want) {
				t.Fatalf("render after verify: %d bytes (want %d), err %v", got.Len(), len(want), err)
			}
		})
	}
}
