package cli

import (
	"errors"
	"log/slog"
	"net"
	"os"
	"os/user"
	"path/filepath"
	"strconv"
	"strings"
	"testing"
)

func TestSocketAccess(t *testing.T) {
	g, err := user.LookupGroupId(strconv.Itoa(os.Getgid()))
	if err != nil {
		t.Skipf("no group entry for gid %d: %v", os.Getgid(), err)
	}
	gid, _ := strconv.Atoi(g.Gid)
	tests := []struct {
		name    string
		cmd     ServeCmd
		mode    os.FileMode
		gid     int
		wantErr bool
	}{
		{"everyone", ServeCmd{AllowedUsers: []string{"*"}}, 0o666, -1, false},
		{"names only: checked per connection", ServeCmd{AllowedUsers: []string{"root"}}, 0o666, -1, false},
		{"one group: the file mode enforces it too", ServeCmd{AllowedUsers: []string{"@" + g.Name}}, 0o660, gid, false},
		{"group and names", ServeCmd{AllowedUsers: []string{"@" + g.Name, "root"}}, 0o666, -1, false},
		{"explicit group", ServeCmd{AllowedUsers: []string{"*"}, SocketGroup: g.Name}, 0o660, gid, false},
		{"explicit mode", ServeCmd{AllowedUsers: []string{"@" + g.Name}, SocketMode: "0600"}, 0o600, gid, false},
		{"bad mode", ServeCmd{AllowedUsers: []string{"*"}, SocketMode: "rw-rw----"}, 0, 0, true},
		{"mode out of range", ServeCmd{AllowedUsers: []string{"*"}, SocketMode: "7777"}, 0, 0, true},
		{"unknown group", ServeCmd{AllowedUsers: []string{"*"}, SocketGroup: "no-such-group-casnix"}, 0, 0, true},
	}
	for _, tc := range tests {
		t.Run(tc.name, func(t *testing.T) {
			mode, gid, err := tc.cmd.socketAccess()
			if tc.wantErr {
				if err == nil {
					t.Fatal("accepted")
				}
				return
			}
			if err != nil || mode != tc.mode || gid != tc.gid {
				t.Fatalf("mode %o gid %d err %v; want %o %d", mode, gid, err, tc.mode, tc.gid)
			}
		})
	}
}

// TestUserFuncErrors checks that a bad entry in a user list is reported
// under the flag it came from.
func TestUserFuncErrors(t *testing.T) {
	for _, flag := range []string{"trusted-users", "allowed-users"} {
		for _, entry := range []string{"no-such-user-casnix", "@no-such-group-casnix"} {
			_, err := userFunc(flag, []string{"root", entry})
			if err == nil {
				t.Fatalf("%s %s: accepted", flag, entry)
			}
			other := map[string]string{"trusted-users": "allowed-users", "allowed-users": "trusted-users"}[flag]
			if msg := err.Error(); !strings.HasPrefix(msg, flag+": ") || strings.Contains(msg, other) {
				t.Errorf("%s %s: error %q, want it to name %s only", flag, entry, msg, flag)
			}
		}
	}
}

// TestSocketHandOver checks the socket file's life across a restart on
// the same path: a new daemon can listen as soon as the old one closed its
// listener (which the old one does at once on SIGTERM, while it still
// drains), and the old one's exit leaves the new one's socket in place.
func TestSocketHandOver(t *testing.T) {
	path := filepath.Join(t.TempDir(), "daemon.sock")
	cmd := &ServeCmd{Socket: path, AllowedUsers: []string{"*"}}
	old, err := cmd.listen(t.TempDir())
	if err != nil {
		t.Fatal(err)
	}
	if _, err := cmd.listen(t.TempDir()); err == nil || !strings.Contains(err.Error(), "another daemon") {
		t.Fatalf("second listen while the first answers: err = %v", err)
	}
	old.Close() // the old daemon stops accepting
	if _, err := os.Lstat(path); !errors.Is(err, os.ErrNotExist) {
		t.Fatalf("the old daemon left its socket file: %v", err)
	}
	next, err := cmd.listen(t.TempDir())
	if err != nil {
		t.Fatalf("listen after the old daemon stopped accepting: %v", err)
	}
	defer next.Close()
	old.Close() // again, as the old daemon's exit does
	c, err := net.Dial("unix", path)
	if err != nil {
		t.Fatalf("the new daemon's socket is gone after the old one exited: %v", err)
	}
	c.Close()
	// A socket replaced behind a running daemon's back is not removed.
	os.Remove(path)
	other, err := net.Listen("unix", path)
	if err != nil {
		t.Fatal(err)
	}
	defer other.Close()
	next.Close()
	if _, err := os.Lstat(path); err != nil {
		t.Fatalf("closing removed a socket file it did not create: %v", err)
	}
}

