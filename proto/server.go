package proto

import (
	"bufio"
	"context"
	"errors"
	"fmt"
	"io"
	"log/slog"
	"net"
	"os"
	"strings"
	"sync"
	"syscall"
	"time"

	"github.com/casnix/casnix/store"
)

// Protocol constants (worker-protocol.hh).
const (
	workerMagic1 = 0x6e697863
	workerMagic2 = 0x6478696f

	// ServerMinor is the protocol minor version casnix speaks (1.38).
	ServerMinor = 38
	// minClientMinor is the oldest protocol casnix accepts: Nix 2.3's.
	minClientMinor = 21

	stderrNext  = 0x6f6c6d67
	stderrRead  = 0x64617461
	stderrLast  = 0x616c7473
	stderrError = 0x63787470
)

// Trust values of the handshake (≥ 1.35).
const (
	trustUnknown = 0
	trustYes     = 1
	trustNo      = 2
)

// Server serves the nix-daemon protocol from a store.
type Server struct {
	Store    *store.Store
	StoreDir string
	// NixVersion is the daemon version string clients display.
	NixVersion string
	Logger     *slog.Logger
	// HandshakeTimeout bounds how long a new connection may take to finish
	// the handshake; StallTimeout how long a client may stall in the middle
	// of sending an op. Zero disables either. Between ops a client may stay
	// idle as long as it likes, as with nix-daemon (clients pool connections).
	HandshakeTimeout time.Duration
	StallTimeout     time.Duration
	// Trusted decides whether a peer (by its SO_PEERCRED uid and gid) is a
	// trusted user. Nil trusts only root.
	Trusted func(uid, gid uint32) bool
	// Allowed decides whether a peer may connect at all (nix-daemon's
	// allowed-users; trusted users always may). Nil allows everyone.
	Allowed func(uid, gid uint32) bool
	// RequireSigs makes added input-addressed paths need a signature by
	// one of PublicKeys unless a trusted client waives the check, as Nix's
	// require-sigs and trusted-public-keys settings do.
	RequireSigs bool
	PublicKeys  store.PublicKeys

	wg    sync.WaitGroup
	mu    sync.Mutex
	conns map[*conn]struct{}
}

// Serve accepts connections on ln until ctx is done, then stops accepting,
// lets in-flight ops finish until drain expires, and closes what is left.
func (s *Server) Serve(ctx context.Context, ln net.Listener, drain time.Duration) error {
	stop := context.AfterFunc(ctx, func() { ln.Close() })
	defer stop()
	for {
		c, err := ln.Accept()
		if err != nil {
			if ctx.Err() != nil {
				s.shutdown(drain)
				return nil
			}
			var ne net.Error
			if errors.As(err, &ne) && ne.Timeout() {
				continue
			}
			if errors.Is(err, syscall.EMFILE) || errors.Is(err, syscall.ENFILE) {
				s.log().Warn("accept: out of file descriptors; backing off", "err", err)
				time.Sleep(100 * time.Millisecond)
				continue
			}
			return fmt.Errorf("accept: %w", err)
		}
		trusted, allowed := s.peerAccess(c)
		s.wg.Add(1)
		go func() {
			defer s.wg.Done()
			s.serveNetConn(ctx, c, trusted, allowed)
		}()
	}
}

func (s *Server) log() *slog.Logger {
	if s.Logger == nil {
		return slog.New(slog.DiscardHandler)
	}
	return s.Logger
}

// shutdown waits for in-flight ops; connections idle between ops are
// closed at once, busy ones when they finish their op or drain expires.
func (s *Server) shutdown(drain time.Duration) {
	s.mu.Lock()
	for c := range s.conns {
		c.closing()
	}
	s.mu.Unlock()
	done := make(chan struct{})
	go func() { s.wg.Wait(); close(done) }()
	select {
	case <-done:
	case <-time.After(drain):
		s.mu.Lock()
		for c := range s.conns {
			c.rw.Close()
		}
		s.mu.Unlock()
		<-done
	}
}

