package cli

import (
	"errors"
	"fmt"
	"net"
	"os"
	"os/user"
	"path/filepath"
	"strconv"
	"strings"
	"time"

	"github.com/casnix/casnix/proto"
	"github.com/casnix/casnix/store"
)

// ServeCmd runs the daemon.
type ServeCmd struct {
	Socket           string        `name:"socket" env:"CASNIX_SOCKET" placeholder:"PATH" help:"Unix socket for the nix-daemon protocol (default: /run/casnix/daemon.sock as root, else DATA_DIR/daemon.sock). Ignored under socket activation (LISTEN_FDS)."`
	Stdio            bool          `name:"stdio" env:"CASNIX_STDIO" help:"Speak the protocol on stdin/stdout, like nix-daemon --stdio (for ssh-ng:// stores: remote-program=casnix serve --stdio)."`
	TrustedUsers     []string      `name:"trusted-users" env:"CASNIX_TRUSTED_USERS" default:"root" help:"Users (names, @group, or *) whose connections are trusted: they may add unsigned paths (with --no-check-sigs), add signatures and delete paths."`
	AllowedUsers     []string      `name:"allowed-users" env:"CASNIX_ALLOWED_USERS" default:"*" help:"Users (names, @group, or *) who may connect at all; trusted users always may. With a single @group, the socket is made 0660 and owned by that group."`
	RequireSigs      bool          `name:"require-sigs" env:"CASNIX_REQUIRE_SIGS" default:"true" negatable:"" help:"Paths added over the daemon must be content-addressed or signed by a --trusted-public-keys key, unless a trusted client passes --no-check-sigs (Nix's require-sigs)."`
	TrustedKeys      []string      `name:"trusted-public-keys" env:"CASNIX_TRUSTED_PUBLIC_KEYS" placeholder:"NAME:KEY" help:"Public keys (Nix format) whose signatures make an added path acceptable."`
	SocketMode       string        `name:"socket-mode" env:"CASNIX_SOCKET_MODE" placeholder:"MODE" help:"Permission bits of the socket (default 0666, or 0660 when --allowed-users is a single @group)."`
	SocketGroup      string        `name:"socket-group" env:"CASNIX_SOCKET_GROUP" placeholder:"GROUP" help:"Group owning the socket (default: the single @group of --allowed-users, if any)."`
	HandshakeTimeout time.Duration `name:"handshake-timeout" env:"CASNIX_HANDSHAKE_TIMEOUT" default:"30s" help:"Close connections that do not finish the handshake in time."`
	StallTimeout     time.Duration `name:"stall-timeout" env:"CASNIX_STALL_TIMEOUT" default:"5m" help:"Close connections that stall this long in the middle of an operation."`
	Mount            string        `name:"mount" env:"CASNIX_MOUNT" placeholder:"DIR" help:"Also mount the store read-only at DIR (FUSE), in the same process: the whole lower store of a Local Overlay Store."`
	MountFlags
	HTTPFlags
	ShutdownTimeout time.Duration `name:"shutdown-timeout" env:"CASNIX_SHUTDOWN_TIMEOUT" default:"30s" help:"On SIGINT/SIGTERM, how long in-flight operations may take to finish."`
}

// DefaultSocket is the socket path used when none is given.
func DefaultSocket(dataDir string) string {
	if os.Geteuid() == 0 {
		return "/run/casnix/daemon.sock"
	}
	return filepath.Join(dataDir, "daemon.sock")
}

// Run serves until interrupted.
func (c *ServeCmd) Run(g *Globals) error {
	if g.ZstdLevel == 0 {
		g.ZstdLevel = ServeWriteLevel
	}
	st, err := g.Open()
	if err != nil {
		return err
	}
	defer st.Close()
	trusted, err := userFunc("trusted-users", c.TrustedUsers)
	if err != nil {
		return err
	}
	allowed, err := userFunc("allowed-users", c.AllowedUsers)
	if err != nil {
		return err
	}
	keys, err := store.ParsePublicKeys(c.TrustedKeys)
	if err != nil {
		return fmt.Errorf("trusted-public-keys: %w", err)
	}
	srv := &proto.Server{
		Store: st, StoreDir: st.StoreDir, NixVersion: "casnix-" + Version, Logger: g.Logger,
		HandshakeTimeout: c.HandshakeTimeout, StallTimeout: c.StallTimeout, Trusted: trusted,
		Allowed: allowed, RequireSigs: c.RequireSigs, PublicKeys: keys,
	}
	if c.HTTP != "" {
		stop, err := c.startHTTP(g, st)
		if err != nil {
			return err
		}
		defer stop()
		if c.HTTPOnly {
			<-g.Ctx.Done()
			return nil
		}
	}
	if c.Stdio {
		err := srv.ServeStdio(g.Ctx, os.Stdin, os.Stdout, trusted(uint32(os.Getuid()), uint32(os.Getgid())))
		if err != nil && !errors.Is(err, os.ErrClosed) {
			return err
		}
		return nil
	}
	ln, path, err := c.listen(st.Dir())
	if err != nil {
		return err
	}
	if c.Mount != "" {
		fsrv, err := c.mount(g, st, c.Mount)
		if err != nil {
			ln.Close()
			if path != "" {
				os.Remove(path)
			}
			return err
		}
		g.Logger.Info("mounted", "dir", c.Mount)
		defer unmount(g, fsrv, c.Mount)
	}
	if path != "" {
		defer os.Remove(path)
	}
	g.Logger.Info("serving", "socket", ln.Addr().String(), "data", st.Dir(), "version", Version)
	err = srv.Serve(g.Ctx, ln, c.ShutdownTimeout)
	g.Logger.Info("stopped")
	return err
}

