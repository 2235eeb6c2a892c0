package tests

import (
	"crypto/rand"
	"fmt"
	"io/fs"
	"os"
	"path/filepath"
	"strings"
	"syscall"
	"testing"
	"time"

	"github.com/casnix/casnix/proto"
	"github.com/casnix/casnix/tests/nixtest"
)

// shutdownSuites are the clients of the restart test: the oldest (host Nix 2.8) and the
// newest (Nix 2.34 in the sid root).
var shutdownSuites = []string{"bookworm", "sid"}

// randomClosure adds n paths of a few MiB of random (incompressible) files each to a fresh
// local Nix store, so copying them takes long enough for a signal to land in the middle.
func randomClosure(t *testing.T, n, mib int) (*nixtest.Store, []string) {
	t.Helper()
	s := nixtest.NewStore(t)
	var paths []string
	for i := range n {
		dir := filepath.Join(t.TempDir(), fmt.Sprintf("random-%02d", i))
		if err := os.MkdirAll(dir, 0o755); err != nil {
			t.Fatal(err)
		}
		for j := range mib {
			b := make([]byte, 1<<20)
			rand.Read(b)
			if err := os.WriteFile(filepath.Join(dir, fmt.Sprintf("f%d", j)), b, 0o644); err != nil {
				t.Fatal(err)
			}
		}
		paths = append(paths, s.Add(t, dir))
	}
	return s, paths
}

// waitGone waits until path no longer exists: casnix removes its socket file when it
// stops accepting.
func waitGone(t *testing.T, path string, within time.Duration) {
	t.Helper()
	deadline := time.Now().Add(within)
	for {
		if _, err := os.Lstat(path); os.IsNotExist(err) {
			return
		}
		if time.Now().After(deadline) {
			t.Fatalf("%s still exists %v after SIGTERM: the daemon did not stop accepting", path, within)
		}
		time.Sleep(10 * time.Millisecond)
	}
}

// TestRestartDuringCopy sends SIGTERM to casnix serve while a real `nix copy --to
// unix://SOCKET` is in flight and, as systemd would on a restart, starts a new casnix on
// the same socket and data dir as soon as the old one stops accepting. The copy must
// complete, every path it copied must be valid and byte-identical to the source, and both
// daemons must exit cleanly.
func TestRestartDuringCopy(t *testing.T) {
	nixtest.CasnixBinary(t)
	src, paths := randomClosure(t, 32, 4)
	srcDumps := map[string]nixtest.Digest{}
	for _, p := range paths {
		srcDumps[p] = src.Dump(t, p)
	}
	for _, suite := range shutdownSuites {
		t.Run(suite, func(t *testing.T) {
			c := nixtest.RequireNixClient(t, suite)
			sockDir := t.TempDir()
			sock := filepath.Join(sockDir, "casnix.sock")
			c.Bind(sockDir)
			from := src.Root
			if !c.IsHost() {
				from = copyStoreRoot(t, src.Root, filepath.Join(c.TempDir(t), "src")).Root
			}
			cas := nixtest.NewCasnix(t)
			old := cas.Serve(t, sock, "--shutdown-timeout", "5m")

			copyDone := make(chan *nixtest.Result, 1)
			go func() {
				copyDone <- c.Try(append([]string{"nix", "copy", "--no-check-sigs", "--from", "local?root=" + from, "--to", old.URL()}, paths...)...)
			}()
			// SIGTERM once the copy is under way: some of its data is in packs, and not
			// all (nothing is valid before a batch commits, and a batch takes 256 MiB).
			deadline := time.Now().Add(2 * time.Minute)
			for {
				if packBytes(t, cas.DataDir) >= 8<<20 {
					break
				}
				select {
				case r := <-copyDone:
					t.Fatalf("nix copy ended before a path was valid:\n%s", r)
				default:
				}
				if time.Now().After(deadline) {
					t.Fatal("no path valid 2 minutes into the copy")
				}
				time.Sleep(20 * time.Millisecond)
			}
			if err := syscall.Kill(old.Pid(), syscall.SIGTERM); err != nil {
				t.Fatal(err)
			}
			waitGone(t, sock, 10*time.Second)
			// The restarted daemon, on the same socket and data dir, while the old one drains.
			next := cas.Serve(t, sock)
			if old.Exited() {
				t.Errorf("the old daemon exited while the copy was in flight:\n%s", old.Output())
			}
			if validOn(sock, paths[len(paths)-1]) {
				t.Log("warning: the copy was already committed when the new daemon started")
			}
			var r *nixtest.Result
			select {
			case r = <-copyDone:
			case <-time.After(5 * time.Minute):
				t.Fatal("nix copy did not finish within 5 minutes")
			}
			if !r.OK() {
				t.Fatalf("nix copy across the restart failed:\n%s\nold daemon:\n%s", r, old.Output())
			}
			// The client hung up: the old daemon ends its drain and exits by itself.
			exitBy := time.Now().Add(30 * time.Second)
			for !old.Exited() && time.Now().Before(exitBy) {
				time.Sleep(20 * time.Millisecond)
			}
			if !old.Exited() {
				t.Errorf("the old daemon still runs 30s after the copy ended:\n%s", old.Output())
			}
			if err := old.Stop(time.Minute); err != nil {
				t.Errorf("old daemon: %v\n%s", err, old.Output())
			}
			if !strings.Contains(old.Output(), "stopped accepting") {
				t.Errorf("the old daemon did not drain (no %q in its log):\n%s", "stopped accepting", old.Output())
			}
			if _, err := os.Lstat(sock); err != nil {
				t.Errorf("the old daemon's exit removed the new daemon's socket: %v", err)
			}
			// Every path is valid, read by the new daemon and by the CLI.
			cl, err := proto.Dial(sock)
			if err != nil {
				t.Fatalf("the new daemon: %v", err)
			}
			defer cl.Close()
			for _, p := range paths {
				if ok, err := cl.IsValidPath(p); err != nil || !ok {
					t.Errorf("%s after the copy: valid %v, %v", p, ok, err)
				}
				if dg := cas.Dump(t, p); dg != srcDumps[p] {
					t.Errorf("casnix dump %s: %s, source %s", p, dg, srcDumps[p])
				}
			}
			cas.Run(t, "verify")
			if err := next.Stop(time.Minute); err != nil {
				t.Errorf("new daemon: %v", err)
			}
			checkServeLog(t, next)
		})
	}
}

