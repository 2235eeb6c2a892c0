package cli

import (
	"context"
	"fmt"
	"os"
	"runtime"
	"strings"
	"sync"
	"time"

	"github.com/hanwen/go-fuse/v2/fuse"

	"github.com/casnix/casnix/fusefs"
	"github.com/casnix/casnix/store"
)

// MountFlags are shared by mount and serve --mount.
type MountFlags struct {
	ListRoot   bool `name:"list-root" env:"CASNIX_LIST_ROOT" default:"true" negatable:"" help:"Make the mount root listable (overlayfs and Nix's overlay GC list it); --no-list-root for huge stores only looked up by name."`
	AllowOther bool `name:"allow-other" env:"CASNIX_ALLOW_OTHER" default:"true" negatable:"" help:"Let other users (sandboxed builders) read the mount: as root, or as another user when /etc/fuse.conf has user_allow_other (else only the mounting user can, with a warning)."`
	FuseDebug  bool `name:"fuse-debug" env:"CASNIX_FUSE_DEBUG" hidden:"" help:"Log every FUSE request."`
}

func (m *MountFlags) mount(g *Globals, st *store.Store, dir string, fetch func(context.Context, string) error) (*fuse.Server, error) {
	if err := os.MkdirAll(dir, 0o755); err != nil {
		return nil, fmt.Errorf("create mount point: %w", err)
	}
	moreProcs.Do(func() {
		// go-fuse keeps goroutines blocked in read(2) on /dev/fuse, each
		// holding a P until the runtime takes it back; one that wakes with a
		// request while read-ahead's decoders (one per CPU) run on every P
		// waits for a decoder to finish a frame, milliseconds, with the
		// kernel and the reading process waiting on it. Two Ps more than
		// CPUs let it run at once and leave the sharing of the CPUs to the
		// kernel's scheduler (bench/README.md, "FUSE"). A GOMAXPROCS set by
		// the user stands.
		if os.Getenv("GOMAXPROCS") == "" {
			runtime.GOMAXPROCS(runtime.GOMAXPROCS(0) + 2)
		}
	})
	allow, why := allowOther(m.AllowOther, os.Geteuid(), fuseConf)
	if m.AllowOther && !allow {
		g.Logger.Warn("the mount is readable by its owner only", "reason", why)
	}
	return fusefs.Mount(dir, st, fusefs.Options{
		ListRoot: m.ListRoot, AllowOther: allow, Logger: g.Logger, Debug: m.FuseDebug,
		Deletions: st.Deletions, Fetch: fetch,
	})
}

// fuseConf is where fusermount reads user_allow_other.
const fuseConf = "/etc/fuse.conf"

// allowOther decides whether to mount with allow_other: root may always;
// anyone else only when conf (fuse.conf) has the user_allow_other line,
// without which fusermount refuses the whole mount. why says why not.
func allowOther(requested bool, euid int, conf string) (bool, string) {
	switch {
	case !requested:
		return false, "--no-allow-other"
	case euid == 0:
		return true, ""
	}
	data, err := os.ReadFile(conf)
	if err != nil {
		return false, fmt.Sprintf("not root, and %v", err)
	}
	for line := range strings.SplitSeq(string(data), "\n") {
		line, _, _ = strings.Cut(line, "#")
		if strings.TrimSpace(line) == "user_allow_other" {
			return true, ""
		}
	}
	return false, "not root, and " + conf + " has no user_allow_other line"
}

var moreProcs sync.Once

// MountCmd mounts the store read-only.
type MountCmd struct {
	Dir string `arg:"" help:"Mount point."`
	MountFlags
}

// Run mounts until interrupted, then unmounts.
func (c *MountCmd) Run(g *Globals) error {
	st, err := g.Open()
	if err != nil {
		return err
	}
	defer st.Close()
	srv, err := c.mount(g, st, c.Dir, nil)
	if err != nil {
		return err
	}
	g.Logger.Info("mounted", "dir", c.Dir, "data", st.Dir())
	done := make(chan struct{})
	go func() { srv.Wait(); close(done) }()
	select {
	case <-g.Ctx.Done():
		return unmount(g, srv, c.Dir)
	case <-done:
		// Unmounted from outside (fusermount -u / umount).
		return nil
	}
}

// unmountWait bounds how long unmount waits, after the unmount itself, for
// the kernel to end the FUSE connection. It ends only once no mount of the
// file system is left anywhere, and a mount namespace created while it was
// mounted (a Nix build sandbox, unshare -m) keeps a copy until that
// namespace goes away: waiting for that held `serve` and `mount` up to the
// end of someone else's build. Past the wait, the process exits, which
// closes /dev/fuse and leaves such copies disconnected.
const unmountWait = 5 * time.Second

func unmount(g *Globals, srv *fuse.Server, dir string) error {
	done := make(chan error, 1)
	go func() { done <- srv.Unmount() }()
	select {
	case err := <-done:
		if err != nil {
			// Busy (a process has it open): detach so it goes away when freed.
			g.Logger.Warn("unmount failed; detaching", "dir", dir, "err", err)
			return fusefs.Detach(dir)
		}
		return nil
	case <-time.After(unmountWait):
		g.Logger.Warn("the file system is still mounted elsewhere (another mount namespace, such as a build sandbox, holds a copy of the mount); not waiting for it", "dir", dir)
		return nil
	}
}
