package cli

import (
	"context"
	"errors"
	"fmt"
	"io"
	"log/slog"
	"net"
	"os"
	"os/user"
	"path/filepath"
	"runtime/debug"
	"strconv"
	"strings"
	"sync"
	"syscall"
	"time"

	"github.com/casnix/casnix/binarycache"
	"github.com/casnix/casnix/fusefs"
	"github.com/casnix/casnix/loglimit"
	"github.com/casnix/casnix/proto"
	"github.com/casnix/casnix/store"
	"github.com/casnix/casnix/subst"
)

// ServeCmd runs the daemon.
type ServeCmd struct {
	Socket           string        `name:"socket" env:"CASNIX_SOCKET" placeholder:"PATH" help:"Unix socket for the nix-daemon protocol (default: /run/casnix/daemon.sock as root, else DATA_DIR/daemon.sock). Ignored under socket activation (LISTEN_FDS)."`
	Stdio            bool          `name:"stdio" env:"CASNIX_STDIO" help:"Speak the protocol on stdin/stdout, like nix-daemon --stdio (for ssh-ng:// stores: remote-program=casnix serve --stdio)."`
	TrustedUsers     []string      `name:"trusted-users" env:"CASNIX_TRUSTED_USERS" default:"root" help:"Users (names, @group, or *) whose connections are trusted: they may add unsigned paths (with --no-check-sigs), add signatures and delete paths."`
	AllowedUsers     []string      `name:"allowed-users" env:"CASNIX_ALLOWED_USERS" default:"*" help:"Users (names, @group, or *) who may connect at all; trusted users always may. With a single @group, the socket is made 0660 and owned by that group."`
	RequireSigs      bool          `name:"require-sigs" env:"CASNIX_REQUIRE_SIGS" default:"true" negatable:"" help:"Paths added over the daemon must be content-addressed or signed by a --trusted-public-keys key, unless a trusted client passes --no-check-sigs (Nix's require-sigs)."`
	TrustedKeys      []string      `name:"trusted-public-keys" env:"CASNIX_TRUSTED_PUBLIC_KEYS" placeholder:"NAME:KEY" help:"Public keys (Nix format) whose signatures make an added or substituted path acceptable."`
	Substituters     []string      `name:"substituters" env:"CASNIX_SUBSTITUTERS" placeholder:"URL" help:"Binary caches (file://, http://, https://; ?priority=N) to fetch missing paths from on demand, lowest priority number first, as nix-daemon's substituters. Paths need a signature by a --trusted-public-keys key unless content-addressed (or --no-require-sigs)."`
	TrustedSubsts    []string      `name:"trusted-substituters" env:"CASNIX_TRUSTED_SUBSTITUTERS" placeholder:"URL" help:"Binary caches used only for daemon clients whose substituters setting names them (nix-daemon's trusted-substituters); never by the lazy store or the HTTP pull-through."`
	SubstTimeout     time.Duration `name:"substituter-timeout" env:"CASNIX_SUBSTITUTER_TIMEOUT" default:"1m" help:"An upstream that sends nothing for this long (no answer, or a download that stopped flowing) fails the attempt, which is retried, then the next upstream is asked (as Nix's stalled-download-timeout). Its nix-cache-info gets at most 10s."`
	SocketMode       string        `name:"socket-mode" env:"CASNIX_SOCKET_MODE" placeholder:"MODE" help:"Permission bits of the socket (default 0666, or 0660 when --allowed-users is a single @group)."`
	SocketGroup      string        `name:"socket-group" env:"CASNIX_SOCKET_GROUP" placeholder:"GROUP" help:"Group owning the socket (default: the single @group of --allowed-users, if any)."`
	HandshakeTimeout time.Duration `name:"handshake-timeout" env:"CASNIX_HANDSHAKE_TIMEOUT" default:"30s" help:"Close connections that do not finish the handshake in time."`
	StallTimeout     time.Duration `name:"stall-timeout" env:"CASNIX_STALL_TIMEOUT" default:"5m" help:"Close connections that stall this long in the middle of an operation."`
	Mount            string        `name:"mount" env:"CASNIX_MOUNT" placeholder:"DIR" help:"Also mount the store read-only at DIR (FUSE), in the same process: the whole lower store of a Local Overlay Store."`
	Lazy             bool          `name:"lazy" env:"CASNIX_LAZY" help:"Lazy lower store (needs --substituters and --mount): paths an upstream has, validly signed, are answered for as if present (path-info from the narinfo), and fetched with their closure when first looked up in the mount (or read over the daemon). For a Local Overlay Store, which never asks its lower store to substitute."`
	MountFlags
	HTTPFlags
	MemoryLimit      string        `name:"memory-limit" env:"CASNIX_MEMORY_LIMIT" default:"auto" placeholder:"BYTES" help:"Soft limit on the daemon's Go memory (GOMEMLIMIT, which overrides it): the garbage collector works harder near it, and the decoded-frame cache gets 40% of it (and the caches of index lookups beside it up to 15%, 48 MiB at most). auto: 1/16 of the machine's (or the container's) memory, at least 128 MiB and at most 2 GiB. The process maps about 75 MiB more that it never touches (Go runtime tables)."`
	ShutdownTimeout  time.Duration `name:"shutdown-timeout" env:"CASNIX_SHUTDOWN_TIMEOUT" default:"30s" help:"On SIGINT/SIGTERM, the socket is closed at once and open connections are served until their clients hang up, for at most this long; then their operations are cancelled. A second signal stops at once."`
	MaxConnections   int           `name:"max-connections" env:"CASNIX_MAX_CONNECTIONS" default:"256" help:"Connections open at once; more are refused with an error in the handshake (0: no limit)."`
	RepackQuiet      time.Duration `name:"repack-quiet" env:"CASNIX_REPACK_QUIET" default:"5m" help:"Repack in the background (idle CPU priority, one core at most) once no write has committed for this long and --repack-min of new data waits (0: never; casnix repack does it by hand)."`
	RepackMin        string        `name:"repack-min" env:"CASNIX_REPACK_MIN" default:"64MiB" placeholder:"BYTES" help:"New data (raw) that must wait before a background repack starts."`
	MaxSize          string        `name:"max-size" env:"CASNIX_MAX_SIZE" default:"0" placeholder:"BYTES" help:"Space budget for substituted paths: when the pack files take more disk than this, the least recently used substituted paths are deleted (as casnix gc, roots and temp roots respected) until they take 90% of it. Paths clients added or imported, gcroots and --pin closures are never evicted. 0: no budget."`
	Pin              []string      `name:"pin" env:"CASNIX_PIN" placeholder:"PATH" help:"Store paths whose closures --max-size never evicts."`
	EvictInterval    time.Duration `name:"evict-interval" env:"CASNIX_EVICT_INTERVAL" default:"10s" hidden:"" help:"How often access times are saved and --max-size is checked."`
	UploadWithin     time.Duration `name:"upload-within" env:"CASNIX_UPLOAD_WITHIN" default:"10s" help:"With --packs and --durability local: a pack is sealed and uploaded once its oldest frame waited this long (or it is full). Until then an acknowledged write is on the local disk only (fsynced)."`
	Durability       string        `name:"durability" env:"CASNIX_DURABILITY" enum:"local,bucket" default:"local" help:"With --packs s3://…: when a write is acknowledged. local: once fsynced on this host's disk; it reaches the bucket within --upload-within plus the upload (a lost host loses that window). bucket: only once its packs are uploaded and the database naming them is replicated (each write seals its packs: more, smaller objects); a write that cannot get there within --bucket-timeout fails and is taken back, and writes are refused while uploads are failing."`
	BucketTimeout    time.Duration `name:"bucket-timeout" env:"CASNIX_BUCKET_TIMEOUT" default:"30s" help:"With --durability bucket: how long a write waits for the bucket before it fails."`
	ReplicaOf        string        `name:"replica-of" env:"CASNIX_REPLICA_OF" placeholder:"URL" help:"Serve this data dir as a read replica of the primary whose packs and database are in the bucket at URL (its --packs s3://…): the database is restored and kept current by a follower process, bytes are read from the bucket through the local cache (--cache-size). Reads only: writes are refused naming the primary."`
	FollowInterval   time.Duration `name:"follow-interval" env:"CASNIX_FOLLOW_INTERVAL" default:"1s" help:"With --replica-of: how often the bucket is asked for the primary's new transactions."`
	DeadPackMargin   time.Duration `name:"dead-pack-margin" env:"CASNIX_DEAD_PACK_MARGIN" default:"1h" help:"With --packs s3://…: the object of a pack a compaction dropped is deleted from the bucket once the oldest database state a restore from the bucket can give (snapshots are kept 24 h) was made this long after the drop. It covers replicas lagging behind and readers still on older states."`
	DeadPackInterval time.Duration `name:"dead-pack-interval" env:"CASNIX_DEAD_PACK_INTERVAL" default:"10m" help:"With --packs s3://…: how often dropped packs' objects are looked at for deletion from the bucket (0: never)."`
	DBSyncInterval   time.Duration `name:"db-sync-interval" env:"CASNIX_DB_SYNC_INTERVAL" default:"1s" help:"With --packs s3://…: how often the database's new transactions are shipped to the bucket (Litestream), for replicas and restores."`
	MaxPerUser       int           `name:"max-connections-per-user" env:"CASNIX_MAX_CONNECTIONS_PER_USER" default:"64" help:"Connections open at once from one uid; trusted users are exempt (0: no limit)."`
}

