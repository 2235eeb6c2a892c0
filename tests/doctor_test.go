package tests

import (
	"database/sql"
	"fmt"
	"os"
	"path/filepath"
	"strings"
	"testing"
	"time"

	_ "modernc.org/sqlite"

	"github.com/casnix/casnix/tests/nixtest"
)

// TestDoctor runs `casnix doctor` on the host against good and broken setups: each broken
// one must exit non-zero with a PROBLEM line naming the check and a fix; the good one (a
// data dir in use, root, /dev/fuse, fusermount, overlayfs, a free socket path) exits 0.
// The container test checks it again inside the image (unwritable volume, no /dev/fuse).
func TestDoctor(t *testing.T) {
	if os.Geteuid() != 0 {
		nixtest.SkipOrFatal(t, "the good setup needs root (/dev/fuse, /run)")
	}
	for _, dev := range []string{"/dev/fuse"} {
		if _, err := os.Stat(dev); err != nil {
			nixtest.SkipOrFatal(t, "%s: %v", dev, err)
		}
	}
	good := nixtest.NewCasnix(t)
	good.Run(t, "info") // creates the data dir and database

	newer := nixtest.NewCasnix(t)
	newer.Run(t, "info")
	setUserVersion(t, filepath.Join(newer.DataDir, "casnix.db"), 999)

	blocker := filepath.Join(t.TempDir(), "a-file")
	if err := os.WriteFile(blocker, nil, 0o644); err != nil {
		t.Fatal(err)
	}
	uncreatable := &nixtest.Casnix{Bin: good.Bin, DataDir: filepath.Join(blocker, "data")}
	sock := filepath.Join(t.TempDir(), "daemon.sock")

	for _, tc := range []struct {
		name    string
		cas     *nixtest.Casnix
		env     []string
		args    []string
		problem string // the check that must fail; "" for none
		fix     string
	}{
		{"good", good, nil, nil, "", ""},
		{"no /dev/fuse", good, []string{"CASNIX_FUSE_DEVICE=" + filepath.Join(t.TempDir(), "fuse")}, nil, "fuse device", "modprobe fuse"},
		{"fuse device not a char device", good, nil, []string{"--fuse-device", blocker}, "fuse device", "mknod"},
		{"no overlay", good, []string{"CASNIX_PROC_FILESYSTEMS=" + blocker}, nil, "overlayfs", "modprobe overlay"},
		{"newer schema", newer, nil, nil, "schema", "upgrade casnix"},
		{"data dir cannot be created", uncreatable, nil, nil, "data dir", "--data-dir"},
		{"not enough space", good, []string{"CASNIX_DOCTOR_MIN_FREE=" + "9223372036854775807"}, nil, "free space", "--min-free"},
		{"socket path is a file", good, nil, []string{"--socket", blocker}, "socket", "not a socket"},
	} {
		t.Run(tc.name, func(t *testing.T) {
			c := tc.cas.Cmd(append([]string{"doctor", "--socket", sock}, tc.args...)...)
			c.Env = append(c.Env, tc.env...)
			r := c.Try()
			out := string(r.Stdout)
			if tc.problem == "" {
				if !r.OK() || strings.Contains(out, "PROBLEM") || !strings.Contains(out, "checks passed") {
					t.Fatalf("doctor on a good setup:\n%s", r)
				}
				return
			}
			if r.OK() || r.ExitCode != 1 {
				t.Errorf("doctor exited %d, want 1", r.ExitCode)
			}
			var line string
			for _, l := range strings.Split(out, "\n") {
				if strings.HasPrefix(l, "PROBLEM") {
					if line != "" {
						t.Errorf("more than one problem: %q and %q", line, l)
					}
					line = l
				}
			}
			if !strings.HasPrefix(line, "PROBLEM  "+tc.problem) || !strings.Contains(out, "fix:") || !strings.Contains(out, tc.fix) {
				t.Errorf("want one PROBLEM %q with a fix mentioning %q:\n%s", tc.problem, tc.fix, r)
			}
		})
	}
}

// TestPing: `casnix ping` answers for a running daemon (and doctor sees it listening), and
// fails clearly when nothing listens.
func TestPing(t *testing.T) {
	cas := nixtest.NewCasnix(t)
	sock := filepath.Join(t.TempDir(), "daemon.sock")
	if r := cas.Try("ping", "--socket", sock); r.OK() || !strings.Contains(string(r.Stderr), "ping "+sock) {
		t.Errorf("ping with no daemon:\n%s", r)
	}
	d := cas.Serve(t, sock)
	r := cas.Run(t, "ping", "--socket", sock)
	if !strings.Contains(string(r.Stdout), "protocol 1.") {
		t.Errorf("ping output: %s", r.Stdout)
	}
	r = cas.Try("doctor", "--socket", sock, "--skip", "fuse,overlay")
	if !r.OK() || !strings.Contains(string(r.Stdout), "a daemon listens") {
		t.Errorf("doctor with a daemon on the socket:\n%s", r)
	}
	if err := d.Stop(10 * time.Second); err != nil {
		t.Fatal(err)
	}
	if r := cas.Try("ping", "--socket", sock, "--timeout", "2s"); r.OK() {
		t.Errorf("ping after the daemon stopped:\n%s", r)
	}
}

// setUserVersion sets the SQLite schema version of the database at path.
func setUserVersion(t *testing.T, path string, v int) {
	t.Helper()
	d, err := sql.Open("sqlite", path)
	if err != nil {
		t.Fatal(err)
	}
	defer d.Close()
	if _, err := d.Exec(fmt.Sprintf("PRAGMA user_version = %d", v)); err != nil {
		t.Fatal(err)
	}
	var got int
	if err := d.QueryRow("PRAGMA user_version").Scan(&got); err != nil || got != v {
		t.Fatalf("user_version = %d, %v; want %d", got, err, v)
	}
}
