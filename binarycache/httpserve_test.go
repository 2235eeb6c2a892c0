package binarycache

import (
	"bufio"
	"bytes"
	"errors"
	"fmt"
	"io"
	"net"
	"net/http"
	"os"
	"path/filepath"
	"testing"
	"time"
)

// serveLimited serves h with lim on a loopback port and returns its address.
func serveLimited(t *testing.T, h http.Handler, lim HTTPLimits) string {
	t.Helper()
	ln, err := net.Listen("tcp", "127.0.0.1:0")
	if err != nil {
		t.Fatal(err)
	}
	srv := NewHTTPServer(h, lim)
	go srv.Serve(LimitListener(ln, lim.MaxConns, lim.MaxConnsPerClient))
	t.Cleanup(func() { srv.Close() })
	return ln.Addr().String()
}

// waitClosed reports whether the server closes c within d (reading and
// dropping whatever it sends).
func waitClosed(c net.Conn, d time.Duration) bool {
	c.SetReadDeadline(time.Now().Add(d))
	_, err := io.Copy(io.Discard, c)
	var ne net.Error
	return !(errors.As(err, &ne) && ne.Timeout())
}

// TestHTTPSlowHeaders: a client trickling its headers (slowloris) is dropped
// after ReadHeaderTimeout, and one announcing a body it never sends gets an
// answer and a closed connection at once.
func TestHTTPSlowHeaders(t *testing.T) {
	lim := DefaultHTTPLimits
	lim.ReadHeaderTimeout = 300 * time.Millisecond
	addr := serveLimited(t, http.NotFoundHandler(), lim)

	c, err := net.Dial("tcp", addr)
	if err != nil {
		t.Fatal(err)
	}
	defer c.Close()
	start := time.Now()
	fmt.Fprintf(c, "GET /nix-cache-info HTTP/1.1\r\nHost: x\r\n")
	dropped := make(chan time.Duration, 1)
	go func() {
		waitClosed(c, 10*time.Second)
		dropped <- time.Since(start)
	}()
	for i := 0; ; i++ {
		select {
		case el := <-dropped:
			if el > 3*time.Second {
				t.Errorf("slow client dropped after %v", el)
			}
			goto body
		case <-time.After(50 * time.Millisecond):
			if _, err := fmt.Fprintf(c, "X-%d: y\r\n", i); err != nil && time.Since(start) < lim.ReadHeaderTimeout {
				t.Fatalf("write before the timeout: %v", err)
			}
			if time.Since(start) > 10*time.Second {
				t.Fatal("slow client still connected after 10s")
			}
		}
	}
body:
	c2, err := net.Dial("tcp", addr)
	if err != nil {
		t.Fatal(err)
	}
	defer c2.Close()
	start = time.Now()
	fmt.Fprintf(c2, "GET /nix-cache-info HTTP/1.1\r\nHost: x\r\nContent-Length: 100000\r\n\r\n")
	c2.SetReadDeadline(time.Now().Add(5 * time.Second))
	resp, err := http.ReadResponse(bufio.NewReader(c2), nil)
	if err != nil {
		t.Fatal(err)
	}
	resp.Body.Close()
	if resp.StatusCode != http.StatusRequestEntityTooLarge || time.Since(start) > 2*time.Second {
		t.Errorf("request with an unsent body: %s after %v", resp.Status, time.Since(start))
	}
	if !waitClosed(c2, 5*time.Second) {
		t.Error("connection with an unsent body left open")
	}
}

// TestHTTPMaxConns: with MaxConns 2, a third connection is not served
// until one of the first two closes.
func TestHTTPMaxConns(t *testing.T) {
	lim := DefaultHTTPLimits
	lim.MaxConns = 2
	addr := serveLimited(t, http.HandlerFunc(func(w http.ResponseWriter, r *http.Request) { io.WriteString(w, "ok") }), lim)
	var held []net.Conn
	for range 2 {
		c, err := net.Dial("tcp", addr)
		if err != nil {
			t.Fatal(err)
		}
		defer c.Close()
		fmt.Fprintf(c, "GET / HTTP/1.1\r\nHost: x\r\n") // headers never finished
		held = append(held, c)
	}
	time.Sleep(100 * time.Millisecond) // let the server take both
	c, err := net.Dial("tcp", addr)    // the kernel completes the handshake
	if err != nil {
		t.Fatal(err)
	}
	defer c.Close()
	fmt.Fprintf(c, "GET / HTTP/1.1\r\nHost: x\r\n\r\n")
	got := make(chan error, 1)
	go func() {
		resp, err := http.ReadResponse(bufio.NewReader(c), nil)
		if err == nil {
			resp.Body.Close()
		}
		got <- err
	}()
	select {
	case err := <-got:
		t.Fatalf("third connection served while two were open (%v)", err)
	case <-time.After(500 * time.Millisecond):
	}
	held[0].Close()
	select {
	case err := <-got:
		if err != nil {
			t.Fatal(err)
		}
	case <-time.After(5 * time.Second):
		t.Fatal("third connection not served after one closed")
	}
}

