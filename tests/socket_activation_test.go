package tests

import (
	"context"
	"net"
	"os"
	"os/exec"
	"path/filepath"
	"syscall"
	"testing"
	"time"

	"github.com/casnix/casnix/proto"
	"github.com/casnix/casnix/tests/nixtest"
)

// TestSocketActivation runs casnix serve the way systemd's casnix.socket
// does: the listening socket is fd 3 with LISTEN_FDS=1 and LISTEN_PID set
// to the daemon's pid. A client connects before the daemon is even
// started, and on SIGTERM the daemon exits cleanly, leaving the socket
// (systemd's) in place.
func TestSocketActivation(t *testing.T) {
	bin := nixtest.CasnixBinary(t)
	dir := t.TempDir()
	sock := filepath.Join(dir, "daemon.sock")
	ln, err := net.Listen("unix", sock)
	if err != nil {
		t.Fatal(err)
	}
	defer ln.Close()
	f, err := ln.(*net.UnixListener).File()
	if err != nil {
		t.Fatal(err)
	}
	defer f.Close()

	// Connecting works before the daemon runs: the kernel queues it.
	type dialed struct {
		c   *proto.Client
		err error
	}
	early := make(chan dialed, 1)
	go func() {
		c, err := proto.Dial(sock)
		early <- dialed{c, err}
	}()

	ctx, cancel := context.WithTimeout(context.Background(), time.Minute)
	defer cancel()
	// sh's exec keeps its pid, so $$ is the daemon's pid, as systemd sets it.
	cmd := exec.CommandContext(ctx, "sh", "-c", `LISTEN_PID=$$ LISTEN_FDS=1 exec "$0" -d "$1" serve`, bin, filepath.Join(dir, "data"))
	cmd.ExtraFiles = []*os.File{f}
	cmd.Stdout, cmd.Stderr = os.Stderr, os.Stderr
	if err := cmd.Start(); err != nil {
		t.Fatal(err)
	}
	d := <-early
	if d.err != nil {
		t.Fatalf("early client: %v", d.err)
	}
	if ok, err := d.c.IsValidPath("/nix/store/00000000000000000000000000000000-none"); err != nil || ok {
		t.Fatalf("IsValidPath: %v %v", ok, err)
	}
	d.c.Close()
	if err := cmd.Process.Signal(syscall.SIGTERM); err != nil {
		t.Fatal(err)
	}
	if err := cmd.Wait(); err != nil {
		t.Fatalf("daemon exit: %v", err)
	}
	if _, err := os.Stat(sock); err != nil {
		t.Fatalf("the activated socket was removed: %v", err)
	}
}