// substituterURLs splits the --substituters values: each flag (or
// CASNIX_SUBSTITUTERS, split at commas) may hold several URLs separated by
// spaces, as Nix's substituters setting does.
func substituterURLs(vals []string) []string {
	var urls []string
	for _, v := range vals {
		urls = append(urls, strings.Fields(v)...)
	}
	return urls
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
	if err := c.checkLazy(); err != nil {
		return err
	}
	if n, err := parseSize(c.MaxSize); err == nil && n > 0 {
		g.Budgeted = true // (a bad --max-size is told below)
	}
	if err := c.applyMemoryLimit(g); err != nil {
		return err
	}
	g.Upload, g.UploadWithin = true, c.UploadWithin
	bucketDurable := c.Durability == "bucket"
	if bucketDurable {
		if c.ReplicaOf != "" {
			return errors.New("--durability bucket is for a primary: a read replica takes no writes")
		}
		g.SealOnCommit = true
	}
	if c.ReplicaOf != "" {
		if len(c.Substituters) > 0 || len(c.TrustedSubsts) > 0 || c.MaxSize != "0" {
			return errors.New("--replica-of: a read replica cannot substitute or evict (--substituters, --trusted-substituters, --max-size): it holds the primary's paths only")
		}
		stop, err := startFollower(g, g.dataDir(), c.ReplicaOf, c.FollowInterval)
		if err != nil {
			return err
		}
		defer stop()
	}
	st, err := g.Open()
	if err != nil {
		return err
	}
	defer st.Close()
	replica := st.ReplicaOf() != ""
	if c.ReplicaOf == "" && replica {
		return fmt.Errorf("data dir %s is a read replica of %s: serve it with --replica-of", st.Dir(), st.ReplicaOf())
	}
	if replica {
		g.Logger.Info("read replica", "primary", st.ReplicaOf())
		c.RepackQuiet, c.EvictInterval = 0, 0 // both write
	} else if st.Packs() != "" {
		stop, primary, err := startPrimary(g, st, c.DBSyncInterval)
		if err != nil {
			return err
		}
		// Before st.Close (deferred earlier, so run later).
		defer stop()
		if bucketDurable {
			if err := st.SetBucketDurable(primary.Sync, c.BucketTimeout); err != nil {
				return err
			}
		}
	} else if bucketDurable {
		return errors.New("--durability bucket needs packs in a bucket (--packs s3://…)")
	}
	if st.Packs() != "" && !replica {
		if bucketDurable {
			g.Logger.Info("packs go to a bucket; writes are acknowledged once there", "url", st.Packs(), "bucket-timeout", c.BucketTimeout)
		} else {
			g.Logger.Info("packs go to a bucket", "url", st.Packs(), "upload-within", c.UploadWithin)
		}
		ctx, cancel := context.WithCancel(g.Ctx)
		done := make(chan struct{})
		go func() {
			defer close(done)
			logUploads(ctx, st, g.Logger)
		}()
		// Before st.Close (deferred earlier, so run later).
		defer func() { cancel(); <-done }()
		if c.DeadPackInterval > 0 {
			ctx, cancel := context.WithCancel(g.Ctx)
			done := make(chan struct{})
			go func() {
				defer close(done)
				deadPackDeleter(ctx, st, store.DeadPackOptions{Margin: c.DeadPackMargin}, c.DeadPackInterval, g.Logger)
			}()
			defer func() { cancel(); <-done }()
		}
	}
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
		MaxConnections: c.MaxConnections, MaxConnectionsPerUser: c.MaxPerUser,
	}
	// The substituter is there even without upstreams: a trusted client
	// may name its own caches, as with nix-daemon (subst.Select). Opening
	// contacts no upstream: one that is down cannot stop the daemon from
	// starting.
	sub, err := subst.New(st, substituterURLs(c.Substituters), subst.Options{StoreDir: st.StoreDir, Keys: keys, Logger: g.Logger,
		Timeout: c.SubstTimeout, InfoTimeout: min(subst.DefaultInfoTimeout, c.SubstTimeout), OptIn: substituterURLs(c.TrustedSubsts)})
	if err != nil {
		return err
	}
	defer sub.Close()
	srv.Subst = sub
	upstreams := sub.Configured()
	if upstreams {
		if c.Lazy {
			// Closed before the substituter (defers run last first).
			srv.Lazy = sub.Lazy(c.RequireSigs, 0)
			defer srv.Lazy.Close()
		}
	}
	maxSize, err := parseSize(c.MaxSize)
	if err != nil {
		return fmt.Errorf("--max-size: %w", err)
	}
	pins, err := pinNames(st.StoreDir, c.Pin)
	if err != nil {
		return err
	}
	if c.EvictInterval > 0 && (maxSize > 0 || upstreams) {
		st.EnableAccessTimes()
		ctx, cancel := context.WithCancel(g.Ctx)
		done := make(chan struct{})
		go func() {
			defer close(done)
			evictor(ctx, st, store.EvictOptions{MaxSize: maxSize, Pin: pins, RuntimeRoots: true}, c.EvictInterval, g.Logger)
		}()
		// Before st.Close (deferred earlier, so run later).
		defer func() { cancel(); <-done }()
	}
	if c.HTTP != "" {
		var pull binarycache.Puller
		if upstreams && c.HTTPPull {
			// Its own lazy view (not the daemon's --lazy): its roots keep
			// what a pull fetched while clients download the NARs. Closed
			// after the HTTP server stops (defers run last first).
			p := srv.Subst.PullThrough(c.RequireSigs)
			defer p.Close()
			pull = p
		}
		stop, err := c.startHTTP(g, st, func(w io.Writer) { substMetrics(w, srv.Subst, st, maxSize) }, pull)
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
	ln, err := c.listen(st.Dir())
	if err != nil {
		return err
	}
	if c.RepackQuiet > 0 {
		minBytes, err := parseSize(c.RepackMin)
		if err != nil {
			return fmt.Errorf("--repack-min: %w", err)
		}
		ctx, cancel := context.WithCancel(g.Ctx)
		done := make(chan struct{})
		go func() {
			defer close(done)
			st.RepackInBackground(ctx, store.BackgroundRepack{Quiet: c.RepackQuiet, MinBytes: minBytes})
		}()
		// Before st.Close (deferred earlier, so run later).
		defer func() { cancel(); <-done }()
	}
	// Closing the listener removes a socket file we created (if it is
	// still ours); Serve closes it at the first signal.
	defer ln.Close()
	if c.Mount != "" {
		var fetch func(context.Context, string) error
		if srv.Lazy != nil {
			fetch = lazyFetch(g, srv.Lazy)
		}
		fsrv, err := c.mount(g, st, c.Mount, fetch)
		if err != nil {
			return err
		}
		g.Logger.Info("mounted", "dir", c.Mount)
		defer unmount(g, fsrv, c.Mount)
	}
	if g.Abort != nil {
		stop := make(chan struct{})
		defer close(stop)
		go func() {
			select {
			case <-g.Abort:
				srv.Abort()
			case <-stop:
			}
		}()
	}
	g.Logger.Info("serving", "socket", ln.Addr().String(), "data", st.Dir(), "version", Version)
	err = srv.Serve(g.Ctx, ln, c.ShutdownTimeout)
	g.Logger.Info("stopped")
	return err
}