func TestMemoryLimit(t *testing.T) {
	for _, tc := range []struct {
		flag    string
		machine int64
		want    int64
		bad     bool
	}{
		{"auto", 24 << 30, 24 << 30 / 16, false},
		{"AUTO", 1 << 30, autoMemoryMin, false}, // a small machine still gets the minimum
		{"auto", 0, autoMemoryMin, false},       // memory unknown
		{"auto", 1 << 40, autoMemoryMax, false},
		{"256MiB", 24 << 30, 256 << 20, false},
		{"lots", 24 << 30, 0, true},
	} {
		got, err := memoryLimit(tc.flag, tc.machine)
		if (err != nil) != tc.bad || got != tc.want {
			t.Errorf("memoryLimit(%q, %d) = %d, %v; want %d (error %v)", tc.flag, tc.machine, got, err, tc.want, tc.bad)
		}
	}
	if m := machineMemory(); m <= 0 {
		t.Errorf("machineMemory() = %d, want the memory of this machine", m)
	}
}

// TestCheckLazy: --lazy needs substituters and a mount.
func TestCheckLazy(t *testing.T) {
	for _, tc := range []struct {
		name string
		cmd  ServeCmd
		ok   bool
	}{
		{"off", ServeCmd{}, true},
		{"substituters and mount", ServeCmd{Lazy: true, Substituters: []string{"http://c"}, Mount: "/m"}, true},
		{"no substituters", ServeCmd{Lazy: true, Mount: "/m"}, false},
		{"blank substituters", ServeCmd{Lazy: true, Substituters: []string{" "}, Mount: "/m"}, false},
		{"no mount", ServeCmd{Lazy: true, Substituters: []string{"http://c"}}, false},
		{"stdio", ServeCmd{Lazy: true, Substituters: []string{"http://c"}, Mount: "/m", Stdio: true}, false},
	} {
		if err := tc.cmd.checkLazy(); (err == nil) != tc.ok {
			t.Errorf("%s: %v", tc.name, err)
		}
	}
}

// TestServeDurabilityNeedsPrimary: --durability bucket is refused, before anything is
// served, on a read replica and on a data dir whose packs are not in a bucket.
func TestServeDurabilityNeedsPrimary(t *testing.T) {
	tests := []struct {
		name string
		cmd  ServeCmd
		want string
	}{
		{"read replica", ServeCmd{Durability: "bucket", MemoryLimit: "auto", ReplicaOf: "s3://b/p?endpoint=http://127.0.0.1:1"}, "a read replica takes no writes"},
		{"local packs", ServeCmd{Durability: "bucket", MemoryLimit: "auto", MaxSize: "0"}, "needs packs in a bucket"},
	}
	for _, tc := range tests {
		t.Run(tc.name, func(t *testing.T) {
			g := &Globals{DataDir: filepath.Join(t.TempDir(), "d"), StoreDir: "/nix/store", Ctx: t.Context(),
				Logger: slog.New(slog.DiscardHandler)}
			err := tc.cmd.Run(g)
			if err == nil || !strings.Contains(err.Error(), tc.want) {
				t.Fatalf("serve: %v, want an error saying %q", err, tc.want)
			}
		})
	}
}
