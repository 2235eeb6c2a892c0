package nixtest

import (
	"context"
	"crypto/sha256"
	"encoding/hex"
	"fmt"
	"os"
	"os/exec"
	"path"
	"path/filepath"
	"regexp"
	"slices"
	"strings"
	"sync"
	"testing"
	"time"
)

// RootEnv is the environment every command in a Root starts from; Root.Env and Cmd.Env
// add to it. Nothing of the test process's environment reaches the root.
var RootEnv = []string{
	"PATH=/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin",
	"HOME=/root",
	"USER=root",
	"LOGNAME=root",
	"TMPDIR=/tmp",
	"LANG=C.UTF-8",
	"TERM=dumb",
}

// Root is a Debian root holding a newer real Nix (trixie: Nix 2.26, sid: Nix 2.34), made
// and cached by nixenv/make-root.sh, in which a test runs commands (Cmd, Run, Output, Try,
// Command).
//
// Every command gets a mount namespace of its own, made with unshare(1): the cached root
// (Base) is bind-mounted read-only onto itself, /dev and /sys are bound from the host, a
// fresh /proc and a tmpfs /run are mounted, the test's private directories (NixDir, TmpDir,
// HomeDir) are bound at /nix, /tmp and /root, then the Bind directories; then pivot_root
// makes it the root and the host's file system is detached. Unlike chroot(2), this lets
// Nix's build sandbox work, which Nix forces for stores whose files are not where their
// store directory says (local?root=…).
//
// The root's /etc/nix/nix.conf (see make-root.sh) enables nix-command and
// local-overlay-store, builds as root without build users, sets sandbox = false (give
// `--option sandbox true`, or NIX_CONFIG in Env, to sandbox a build) and makes /bin/busybox,
// the builder of test derivations, available inside the sandbox. /etc is read-only; change
// settings with --option, NIX_CONFIG, or BindAt a file over /etc/nix/nix.conf.
//
// Commands of one Root may run concurrently (a daemon in the background and clients); they
// share the bound host directories but not mounts made inside (Setup runs in each). Host
// mounts are copied when a command starts: a FUSE file system must be mounted in a Bind
// directory before the commands that use it start.
//
// A daemon store (unix:///path/to/socket) is a local file system store to Nix: path-info,
// builds, copies go over the socket, but `nix store cat/ls/dump-path` read the files from
// the client's /nix/store (or from the directory of the store's real= setting). Give the
// client the daemon's store directory there, e.g. BindAt(fuseMount, "/nix/store").
//
// Fields may be changed between commands; they are read when a command is made.
type Root struct {
	Suite string // the Debian suite, e.g. "trixie" or "sid"
	Base  string // host directory of the cached root, shared by all tests; never write to it

	// Host directories of the test's own, bound at /nix, /tmp and /root (HOME) inside. They
	// start empty except for NixDir/store and NixDir/var, under a t.TempDir, so a Nix
	// command without --store uses a fresh store at /nix/store that later commands of the
	// test see and that the test can read on the host (HostPath).
	NixDir  string
	TmpDir  string
	HomeDir string

	Env     []string      // KEY=VALUE added to RootEnv for every command
	WorkDir string        // working directory inside; "/" when empty
	Setup   string        // shell commands run by the root's /bin/sh (set -e) before each command
	Timeout time.Duration // for Try, Run and Output; DefaultTimeout when zero

	t     testing.TB
	state string
	binds []rootBind
}

type rootBind struct{ host, inside string }

type rootBuild struct {
	once sync.Once
	dir  string
	err  error
}

var rootBuilds sync.Map // suite → *rootBuild

// RequireRoot returns a Root of the given Debian suite ("trixie", "sid"; "bookworm" works
// too) with private /nix, /tmp and /root directories under t.TempDir. The first call for a
// suite in a process runs nixenv/make-root.sh, which reuses the cached root (instantly) or
// builds it with debootstrap (a minute or two; the .debs are cached too), then checks that
// a command runs in it. When that fails the test is skipped, or fails when Strict.
func RequireRoot(t testing.TB, suite string) *Root {
	t.Helper()
	v, _ := rootBuilds.LoadOrStore(suite, &rootBuild{})
	b := v.(*rootBuild)
	b.once.Do(func() { b.dir, b.err = makeRoot(suite) })
	if b.err != nil {
		SkipOrFatal(t, "Nix root %s unavailable: %v", suite, b.err)
	}
	state := t.TempDir()
	r := &Root{
		Suite:   suite,
		Base:    b.dir,
		NixDir:  filepath.Join(state, "nix"),
		TmpDir:  filepath.Join(state, "tmp"),
		HomeDir: filepath.Join(state, "home"),
		t:       t,
		state:   state,
	}
	for _, d := range []string{filepath.Join(r.NixDir, "store"), filepath.Join(r.NixDir, "var"), r.TmpDir, r.HomeDir} {
		if err := os.MkdirAll(d, 0o755); err != nil {
			t.Fatal(err)
		}
	}
	if err := os.Chmod(r.TmpDir, 0o1777); err != nil {
		t.Fatal(err)
	}
	if err := os.Chmod(r.HomeDir, 0o700); err != nil {
		t.Fatal(err)
	}
	return r
}