// ownedSocket is a listener on a socket file this process created. Close
// removes the file only while it is still the one we bound: a daemon
// started on the same path while this one drains has its own, which must
// stay. The file is removed before the listener is closed, so no other
// daemon can take a socket that still answers for stale and remove it.
type ownedSocket struct {
	*net.UnixListener
	path     string
	dev, ino uint64
	once     sync.Once
}

func (o *ownedSocket) Close() error {
	o.once.Do(func() {
		var st syscall.Stat_t
		if err := syscall.Lstat(o.path, &st); err == nil && uint64(st.Dev) == o.dev && st.Ino == o.ino {
			os.Remove(o.path)
		}
	})
	return o.UnixListener.Close()
}

// listen takes the socket from systemd (LISTEN_FDS) or creates it. A
// socket from systemd is left in place on exit; one we created is removed
// when its listener is closed, if it is still ours.
func (c *ServeCmd) listen(dataDir string) (net.Listener, error) {
	if pid, _ := strconv.Atoi(os.Getenv("LISTEN_PID")); pid == os.Getpid() {
		if n, _ := strconv.Atoi(os.Getenv("LISTEN_FDS")); n >= 1 {
			f := os.NewFile(3, "systemd-socket")
			ln, err := net.FileListener(f)
			f.Close()
			if err != nil {
				return nil, fmt.Errorf("socket activation: %w", err)
			}
			return ln, nil
		}
	}
	path := c.Socket
	if path == "" {
		path = DefaultSocket(dataDir)
	}
	if err := os.MkdirAll(filepath.Dir(path), 0o755); err != nil {
		return nil, fmt.Errorf("create socket dir: %w", err)
	}
	if _, err := os.Lstat(path); err == nil {
		// A socket nobody answers on is left over from a crash.
		if conn, err := net.Dial("unix", path); err == nil {
			conn.Close()
			return nil, fmt.Errorf("%s: another daemon is already listening there", path)
		}
		if err := os.Remove(path); err != nil {
			return nil, fmt.Errorf("remove stale socket: %w", err)
		}
	}
	ul, err := net.ListenUnix("unix", &net.UnixAddr{Name: path, Net: "unix"})
	if err != nil {
		return nil, fmt.Errorf("listen: %w", err)
	}
	ul.SetUnlinkOnClose(false) // ownedSocket removes it, if still ours
	var fst syscall.Stat_t
	if err := syscall.Lstat(path, &fst); err != nil {
		ul.Close()
		return nil, fmt.Errorf("listen: %w", err)
	}
	ln := &ownedSocket{UnixListener: ul, path: path, dev: uint64(fst.Dev), ino: fst.Ino}
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
		return nil, fmt.Errorf("socket permissions: %w", err)
	}
	return ln, nil
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

