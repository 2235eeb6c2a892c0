package proto

import (
	"bufio"
	"context"
	"errors"
	"fmt"
	"github.com/casnix/casnix/loglimit"
	"io"
	"log/slog"
	"net"
	"os"
	"strings"
	"sync"
	"syscall"
	"time"

	"github.com/casnix/casnix/store"
	"github.com/casnix/casnix/subst"
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
	// MaxConnections caps the connections open at once, and
	// MaxConnectionsPerUser those of one uid (trusted users are exempt
	// from the latter); zero is no limit. A connection over a limit is
	// refused with an error during its handshake, which Nix prints.
	MaxConnections        int
	MaxConnectionsPerUser int
	// Subst, when set, supplies paths the store lacks from upstream
	// binary caches (nix-daemon's substituters).
	Subst *subst.Substituter
	// Lazy, when set (serve --lazy), makes the store answer as if it held
	// every path an upstream has, validly signed: IsValidPath,
	// QueryValidPaths, QueryPathInfo, QueryDeriver and
	// QueryPathFromHashPart answer from the narinfo, and NarFromPath
	// fetches first. A Local Overlay Store never asks its lower store to
	// substitute, so this is how one gets paths from upstream.
	Lazy *subst.Lazy

	wg       sync.WaitGroup
	mu       sync.Mutex
	conns    map[*conn]struct{}
	active   int            // connections admitted and not yet ended
	perUser  map[uint32]int // of active, by peer uid
	refusing int            // refusals still in their handshake
	closing  bool           // the drain is over: open connections are being closed
	abort    chan struct{}
	abortMu  sync.Once
	refusals loglimit.Limiter // refusal warnings, at most one of a kind a second
}

// maxRefusing bounds the connections being refused at once: past it a
// connection over a limit is closed without a handshake, so a flood of
// connections cannot hold goroutines and descriptors for the handshake
// timeout each.
const maxRefusing = 64