// makeRoot runs make-root.sh for suite and checks that the root works; it returns the
// root's directory.
func makeRoot(suite string) (string, error) {
	if os.Geteuid() != 0 {
		return "", fmt.Errorf("need root (debootstrap, mount namespaces)")
	}
	for _, tool := range []string{"unshare", "pivot_root", "mount", "flock"} {
		if _, err := exec.LookPath(tool); err != nil {
			return "", err
		}
	}
	// make-root.sh reads CASNIX_ROOTS_DIR, CASNIX_DEB_CACHE and CASNIX_DEBIAN_MIRROR.
	res := (&Cmd{Name: "sh", Args: []string{ScriptPath("make-root.sh"), suite}, Timeout: 30 * time.Minute}).Try()
	if !res.OK() {
		return "", fmt.Errorf("make-root.sh failed:\n%s", res)
	}
	out := strings.Split(strings.TrimSpace(string(res.Stdout)), "\n")
	dir := strings.TrimSpace(out[len(out)-1])
	if !filepath.IsAbs(dir) {
		return "", fmt.Errorf("make-root.sh printed no directory:\n%s", res)
	}
	// A smoke test: the namespace recipe works here and Nix starts in the root.
	state, err := os.MkdirTemp("", "casnix-root-check-")
	if err != nil {
		return "", err
	}
	defer os.RemoveAll(state)
	r := &Root{Suite: suite, Base: dir, state: state, Timeout: time.Minute}
	for _, d := range []string{"nix", "tmp", "home"} {
		if err := os.Mkdir(filepath.Join(state, d), 0o755); err != nil {
			return "", err
		}
	}
	r.NixDir, r.TmpDir, r.HomeDir = filepath.Join(state, "nix"), filepath.Join(state, "tmp"), filepath.Join(state, "home")
	cmd, err := r.cmd([]string{"nix", "--version"})
	if err != nil {
		return "", err
	}
	if res := cmd.Try(); !res.OK() {
		return "", fmt.Errorf("running a command in %s failed:\n%s", dir, res)
	}
	return dir, nil
}

// Bind makes host files or directories visible inside the root at the same absolute paths
// (recursively, with the mounts below them). Use it for the directory of a daemon socket,
// the casnix binary's directory, a FUSE mount's parent, temporary directories. Mount
// points are made in TmpDir when a path is under /tmp, else as empty directories (or
// files) in the cached root itself. Paths must exist; later binds go on top of earlier
// ones. It returns r.
func (r *Root) Bind(hostPaths ...string) *Root {
	r.t.Helper()
	for _, p := range hostPaths {
		r.BindAt(p, p)
	}
	return r
}

// BindAt makes the host file or directory hostPath visible inside the root at the absolute
// path inside, e.g. a file over /etc/nix/nix.conf. It returns r.
func (r *Root) BindAt(hostPath, inside string) *Root {
	r.t.Helper()
	if !filepath.IsAbs(hostPath) || !path.IsAbs(inside) {
		r.t.Fatalf("Root.BindAt(%q, %q): paths must be absolute", hostPath, inside)
	}
	if _, err := os.Stat(hostPath); err != nil {
		r.t.Fatalf("Root.BindAt: %v", err)
	}
	inside = path.Clean(inside)
	if inside == "/" || inside == "/proc" || inside == "/dev" || inside == "/sys" {
		r.t.Fatalf("Root.BindAt(%q, %q): cannot bind over %s", hostPath, inside, inside)
	}
	r.binds = append(r.binds, rootBind{host: filepath.Clean(hostPath), inside: inside})
	return r
}

// mounts lists what is bound where inside, in mount order, binds last.
func (r *Root) mounts() []rootBind {
	m := []rootBind{
		{r.Base, "/"},
		{"/dev", "/dev"},
		{"/sys", "/sys"},
		{r.NixDir, "/nix"},
		{r.TmpDir, "/tmp"},
		{r.HomeDir, "/root"},
	}
	binds := slices.Clone(r.binds)
	// Parents before children, and in the order given for the same path.
	slices.SortStableFunc(binds, func(a, b rootBind) int { return strings.Compare(a.inside, b.inside) })
	return append(m, binds...)
}