// applyMemoryLimit sets the Go soft memory limit and sizes the frame cache
// from --memory-limit. The daemon is one process shared by every user (and,
// under an overlay, by every program on the machine): its memory must not
// follow its load. Per connection it is bounded (protocol buffers, strings
// grown as they arrive); what is left is the frame cache and the garbage
// the collector has not yet reclaimed, which the soft limit keeps in check
// instead of letting the heap double (GOGC=100) under a burst of readers.
func (c *ServeCmd) applyMemoryLimit(g *Globals) error {
	limit, err := memoryLimit(c.MemoryLimit, machineMemory())
	if err != nil {
		return fmt.Errorf("--memory-limit: %w", err)
	}
	if limit < 32<<20 {
		return fmt.Errorf("--memory-limit %s: at least 32 MiB", c.MemoryLimit)
	}
	if os.Getenv("GOMEMLIMIT") == "" {
		debug.SetMemoryLimit(limit)
	}
	g.FrameCache = limit * 2 / 5
	return nil
}

// Bounds of --memory-limit auto.
const (
	autoMemoryMin = 128 << 20
	autoMemoryMax = 2 << 30
)

// memoryLimit parses --memory-limit; "auto" takes 1/16 of the machine's
// memory, within [autoMemoryMin, autoMemoryMax]. Decoded frames are what
// makes reads of a repacked store fast (a small path's frame holds its
// package's other versions too): fetching the 544 paths of the releases
// corpus one by one ran at 75 MB/s with a 51 MiB cache and 178 MB/s with
// 800 MiB (bench/narfrom.sh). A fixed 128 MiB left a big machine's memory
// unused; a share of it still leaves the machine to its programs.
func memoryLimit(flag string, machine int64) (int64, error) {
	if strings.TrimSpace(strings.ToLower(flag)) == "auto" {
		return min(max(machine/16, autoMemoryMin), autoMemoryMax), nil
	}
	return parseSize(flag)
}