// TestHTTPWriteStall: a client that stops reading is dropped after
// WriteStall; a slow but steady one gets a download lasting many times
// WriteStall, from a handler's writes and from a file (sendfile).
func TestHTTPWriteStall(t *testing.T) {
	lim := DefaultHTTPLimits
	// Long enough for the kernel's send buffer (up to 4 MiB, woken at a
	// third free) to drain at the slow reader's pace.
	lim.WriteStall = time.Second
	const size = 8 << 20
	file := filepath.Join(t.TempDir(), "f")
	data := bytes.Repeat([]byte("0123456789abcdef"), size/16)
	if err := os.WriteFile(file, data, 0o644); err != nil {
		t.Fatal(err)
	}
	handlerErr := make(chan error, 10)
	addr := serveLimited(t, http.HandlerFunc(func(w http.ResponseWriter, r *http.Request) {
		if r.URL.Path == "/file" {
			f, err := os.Open(file)
			if err != nil {
				t.Error(err)
				return
			}
			defer f.Close()
			http.ServeContent(&statusWriter{ResponseWriter: w}, r, "", time.Time{}, f)
			return
		}
		var err error
		for sent := 0; sent < size && err == nil; sent += 64 << 10 {
			_, err = w.Write(data[sent : sent+64<<10])
		}
		if r.URL.Path == "/endless" {
			for err == nil {
				_, err = w.Write(data[:64<<10])
			}
		}
		handlerErr <- err
	}), lim)

	// A client that never reads.
	c, err := net.Dial("tcp", addr)
	if err != nil {
		t.Fatal(err)
	}
	defer c.Close()
	c.(*net.TCPConn).SetReadBuffer(4 << 10)
	fmt.Fprintf(c, "GET /endless HTTP/1.1\r\nHost: x\r\n\r\n")
	select {
	case err := <-handlerErr:
		if err == nil {
			t.Error("endless response ended without an error")
		}
	case <-time.After(10 * time.Second):
		t.Fatal("a client that does not read held the response for 10s")
	}

	// Slow but steady readers: 64 KiB every 20 ms, 8 MiB in about 2.6 s.
	for _, path := range []string{"/writes", "/file"} {
		start := time.Now()
		resp, err := http.Get("http://" + addr + path)
		if err != nil {
			t.Fatal(err)
		}
		var got bytes.Buffer
		for {
			n, err := io.CopyN(&got, resp.Body, 64<<10)
			if err != nil || n == 0 {
				break
			}
			time.Sleep(20 * time.Millisecond)
		}
		resp.Body.Close()
		if !bytes.Equal(got.Bytes(), data) {
			t.Errorf("%s: slow download got %d of %d bytes in %v", path, got.Len(), size, time.Since(start))
		}
		if path == "/writes" {
			if err := <-handlerErr; err != nil {
				t.Errorf("%s: handler: %v", path, err)
			}
		}
	}
}

// TestHTTPMaxConnsPerClient: with MaxConnsPerClient 2, a client address
// holding two connections gets a 503 for a third (answered at once, not
// queued behind the others), while another address is served, and the
// first is served again once one of its connections closes.
func TestHTTPMaxConnsPerClient(t *testing.T) {
	lim := DefaultHTTPLimits
	lim.MaxConns, lim.MaxConnsPerClient = 8, 2
	ln, err := net.Listen("tcp", "127.0.0.1:0")
	if err != nil {
		t.Fatal(err)
	}
	limited := LimitListener(ln, lim.MaxConns, lim.MaxConnsPerClient)
	srv := NewHTTPServer(http.HandlerFunc(func(w http.ResponseWriter, r *http.Request) { io.WriteString(w, "ok") }), lim)
	go srv.Serve(limited)
	t.Cleanup(func() { srv.Close() })
	addr := ln.Addr().String()
	dial := func(from string) net.Conn {
		t.Helper()
		d := net.Dialer{LocalAddr: &net.TCPAddr{IP: net.ParseIP(from)}, Timeout: 5 * time.Second}
		c, err := d.Dial("tcp", addr)
		if err != nil {
			t.Fatal(err)
		}
		t.Cleanup(func() { c.Close() })
		return c
	}
	get := func(c net.Conn) (int, error) {
		t.Helper()
		c.SetDeadline(time.Now().Add(5 * time.Second))
		if _, err := fmt.Fprintf(c, "GET / HTTP/1.1\r\nHost: x\r\n\r\n"); err != nil {
			return 0, err
		}
		resp, err := http.ReadResponse(bufio.NewReader(c), nil)
		if err != nil {
			return 0, err
		}
		resp.Body.Close()
		return resp.StatusCode, nil
	}
	var held []net.Conn
	for range 2 {
		c := dial("127.0.0.1")
		fmt.Fprintf(c, "GET / HTTP/1.1\r\nHost: x\r\n") // headers never finished
		held = append(held, c)
	}
	time.Sleep(100 * time.Millisecond) // let the server take both
	if code, err := get(dial("127.0.0.1")); err != nil || code != http.StatusServiceUnavailable {
		t.Fatalf("third connection of one address: %d, %v; want 503", code, err)
	}
	if code, err := get(dial("127.0.0.2")); err != nil || code != http.StatusOK {
		t.Fatalf("another address: %d, %v; want 200", code, err)
	}
	if n := limited.(interface{ Refused() int64 }).Refused(); n != 1 {
		t.Fatalf("Refused() = %d, want 1", n)
	}
	held[0].Close()
	for deadline := time.Now().Add(5 * time.Second); ; time.Sleep(20 * time.Millisecond) {
		code, err := get(dial("127.0.0.1"))
		if err == nil && code == http.StatusOK {
			break
		}
		if time.Now().After(deadline) {
			t.Fatalf("first address not served after one of its connections closed: %d, %v", code, err)
		}
	}
}