// peerAccess decides from the peer's SO_PEERCRED credentials whether it is
// trusted and whether it may connect at all.
func (s *Server) peerAccess(c net.Conn) (trusted, allowed bool) {
	uc, ok := c.(*net.UnixConn)
	if !ok {
		return false, s.Allowed == nil
	}
	cred, err := peerCred(uc)
	if err != nil {
		s.log().Warn("cannot read peer credentials; treating client as untrusted", "err", err)
		return false, s.Allowed == nil
	}
	if s.Trusted != nil {
		trusted = s.Trusted(cred.Uid, cred.Gid)
	} else {
		trusted = cred.Uid == 0
	}
	allowed = trusted || s.Allowed == nil || s.Allowed(cred.Uid, cred.Gid)
	if !allowed {
		s.log().Warn("refusing connection: user not in allowed-users", "uid", cred.Uid, "gid", cred.Gid)
	}
	return trusted, allowed
}

func (s *Server) serveNetConn(ctx context.Context, nc net.Conn, trusted, allowed bool) {
	dc := &deadlineConn{Conn: nc}
	c := s.newConn(ctx, dc, trusted)
	c.refused = !allowed
	c.deadline = dc
	s.track(c, true)
	defer s.track(c, false)
	defer nc.Close()
	c.serve()
}

// ServeStdio speaks the protocol on stdin and stdout, like
// nix-daemon --stdio (the remote end of an ssh-ng:// store).
func (s *Server) ServeStdio(ctx context.Context, in io.Reader, out io.Writer, trusted bool) error {
	c := s.newConn(ctx, struct {
		io.Reader
		io.Writer
		io.Closer
	}{in, out, io.NopCloser(nil)}, trusted)
	return c.serve()
}

func (s *Server) track(c *conn, add bool) {
	s.mu.Lock()
	defer s.mu.Unlock()
	if s.conns == nil {
		s.conns = map[*conn]struct{}{}
	}
	if add {
		s.conns[c] = struct{}{}
	} else {
		delete(s.conns, c)
	}
}

// deadlineConn sets read deadlines by phase: the handshake and op bodies
// are bounded, waiting for the next op is not.
type deadlineConn struct {
	net.Conn
	mu      sync.Mutex
	timeout time.Duration
}

func (d *deadlineConn) setTimeout(t time.Duration) {
	d.mu.Lock()
	d.timeout = t
	d.mu.Unlock()
	if t == 0 {
		d.Conn.SetReadDeadline(time.Time{})
	}
}

func (d *deadlineConn) Read(p []byte) (int, error) {
	d.mu.Lock()
	t := d.timeout
	d.mu.Unlock()
	if t > 0 {
		d.Conn.SetReadDeadline(time.Now().Add(t))
	}
	return d.Conn.Read(p)
}

// conn is one client connection.
type conn struct {
	s        *Server
	ctx      context.Context
	rw       io.ReadWriteCloser
	deadline *deadlineConn
	r        wireReader
	w        wireWriter
	minor    uint64
	trusted  bool
	log      *slog.Logger

	mu        sync.Mutex
	busy      bool // inside an op
	stopping  bool
	tempRoots map[string]struct{}
	refused   bool // not in allowed-users: the handshake ends in an error
}

func (s *Server) newConn(ctx context.Context, rw io.ReadWriteCloser, trusted bool) *conn {
	return &conn{
		s: s, ctx: ctx, rw: rw, trusted: trusted, log: s.log(),
		r:         wireReader{r: bufio.NewReaderSize(rw, 64<<10)},
		w:         wireWriter{w: bufio.NewWriterSize(rw, 64<<10)},
		tempRoots: map[string]struct{}{},
	}
}

// closing asks the connection to end: now if it is idle, else after its op.
func (c *conn) closing() {
	c.mu.Lock()
	defer c.mu.Unlock()
	c.stopping = true
	if !c.busy {
		c.rw.Close()
	}
}

func (c *conn) setBusy(b bool) bool {
	c.mu.Lock()
	defer c.mu.Unlock()
	c.busy = b
	return c.stopping
}

func (c *conn) timeout(t time.Duration) {
	if c.deadline != nil {
		c.deadline.setTimeout(t)
	}
}

func (c *conn) serve() error {
	c.timeout(c.s.HandshakeTimeout)
	if err := c.handshake(); err != nil {
		if !isDisconnect(err) {
			c.log.Info("handshake failed", "err", err)
		}
		return err
	}
	for {
		c.timeout(0)
		if c.setBusy(false) {
			return nil
		}
		op, err := c.r.u64()
		if err != nil {
			if isDisconnect(err) {
				return nil // a client hanging up between ops is normal
			}
			return err
		}
		if c.setBusy(true) {
			// Shutting down: still answer this op, then close.
			defer c.rw.Close()
		}
		c.timeout(c.s.StallTimeout)
		keep, err := c.dispatch(op)
		if ferr := c.w.flush(); err == nil {
			err = ferr
		}
		if err != nil {
			if !isDisconnect(err) {
				c.log.Info("closing connection", "op", opName(op), "err", err)
			}
			return err
		}
		if !keep {
			return nil
		}
	}
}

