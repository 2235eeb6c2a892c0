package nixtest

import (
	"io"
	"net"
	"net/http"
	"testing"
)

// ServeHTTP starts `casnix serve --http ADDR --http-only [ARGS...]` on a free loopback
// port and waits until it accepts connections; it returns the daemon and its base URL.
func (c *Casnix) ServeHTTP(t testing.TB, args ...string) (*Daemon, string) {
	t.Helper()
	for range 5 {
		ln, err := net.Listen("tcp", "127.0.0.1:0")
		if err != nil {
			t.Fatal(err)
		}
		addr := ln.Addr().String()
		ln.Close()
		cmd := c.Cmd(append([]string{"serve", "--http", addr, "--http-only"}, args...)...)
		if d := startTCPDaemon(t, "casnix serve --http", addr, cmd); d != nil {
			return d, "http://" + addr
		}
	}
	t.Fatal("casnix serve --http: no free port after 5 tries")
	return nil, ""
}

// HTTPGet fetches url and fails the test unless it answers 200.
func HTTPGet(t testing.TB, url string) []byte {
	t.Helper()
	resp, err := http.Get(url)
	if err != nil {
		t.Fatalf("GET %s: %v", url, err)
	}
	defer resp.Body.Close()
	b, err := io.ReadAll(resp.Body)
	if err != nil || resp.StatusCode != http.StatusOK {
		t.Fatalf("GET %s: %s %v", url, resp.Status, err)
	}
	return b
}