// listen takes the socket from systemd (LISTEN_FDS) or creates it. It
// returns the path to remove on exit ("" when systemd owns the socket).
func (c *ServeCmd) listen(dataDir string) (net.Listener, string, error) {
	if pid, _ := strconv.Atoi(os.Getenv("LISTEN_PID")); pid == os.Getpid() {
		if n, _ := strconv.Atoi(os.Getenv("LISTEN_FDS")); n >= 1 {
			f := os.NewFile(3, "systemd-socket")
			ln, err := net.FileListener(f)
			f.Close()
			if err != nil {
				return nil, "", fmt.Errorf("socket activation: %w", err)
			}
			return ln, "", nil
		}
	}
	path := c.Socket
	if path == "" {
		path = DefaultSocket(dataDir)
	}
	if err := os.MkdirAll(filepath.Dir(path), 0o755); err != nil {
		return nil, "", fmt.Errorf("create socket dir: %w", err)
	}
	if _, err := os.Lstat(path); err == nil {
		// A socket nobody answers on is left over from a crash.
		if conn, err := net.Dial("unix", path); err == nil {
			conn.Close()
			return nil, "", fmt.Errorf("%s: another daemon is already listening there", path)
		}
		if err := os.Remove(path); err != nil {
			return nil, "", fmt.Errorf("remove stale socket: %w", err)
		}
	}
	ln, err := net.Listen("unix", path)
	if err != nil {
		return nil, "", fmt.Errorf("listen: %w", err)
	}
	// Like nix-daemon's socket: anyone may connect and trust is decided per
	// connection from the peer's credentials, unless access is narrowed to
	// a group, which the file mode then enforces too.
	mode, gid, err := c.socketAccess()
	if err == nil && gid >= 0 {
		err = os.Chown(path, -1, gid)
	}
	if err == nil {
		err = os.Chmod(path, mode)
	}
	if err != nil {
		ln.Close()
		os.Remove(path)
		return nil, "", fmt.Errorf("socket permissions: %w", err)
	}
	return ln, path, nil
}

// socketAccess is the socket's mode and group (-1: leave it).
func (c *ServeCmd) socketAccess() (os.FileMode, int, error) {
	group := c.SocketGroup
	mode := os.FileMode(0o666)
	entries := userEntries(c.AllowedUsers)
	if group == "" && len(entries) == 1 && strings.HasPrefix(entries[0], "@") {
		group = entries[0][1:]
	}
	gid := -1
	if group != "" {
		g, err := user.LookupGroup(group)
		if err != nil {
			return 0, 0, err
		}
		gid, _ = strconv.Atoi(g.Gid)
		mode = 0o660
	}
	if c.SocketMode != "" {
		m, err := strconv.ParseUint(c.SocketMode, 8, 32)
		if err != nil || m > 0o777 {
			return 0, 0, fmt.Errorf("socket-mode %q: want octal permission bits like 0660", c.SocketMode)
		}
		mode = os.FileMode(m)
	}
	return mode, gid, nil
}

// userEntries splits user lists (flags repeated, or comma- or
// space-separated in one value) into names, @groups and *.
func userEntries(spec []string) []string {
	var out []string
	for _, s := range spec {
		out = append(out, strings.FieldsFunc(s, func(r rune) bool { return r == ',' || r == ' ' })...)
	}
	return out
}

// userFunc builds the check of a user list (--trusted-users or
// --allowed-users, named by flag in errors): names, @group and *.
func userFunc(flag string, spec []string) (func(uid, gid uint32) bool, error) {
	uids := map[uint32]bool{}
	gids := map[uint32]bool{}
	all := false
	for _, e := range userEntries(spec) {
		switch {
		case e == "*":
			all = true
		case strings.HasPrefix(e, "@"):
			g, err := user.LookupGroup(e[1:])
			if err != nil {
				return nil, fmt.Errorf("%s: %w", flag, err)
			}
			id, _ := strconv.Atoi(g.Gid)
			gids[uint32(id)] = true
		default:
			u, err := user.Lookup(e)
			if err != nil {
				return nil, fmt.Errorf("%s: %w", flag, err)
			}
			id, _ := strconv.Atoi(u.Uid)
			uids[uint32(id)] = true
		}
	}
	return func(uid, gid uint32) bool {
		if all || uids[uid] || gids[gid] {
			return true
		}
		if len(gids) == 0 {
			return false
		}
		u, err := user.LookupId(strconv.Itoa(int(uid)))
		if err != nil {
			return false
		}
		groups, err := u.GroupIds()
		if err != nil {
			return false
		}
		for _, g := range groups {
			id, _ := strconv.Atoi(g)
			if gids[uint32(id)] {
				return true
			}
		}
		return false
	}, nil
}
