package cli

import (
	"bufio"
	"errors"
	"fmt"
	"io/fs"
	"net"
	"os"
	"os/exec"
	"path/filepath"
	"strings"
	"time"

	"golang.org/x/sys/unix"

	"github.com/casnix/casnix/db"
	"github.com/casnix/casnix/proto"
	"github.com/casnix/casnix/store"
)

// DoctorCmd checks that this machine (or container) can run casnix.
type DoctorCmd struct {
	Socket          string   `name:"socket" env:"CASNIX_SOCKET" placeholder:"PATH" help:"Daemon socket to check (default: as casnix serve picks it)."`
	MinFree         int64    `name:"min-free" env:"CASNIX_DOCTOR_MIN_FREE" default:"1073741824" help:"Free bytes the data dir's file system needs."`
	Skip            []string `name:"skip" env:"CASNIX_DOCTOR_SKIP" enum:"fuse,overlay,socket" placeholder:"CHECK" help:"Checks to leave out (${enum}): fuse and overlay matter only for mount / serve --mount and the Local Overlay Store."`
	FuseDevice      string   `name:"fuse-device" env:"CASNIX_FUSE_DEVICE" default:"/dev/fuse" hidden:"" help:"FUSE device to check."`
	ProcFilesystems string   `name:"proc-filesystems" env:"CASNIX_PROC_FILESYSTEMS" default:"/proc/filesystems" hidden:"" help:"Kernel file system list to look for overlay in."`
}

// check is one line of the doctor's report: problem is "" when it passed.
type check struct {
	name, detail, problem string
}

// Run prints every check and fails when any found a problem.
func (c *DoctorCmd) Run(g *Globals) error {
	dir := g.DataDir
	if dir == "" {
		dir = DefaultDataDir()
	}
	skip := map[string]bool{}
	for _, s := range c.Skip {
		skip[s] = true
	}
	checks := []check{checkDataDir(dir), checkSchema(g, dir), checkFree(dir, c.MinFree)}
	if !skip["fuse"] {
		checks = append(checks, checkFuseDevice(c.FuseDevice), checkFusermount())
	}
	if !skip["overlay"] {
		checks = append(checks, checkOverlay(c.ProcFilesystems))
	}
	if !skip["socket"] {
		sock := c.Socket
		if sock == "" {
			sock = DefaultSocket(dir)
		}
		checks = append(checks, checkSocket(sock))
	}
	problems := 0
	for _, ch := range checks {
		if ch.problem == "" {
			fmt.Fprintf(g.Stdout, "OK       %-12s %s\n", ch.name, ch.detail)
			continue
		}
		problems++
		fmt.Fprintf(g.Stdout, "PROBLEM  %-12s %s\n         %-12s fix: %s\n", ch.name, ch.detail, "", ch.problem)
	}
	if problems > 0 {
		return fmt.Errorf("%d of %d checks found a problem", problems, len(checks))
	}
	fmt.Fprintf(g.Stdout, "all %d checks passed (casnix %s)\n", len(checks), Version)
	return nil
}

// absent reports whether a stat error means the path does not exist (or
// cannot, being below a file).
func absent(err error) bool {
	return errors.Is(err, fs.ErrNotExist) || errors.Is(err, unix.ENOTDIR)
}

// existingParent is dir or its nearest existing ancestor.
func existingParent(dir string) string {
	for {
		if _, err := os.Stat(dir); err == nil || filepath.Dir(dir) == dir {
			return dir
		}
		dir = filepath.Dir(dir)
	}
}

// canWrite tries to create and remove a file in dir: access(2) would not
// see read-only mounts or what the file system itself refuses.
func canWrite(dir string) error {
	f, err := os.CreateTemp(dir, ".casnix-doctor-")
	if err != nil {
		return err
	}
	f.Close()
	return os.Remove(f.Name())
}

