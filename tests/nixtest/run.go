package nixtest

import (
	"bytes"
	"context"
	"errors"
	"fmt"
	"io"
	"os"
	"os/exec"
	"strings"
	"syscall"
	"testing"
	"time"
)

// DefaultTimeout bounds a command run through Cmd that sets no Timeout of its own.
const DefaultTimeout = 5 * time.Minute

// Cmd describes one command to run. Stdout and Stderr, when set, receive the streams
// instead of the in-memory buffers of the Result (use them for NARs and other big output).
type Cmd struct {
	Name    string
	Args    []string
	Env     []string // added to (and overriding) the test process's environment
	Dir     string
	Stdin   io.Reader
	Stdout  io.Writer
	Stderr  io.Writer
	Timeout time.Duration

	// ExactEnv makes Env the whole environment of the command instead of additions to the
	// test process's environment (nixtest.Root uses it to keep the host's out of its roots).
	ExactEnv bool
}

// Result is what a finished command did.
type Result struct {
	Cmd      *Cmd
	Stdout   []byte
	Stderr   []byte
	ExitCode int // -1 when the command did not exit normally (signal, start failure)
	Err      error
	Duration time.Duration
}

// OK reports whether the command ran and exited 0.
func (r *Result) OK() bool { return r.Err == nil && r.ExitCode == 0 }

// String describes the command and its outcome for test failure messages.
func (r *Result) String() string {
	var b strings.Builder
	fmt.Fprintf(&b, "command: %s\n", r.Cmd.CommandLine())
	if r.Err != nil {
		fmt.Fprintf(&b, "error: %v\n", r.Err)
	}
	fmt.Fprintf(&b, "exit status: %d after %s\n", r.ExitCode, r.Duration.Round(time.Millisecond))
	if r.Cmd.Stderr == nil {
		fmt.Fprintf(&b, "stderr:\n%s\n", tail(r.Stderr, 8<<10))
	}
	if r.Cmd.Stdout == nil {
		fmt.Fprintf(&b, "stdout:\n%s\n", tail(r.Stdout, 4<<10))
	}
	return b.String()
}

func tail(b []byte, n int) string {
	if len(b) <= n {
		return string(b)
	}
	return fmt.Sprintf("[… %d bytes cut …]\n%s", len(b)-n, b[len(b)-n:])
}

// CommandLine is the command as a shell-like line, for messages.
func (c *Cmd) CommandLine() string {
	parts := make([]string, 0, len(c.Args)+1)
	for _, a := range append([]string{c.Name}, c.Args...) {
		if a == "" || strings.ContainsAny(a, " \t\n'\"\\$*?;&|<>()") {
			a = "'" + strings.ReplaceAll(a, "'", `'\''`) + "'"
		}
		parts = append(parts, a)
	}
	s := strings.Join(parts, " ")
	if len(s) > 2000 {
		s = s[:2000] + fmt.Sprintf(" [… %d more characters]", len(s)-2000)
	}
	return s
}

// Exec builds the exec.Cmd for c, in its own process group so that Kill reaches children,
// without starting it. Stdout and Stderr are left to the caller when c leaves them nil.
func (c *Cmd) Exec(ctx context.Context) *exec.Cmd {
	cmd := exec.CommandContext(ctx, c.Name, c.Args...)
	cmd.Env = mergeEnv(os.Environ(), c.Env)
	if c.ExactEnv {
		cmd.Env = append([]string{}, c.Env...)
	}
	cmd.Dir = c.Dir
	cmd.Stdin = c.Stdin
	cmd.Stdout = c.Stdout
	cmd.Stderr = c.Stderr
	cmd.SysProcAttr = &syscall.SysProcAttr{Setpgid: true}
	// On timeout, SIGQUIT first: a Go program (casnix) then prints all its goroutines'
	// stacks to stderr, which the failure message shows. Its process group is killed a few
	// seconds later whatever it did.
	cmd.Cancel = func() error {
		pid := cmd.Process.Pid
		time.AfterFunc(5*time.Second, func() { syscall.Kill(-pid, syscall.SIGKILL) })
		return syscall.Kill(pid, syscall.SIGQUIT)
	}
	cmd.WaitDelay = 15 * time.Second
	return cmd
}

// Try runs the command to completion and returns what happened; it never fails the test.
func (c *Cmd) Try() *Result {
	timeout := c.Timeout
	if timeout == 0 {
		timeout = DefaultTimeout
	}
	ctx, cancel := context.WithTimeout(context.Background(), timeout)
	defer cancel()
	var stdout, stderr bytes.Buffer
	cmd := c.Exec(ctx)
	if cmd.Stdout == nil {
		cmd.Stdout = &stdout
	}
	if cmd.Stderr == nil {
		cmd.Stderr = &stderr
	}
	start := time.Now()
	err := cmd.Run()
	r := &Result{Cmd: c, Stdout: stdout.Bytes(), Stderr: stderr.Bytes(), Duration: time.Since(start), ExitCode: -1}
	if cmd.ProcessState != nil {
		r.ExitCode = cmd.ProcessState.ExitCode()
	}
	var ee *exec.ExitError
	if err != nil && !(errors.As(err, &ee) && r.ExitCode > 0) {
		r.Err = err
	}
	if ctx.Err() != nil {
		r.Err = fmt.Errorf("timed out after %s: %w", timeout, ctx.Err())
	}
	return r
}

// Run runs the command and fails the test unless it exits 0.
func (c *Cmd) Run(t testing.TB) *Result {
	t.Helper()
	r := c.Try()
	if !r.OK() {
		t.Fatalf("command failed:\n%s", r)
	}
	return r
}

// Run runs name with args and fails the test unless it exits 0; it returns stdout.
func Run(t testing.TB, name string, args ...string) []byte {
	t.Helper()
	return (&Cmd{Name: name, Args: args}).Run(t).Stdout
}

// mergeEnv returns base with the KEY=VALUE entries of extra replacing those of base.
func mergeEnv(base, extra []string) []string {
	if len(extra) == 0 {
		return base
	}
	override := map[string]bool{}
	for _, kv := range extra {
		k, _, _ := strings.Cut(kv, "=")
		override[k] = true
	}
	out := make([]string, 0, len(base)+len(extra))
	for _, kv := range base {
		k, _, _ := strings.Cut(kv, "=")
		if !override[k] {
			out = append(out, kv)
		}
	}
	return append(out, extra...)
}
