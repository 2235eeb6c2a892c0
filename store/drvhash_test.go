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

// TestRealisationID: the DrvOutput ids of two floating content-addressed
// derivations made by Nix 2.34 (ca-derivations), one the input of the
// other, are the ones Nix gave their realisations (`nix realisation info`
// after building them): the masked hash modulo, with a deferred input
// replaced by its own hash modulo, which go-nix alone gets wrong (it takes
// a floating output for a fixed one).
func TestRealisationID(t *testing.T) {
	ctx := context.Background()
	st := openStore(t)
	b := st.NewBatch(ctx)
	for _, f := range []string{"dy1zbjhxmix6f1r5dlhqzrnw6sss4raz-ca-dep.drv", "b7bysmg52h8j83qavnxxdf6lpfjqgar0-ca-top.drv"} {
		contents, err := os.ReadFile(filepath.Join("testdata", "drv", f))
		if err != nil {
			t.Fatal(err)
		}
		d := loadTestDrv(t, f, contents)
		if _, err := b.Add(bytes.NewReader(drvNAR(t, contents)), PathInfo{Name: f, References: d.refs}); err != nil {
			t.Fatalf("add %s: %v", f, err)
		}
	}
	if _, err := b.Commit(); err != nil {
		t.Fatal(err)
	}
	for _, tc := range []struct{ drv, out, want, err string }{
		{"dy1zbjhxmix6f1r5dlhqzrnw6sss4raz-ca-dep.drv", "out", "sha256:09838ae3962a182f7b98005dc303f064bc3b746a747d5fd07eaa4f0fd960fd38!out", ""},
		{"b7bysmg52h8j83qavnxxdf6lpfjqgar0-ca-top.drv", "out", "sha256:0cf161a1b00aad0ed35781786c0a306b592284cc88e183a568d82f9c48499e3f!out", ""},
		{"b7bysmg52h8j83qavnxxdf6lpfjqgar0-ca-top.drv", "dev", "", "has no output"},
		{"aaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaa-absent.drv", "out", "", "not found"},
	} {
		got, err := st.RealisationID(ctx, tc.drv, tc.out)
		if tc.err != "" {
			if err == nil || !strings.Contains(err.Error(), tc.err) {
				t.Errorf("%s!%s: %q, %v; want an error with %q", tc.drv, tc.out, got, err, tc.err)
			}
			continue
		}
		if err != nil || got != tc.want {
			t.Errorf("%s!%s: %q, %v; want %q", tc.drv, tc.out, got, err, tc.want)
		}
		// The outputs are recorded, with no path (a floating output has none).
		rows, err := st.DrvOutputs(ctx, tc.drv)
		if err != nil || len(rows) != 1 || rows[0].Name != "out" || rows[0].Path != "" {
			t.Errorf("%s: outputs %v, %v", tc.drv, rows, err)
		}
	}
}