// hostPathIn maps a path inside to the host through mounts: the deepest mount holding it,
// the last one of those at the same path.
func hostPathIn(mounts []rootBind, inside string) string {
	inside = path.Clean("/" + inside)
	best, host := -1, ""
	for _, m := range mounts {
		if inside == m.inside || m.inside == "/" || strings.HasPrefix(inside, m.inside+"/") {
			if len(m.inside) >= best {
				best = len(m.inside)
				host = filepath.Join(m.host, strings.TrimPrefix(inside, m.inside))
			}
		}
	}
	return host
}

// HostPath is where the path inside the root lives on the host: in NixDir, TmpDir,
// HomeDir, a Bind directory, the host's /dev and /sys, or else the (read-only) cached
// root. Files in /proc and /run (a tmpfs of each command) have no host path.
func (r *Root) HostPath(inside string) string { return hostPathIn(r.mounts(), inside) }

// Cmd returns the command running args (a program looked up in the root's PATH, and its
// arguments) in the root, with RootEnv and r.Env as its whole environment (Cmd.Env may
// add more), for Try, Run, Exec and streaming Stdin/Stdout/Stderr. Its command line reads
// `unshare -m --propagation private sh STATE/enter-….sh ARGS…`; the generated enter
// script, kept in the test's temporary directory, does the mounts.
func (r *Root) Cmd(args ...string) *Cmd {
	r.t.Helper()
	c, err := r.cmd(args)
	if err != nil {
		r.t.Fatalf("Root.Cmd: %v", err)
	}
	return c
}

func (r *Root) cmd(args []string) (*Cmd, error) {
	if len(args) == 0 {
		return nil, fmt.Errorf("no command")
	}
	script, err := r.enterScript()
	if err != nil {
		return nil, err
	}
	return &Cmd{
		Name:     "unshare",
		Args:     append([]string{"-m", "--propagation", "private", "sh", script}, args...),
		Env:      mergeEnv(RootEnv, r.Env),
		ExactEnv: true,
		Timeout:  r.Timeout,
	}, nil
}

// Command returns an exec.Cmd running args in the root, like Cmd, not started, in its own
// process group that ctx's end kills. Set Stdin, Stdout, Stderr as needed; append to Env
// for more variables.
func (r *Root) Command(ctx context.Context, args ...string) *exec.Cmd {
	r.t.Helper()
	return r.Cmd(args...).Exec(ctx)
}

// Try runs args in the root and returns what happened; it never fails the test.
func (r *Root) Try(args ...string) *Result {
	r.t.Helper()
	return r.Cmd(args...).Try()
}

// Run runs args in the root and fails t unless it exits 0; the failure shows the command,
// exit status, duration and the tails of stderr and stdout.
func (r *Root) Run(t testing.TB, args ...string) *Result {
	t.Helper()
	c, err := r.cmd(args)
	if err != nil {
		t.Fatalf("Root.Run: %v", err)
	}
	res := c.Try()
	if !res.OK() {
		t.Fatalf("command failed in the %s root %s:\n%s", r.Suite, r.Base, res)
	}
	return res
}

// Output runs args in the root like Run and returns its stdout.
func (r *Root) Output(t testing.TB, args ...string) []byte {
	t.Helper()
	return r.Run(t, args...).Stdout
}

var (
	nixVersionRE = regexp.MustCompile(`\b(\d+)\.(\d+)(\.\d+)?\b`)
	nixVersions  sync.Map // Base → version
)

// NixVersion returns the version of Nix in the root, e.g. "2.26.3" (asked once per root
// and process).
func (r *Root) NixVersion(t testing.TB) string {
	t.Helper()
	if v, ok := nixVersions.Load(r.Base); ok {
		return v.(string)
	}
	out := r.Output(t, "nix", "--version")
	m := nixVersionRE.FindSubmatch(out)
	if m == nil {
		t.Fatalf("nix --version in the %s root printed %q", r.Suite, out)
	}
	v := string(m[0])
	nixVersions.Store(r.Base, v)
	return v
}

// NixAtLeast reports whether the root's Nix is version major.minor or newer.
func (r *Root) NixAtLeast(t testing.TB, major, minor int) bool {
	t.Helper()
	var ma, mi int
	fmt.Sscanf(r.NixVersion(t), "%d.%d", &ma, &mi)
	return ma > major || ma == major && mi >= minor
}

