package binarycache

import (
	"fmt"
	"io"
	"math"
	"net"
	"net/http"
	"sync"
	"sync/atomic"
	"time"
)

// HTTPLimits bound what clients of the HTTP cache can hold: the server is
// unauthenticated, so a slow, idle or merely numerous client must not tie
// up goroutines, file descriptors and NAR encoders without end.
type HTTPLimits struct {
	// ReadHeaderTimeout: a request's headers must arrive within this
	// (slowloris clients are dropped).
	ReadHeaderTimeout time.Duration
	// IdleTimeout: a keep-alive connection may wait this long for its
	// next request.
	IdleTimeout time.Duration
	// WriteStall: a response write that makes no progress for this long
	// closes the connection. It is a deadline per write (of at most
	// stallChunk bytes), renewed as bytes flow, not a bound on the whole
	// response: a multi-GiB NAR to a slow but steady client is fine.
	WriteStall time.Duration
	// MaxHeaderBytes caps a request's header block.
	MaxHeaderBytes int
	// MaxConns caps the connections served at once; more wait in the
	// kernel's accept backlog until one closes. 0 means no cap.
	MaxConns int
	// MaxConnsPerClient caps those of one client address, so that one
	// client cannot hold every connection MaxConns allows while others
	// wait: a connection over it is answered 503 Service Unavailable
	// (which Nix retries after a short delay; newer Nix waits a minute
	// after a 429) and closed. 0 (the default) means no cap: a
	// server behind a proxy or NAT sees many clients at one address, and
	// local clients all come from the loopback address.
	MaxConnsPerClient int
}

// DefaultHTTPLimits are generous for Nix clients (requests of a few
// hundred bytes, http-connections = 25 per client by default).
var DefaultHTTPLimits = HTTPLimits{
	ReadHeaderTimeout: 30 * time.Second,
	IdleTimeout:       2 * time.Minute,
	WriteStall:        time.Minute,
	MaxHeaderBytes:    32 << 10,
	MaxConns:          128,
}

// stallChunk is the most one write under a single deadline may carry
// (sendfile of a cached NAR is cut into pieces of this size), so a client
// must take at least stallChunk bytes per WriteStall.
const stallChunk = 256 << 10

// NewHTTPServer returns an http.Server for h with lim's timeouts and
// limits; serve it on LimitListener(ln, lim.MaxConns, lim.MaxConnsPerClient).
func NewHTTPServer(h http.Handler, lim HTTPLimits) *http.Server {
	if lim.WriteStall > 0 {
		h = stallHandler{h: h, d: lim.WriteStall, bodyWait: lim.ReadHeaderTimeout}
	}
	return &http.Server{
		Handler:           h,
		ReadHeaderTimeout: lim.ReadHeaderTimeout,
		IdleTimeout:       lim.IdleTimeout,
		MaxHeaderBytes:    lim.MaxHeaderBytes,
		// No ReadTimeout or WriteTimeout: both run from the start of a
		// request and would cut long NAR downloads off (a read deadline
		// that expires during the response also cancels its context).
	}
}

// stallHandler gives every write of a response its own deadline.
type stallHandler struct {
	h        http.Handler
	d        time.Duration
	bodyWait time.Duration
}

func (s stallHandler) ServeHTTP(rw http.ResponseWriter, r *http.Request) {
	rc := http.NewResponseController(rw)
	w := &stallWriter{ResponseWriter: rw, rc: rc, d: s.d}
	// A deadline left from the previous response on this connection may
	// have passed: this one starts afresh, and its last bytes (written by
	// net/http after the handler returns) get a full period too.
	w.extend()
	defer w.extend()
	if r.ContentLength != 0 {
		// The cache takes GET and HEAD only: a body is never read, and
		// net/http would otherwise wait (with no deadline) to discard it
		// before answering. Answer at once and close instead.
		w.Header().Set("Connection", "close")
		if s.bodyWait > 0 {
			rc.SetReadDeadline(time.Now().Add(s.bodyWait))
		}
		http.Error(w, "request bodies are not accepted", http.StatusRequestEntityTooLarge)
		return
	}
	s.h.ServeHTTP(w, r)
}

// stallWriter renews the connection's write deadline before each write.
type stallWriter struct {
	http.ResponseWriter
	rc *http.ResponseController
	d  time.Duration
}

func (w *stallWriter) extend() { w.rc.SetWriteDeadline(time.Now().Add(w.d)) }

func (w *stallWriter) Write(p []byte) (int, error) {
	var done int
	for len(p) > 0 {
		k := min(len(p), stallChunk)
		w.extend()
		n, err := w.ResponseWriter.Write(p[:k])
		done += n
		if err != nil {
			return done, err
		}
		p = p[k:]
	}
	return done, nil
}

