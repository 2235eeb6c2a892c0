package nixtest

import (
	"net"
	"strconv"
	"testing"
)

// TestFreePorts: the ports weed is given are distinct, free, and outside the kernel's
// ephemeral range, which outgoing connections of other tests draw from.
func TestFreePorts(t *testing.T) {
	ports := freePorts(t, 9)
	seen := map[int]bool{}
	for _, p := range ports {
		if seen[p] {
			t.Fatalf("port %d twice in %v", p, ports)
		}
		seen[p] = true
		if ephemeralStart() > 11000 && p >= ephemeralStart() {
			t.Errorf("port %d is in the ephemeral range (from %d)", p, ephemeralStart())
		}
		l, err := net.Listen("tcp", "127.0.0.1:"+strconv.Itoa(p))
		if err != nil {
			t.Errorf("port %d: %v", p, err)
			continue
		}
		l.Close()
	}
}