// checkLazy refuses a --lazy that could not work: with nowhere to fetch
// from, or no mount to fetch on first use (--stdio and --http-only serve
// no mount).
func (c *ServeCmd) checkLazy() error {
	if !c.Lazy {
		return nil
	}
	if len(substituterURLs(c.Substituters)) == 0 || c.Mount == "" || c.Stdio || c.HTTPOnly {
		return errors.New("--lazy needs --substituters (where paths come from) and --mount (where they are fetched on first use), and neither --stdio nor --http-only")
	}
	return nil
}

// lazyFetch is the mount's Fetch under --lazy: it fetches on the daemon's
// context (so shutting down ends it), and reports a path no upstream has
// as not found.
func lazyFetch(g *Globals, l *subst.Lazy) func(context.Context, string) error {
	return func(_ context.Context, name string) error {
		err := l.Ensure(g.Ctx, name)
		if errors.Is(err, subst.ErrNoSubstitute) {
			return fmt.Errorf("%w: %v", fusefs.ErrNotFound, err)
		}
		if err != nil {
			// Any user can cause one per lookup while an upstream fails.
			lazyWarnings.Warn(g.Logger, "lazy fetch failed", "path", name, "err", err)
		}
		return err
	}
}

var lazyWarnings loglimit.Limiter

// logUploads warns, at most every 30 s, while pack uploads fail (the
// writes go on: packs queue locally), and says when they work again.
func logUploads(ctx context.Context, st *store.Store, log *slog.Logger) {
	t := time.NewTicker(30 * time.Second)
	defer t.Stop()
	failing := false
	for {
		select {
		case <-ctx.Done():
			return
		case <-t.C:
		}
		rs := st.RemoteStats()
		switch {
		case rs.LastError != "":
			failing = true
			log.Warn("pack uploads failing; writes go on and queue locally", "err", rs.LastError,
				"queued-packs", rs.QueuedPacks, "oldest-waiting", rs.OldestPending.Round(time.Second))
		case failing:
			failing = false
			log.Info("pack uploads work again", "queued-packs", rs.QueuedPacks)
		}
	}
}