// ReadFrom keeps net/http's sendfile path for files (http.ServeContent
// hands over an *io.LimitedReader of the file, which sendfile unwraps one
// level deep), in pieces of stallChunk, each under a fresh deadline.
func (w *stallWriter) ReadFrom(r io.Reader) (int64, error) {
	lr, ok := r.(*io.LimitedReader)
	if !ok {
		lr = &io.LimitedReader{R: r, N: math.MaxInt64}
	}
	var total int64
	for lr.N > 0 {
		w.extend()
		want := min(lr.N, stallChunk)
		n, err := io.Copy(w.ResponseWriter, &io.LimitedReader{R: lr.R, N: want})
		total += n
		lr.N -= n
		if err != nil || n < want {
			return total, err
		}
	}
	return total, nil
}

// Unwrap lets http.ResponseController reach the connection.
func (w *stallWriter) Unwrap() http.ResponseWriter { return w.ResponseWriter }

// LimitListener accepts at most n connections at once (n <= 0: no cap);
// Accept waits for one to close. Like golang.org/x/net/netutil's, but its
// connections keep the TCP connection's ReadFrom (sendfile) and CloseWrite.
// At most perClient of them (0: no cap) come from one client IP address: a
// connection over that is refused with a 503 answer, in the background,
// and never handed to the server.
func LimitListener(ln net.Listener, n, perClient int) net.Listener {
	if n <= 0 && perClient <= 0 {
		return ln
	}
	l := &limitListener{Listener: ln, done: make(chan struct{}), perClient: perClient, clients: map[string]int{}}
	if n > 0 {
		l.sem = make(chan struct{}, n)
	}
	return l
}

type limitListener struct {
	net.Listener
	sem       chan struct{} // nil: no cap
	done      chan struct{}
	closeOnce sync.Once

	perClient int
	mu        sync.Mutex
	clients   map[string]int // open connections by client address
	refusing  int            // refusals being written
	refused   atomic.Int64
}

// Refused counts the connections refused for being over their client's
// cap, for /metrics.
func (l *limitListener) Refused() int64 { return l.refused.Load() }

// maxHTTPRefusing bounds the per-client refusals written at once; beyond
// it a refused connection is closed without an answer.
const maxHTTPRefusing = 64

func (l *limitListener) Accept() (net.Conn, error) {
	for {
		if l.sem != nil {
			select {
			case l.sem <- struct{}{}:
			case <-l.done:
				return nil, net.ErrClosed
			}
		}
		c, err := l.Listener.Accept()
		if err != nil {
			l.releaseSlot()
			return nil, err
		}
		client := "" // not counted
		if l.perClient > 0 {
			client = clientKey(c)
		}
		l.mu.Lock()
		if client != "" && l.clients[client] >= l.perClient {
			refuse := l.refusing < maxHTTPRefusing
			if refuse {
				l.refusing++
			}
			l.mu.Unlock()
			l.releaseSlot()
			l.refused.Add(1)
			if refuse {
				go l.refuse(c)
			} else {
				c.Close()
			}
			continue
		}
		if client != "" {
			l.clients[client]++
		}
		l.mu.Unlock()
		return &limitConn{Conn: c, release: func() {
			if client != "" {
				l.mu.Lock()
				if l.clients[client]--; l.clients[client] <= 0 {
					delete(l.clients, client)
				}
				l.mu.Unlock()
			}
			l.releaseSlot()
		}}, nil
	}
}

func (l *limitListener) releaseSlot() {
	if l.sem != nil {
		<-l.sem
	}
}

// clientKey is the connection's client IP address; "" when it has none
// (not TCP).
func clientKey(c net.Conn) string {
	if a, ok := c.RemoteAddr().(*net.TCPAddr); ok {
		return a.IP.String()
	}
	return ""
}

// refuse answers a connection over its client's cap with 503 and closes
// it, within a second: the request is read and dropped after the answer
// (closing with unread bytes would reset the connection before the
// client read the answer).
func (l *limitListener) refuse(c net.Conn) {
	defer func() {
		c.Close()
		l.mu.Lock()
		l.refusing--
		l.mu.Unlock()
	}()
	c.SetDeadline(time.Now().Add(time.Second))
	const msg = "too many connections from your address\n"
	fmt.Fprintf(c, "HTTP/1.1 503 Service Unavailable\r\nContent-Type: text/plain\r\nRetry-After: 1\r\nConnection: close\r\nContent-Length: %d\r\n\r\n%s", len(msg), msg)
	if cw, ok := c.(interface{ CloseWrite() error }); ok {
		cw.CloseWrite()
	}
	io.Copy(io.Discard, io.LimitReader(c, 64<<10))
}

func (l *limitListener) Close() error {
	l.closeOnce.Do(func() { close(l.done) })
	return l.Listener.Close()
}

type limitConn struct {
	net.Conn
	once    sync.Once
	release func()
}

func (c *limitConn) Close() error {
	err := c.Conn.Close()
	c.once.Do(c.release)
	return err
}

func (c *limitConn) ReadFrom(r io.Reader) (int64, error) {
	if rf, ok := c.Conn.(io.ReaderFrom); ok {
		return rf.ReadFrom(r)
	}
	return io.Copy(struct{ io.Writer }{c.Conn}, r)
}

func (c *limitConn) CloseWrite() error {
	if cw, ok := c.Conn.(interface{ CloseWrite() error }); ok {
		return cw.CloseWrite()
	}
	return nil
}
