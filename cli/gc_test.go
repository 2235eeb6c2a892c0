package cli

import (
	"bytes"
	"errors"
	"log/slog"
	"os"
	"path/filepath"
	"slices"
	"strings"
	"testing"
	"time"

	narpkg "github.com/casnix/casnix/nar"
	"github.com/casnix/casnix/objstore"
	"github.com/casnix/casnix/store"
	"github.com/casnix/casnix/tests/nixtest"
)

func TestParseSize(t *testing.T) {
	tests := []struct {
		in   string
		want int64
		bad  bool
	}{
		{"0", 0, false},
		{"123", 123, false},
		{"1K", 1024, false},
		{"1k", 1024, false},
		{"2M", 2 << 20, false},
		{"2MiB", 2 << 20, false},
		{"3G", 3 << 30, false},
		{"1T", 1 << 40, false},
		{" 5 ", 5, false},
		{"", 0, true},
		{"K", 0, true},
		{"-1", 0, true},
		{"1.5G", 0, true},
		{"1X", 0, true},
		{"99999999999T", 0, true},
	}
	for _, tc := range tests {
		got, err := parseSize(tc.in)
		if tc.bad != (err != nil) || got != tc.want {
			t.Errorf("parseSize(%q) = %d, %v; want %d, error %v", tc.in, got, err, tc.want, tc.bad)
		}
	}
}

func FuzzParseSize(f *testing.F) {
	for _, s := range []string{"0", "1K", "2MiB", "3gb", "-1", "", "1e9", "9223372036854775807", "4T"} {
		f.Add(s)
	}
	f.Fuzz(func(t *testing.T, s string) {
		n, err := parseSize(s)
		if err == nil && (n < 0 || n > 1<<62) {
			t.Fatalf("parseSize(%q) = %d", s, n)
		}
	})
}

func TestKeepList(t *testing.T) {
	st, err := store.Open(t.Context(), t.TempDir(), store.Options{})
	if err != nil {
		t.Fatal(err)
	}
	defer st.Close()
	const a = "00000000000000000000000000000000-a"
	const b = "11111111111111111111111111111111-b"
	file := filepath.Join(t.TempDir(), "keep")
	os.WriteFile(file, []byte("# roots\n/nix/store/"+b+"/bin/x\n\n"+a+"\n"), 0o644)
	got, err := keepList(st, []string{"/nix/store/" + a, file})
	if err != nil {
		t.Fatal(err)
	}
	if want := []string{a, b, a}; !slices.Equal(got, want) {
		t.Fatalf("keepList = %q, want %q", got, want)
	}
	bad := filepath.Join(t.TempDir(), "bad")
	os.WriteFile(bad, []byte("/etc/passwd\n"), 0o644)
	if _, err := keepList(st, []string{bad}); err == nil || !strings.Contains(err.Error(), ":1:") {
		t.Fatalf("bad keep file: %v", err)
	}
	if _, err := keepList(st, []string{"/nix/store/short"}); err == nil {
		t.Fatal("accepted an invalid store path")
	}
}

// TestGCRefusesWithoutRoots: `casnix gc` on a store no root reaches (as
// right after an import) deletes nothing unless --force, and says how many
// roots it found; --dry-run still lists.
func TestGCRefusesWithoutRoots(t *testing.T) {
	dir := t.TempDir()
	st, err := store.Open(t.Context(), dir, store.Options{})
	if err != nil {
		t.Fatal(err)
	}
	const a = "00000000000000000000000000000000-a"
	var nar bytes.Buffer
	f := filepath.Join(t.TempDir(), "f")
	os.WriteFile(f, []byte("hello"), 0o644)
	if _, err := narpkg.DumpPath(&nar, f); err != nil {
		t.Fatal(err)
	}
	b := st.NewBatch(t.Context())
	if _, err := b.Add(&nar, store.PathInfo{Name: a}); err != nil {
		t.Fatal(err)
	}
	if _, err := b.Commit(); err != nil {
		t.Fatal(err)
	}
	st.Close()
	run := func(c GCCmd) (string, error) {
		var out, errOut bytes.Buffer
		g := &Globals{DataDir: dir, StoreDir: "/nix/store", Ctx: t.Context(), Stdout: &out, Stderr: &errOut}
		err := c.Run(g)
		return out.String() + errOut.String(), err
	}
	for _, tc := range []struct {
		name    string
		cmd     GCCmd
		wantErr bool
		want    string
	}{
		{"refused", GCCmd{MinDead: 0.25}, true, ""},
		{"dry run", GCCmd{MinDead: 0.25, DryRun: true}, false, "0 roots"},
		{"still there", GCCmd{MinDead: 0.25, DryRun: true}, false, "/nix/store/" + a},
		{"forced", GCCmd{MinDead: 0.25, Force: true}, false, "deleted 1 paths"},
	} {
		out, err := run(tc.cmd)
		if (err != nil) != tc.wantErr || (err != nil && !errors.Is(err, store.ErrNoRoots)) {
			t.Fatalf("%s: err %v, want error %v\n%s", tc.name, err, tc.wantErr, out)
		}
		if !strings.Contains(out, tc.want) {
			t.Fatalf("%s: output %q lacks %q", tc.name, out, tc.want)
		}
	}
}

