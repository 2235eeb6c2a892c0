package store

import (
	"bytes"
	"context"
	"maps"
	"os"
	"path/filepath"
	"strings"
	"testing"

	"github.com/nix-community/go-nix/pkg/derivation"

	"github.com/casnix/casnix/nar"
)

// drvNAR is the NAR of a regular file holding contents.
func drvNAR(t *testing.T, contents []byte) []byte {
	t.Helper()
	p := filepath.Join(t.TempDir(), "f")
	if err := os.WriteFile(p, contents, 0o644); err != nil {
		t.Fatal(err)
	}
	var b bytes.Buffer
	if _, err := nar.DumpPath(&b, p); err != nil {
		t.Fatal(err)
	}
	return b.Bytes()
}

type testDrv struct {
	name     string
	contents []byte
	refs     []string
	outputs  map[string]string // as the file says
}

func loadTestDrv(t *testing.T, name string, contents []byte) testDrv {
	t.Helper()
	drv, err := derivation.ReadDerivation(bytes.NewReader(contents))
	if err != nil {
		t.Fatalf("%s: %v", name, err)
	}
	d := testDrv{name: name, contents: contents, outputs: map[string]string{}}
	for p := range drv.InputDerivations {
		d.refs = append(d.refs, strings.TrimPrefix(p, DefaultStoreDir+"/"))
	}
	for _, p := range drv.InputSources {
		d.refs = append(d.refs, strings.TrimPrefix(p, DefaultStoreDir+"/"))
	}
	for o, v := range drv.Outputs {
		d.outputs[o] = strings.TrimPrefix(v.Path, DefaultStoreDir+"/")
	}
	return d
}

// TestDrvOutputsChecked: real derivations made by Nix (fixed-output,
// input-addressed with an input derivation, multiple outputs, structured
// attributes, non-ASCII) get their outputs recorded, added one per batch
// (inputs read back from the store) or all in one batch; a derivation
// whose outputs claim paths its contents do not give (an existing path, or
// another derivation's output) gets none recorded.
func TestDrvOutputsChecked(t *testing.T) {
	ctx := context.Background()
	// Inputs before the derivations that use them.
	files := []string{
		"0hm2f1psjpcwg8fijsmr4wwxrx59s092-bar.drv",
		"4wvvbi4jwn0prsdxb7vs673qa5h9gr7x-foo.drv",
		"ss2p4wmxijn652haqyd7dckxwl4c7hxx-bar.drv",
		"ch49594n9avinrf8ip0aslidkc4lxkqv-foo.drv",
		"h32dahq0bx5rp1krcdx3a53asj21jvhk-has-multi-out.drv",
		"9lj1lkjm2ag622mh4h9rpy6j607an8g2-structured-attrs.drv",
		"52a9id8hx688hvlnz4d1n25ml1jdykz0-unicode.drv",
		"m1vfixn8iprlf0v9abmlrz7mjw1xj8kp-cp1252.drv",
		"x6p0hg79i3wg0kkv7699935f7rrj9jf3-latin1.drv",
		"292w8yzv5nn7nhdpxcs8b7vby2p27s09-nested-json.drv",
	}
	var real []testDrv
	for _, f := range files {
		b, err := os.ReadFile(filepath.Join("testdata", "drv", f))
		if err != nil {
			t.Fatal(err)
		}
		real = append(real, loadTestDrv(t, f, b))
	}
	foo := real[1]
	// Forged: foo with its output moved to an existing path (pathA), and
	// foo with its output claiming bar's output.
	forge := func(name, to string) testDrv {
		c := strings.ReplaceAll(string(foo.contents), DefaultStoreDir+"/"+foo.outputs["out"], DefaultStoreDir+"/"+to)
		d := loadTestDrv(t, name, []byte(c))
		if d.outputs["out"] != to {
			t.Fatalf("forging %s failed", name)
		}
		return d
	}
	forged := []testDrv{
		forge("aaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaa-foo.drv", pathA),
		forge("bbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbb-foo.drv", real[0].outputs["out"]),
	}
	for _, oneBatch := range []bool{false, true} {
		st := openStore(t)
		if err := add(t, st, pathA, treeNAR(t, 10)); err != nil {
			t.Fatal(err)
		}
		all := append(append([]testDrv(nil), real...), forged...)
		b := st.NewBatch(ctx)
		for _, d := range all {
			if _, err := b.Add(bytes.NewReader(drvNAR(t, d.contents)), PathInfo{Name: d.name, References: d.refs}); err != nil {
				t.Fatalf("add %s: %v", d.name, err)
			}
			if !oneBatch {
				if _, err := b.Commit(); err != nil {
					t.Fatal(err)
				}
				b = st.NewBatch(ctx)
			}
		}
		if _, err := b.Commit(); err != nil {
			t.Fatal(err)
		}
		for _, d := range all {
			rows, err := st.DrvOutputs(ctx, d.name)
			if err != nil {
				t.Fatal(err)
			}
			got := map[string]string{}
			for _, r := range rows {
				got[r.Name] = r.Path
			}
			want := d.outputs
			if strings.HasPrefix(d.name, "aaaa") || strings.HasPrefix(d.name, "bbbb") {
				want = map[string]string{}
			}
			if !maps.Equal(got, want) {
				t.Errorf("one batch %v: %s: outputs %v, want %v", oneBatch, d.name, got, want)
			}
		}
		// The forged derivations are not derivers of what they claim.
		for _, p := range []string{pathA, real[0].outputs["out"]} {
			drvs, err := st.ValidDerivers(ctx, p)
			if err != nil {
				t.Fatal(err)
			}
			for _, d := range drvs {
				if strings.HasPrefix(d, "aaaa") || strings.HasPrefix(d, "bbbb") {
					t.Errorf("one batch %v: forged %s is a valid deriver of %s", oneBatch, d, p)
				}
			}
		}
	}
}
