package proto

import (
	"net"
	"os"
	"path/filepath"
	"strconv"
	"strings"
	"testing"

	"golang.org/x/sys/unix"
)

// TestGrowSendBuffer: a client connection's send buffer is sendBuffer
// (doubled by the kernel), or as much of it as net.core.wmem_max allows a
// process without CAP_NET_ADMIN.
func TestGrowSendBuffer(t *testing.T) {
	sock := filepath.Join(t.TempDir(), "s")
	l, err := net.Listen("unix", sock)
	if err != nil {
		t.Fatal(err)
	}
	defer l.Close()
	go func() {
		c, err := net.Dial("unix", sock)
		if err == nil {
			defer c.Close()
			var b [1]byte
			c.Read(b[:])
		}
	}()
	nc, err := l.Accept()
	if err != nil {
		t.Fatal(err)
	}
	defer nc.Close()
	growSendBuffer(nc)
	rc, err := nc.(*net.UnixConn).SyscallConn()
	if err != nil {
		t.Fatal(err)
	}
	var got int
	var gerr error
	rc.Control(func(fd uintptr) { got, gerr = unix.GetsockoptInt(int(fd), unix.SOL_SOCKET, unix.SO_SNDBUF) })
	if gerr != nil {
		t.Fatal(gerr)
	}
	want := 2 * sendBuffer
	if os.Geteuid() != 0 {
		if b, err := os.ReadFile("/proc/sys/net/core/wmem_max"); err == nil {
			if max, err := strconv.Atoi(strings.TrimSpace(string(b))); err == nil {
				want = min(want, 2*max)
			}
		}
	}
	if got < want {
		t.Errorf("send buffer %d bytes, want at least %d", got, want)
	}
}
