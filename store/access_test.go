package store

import (
	"bytes"
	"context"
	"testing"
	"time"
)

// TestAccessFlush: reads (Info, NarRender, Root) note access times in
// memory only; one FlushAccess writes them all in one transaction, and
// only substituted paths have a time to move.
func TestAccessFlush(t *testing.T) {
	ctx := context.Background()
	st := openStore(t)
	const subd, local = "00000000000000000000000000000000-subd", "11111111111111111111111111111111-local"
	b := st.NewBatch(WithSubstituted(ctx))
	if _, err := b.Add(bytes.NewReader(treeNAR(t, 1000)), PathInfo{Name: subd}); err != nil {
		t.Fatal(err)
	}
	if _, err := b.Commit(); err != nil {
		t.Fatal(err)
	}
	if err := add(t, st, local, treeNAR(t, 1000)); err != nil {
		t.Fatal(err)
	}
	before, err := st.Substituted(ctx)
	if err != nil {
		t.Fatal(err)
	}
	if len(before) != 1 || before[subd] == 0 {
		t.Fatalf("substituted %v, want only %s", before, subd)
	}
	// Off until enabled: reads note nothing.
	if _, err := st.Info(ctx, subd); err != nil {
		t.Fatal(err)
	}
	if n, err := st.FlushAccess(ctx); err != nil || n != 0 {
		t.Fatalf("flush before EnableAccessTimes wrote %d (%v)", n, err)
	}
	st.EnableAccessTimes()
	time.Sleep(5 * time.Millisecond)
	for _, tc := range []struct {
		name string
		read func(n string) error
	}{
		{"info", func(n string) error { _, err := st.Info(ctx, n); return err }},
		{"render", func(n string) error { _, err := st.NarRender(ctx, n, &bytes.Buffer{}); return err }},
		{"root", func(n string) error { _, err := st.Root(ctx, n); return err }},
	} {
		t.Run(tc.name, func(t *testing.T) {
			flushes := st.AccessFlushes()
			for i := 0; i < 500; i++ {
				for _, n := range []string{subd, local} {
					if err := tc.read(n); err != nil {
						t.Fatal(err)
					}
				}
			}
			if n := st.AccessFlushes() - flushes; n != 0 {
				t.Fatalf("1000 reads made %d write transactions, want none", n)
			}
			if n, err := st.FlushAccess(ctx); err != nil || n != 2 {
				t.Fatalf("flush wrote %d (%v), want the 2 paths read", n, err)
			}
			if n := st.AccessFlushes() - flushes; n != 1 {
				t.Fatalf("flush made %d write transactions, want 1", n)
			}
			if n, err := st.FlushAccess(ctx); err != nil || n != 0 || st.AccessFlushes()-flushes != 1 {
				t.Fatalf("empty flush wrote %d (%v)", n, err)
			}
		})
	}
	after, err := st.Substituted(ctx)
	if err != nil {
		t.Fatal(err)
	}
	if len(after) != 1 || after[subd] <= before[subd] {
		t.Fatalf("access time %v, was %v: reads did not move it", after, before)
	}
}