// PathInfos runs `nix path-info --json` inside the root on store (a store URI such as
// unix:///path/to/socket, or "" for the root's default store, the test's /nix) for paths
// and returns the parsed, normalised result (ParsePathInfoJSON), keyed by path; invalid
// paths are left out. From Nix 2.34 on it asks for --json-format 1, the format of older
// versions.
func (r *Root) PathInfos(t testing.TB, store string, paths ...string) map[string]PathInfo {
	t.Helper()
	args := []string{"nix", "path-info", "--json"}
	if r.NixAtLeast(t, 2, 34) {
		args = append(args, "--json-format", "1")
	}
	if store != "" {
		args = append(args, "--store", store)
	}
	res := r.Run(t, append(args, paths...)...)
	infos, err := ParsePathInfoJSON(res.Stdout)
	if err != nil {
		t.Fatalf("nix path-info --json in the %s root: %v\n%s", r.Suite, err, res)
	}
	return infos
}

// enterScript writes (once per content) the script that makes the namespace's mounts,
// pivots into the root and runs its arguments, and returns its path.
func (r *Root) enterScript() (string, error) {
	if r.state == "" {
		return "", fmt.Errorf("Root not made by RequireRoot")
	}
	mounts := r.mounts()
	var b strings.Builder
	q := shellQuote
	fmt.Fprintf(&b, "# Made by nixtest.Root: enter the %s root.\n", r.Suite)
	b.WriteString("# Usage: unshare -m --propagation private sh THIS COMMAND [ARG...]\n")
	b.WriteString("set -eu\n")
	fmt.Fprintf(&b, "b=%s\n", q(r.Base))
	b.WriteString(`mount --bind "$b" "$b"` + "\n")
	b.WriteString(`mount -o remount,bind,ro "$b"` + "\n")
	b.WriteString(`mount --rbind /dev "$b/dev"` + "\n")
	b.WriteString(`mount --rbind /sys "$b/sys"` + "\n")
	b.WriteString(`mount -t proc proc "$b/proc"` + "\n")
	b.WriteString(`mount -t tmpfs -o mode=0755 tmpfs "$b/run"` + "\n")
	for i, m := range mounts {
		if i < 3 { // /, /dev, /sys: above
			continue
		}
		fi, err := os.Stat(m.host)
		if err != nil {
			return "", fmt.Errorf("bind %s at %s: %w", m.host, m.inside, err)
		}
		// The mount point, made on the host where it will be inside.
		mp := hostPathIn(mounts[:i], m.inside)
		if fi.IsDir() {
			err = os.MkdirAll(mp, 0o755)
		} else if _, err = os.Stat(mp); os.IsNotExist(err) {
			if err = os.MkdirAll(filepath.Dir(mp), 0o755); err == nil {
				err = os.WriteFile(mp, nil, 0o644)
			}
		}
		if err != nil {
			return "", fmt.Errorf("mount point for %s at %s: %w", m.host, m.inside, err)
		}
		fmt.Fprintf(&b, "mount --rbind %s \"$b\"%s\n", q(m.host), q(m.inside))
	}
	wd := r.WorkDir
	if wd == "" {
		wd = "/"
	}
	inner := "set -e\numount -l /.oldroot\ncd " + q(wd) + "\n" + r.Setup + "\nexec \"$@\"\n"
	b.WriteString(`cd "$b"` + "\n")
	b.WriteString("pivot_root . .oldroot\n")
	fmt.Fprintf(&b, "exec /bin/sh -c %s sh \"$@\"\n", q(inner))

	sum := sha256.Sum256([]byte(b.String()))
	p := filepath.Join(r.state, "enter-"+hex.EncodeToString(sum[:6])+".sh")
	if _, err := os.Stat(p); err == nil {
		return p, nil
	}
	f, err := os.CreateTemp(r.state, "enter-*.tmp")
	if err != nil {
		return "", err
	}
	_, err = f.WriteString(b.String())
	if cerr := f.Close(); err == nil {
		err = cerr
	}
	if err == nil {
		err = os.Rename(f.Name(), p)
	}
	if err != nil {
		os.Remove(f.Name())
		return "", err
	}
	return p, nil
}

// shellQuote quotes s for sh.
func shellQuote(s string) string {
	if s != "" && strings.Trim(s, "abcdefghijklmnopqrstuvwxyzABCDEFGHIJKLMNOPQRSTUVWXYZ0123456789/._-+=:,@") == "" {
		return s
	}
	return "'" + strings.ReplaceAll(s, "'", `'\''`) + "'"
}
