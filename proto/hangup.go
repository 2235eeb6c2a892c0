package proto

import (
	"context"
	"errors"
	"syscall"
	"time"

	"golang.org/x/sys/unix"
)

// Hang-up detection. An op that works long without reading from the
// client (VerifyStore, CollectGarbage, QueryMissing, ...) would otherwise
// run to its end after the client is gone, holding the verify or GC lock
// and a CPU: an untrusted client could start a full VerifyStore and hang up
// at once, again and again, and keep everyone else's verify refused. As
// nix-daemon (MonitorFdHup), such an op watches its socket while it runs
// and its context is cancelled when the client hangs up.
//
// The watcher reads nothing: it waits in the netpoller (RawConn.Read) for
// the socket to change state and then asks poll(2) whether the peer has
// closed its end (POLLHUP, or POLLERR when the socket broke). A client
// that only half-closes (shutdown(SHUT_WR)) can still read the answer, so
// that is not a hang-up, and bytes it sends early (Nix clients send none
// during an op) stay unread for the next op and do not stop the watch, so
// a byte sent before hanging up does not hide the hang-up. Connections
// that are not sockets (serve --stdio, whose stdin is a pipe from ssh) are
// not watched: their ops run to their end.

// errHungUp is the cause of an op's context ending because its client hung
// up.
var errHungUp = errors.New("client hung up")

// watchHangup makes c.ctx, until stop is called, a context that is
// cancelled with errHungUp when the client hangs up. stop ends the watch,
// waits for the watcher to exit and restores c.ctx. The op must not read
// from the connection between the two: the watcher holds the socket's read
// side and its read deadline.
func (c *conn) watchHangup() (stop func()) {
	parent := c.ctx
	ctx, cancel := context.WithCancelCause(parent)
	c.ctx = ctx
	restore := func() {
		cancel(nil)
		c.ctx = parent
	}
	if c.deadline == nil {
		return restore
	}
	sc, ok := c.deadline.Conn.(syscall.Conn)
	if !ok {
		return restore
	}
	raw, err := sc.SyscallConn()
	if err != nil {
		return restore
	}
	// The deadline the op's arguments set (the stall timeout) would end
	// the watch long before the op.
	c.deadline.Conn.SetReadDeadline(time.Time{})
	done := make(chan struct{})
	go func() {
		defer close(done)
		// Returns when the peer hung up, or with an error when stop sets
		// a deadline in the past or the connection is closed (the
		// daemon's drain ended): then there is nothing to do.
		if raw.Read(func(fd uintptr) bool { return peerClosed(int(fd)) }) == nil {
			cancel(errHungUp)
		}
	}()
	return func() {
		c.deadline.Conn.SetReadDeadline(time.Unix(1, 0)) // wakes raw.Read
		<-done
		// Back to no deadline, as between ops; deadlineConn.Read sets the
		// next op's own.
		c.deadline.Conn.SetReadDeadline(time.Time{})
		restore()
	}
}

// peerClosed reports whether the peer of socket fd has closed its end (or
// the socket broke), without reading from it.
func peerClosed(fd int) bool {
	fds := []unix.PollFd{{Fd: int32(fd), Events: unix.POLLIN | unix.POLLRDHUP}}
	for {
		n, err := unix.Poll(fds, 0)
		if err == unix.EINTR {
			continue
		}
		if err != nil || n == 0 {
			return false
		}
		return fds[0].Revents&(unix.POLLHUP|unix.POLLERR) != 0
	}
}

// hungUp reports whether c's op was cancelled because its client hung up.
func (c *conn) hungUp() bool {
	return errors.Is(context.Cause(c.ctx), errHungUp)
}
