package nixtest

import (
	"bufio"
	"bytes"
	"context"
	"fmt"
	"net"
	"os"
	"os/exec"
	"slices"
	"strconv"
	"strings"
	"sync"
	"syscall"
	"testing"
	"time"
)

// Daemon is a process serving the Nix worker protocol on a Unix socket in the background:
// `casnix serve` (Casnix.Serve) or a real nix-daemon (StartNixDaemon). It is stopped at the
// end of the test at the latest; the test's failure message then shows its output.
type Daemon struct {
	Name   string // for messages: "casnix serve", "nix-daemon 2.26.3"
	Socket string // host path of the socket

	cmd     *exec.Cmd
	log     syncBuffer
	done    chan struct{}
	err     error // of Wait, valid once done is closed
	cancel  context.CancelFunc
	stop    sync.Once
	stopErr error // Stop's result
}

// URL is the store URL of the daemon for Nix clients: unix://SOCKET.
func (d *Daemon) URL() string { return "unix://" + d.Socket }

// Pid is the daemon's process id (for a daemon in a Root, the process that became it).
func (d *Daemon) Pid() int { return d.cmd.Process.Pid }

// Output is what the daemon wrote to stdout and stderr so far.
func (d *Daemon) Output() string { return d.log.String() }

// Exited reports whether the daemon's process has ended.
func (d *Daemon) Exited() bool {
	select {
	case <-d.done:
		return true
	default:
		return false
	}
}

// Stop sends SIGTERM (unless the process has exited already), waits up to timeout for the
// process to exit, then kills it. It returns the exit error (nil for exit status 0); after
// a kill it says so. Later calls return the first call's result.
func (d *Daemon) Stop(timeout time.Duration) error {
	d.stop.Do(func() {
		if !d.Exited() {
			syscall.Kill(d.Pid(), syscall.SIGTERM)
			select {
			case <-d.done:
			case <-time.After(timeout):
				syscall.Kill(-d.Pid(), syscall.SIGKILL)
				<-d.done
				d.stopErr = fmt.Errorf("%s did not exit within %s of SIGTERM; killed", d.Name, timeout)
			}
		}
		if d.stopErr == nil {
			d.stopErr = d.err
		}
		// Children of the daemon (nix-daemon forks one per connection) go with it.
		syscall.Kill(-d.Pid(), syscall.SIGKILL)
		d.cancel()
	})
	return d.stopErr
}

// RSS returns the daemon's resident set size (VmRSS of /proc/PID/status) in bytes.
func (d *Daemon) RSS() (int64, error) { return d.status("VmRSS") }

// RssAnon and RssFile return the anonymous and the file-backed parts of the daemon's
// RSS (/proc/PID/status) in bytes: a leak grows the first, while pages of mmapped files
// (casnix's SQLite database) count in the second and are the kernel's to reclaim.
func (d *Daemon) RssAnon() (int64, error) { return d.status("RssAnon") }

// RssFile: see RssAnon.
func (d *Daemon) RssFile() (int64, error) { return d.status("RssFile") }

// VmData returns the daemon's committed private data (VmData of /proc/PID/status) in
// bytes: unlike RSS it counts allocations whose pages were never touched, so a daemon
// that allocates what a client merely announces shows it at once.
func (d *Daemon) VmData() (int64, error) { return d.status("VmData") }

// status reads one "Field: N kB" line of /proc/PID/status, in bytes.
func (d *Daemon) status(field string) (int64, error) {
	b, err := os.ReadFile(fmt.Sprintf("/proc/%d/status", d.Pid()))
	if err != nil {
		return 0, err
	}
	sc := bufio.NewScanner(bytes.NewReader(b))
	for sc.Scan() {
		if v, ok := strings.CutPrefix(sc.Text(), field+":"); ok {
			f := strings.Fields(v) // "1234 kB"
			if len(f) != 2 || f[1] != "kB" {
				return 0, fmt.Errorf("%s line %q", field, sc.Text())
			}
			kb, err := strconv.ParseInt(f[0], 10, 64)
			return kb << 10, err
		}
	}
	return 0, fmt.Errorf("no %s in /proc/%d/status", field, d.Pid())
}