func checkDataDir(dir string) check {
	ch := check{name: "data dir"}
	st, err := os.Stat(dir)
	switch {
	case absent(err):
		parent := existingParent(dir)
		if err := canWrite(parent); err != nil {
			ch.detail = fmt.Sprintf("%s does not exist and cannot be created: %v", dir, err)
			ch.problem = fmt.Sprintf("create %s writable by uid %d, or pick another with --data-dir / CASNIX_DIR", dir, os.Geteuid())
			return ch
		}
		ch.detail = fmt.Sprintf("%s does not exist yet; it will be created (in %s)", dir, parent)
	case err != nil:
		ch.detail = fmt.Sprintf("%s: %v", dir, err)
		ch.problem = "make the data dir reachable, or pick another with --data-dir / CASNIX_DIR"
	case !st.IsDir():
		ch.detail = fmt.Sprintf("%s is not a directory", dir)
		ch.problem = "point --data-dir / CASNIX_DIR at a directory"
	default:
		if err := canWrite(dir); err != nil {
			ch.detail = fmt.Sprintf("%s is not writable: %v", dir, err)
			ch.problem = fmt.Sprintf("chown/chmod %s so uid %d can write it (in a container: mount the volume writable, podman -v ...:/data:U)", dir, os.Geteuid())
			return ch
		}
		ch.detail = fmt.Sprintf("%s exists and is writable", dir)
	}
	return ch
}

func checkSchema(g *Globals, dir string) check {
	ch := check{name: "schema"}
	latest, err := db.LatestVersion()
	if err != nil {
		ch.detail, ch.problem = err.Error(), "this binary is broken: rebuild casnix"
		return ch
	}
	file := filepath.Join(dir, store.DBFile)
	if _, err := os.Stat(file); absent(err) {
		ch.detail = fmt.Sprintf("no database yet; it will be created at schema version %d", latest)
		return ch
	}
	v, err := db.SchemaVersion(g.Ctx, file)
	switch {
	case err != nil:
		ch.detail = fmt.Sprintf("%s: %v", file, err)
		ch.problem = "the database cannot be read: restore the data dir from a backup (casnix restore)"
	case v > latest:
		ch.detail = fmt.Sprintf("%s has schema version %d, newer than this casnix (%s) knows (%d)", file, v, Version, latest)
		ch.problem = "upgrade casnix to the version that wrote this data dir, or restore an older backup"
	case v < latest:
		ch.detail = fmt.Sprintf("schema version %d; the next casnix that writes will migrate it to %d", v, latest)
	default:
		ch.detail = fmt.Sprintf("schema version %d (current)", v)
	}
	return ch
}

func checkFree(dir string, minFree int64) check {
	ch := check{name: "free space"}
	at := existingParent(dir)
	var st unix.Statfs_t
	if err := unix.Statfs(at, &st); err != nil {
		ch.detail, ch.problem = fmt.Sprintf("statfs %s: %v", at, err), "make the data dir's file system reachable"
		return ch
	}
	free := int64(st.Bavail) * int64(st.Bsize)
	ch.detail = fmt.Sprintf("%s free on %s's file system", humanBytes(free), at)
	if free < minFree {
		ch.problem = fmt.Sprintf("free space (at least %s, --min-free) or move the data dir", humanBytes(minFree))
	}
	return ch
}

func checkFuseDevice(dev string) check {
	ch := check{name: "fuse device"}
	st, err := os.Stat(dev)
	if err != nil {
		ch.detail = fmt.Sprintf("%s: %v", dev, err)
		ch.problem = "load the fuse module (modprobe fuse); in a container pass --device /dev/fuse (needed only for mount / serve --mount)"
		return ch
	}
	if st.Mode()&fs.ModeCharDevice == 0 {
		ch.detail = fmt.Sprintf("%s is not a character device", dev)
		ch.problem = "recreate it: mknod /dev/fuse c 10 229 (or pass --device /dev/fuse to the container)"
		return ch
	}
	f, err := os.OpenFile(dev, os.O_RDWR, 0)
	if err != nil {
		ch.detail = fmt.Sprintf("%s cannot be opened: %v", dev, err)
		ch.problem = "give this user read-write access to /dev/fuse (or, in a container, --device /dev/fuse)"
		return ch
	}
	f.Close()
	ch.detail = dev + " is usable"
	return ch
}

func checkFusermount() check {
	ch := check{name: "fusermount"}
	for _, name := range []string{"fusermount3", "fusermount"} {
		if p, err := exec.LookPath(name); err == nil {
			ch.detail = p
			return ch
		}
	}
	if os.Geteuid() == 0 {
		ch.detail = "not found; not needed as root (mounts with mount(2) directly)"
		return ch
	}
	ch.detail = "neither fusermount3 nor fusermount is on PATH; non-root mounts need one"
	ch.problem = "install fuse3 (apt-get install fuse3), or mount as root"
	return ch
}