// TestGCDeletesDeadPackObjects: `casnix gc` on a data dir whose packs are in a bucket
// that holds no replica of its database keeps the objects of the packs it drops (and
// /metrics counts them waiting) unless --dead-packs-without-replica, which deletes them
// once --dead-pack-margin has passed since the drop.
func TestGCDeletesDeadPackObjects(t *testing.T) {
	srv := nixtest.StartS3(t)
	srv.SetEnv(t)
	url := srv.URL("gc")
	dir := t.TempDir()
	st, err := store.Open(t.Context(), dir, store.Options{Packs: url})
	if err != nil {
		t.Fatal(err)
	}
	const a = "00000000000000000000000000000000-a"
	const b = "11111111111111111111111111111111-b"
	for _, name := range []string{a, b} {
		var nar bytes.Buffer
		f := filepath.Join(t.TempDir(), "f")
		os.WriteFile(f, []byte("contents of "+name), 0o644)
		if _, err := narpkg.DumpPath(&nar, f); err != nil {
			t.Fatal(err)
		}
		bt := st.NewBatch(t.Context())
		if _, err := bt.Add(&nar, store.PathInfo{Name: name}); err != nil {
			t.Fatal(err)
		}
		if _, err := bt.Commit(); err != nil {
			t.Fatal(err)
		}
		// Its own pack, uploaded.
		if err := st.UploadAll(t.Context()); err != nil {
			t.Fatal(err)
		}
	}
	st.Close()
	loc, err := objstore.ParseURL(url)
	if err != nil {
		t.Fatal(err)
	}
	bucket, err := objstore.Open(t.Context(), loc, objstore.Options{})
	if err != nil {
		t.Fatal(err)
	}
	packObjects := func() int {
		n := 0
		if err := bucket.List(t.Context(), "packs/", func(objstore.Info) error { n++; return nil }); err != nil {
			t.Fatal(err)
		}
		return n
	}
	if n := packObjects(); n != 2 {
		t.Fatalf("%d pack objects, want 2", n)
	}
	run := func(c GCCmd) string {
		t.Helper()
		var out, errOut bytes.Buffer
		g := &Globals{DataDir: dir, StoreDir: "/nix/store", Ctx: t.Context(), Stdout: &out, Stderr: &errOut, Logger: slog.New(slog.DiscardHandler)}
		if err := c.Run(g); err != nil {
			t.Fatalf("gc: %v\n%s%s", err, out.String(), errOut.String())
		}
		return out.String() + errOut.String()
	}
	out := run(GCCmd{MinDead: 0.25, Delete: []string{"/nix/store/" + a}, DeadPackMargin: time.Millisecond})
	if want := "0 dropped packs' objects deleted, 1 kept (no database replica in the bucket"; !strings.Contains(out, want) {
		t.Fatalf("output %q lacks %q", out, want)
	}
	if n := packObjects(); n != 2 {
		t.Fatalf("%d pack objects after gc without --dead-packs-without-replica, want 2", n)
	}
	st, err = store.Open(t.Context(), dir, store.Options{})
	if err != nil {
		t.Fatal(err)
	}
	var metrics bytes.Buffer
	packsMetrics(&metrics, st)
	st.Close()
	for _, want := range []string{"\ncasnix_packs_dead_waiting 1\n", "\ncasnix_packs_deleted_from_bucket_total 0\n"} {
		if !strings.Contains(metrics.String(), want) {
			t.Fatalf("metrics lack %q:\n%s", want, metrics.String())
		}
	}
	time.Sleep(2 * time.Second) // past the drop (whole seconds) and the margin
	out = run(GCCmd{MinDead: 0.25, Delete: []string{"/nix/store/" + a}, DeadPackMargin: time.Millisecond, DeadNoReplica: true})
	if want := "1 dropped packs' objects deleted, 0 kept (no database replica in the bucket; margin 1ms)"; !strings.Contains(out, want) {
		t.Fatalf("output %q lacks %q", out, want)
	}
	if n := packObjects(); n != 1 {
		t.Fatalf("%d pack objects after gc --dead-packs-without-replica, want 1", n)
	}
}