// OpenFDs lists what the daemon's open file descriptors point to (the targets of the
// links in /proc/PID/fd: paths, "socket:[INODE]", "pipe:[INODE]", "anon_inode:…"), sorted.
func (d *Daemon) OpenFDs() ([]string, error) {
	dir := fmt.Sprintf("/proc/%d/fd", d.Pid())
	ents, err := os.ReadDir(dir)
	if err != nil {
		return nil, err
	}
	var out []string
	for _, e := range ents {
		if target, err := os.Readlink(dir + "/" + e.Name()); err == nil { // gone meanwhile otherwise
			out = append(out, target)
		}
	}
	slices.Sort(out)
	return out, nil
}

// startDaemon starts c and waits until a connection to socket succeeds; it registers the
// stop at the end of the test. It fails the test when the process exits first.
func startDaemon(t testing.TB, name, socket string, c *Cmd) *Daemon {
	t.Helper()
	d, err := startProcess(t, name, "unix", socket, c)
	if err != nil {
		t.Fatal(err)
	}
	d.Socket = socket
	return d
}

// startTCPDaemon is startDaemon for a TCP address; it returns nil when the process exits
// before it accepts connections (e.g. the port was taken in the meantime).
func startTCPDaemon(t testing.TB, name, addr string, c *Cmd) *Daemon {
	t.Helper()
	d, err := startProcess(t, name, "tcp", addr, c)
	if err != nil {
		t.Log(err)
		return nil
	}
	return d
}

// startProcess starts c (in a process group of its own, see Cmd.Exec) with its output
// collected, and waits until addr accepts a connection; it registers the stop at the end
// of the test.
func startProcess(t testing.TB, name, network, addr string, c *Cmd) (*Daemon, error) {
	t.Helper()
	ctx, cancel := context.WithCancel(context.Background())
	d := &Daemon{Name: name, done: make(chan struct{}), cancel: cancel}
	c.Stdout, c.Stderr = &d.log, &d.log
	d.cmd = c.Exec(ctx)
	if err := d.cmd.Start(); err != nil {
		cancel()
		t.Fatalf("start %s: %v", name, err)
	}
	go func() {
		d.err = d.cmd.Wait()
		close(d.done)
	}()
	t.Cleanup(func() {
		d.Stop(30 * time.Second)
		if t.Failed() {
			t.Logf("%s (%s) output:\n%s", name, c.CommandLine(), tail([]byte(d.Output()), 8<<10))
		}
	})
	deadline := time.Now().Add(60 * time.Second)
	for {
		if conn, err := net.DialTimeout(network, addr, 5*time.Second); err == nil {
			conn.Close()
			return d, nil
		}
		if d.Exited() {
			return nil, fmt.Errorf("%s exited before serving on %s: %v\ncommand: %s\noutput:\n%s", name, addr, d.err, c.CommandLine(), d.Output())
		}
		if time.Now().After(deadline) {
			return nil, fmt.Errorf("%s does not serve on %s after 60s\ncommand: %s\noutput:\n%s", name, addr, c.CommandLine(), d.Output())
		}
		time.Sleep(20 * time.Millisecond)
	}
}

// Serve starts `casnix serve --socket SOCKET [ARGS...]` on c's data directory and waits
// until it accepts connections. Stop it with Daemon.Stop (also done at the end of the
// test).
func (c *Casnix) Serve(t testing.TB, socket string, args ...string) *Daemon {
	t.Helper()
	cmd := c.Cmd(append([]string{"serve", "--socket", socket}, args...)...)
	return startDaemon(t, "casnix serve", socket, cmd)
}

// StartNixDaemon starts the real nix-daemon of client c on socket (a host path the client
// sees: bind its directory first), serving the store storeArg (e.g. a chroot store's
// directory; "" for the client's default store), and waits until it accepts connections.
func StartNixDaemon(t testing.TB, c *NixClient, socket, storeArg string) *Daemon {
	t.Helper()
	args := []string{"nix-daemon"}
	if storeArg != "" {
		args = append(args, "--store", storeArg)
	}
	cmd := c.Cmd(args...)
	cmd.Env = mergeEnv(cmd.Env, []string{"NIX_DAEMON_SOCKET_PATH=" + socket})
	return startDaemon(t, "nix-daemon "+c.Version(t), socket, cmd)
}

// syncBuffer is a bytes.Buffer safe for concurrent writers and readers.
type syncBuffer struct {
	mu sync.Mutex
	b  bytes.Buffer
}

func (b *syncBuffer) Write(p []byte) (int, error) {
	b.mu.Lock()
	defer b.mu.Unlock()
	return b.b.Write(p)
}

func (b *syncBuffer) String() string {
	b.mu.Lock()
	defer b.mu.Unlock()
	return b.b.String()
}