func checkOverlay(procFS string) check {
	ch := check{name: "overlayfs"}
	f, err := os.Open(procFS)
	if err != nil {
		ch.detail, ch.problem = fmt.Sprintf("%s: %v", procFS, err), "mount /proc"
		return ch
	}
	defer f.Close()
	sc := bufio.NewScanner(f)
	for sc.Scan() {
		fields := strings.Fields(sc.Text())
		if len(fields) > 0 && fields[len(fields)-1] == "overlay" {
			ch.detail = "overlay is in " + procFS
			return ch
		}
	}
	ch.detail = "overlay is not in " + procFS
	ch.problem = "modprobe overlay (needed only for Nix's Local Overlay Store on top of casnix mount)"
	return ch
}

func checkSocket(path string) check {
	ch := check{name: "socket"}
	st, err := os.Lstat(path)
	if absent(err) {
		parent := existingParent(filepath.Dir(path))
		if err := canWrite(parent); err != nil {
			ch.detail = fmt.Sprintf("%s cannot be created: %v", path, err)
			ch.problem = fmt.Sprintf("make %s writable by uid %d, or pick another with --socket / CASNIX_SOCKET", filepath.Dir(path), os.Geteuid())
			return ch
		}
		ch.detail = fmt.Sprintf("%s does not exist; casnix serve can create it", path)
		return ch
	}
	if err != nil {
		ch.detail, ch.problem = fmt.Sprintf("%s: %v", path, err), "make the socket's directory reachable"
		return ch
	}
	if st.Mode()&fs.ModeSocket == 0 {
		ch.detail = fmt.Sprintf("%s exists and is not a socket", path)
		ch.problem = "remove it, or pick another path with --socket / CASNIX_SOCKET"
		return ch
	}
	mode := st.Mode().Perm()
	conn, err := net.DialTimeout("unix", path, 2*time.Second)
	if err != nil {
		if err := canWrite(filepath.Dir(path)); err != nil {
			ch.detail = fmt.Sprintf("%s is a stale socket (%v) in a directory this user cannot write", path, err)
			ch.problem = "remove the stale socket or fix the directory's permissions"
			return ch
		}
		ch.detail = fmt.Sprintf("%s is a stale socket (nobody listens); casnix serve replaces it", path)
		return ch
	}
	conn.Close()
	ch.detail = fmt.Sprintf("%s (mode %04o, owner %d, group %d): a daemon listens", path, mode, ownerOf(st), groupOf(st))
	if mode&0o006 != 0o006 {
		// Deliberate with --allowed-users @group / --socket-mode; worth saying.
		ch.detail += "; only its owner and group may connect"
	}
	return ch
}

func ownerOf(st fs.FileInfo) uint32 {
	if s, ok := st.Sys().(*unix.Stat_t); ok {
		return s.Uid
	}
	return 0
}

func groupOf(st fs.FileInfo) uint32 {
	if s, ok := st.Sys().(*unix.Stat_t); ok {
		return s.Gid
	}
	return 0
}

// PingCmd connects to a running daemon and does the protocol handshake;
// the container image's HEALTHCHECK.
type PingCmd struct {
	Socket  string        `name:"socket" env:"CASNIX_SOCKET" placeholder:"PATH" help:"Daemon socket (default: as casnix serve picks it)."`
	Timeout time.Duration `name:"timeout" env:"CASNIX_PING_TIMEOUT" default:"5s" help:"Give up after this long."`
}

// Run pings.
func (c *PingCmd) Run(g *Globals) error {
	sock := c.Socket
	if sock == "" {
		dir := g.DataDir
		if dir == "" {
			dir = DefaultDataDir()
		}
		sock = DefaultSocket(dir)
	}
	start := time.Now()
	type result struct {
		cl  *proto.Client
		err error
	}
	done := make(chan result, 1)
	go func() {
		cl, err := proto.Dial(sock)
		if err != nil {
			done <- result{err: err}
			return
		}
		// One real operation, so a daemon that handshakes but cannot reach
		// its database is not reported healthy.
		_, err = cl.QueryValidPaths([]string{g.StoreDir + "/00000000000000000000000000000000-casnix-ping"})
		done <- result{cl, err}
	}()
	select {
	case r := <-done:
		if r.cl != nil {
			defer r.cl.Close()
		}
		if r.err != nil {
			return fmt.Errorf("ping %s: %w", sock, r.err)
		}
		fmt.Fprintf(g.Stdout, "%s: %s, protocol 1.%d, answered in %s\n", sock, r.cl.DaemonVersion, r.cl.Minor, time.Since(start).Round(time.Microsecond))
		return nil
	case <-time.After(c.Timeout):
		return fmt.Errorf("ping %s: no answer within %s", sock, c.Timeout)
	}
}
