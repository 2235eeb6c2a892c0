package cli

import (
	"bytes"
	"encoding/json"
	"os"
	"path/filepath"
	"slices"
	"strings"
	"testing"

	narpkg "github.com/casnix/casnix/nar"
	"github.com/casnix/casnix/store"
)

// TestRepairCommand damages the one pack holding path a's file, which b
// refers to and c does not: repair --dry-run names a and b and changes
// nothing, repair drops them and prints them to import again (human and
// JSON), verify is then clean, and a second repair drops nothing.
func TestRepairCommand(t *testing.T) {
	const (
		a = "00000000000000000000000000000000-a"
		b = "11111111111111111111111111111111-b"
		c = "22222222222222222222222222222222-c"
	)
	dir := t.TempDir()
	st, err := store.Open(t.Context(), dir, store.Options{})
	if err != nil {
		t.Fatal(err)
	}
	var packA string
	for _, p := range []struct {
		name, contents string
		refs           []string
	}{{a, "hello, a", nil}, {b, "b uses a", []string{a}}, {c, "c alone", nil}} {
		before, _ := filepath.Glob(filepath.Join(dir, store.PackDir, "*", "*.pack"))
		var nar bytes.Buffer
		f := filepath.Join(t.TempDir(), "f")
		os.WriteFile(f, []byte(p.contents), 0o644)
		if _, err := narpkg.DumpPath(&nar, f); err != nil {
			t.Fatal(err)
		}
		bt := st.NewBatch(t.Context())
		if _, err := bt.Add(&nar, store.PathInfo{Name: p.name, References: p.refs}); err != nil {
			t.Fatal(err)
		}
		if _, err := bt.Commit(); err != nil {
			t.Fatal(err)
		}
		if p.name == a {
			after, _ := filepath.Glob(filepath.Join(dir, store.PackDir, "*", "*.pack"))
			if len(before) != 0 || len(after) != 1 {
				t.Fatalf("packs %q", after)
			}
			packA = after[0]
			st.Close()
			// Later paths go to a pack of their own: a is damaged alone.
			if st, err = store.Open(t.Context(), dir, store.Options{}); err != nil {
				t.Fatal(err)
			}
			os.Rename(packA, packA+".aside")
		}
	}
	st.Close()
	os.Rename(packA+".aside", packA)
	fi, err := os.Stat(packA)
	if err != nil {
		t.Fatal(err)
	}
	fh, err := os.OpenFile(packA, os.O_RDWR, 0)
	if err != nil {
		t.Fatal(err)
	}
	fh.WriteAt([]byte{0xff, 0xff}, fi.Size()-6) // inside the zstd frame's data
	fh.Close()

	run := func(cmd interface{ Run(*Globals) error }) (string, string, error) {
		var out, errOut bytes.Buffer
		g := &Globals{DataDir: dir, StoreDir: "/nix/store", Ctx: t.Context(), Stdout: &out, Stderr: &errOut}
		err := cmd.Run(g)
		return out.String(), errOut.String(), err
	}
	want := []string{"/nix/store/" + a, "/nix/store/" + b}
	for _, tc := range []struct {
		name      string
		cmd       interface{ Run(*Globals) error }
		wantErr   bool
		reimport  []string // from --json, or stdout lines
		json      bool
		errSubstr string // in stderr
	}{
		{"verify sees damage", &VerifyCmd{}, true, nil, false, ""},
		{"dry run json", &RepairCmd{DryRun: true, JSON: true}, false, want, true, ""},
		{"still damaged", &VerifyCmd{}, true, nil, false, ""},
		{"repair", &RepairCmd{}, false, want, false, "import or copy them again"},
		{"verify clean", &VerifyCmd{}, false, nil, false, ""},
		{"second repair json", &RepairCmd{JSON: true}, false, []string{}, true, ""},
		{"second repair", &RepairCmd{}, false, nil, false, "no store path dropped"},
	} {
		out, errOut, err := run(tc.cmd)
		if (err != nil) != tc.wantErr {
			t.Fatalf("%s: err %v, want error %v\n%s%s", tc.name, err, tc.wantErr, out, errOut)
		}
		if !strings.Contains(errOut, tc.errSubstr) {
			t.Fatalf("%s: stderr %q lacks %q", tc.name, errOut, tc.errSubstr)
		}
		if _, ok := tc.cmd.(*RepairCmd); !ok {
			continue
		}
		var got []string
		if tc.json {
			var j repairJSON
			if err := json.Unmarshal([]byte(out), &j); err != nil {
				t.Fatalf("%s: %v\n%s", tc.name, err, out)
			}
			got = j.Reimport
			if j.DryRun != tc.cmd.(*RepairCmd).DryRun || len(j.Dropped) != len(j.Reimport) {
				t.Fatalf("%s: %+v", tc.name, j)
			}
		} else if out != "" {
			got = strings.Split(strings.TrimSpace(out), "\n")
		}
		if !slices.Equal(got, tc.reimport) {
			t.Fatalf("%s: paths to import again %q, want %q\n%s", tc.name, got, tc.reimport, errOut)
		}
	}
}