// Serve accepts connections on ln until ctx is done. Then it closes ln at
// once (a restarted daemon can listen, and under socket activation take
// the next connections), and serves the connections already open, every
// op they send, as nix-daemon's forked workers do, until their clients
// hang up, drain passes or Abort is called. Only then are their ops
// cancelled and the connections closed.
func (s *Server) Serve(ctx context.Context, ln net.Listener, drain time.Duration) error {
	s.init()
	stop := context.AfterFunc(ctx, func() { ln.Close() })
	defer stop()
	// Connections outlive ctx: theirs is cancelled when the drain ends.
	connCtx, cancelConns := context.WithCancel(context.WithoutCancel(ctx))
	defer cancelConns()
	for {
		c, err := ln.Accept()
		if err != nil {
			if ctx.Err() != nil {
				s.drain(drain, cancelConns)
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
		p := s.peerAccess(c)
		refusal := p.refusal
		if refusal == "" {
			refusal = s.admit(p)
		}
		if refusal != "" && !s.startRefusal() {
			c.Close()
			continue
		}
		s.wg.Add(1)
		go func() {
			defer s.wg.Done()
			if refusal != "" {
				defer s.endRefusal()
			} else {
				defer s.release(p)
			}
			s.serveNetConn(connCtx, c, p, refusal)
		}()
	}
}

func (s *Server) init() {
	s.mu.Lock()
	defer s.mu.Unlock()
	if s.abort == nil {
		s.abort = make(chan struct{})
	}
}

// Abort ends a drain at once: the ops of connections still open are
// cancelled and the connections closed. It is what a second SIGTERM does.
func (s *Server) Abort() {
	s.init()
	s.abortMu.Do(func() { close(s.abort) })
}

func (s *Server) log() *slog.Logger {
	if s.Logger == nil {
		return slog.New(slog.DiscardHandler)
	}
	return s.Logger
}

// drain waits for the open connections to end, until timeout or Abort;
// then it cancels their ops and closes them.
func (s *Server) drain(timeout time.Duration, cancel context.CancelFunc) {
	done := make(chan struct{})
	go func() { s.wg.Wait(); close(done) }()
	s.mu.Lock()
	n := len(s.conns)
	s.mu.Unlock()
	if n > 0 {
		s.log().Info("stopped accepting; serving open connections until their clients hang up", "connections", n, "timeout", timeout)
	}
	var reason string
	select {
	case <-done:
		return
	case <-time.After(timeout):
		reason = "shutdown timeout passed"
	case <-s.abort:
		reason = "stopping at once"
	}
	s.mu.Lock()
	for c := range s.conns {
		s.log().Warn(reason+": closing a connection still open", "uid", c.uid, "op", c.currentOp())
	}
	s.mu.Unlock()
	cancel()
	s.mu.Lock()
	s.closing = true
	for c := range s.conns {
		c.rw.Close()
	}
	s.mu.Unlock()
	<-done
}

// peer is what SO_PEERCRED tells of a connecting process.
type peer struct {
	uid     uint32
	known   bool // credentials read: uid is the peer's
	trusted bool
	refusal string // why it may not connect ("" = it may)
}

// peerAccess decides from the peer's SO_PEERCRED credentials whether it is
// trusted and whether it may connect at all.
func (s *Server) peerAccess(c net.Conn) peer {
	uc, ok := c.(*net.UnixConn)
	if !ok {
		return peer{refusal: s.allowedRefusal(s.Allowed == nil)}
	}
	cred, err := peerCred(uc)
	if err != nil {
		s.log().Warn("cannot read peer credentials; treating client as untrusted", "err", err)
		return peer{refusal: s.allowedRefusal(s.Allowed == nil)}
	}
	p := peer{uid: cred.Uid, known: true}
	if s.Trusted != nil {
		p.trusted = s.Trusted(cred.Uid, cred.Gid)
	} else {
		p.trusted = cred.Uid == 0
	}
	allowed := p.trusted || s.Allowed == nil || s.Allowed(cred.Uid, cred.Gid)
	if !allowed {
		s.refusals.Warn(s.log(), "refusing connection: user not in allowed-users", "uid", cred.Uid, "gid", cred.Gid)
	}
	p.refusal = s.allowedRefusal(allowed)
	return p
}

func (s *Server) allowedRefusal(allowed bool) string {
	if allowed {
		return ""
	}
	return "you are not allowed to connect to this casnix daemon (allowed-users)"
}

// admit counts a new connection against the limits, or says why it is
// refused.
func (s *Server) admit(p peer) string {
	s.mu.Lock()
	defer s.mu.Unlock()
	if s.MaxConnections > 0 && s.active >= s.MaxConnections {
		s.refusals.Warn(s.log(), "refusing connection: too many connections", "uid", p.uid, "max", s.MaxConnections)
		return fmt.Sprintf("casnix has too many connections (--max-connections %d); try again later", s.MaxConnections)
	}
	if p.known && !p.trusted && s.MaxConnectionsPerUser > 0 && s.perUser[p.uid] >= s.MaxConnectionsPerUser {
		s.refusals.Warn(s.log(), "refusing connection: too many connections from one user", "uid", p.uid, "max", s.MaxConnectionsPerUser)
		return fmt.Sprintf("casnix has too many connections from uid %d (--max-connections-per-user %d); try again later", p.uid, s.MaxConnectionsPerUser)
	}
	if s.perUser == nil {
		s.perUser = map[uint32]int{}
	}
	s.active++
	if p.known {
		s.perUser[p.uid]++
	}
	return ""
}

// release undoes admit.
func (s *Server) release(p peer) {
	s.mu.Lock()
	defer s.mu.Unlock()
	s.active--
	if p.known {
		if s.perUser[p.uid]--; s.perUser[p.uid] <= 0 {
			delete(s.perUser, p.uid)
		}
	}
}

func (s *Server) startRefusal() bool {
	s.mu.Lock()
	defer s.mu.Unlock()
	if s.refusing >= maxRefusing {
		return false
	}
	s.refusing++
	return true
}

func (s *Server) endRefusal() {
	s.mu.Lock()
	s.refusing--
	s.mu.Unlock()
}

func (s *Server) serveNetConn(ctx context.Context, nc net.Conn, p peer, refusal string) {
	growSendBuffer(nc)
	dc := &deadlineConn{Conn: nc, write: s.StallTimeout}
	c := s.newConn(ctx, dc, p.trusted)
	c.uid = p.uid
	c.refusal = refusal
	c.deadline = dc
	defer nc.Close()
	if !s.track(c, true) {
		return
	}
	defer s.track(c, false)
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

// track adds or removes an open connection. It refuses to add one once
// the drain has ended, when connections are being closed.
func (s *Server) track(c *conn, add bool) bool {
	s.mu.Lock()
	defer s.mu.Unlock()
	if s.conns == nil {
		s.conns = map[*conn]struct{}{}
	}
	if !add {
		delete(s.conns, c)
		return true
	}
	if s.closing {
		return false
	}
	s.conns[c] = struct{}{}
	return true
}

// deadlineConn sets read deadlines by phase: the handshake and op bodies
// are bounded, waiting for the next op is not. Every write is bounded, so
// a client that stops reading (a NarFromPath it does not consume) is
// dropped instead of holding its goroutine, buffers and temp roots.
//
// A deadline is moved on only when it would move by more than
// deadlineSlack: setting one is a runtime timer update, and a client
// asking path-info 7,000 times a second on one connection paid three per
// request (bench/daemon.sh, QueryPathInfo). A phase's bound is so kept to
// within deadlineSlack of its length after the last read or write.
type deadlineConn struct {
	net.Conn
	write    time.Duration
	mu       sync.Mutex
	timeout  time.Duration
	readSet  time.Time // the read deadline last set; zero: none
	writeSet time.Time // likewise for writes
}

// deadlineSlack is how far a deadline may lag behind its timeout: a
// sixteenth of it, at most a second.
func deadlineSlack(t time.Duration) time.Duration { return min(t/16, time.Second) }

// moved reports whether a deadline last set at set must be set to want.
func moved(set, want time.Time, t time.Duration) bool {
	return set.IsZero() || want.Before(set) || want.Sub(set) > deadlineSlack(t)
}

func (d *deadlineConn) setTimeout(t time.Duration) {
	d.mu.Lock()
	defer d.mu.Unlock()
	d.timeout = t
	if t == 0 && !d.readSet.IsZero() {
		d.Conn.SetReadDeadline(time.Time{})
		d.readSet = time.Time{}
	}
}

func (d *deadlineConn) Read(p []byte) (int, error) {
	d.mu.Lock()
	if t := d.timeout; t > 0 {
		if want := time.Now().Add(t); moved(d.readSet, want, t) {
			d.Conn.SetReadDeadline(want)
			d.readSet = want
		}
	}
	d.mu.Unlock()
	return d.Conn.Read(p)
}

func (d *deadlineConn) Write(p []byte) (int, error) {
	if d.write > 0 {
		d.mu.Lock()
		if want := time.Now().Add(d.write); moved(d.writeSet, want, d.write) {
			d.Conn.SetWriteDeadline(want)
			d.writeSet = want
		}
		d.mu.Unlock()
	}
	return d.Conn.Write(p)
}

// connBufSize is each connection's read and write buffer: every open
// connection, idle or not, holds two, so they are what hundreds of pooled
// client connections cost at rest; 32 KiB keeps NarFromPath's writes large.
const connBufSize = 32 << 10

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
	uid      uint32
	log      *slog.Logger
	refusal  string // why the peer may not connect: the handshake ends in this error
	// useSubstitutes is the client's option (SetOptions).
	useSubstitutes bool
	// sel is the upstreams the client's substituters settings name
	// (SetOptions); nil, until it sends them, is the default ones
	// (Substituter.Default). subs is the substituters setting's URLs
	// (nil: not sent).
	sel  *subst.Selection
	subs []string
	// keys, when set, are the keys a trusted client's substitutions are
	// checked against (its trusted-public-keys), not PublicKeys.
	keys store.PublicKeys
	// upReal collects, during a BuildPaths or QueryMissing, the upstream
	// realisations of floating CA outputs (by DrvOutput id; nil: none
	// upstream), asked once per op, and in a BuildPaths registered once
	// their output paths are valid (subst.go).
	upReal map[string]*store.Realisation

	mu    sync.Mutex
	op    uint64           // the op being served, 0 between ops
	roots *store.TempRoots // created by the first temp root
}

func (s *Server) newConn(ctx context.Context, rw io.ReadWriteCloser, trusted bool) *conn {
	return &conn{
		s: s, ctx: ctx, rw: rw, trusted: trusted, log: s.log(), useSubstitutes: true,
		r: wireReader{r: bufio.NewReaderSize(rw, connBufSize)},
		w: wireWriter{w: bufio.NewWriterSize(rw, connBufSize)},
	}
}

func (c *conn) setOp(op uint64) {
	c.mu.Lock()
	c.op = op
	c.mu.Unlock()
}

// currentOp names the op being served, for logs.
func (c *conn) currentOp() string {
	c.mu.Lock()
	defer c.mu.Unlock()
	if c.op == 0 {
		return "none (idle)"
	}
	return opName(c.op)
}

func (c *conn) timeout(t time.Duration) {
	if c.deadline != nil {
		c.deadline.setTimeout(t)
	}
}

func (c *conn) serve() error {
	defer c.closeRoots()
	c.timeout(c.s.HandshakeTimeout)
	if err := c.handshake(); err != nil {
		if !isDisconnect(err) {
			c.log.Info("handshake failed", "err", err)
		}
		return err
	}
	for {
		c.timeout(0)
		c.setOp(0)
		op, err := c.r.u64()
		if err != nil {
			if isDisconnect(err) {
				return nil // a client hanging up between ops is normal
			}
			return err
		}
		c.setOp(op)
		c.timeout(c.s.StallTimeout)
		keep, err := c.dispatch(op)
		if ferr := c.w.flush(); err == nil {
			err = ferr
		}
		if err != nil {
			switch {
			case errors.Is(err, errHungUp):
				c.log.Info("client hung up; op stopped", "op", opName(op), "err", err)
			case !isDisconnect(err):
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
	if c.refusal != "" {
		c.sendError(c.refusal)
		c.w.flush()
		return fmt.Errorf("%w: %s", errRefused, c.refusal)
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

// writePath writes the full store path of name ("" for none).
func (c *conn) writePath(name string) { c.w.storePath(c.s.StoreDir, name) }

// writePaths writes names as a list of full store paths.
func (c *conn) writePaths(names []string) { c.w.storePaths(c.s.StoreDir, names) }

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
