package tests

import (
	"context"
	"net"
	"os"
	"os/exec"
	"path/filepath"
	"strings"
	"sync"
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

// TestSocketActivationHandOver restarts a socket-activated casnix the way systemd does,
// with the listening socket kept by the manager: on SIGTERM the old daemon stops calling
// accept at once and drains its open connection, a new daemon is started on the same
// socket meanwhile, and a connection made while the old one drains is accepted by the new
// one. No connection is lost, and both exit cleanly.
func TestSocketActivationHandOver(t *testing.T) {
	bin := nixtest.CasnixBinary(t)
	dir := t.TempDir()
	data := filepath.Join(dir, "data")
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

	ctx, cancel := context.WithTimeout(context.Background(), 2*time.Minute)
	defer cancel()
	start := func(name string) (*exec.Cmd, *syncLog) {
		log := &syncLog{}
		cmd := exec.CommandContext(ctx, "sh", "-c", `LISTEN_PID=$$ LISTEN_FDS=1 exec "$0" -d "$1" serve --shutdown-timeout 1m`, bin, data)
		cmd.ExtraFiles = []*os.File{f}
		cmd.Stdout, cmd.Stderr = log, log
		if err := cmd.Start(); err != nil {
			t.Fatalf("start %s: %v", name, err)
		}
		return cmd, log
	}
	const none = "/nix/store/00000000000000000000000000000000-none"
	old, oldLog := start("old")
	a, err := proto.Dial(sock)
	if err != nil {
		t.Fatal(err)
	}
	defer a.Close()
	if _, err := a.IsValidPath(none); err != nil {
		t.Fatal(err)
	}
	if err := old.Process.Signal(syscall.SIGTERM); err != nil {
		t.Fatal(err)
	}
	for !strings.Contains(oldLog.String(), "stopped accepting") {
		if ctx.Err() != nil {
			t.Fatalf("the old daemon did not stop accepting:\n%s", oldLog)
		}
		time.Sleep(10 * time.Millisecond)
	}
	// A connection made while the old daemon drains and no new one runs yet: the kernel
	// queues it on the shared socket; the old daemon must not take it.
	type dialed struct {
		c   *proto.Client
		err error
	}
	queued := make(chan dialed, 1)
	go func() {
		c, err := proto.Dial(sock)
		queued <- dialed{c, err}
	}()
	select {
	case d := <-queued:
		t.Fatalf("a connection was answered while only the draining daemon ran (err %v)", d.err)
	case <-time.After(500 * time.Millisecond):
	}
	// The draining daemon still serves its open connection.
	if _, err := a.IsValidPath(none); err != nil {
		t.Fatalf("the open connection while draining: %v", err)
	}
	next, nextLog := start("new")
	d := <-queued
	if d.err != nil {
		t.Fatalf("the connection queued during the hand-over: %v\nnew daemon:\n%s", d.err, nextLog)
	}
	if ok, err := d.c.IsValidPath(none); err != nil || ok {
		t.Fatalf("IsValidPath on the new daemon: %v %v", ok, err)
	}
	d.c.Close()
	a.Close()
	if err := old.Wait(); err != nil {
		t.Fatalf("old daemon exit: %v\n%s", err, oldLog)
	}
	next.Process.Signal(syscall.SIGTERM)
	if err := next.Wait(); err != nil {
		t.Fatalf("new daemon exit: %v\n%s", err, nextLog)
	}
	if _, err := os.Stat(sock); err != nil {
		t.Fatalf("the activated socket was removed: %v", err)
	}
}

// syncLog collects a process's output for a test to read while it runs.
type syncLog struct {
	mu sync.Mutex
	b  strings.Builder
}

func (l *syncLog) Write(p []byte) (int, error) {
	l.mu.Lock()
	defer l.mu.Unlock()
	return l.b.Write(p)
}

func (l *syncLog) String() string {
	l.mu.Lock()
	defer l.mu.Unlock()
	return l.b.String()
}
