package store

import (
	"context"
	"os"
	"os/exec"
	"path/filepath"
	"slices"
	"testing"
)

// TestRuntimeRoots: a collection keeps the store paths a running process
// uses — its executable, working directory, an open file, a path in its
// environment — and deletes the rest; with RuntimeRoots off it keeps none.
func TestRuntimeRoots(t *testing.T) {
	sleep, err := exec.LookPath("sleep")
	if err != nil {
		t.Fatalf("sleep: %v", err)
	}
	const (
		exePath = "55555555555555555555555555555555-exe"
		cwdPath = "66666666666666666666666666666666-cwd"
		fdPath  = "77777777777777777777777777777777-fd"
		envPath = "88888888888888888888888888888888-env"
		deadOne = "99999999999999999999999999999999-dead"
	)
	all := []string{exePath, cwdPath, fdPath, envPath, deadOne}
	// A store dir that exists on disk, so the process can use its paths.
	storeDir := filepath.Join(t.TempDir(), "store")
	st, err := Open(context.Background(), t.TempDir(), Options{StoreDir: storeDir})
	if err != nil {
		t.Fatal(err)
	}
	defer st.Close()
	for _, p := range all {
		if err := add(t, st, p, treeNAR(t, 100)); err != nil {
			t.Fatal(err)
		}
		os.MkdirAll(filepath.Join(storeDir, p), 0o755)
	}
	bin, err := os.ReadFile(sleep)
	if err != nil {
		t.Fatal(err)
	}
	exe := filepath.Join(storeDir, exePath, "sleep")
	if err := os.WriteFile(exe, bin, 0o755); err != nil {
		t.Fatal(err)
	}
	open := filepath.Join(storeDir, fdPath, "file")
	os.WriteFile(open, []byte("x"), 0o644)
	f, err := os.Open(open)
	if err != nil {
		t.Fatal(err)
	}
	cmd := exec.Command(exe, "60")
	cmd.Dir = filepath.Join(storeDir, cwdPath)
	cmd.Env = []string{"CASNIX_TEST=" + filepath.Join(storeDir, envPath) + "/bin:/usr/bin"}
	cmd.ExtraFiles = []*os.File{f}
	if err := cmd.Start(); err != nil {
		t.Fatal(err)
	}
	f.Close()
	defer func() { cmd.Process.Kill(); cmd.Wait() }()

	dry := gc(t, st, GCOptions{Action: GCReturnDead})
	if !slices.Equal(dry.Paths, all) {
		t.Fatalf("without runtime roots, dead = %v, want all", dry.Paths)
	}
	res := gc(t, st, GCOptions{Action: GCDeleteDead, RuntimeRoots: true})
	if !slices.Equal(res.Paths, []string{deadOne}) {
		t.Fatalf("deleted %v, want only %s", res.Paths, deadOne)
	}
	if res.Roots != 4 {
		t.Fatalf("%d roots, want 4", res.Roots)
	}
}

func TestStoreNamesIn(t *testing.T) {
	const a = "00000000000000000000000000000000-a"
	for _, tc := range []struct {
		text string
		want []string
	}{
		{"/nix/store/" + a + "/bin/sh", []string{a}},
		{"PATH=/nix/store/" + a + "/bin:/nix/store/" + a + "-x.drv", []string{a, a + "-x.drv"}},
		{"7f00-7f01 r-xp 0 fd:00 1 /nix/store/" + a + "/lib/libc.so.6 (deleted)", []string{a}},
		{"/nix/store/short", nil},
		{"/nix/storeX/" + a, nil},
		{"/mnt/c/" + a, []string{a}},
	} {
		got := storeNamesIn(tc.text, []string{"/nix/store", "/mnt/c/"})
		if !slices.Equal(got, tc.want) {
			t.Errorf("storeNamesIn(%q) = %v, want %v", tc.text, got, tc.want)
		}
	}
}

func TestCasnixMounts(t *testing.T) {
	dir := t.TempDir()
	os.MkdirAll(filepath.Join(dir, "self"), 0o755)
	os.WriteFile(filepath.Join(dir, "self", "mountinfo"), []byte(
		"22 1 0:21 / /proc rw,nosuid shared:5 - proc proc rw\n"+
			"97 29 0:45 / /var/lib/casnix/mnt rw,nosuid,nodev,relatime shared:52 - fuse.casnix casnix rw,user_id=0,group_id=0\n"+
			"98 29 0:46 / /mnt/with\\040space ro - fuse.casnix casnix ro\n"+
			"99 29 0:47 / /mnt/other rw - fuse.sshfs host: rw\n"), 0o644)
	old := procDir
	procDir = dir
	defer func() { procDir = old }()
	if got, want := casnixMounts(), []string{"/var/lib/casnix/mnt", "/mnt/with space"}; !slices.Equal(got, want) {
		t.Fatalf("casnixMounts = %q, want %q", got, want)
	}
}
