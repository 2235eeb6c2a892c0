package nixtest

import (
	"fmt"
	"path/filepath"
	"regexp"
	"strings"
	"sync"
	"testing"
)

// ClientSuites are the Debian suites whose real Nix the daemon tests use as clients, oldest
// first: bookworm (Nix 2.8, on the host), trixie (Nix 2.26) and sid (Nix 2.34), both in
// Roots.
var ClientSuites = []string{"bookworm", "trixie", "sid"}

// NixClient is one real Nix version driven as a client: host Nix (suite "bookworm", Nix
// 2.8) run directly with the harness's nix.conf (NixEnv), or the Nix of a Root (trixie,
// sid) with the root's nix.conf. Both see host paths given to Bind at the same paths, so a
// test can hand any of them the same socket, key file or store directory.
type NixClient struct {
	Suite string
	// Root is the root the client runs in; nil for host Nix.
	Root *Root
	// Env holds KEY=VALUE entries added to every command (on the host: to NixEnv and the
	// client's own HOME; in a root: to RootEnv and Root.Env).
	Env []string

	t    testing.TB
	home string // host only: HOME and XDG_CACHE_HOME of the client's commands
}

// RequireNixClient returns the Nix client of suite ("bookworm" for host Nix, "trixie",
// "sid" for the Nix of a Root). A missing prerequisite skips the test, or fails it when Strict.
func RequireNixClient(t testing.TB, suite string) *NixClient {
	t.Helper()
	if suite == "bookworm" {
		RequireHostNix(t)
		home := t.TempDir()
		return &NixClient{Suite: suite, t: t, home: home}
	}
	return &NixClient{Suite: suite, Root: RequireRoot(t, suite), t: t}
}

// IsHost reports whether the client is host Nix.
func (c *NixClient) IsHost() bool { return c.Root == nil }

// Bind makes host paths visible to the client at the same paths (Root.Bind); host Nix
// sees them anyway. It returns c.
func (c *NixClient) Bind(hostPaths ...string) *NixClient {
	c.t.Helper()
	if c.Root != nil {
		c.Root.Bind(hostPaths...)
	}
	return c
}

// UseSubstituters sets the client's substituters setting, which Nix sends to the daemon:
// a substituting daemon uses those of its own upstreams the setting names, and none when it
// is empty, as the harness's nix.conf has it (so that no client goes to the network). It
// returns c.
func (c *NixClient) UseSubstituters(urls ...string) *NixClient {
	c.Env = append(c.Env, "NIX_CONFIG=substituters = "+strings.Join(urls, " "))
	return c
}

// Cmd returns the command running args (a Nix tool or any other program) as this client:
// on the host with NixEnv, a private HOME and c.Env; in the root with c.Env added.
func (c *NixClient) Cmd(args ...string) *Cmd {
	c.t.Helper()
	if c.Root != nil {
		cmd := c.Root.Cmd(args...)
		cmd.Env = mergeEnv(cmd.Env, c.Env)
		return cmd
	}
	env := append(NixEnv(c.t), "HOME="+c.home, "XDG_CACHE_HOME="+filepath.Join(c.home, ".cache"))
	return &Cmd{Name: args[0], Args: args[1:], Env: mergeEnv(env, c.Env)}
}

// Try runs args as this client and returns what happened; it never fails the test.
func (c *NixClient) Try(args ...string) *Result {
	c.t.Helper()
	return c.Cmd(args...).Try()
}

// Run runs args as this client and fails t unless the command exits 0.
func (c *NixClient) Run(t testing.TB, args ...string) *Result {
	t.Helper()
	r := c.Cmd(args...).Try()
	if !r.OK() {
		t.Fatalf("command of the %s Nix client failed:\n%s", c.Suite, r)
	}
	return r
}

// Output runs args like Run and returns stdout.
func (c *NixClient) Output(t testing.TB, args ...string) []byte {
	t.Helper()
	return c.Run(t, args...).Stdout
}

var hostNixVersion struct {
	once sync.Once
	v    string
	err  error
}

// Version returns the client's Nix version, e.g. "2.8.0".
func (c *NixClient) Version(t testing.TB) string {
	t.Helper()
	if c.Root != nil {
		return c.Root.NixVersion(t)
	}
	hostNixVersion.once.Do(func() {
		r := c.Cmd("nix", "--version").Try()
		if !r.OK() {
			hostNixVersion.err = fmt.Errorf("nix --version:\n%s", r)
			return
		}
		m := nixVersionRE.FindSubmatch(r.Stdout)
		if m == nil {
			hostNixVersion.err = fmt.Errorf("nix --version printed %q", r.Stdout)
			return
		}
		hostNixVersion.v = string(m[0])
	})
	if hostNixVersion.err != nil {
		t.Fatal(hostNixVersion.err)
	}
	return hostNixVersion.v
}

// AtLeast reports whether the client's Nix is version major.minor or newer.
func (c *NixClient) AtLeast(t testing.TB, major, minor int) bool {
	t.Helper()
	var ma, mi int
	fmt.Sscanf(c.Version(t), "%d.%d", &ma, &mi)
	return ma > major || ma == major && mi >= minor
}

// PathInfoJSONArgs is `nix path-info --json` for this client, with --json-format 1 (the
// object form older versions print) from Nix 2.34 on, which otherwise warns.
func (c *NixClient) PathInfoJSONArgs(t testing.TB) []string {
	t.Helper()
	args := []string{"nix", "path-info", "--json"}
	if c.AtLeast(t, 2, 34) {
		args = append(args, "--json-format", "1")
	}
	return args
}

// TempDir returns a new empty directory that the client sees at the same path (made with
// t.TempDir and bound into the root).
func (c *NixClient) TempDir(t testing.TB) string {
	t.Helper()
	d := t.TempDir()
	c.Bind(d)
	return d
}

// HostPath is where a path the client sees lives on the host: itself on the host, or
// Root.HostPath.
func (c *NixClient) HostPath(inside string) string {
	if c.Root != nil {
		return c.Root.HostPath(inside)
	}
	return inside
}

// nixNoiseRE matches warnings that differ between runs or daemons rather than answers.
var nixNoiseRE = regexp.MustCompile(`(?m)^warning: (you did not specify '--add-root'|.*is dirty|ignoring the client-specified setting.*|.*is not a trusted user.*)\n`)

// StripNixNoise removes warnings from a Nix command's stderr that do not depend on the
// store being asked (e.g. the "--add-root" hint of nix-store -r), for comparing messages.
func StripNixNoise(stderr []byte) string { return nixNoiseRE.ReplaceAllString(string(stderr), "") }