// packBytes is the size of the pack files of a data dir.
func packBytes(t *testing.T, dataDir string) int64 {
	t.Helper()
	var n int64
	filepath.WalkDir(filepath.Join(dataDir, "packs"), func(_ string, d fs.DirEntry, err error) error {
		if err == nil && !d.IsDir() {
			if fi, err := d.Info(); err == nil {
				n += fi.Size()
			}
		}
		return nil
	})
	return n
}

// TestShutdownStalled checks what ends a drain that a client does not end: the
// --shutdown-timeout, or a second SIGTERM. The daemon exits 0 with a log line saying
// why the connection was closed.
func TestShutdownStalled(t *testing.T) {
	tests := []struct {
		name    string
		timeout string
		second  bool
		log     string
	}{
		{"timeout", "2s", false, "shutdown timeout passed: closing a connection still open"},
		{"second SIGTERM", "1h", true, "second signal: stopping at once"},
	}
	for _, tc := range tests {
		t.Run(tc.name, func(t *testing.T) {
			cas := nixtest.NewCasnix(t)
			sock := filepath.Join(t.TempDir(), "casnix.sock")
			d := cas.Serve(t, sock, "--shutdown-timeout", tc.timeout)
			cl, err := proto.Dial(sock)
			if err != nil {
				t.Fatal(err)
			}
			defer cl.Close()
			if _, err := cl.IsValidPath("/nix/store/00000000000000000000000000000000-none"); err != nil {
				t.Fatal(err)
			}
			start := time.Now()
			syscall.Kill(d.Pid(), syscall.SIGTERM)
			waitGone(t, sock, 10*time.Second)
			time.Sleep(500 * time.Millisecond)
			if d.Exited() {
				t.Fatalf("the daemon exited with a connection open, %v after SIGTERM:\n%s", time.Since(start), d.Output())
			}
			// The open connection is still served.
			if _, err := cl.IsValidPath("/nix/store/00000000000000000000000000000000-none"); err != nil {
				t.Fatalf("the open connection while draining: %v", err)
			}
			if tc.second {
				syscall.Kill(d.Pid(), syscall.SIGTERM)
			}
			deadline := time.Now().Add(30 * time.Second)
			for !d.Exited() {
				if time.Now().After(deadline) {
					t.Fatalf("the daemon still runs 30s after SIGTERM:\n%s", d.Output())
				}
				time.Sleep(20 * time.Millisecond)
			}
			if err := d.Stop(time.Second); err != nil {
				t.Errorf("exit: %v\n%s", err, d.Output())
			}
			if !strings.Contains(d.Output(), tc.log) {
				t.Errorf("no %q in the daemon's log:\n%s", tc.log, d.Output())
			}
			if _, err := cl.IsValidPath("/nix/store/00000000000000000000000000000000-none"); err == nil {
				t.Error("the connection is still served after the daemon exited")
			}
		})
	}
}

// validOn asks the daemon on sock whether p is valid, on a connection of its own.
func validOn(sock, p string) bool {
	cl, err := proto.Dial(sock)
	if err != nil {
		return false
	}
	defer cl.Close()
	ok, err := cl.IsValidPath(p)
	return err == nil && ok
}

// TestConnectionLimitMessage checks that a real Nix client refused for
// --max-connections-per-user prints the reason, and gets in once a slot is free.
func TestConnectionLimitMessage(t *testing.T) {
	for _, suite := range shutdownSuites {
		t.Run(suite, func(t *testing.T) {
			c := nixtest.RequireNixClient(t, suite)
			sockDir := t.TempDir()
			sock := filepath.Join(sockDir, "casnix.sock")
			c.Bind(sockDir)
			cas := nixtest.NewCasnix(t)
			// Nobody is trusted, so root is held to the per-user cap too.
			d := cas.Serve(t, sock, "--max-connections-per-user", "1", "--trusted-users", "nobody")
			// The start-up probe's connection may not be counted gone yet.
			var hold *proto.Client
			for start := time.Now(); ; time.Sleep(50 * time.Millisecond) {
				var err error
				if hold, err = proto.Dial(sock); err == nil {
					break
				} else if time.Since(start) > 10*time.Second {
					t.Fatal(err)
				}
			}
			r := c.Try("nix", "path-info", "--store", d.URL(), "--all")
			if r.OK() || !strings.Contains(string(r.Stderr), "--max-connections-per-user 1") {
				t.Errorf("nix path-info with the user's only slot taken: want a failure naming the limit, got:\n%s", r)
			}
			hold.Close()
			deadline := time.Now().Add(10 * time.Second)
			for {
				r := c.Try("nix", "path-info", "--store", d.URL(), "--all")
				if r.OK() {
					break
				}
				if time.Now().After(deadline) {
					t.Fatalf("nix path-info after the slot was freed:\n%s", r)
				}
				time.Sleep(100 * time.Millisecond)
			}
			checkServeLog(t, d)
		})
	}
}
