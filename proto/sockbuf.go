package proto

import (
	"net"

	"golang.org/x/sys/unix"
)

// sendBuffer is the socket send buffer casnix asks for on each client
// connection (the kernel doubles it). NarFromPath writes 256 KiB at a
// time: into the default buffer (net.core.wmem_default, 208 KiB) most
// writes filled it and parked the goroutine until the client had read,
// a wake-up and a context switch per write; with 1 MiB the releases
// corpus's NarFromPath ran ~9% faster (bench/narfrom.sh's A/B). The kernel
// takes the memory only for bytes queued, so an idle connection costs
// nothing; one stalled client holds at most 2 MiB until --stall-timeout
// closes its connection.
const sendBuffer = 1 << 20

// growSendBuffer sets a Unix socket's send buffer to sendBuffer:
// SO_SNDBUFFORCE where the daemon may (CAP_NET_ADMIN, as root), since
// SO_SNDBUF is capped at net.core.wmem_max (208 KiB unless raised);
// SO_SNDBUF up to that cap otherwise. Failing both leaves the default.
func growSendBuffer(nc net.Conn) {
	uc, ok := nc.(*net.UnixConn)
	if !ok {
		return
	}
	rc, err := uc.SyscallConn()
	if err != nil {
		return
	}
	rc.Control(func(fd uintptr) {
		if unix.SetsockoptInt(int(fd), unix.SOL_SOCKET, unix.SO_SNDBUFFORCE, sendBuffer) != nil {
			unix.SetsockoptInt(int(fd), unix.SOL_SOCKET, unix.SO_SNDBUF, sendBuffer)
		}
	})
}