func isDisconnect(err error) bool {
	var ne net.Error
	return errors.Is(err, io.EOF) || errors.Is(err, io.ErrUnexpectedEOF) || errors.Is(err, net.ErrClosed) ||
		errors.Is(err, syscall.EPIPE) || errors.Is(err, syscall.ECONNRESET) || errors.Is(err, os.ErrClosed) ||
		(errors.As(err, &ne) && ne.Timeout())
}

func (c *conn) handshake() error {
	magic, err := c.r.u64()
	if err != nil {
		return err
	}
	if magic != workerMagic1 {
		return fmt.Errorf("%w: bad magic %#x", errProtocol, magic)
	}
	// Nix 2.8-2.23 clients wait for this before sending their version.
	c.w.u64(workerMagic2)
	c.w.u64(1<<8 | ServerMinor)
	if err := c.w.flush(); err != nil {
		return err
	}
	cv, err := c.r.u64()
	if err != nil {
		return err
	}
	if cv>>8 != 1 || cv&0xff < minClientMinor {
		return fmt.Errorf("%w: unsupported client protocol %d.%d", errProtocol, cv>>8, cv&0xff)
	}
	c.minor = min(cv&0xff, ServerMinor)
	if c.minor >= 38 {
		if _, err := c.r.strings(maxPath); err != nil { // client features
			return err
		}
		c.w.strings(nil) // casnix needs no optional features
		if err := c.w.flush(); err != nil {
			return err
		}
	}
	if c.minor >= 14 {
		if aff, err := c.r.u64(); err != nil {
			return err
		} else if aff != 0 {
			if _, err := c.r.u64(); err != nil {
				return err
			}
		}
	}
	if c.minor >= 11 {
		if _, err := c.r.u64(); err != nil { // reserveSpace, obsolete
			return err
		}
	}
	if c.minor >= 33 {
		c.w.str(c.s.NixVersion)
	}
	if c.minor >= 35 {
		if c.trusted {
			c.w.u64(trustYes)
		} else {
			c.w.u64(trustNo)
		}
	}
	if c.refused {
		c.sendError("you are not allowed to connect to this casnix daemon (allowed-users)")
		c.w.flush()
		return fmt.Errorf("%w: peer not in allowed-users", errRefused)
	}
	c.w.u64(stderrLast)
	return c.w.flush()
}

// errRefused ends connections from peers that may not connect.
var errRefused = errors.New("connection refused")

// opError is an error reported to the client with STDERR_ERROR.
type opError struct{ msg string }

func (e *opError) Error() string { return e.msg }

func errorf(format string, args ...any) error { return &opError{fmt.Sprintf(format, args...)} }

// sendError reports err through the stderr channel.
func (c *conn) sendError(msg string) {
	c.w.u64(stderrError)
	if c.minor >= 26 {
		c.w.str("Error")
		c.w.u64(0) // level: lvlError
		c.w.str("Error")
		c.w.str(msg)
		c.w.u64(0) // no position
		c.w.u64(0) // no traces
	} else {
		c.w.str(msg)
		c.w.u64(1)
	}
}

func (c *conn) last() { c.w.u64(stderrLast) }

// full turns a basename into the full path clients see.
func (c *conn) full(name string) string {
	if name == "" {
		return ""
	}
	return c.s.StoreDir + "/" + name
}

func (c *conn) fullAll(names []string) []string {
	out := make([]string, len(names))
	for i, n := range names {
		out[i] = c.full(n)
	}
	return out
}

// parsePath checks that a client's path is a store path of this store.
func (c *conn) parsePath(p string) (string, error) {
	prefix := c.s.StoreDir + "/"
	if !strings.HasPrefix(p, prefix) {
		return "", errorf("path '%s' is not in the Nix store", p)
	}
	name, err := store.ParseName(c.s.StoreDir, p)
	if err != nil {
		return "", errorf("path '%s' is not a valid store path: %v", p, err)
	}
	return name, nil
}
