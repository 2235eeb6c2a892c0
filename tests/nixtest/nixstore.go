package nixtest

import (
	"encoding/json"
	"fmt"
	"os"
	"path/filepath"
	"slices"
	"strings"
	"sync"
	"testing"
	"time"
)

// StoreDir is the logical store directory of every store the harness makes.
const StoreDir = "/nix/store"

// nixConf is the configuration of every host Nix command the harness runs: no daemon, no
// substituters (there is no network), builds as root without build users. Builds into a
// chroot store use Nix's sandbox whatever `sandbox` says.
const nixConf = `experimental-features = nix-command
build-users-group =
sandbox = false
substituters =
require-sigs = false
fsync-metadata = false
warn-dirty = false
`

var (
	nixConfOnce sync.Once
	nixConfDir  string
	nixConfErr  error
)

// cacheHomes holds each running test's XDG_CACHE_HOME for host Nix (see NixEnv).
var cacheHomes sync.Map // testing.TB -> string

// testCacheHome is t's own cache directory, made on first use.
func testCacheHome(t testing.TB) string {
	if dir, ok := cacheHomes.Load(t); ok {
		return dir.(string)
	}
	dir := t.TempDir()
	if prev, loaded := cacheHomes.LoadOrStore(t, dir); loaded {
		return prev.(string)
	}
	t.Cleanup(func() { cacheHomes.Delete(t) })
	return dir
}

// NixEnv is the environment for host Nix commands: the harness's own nix.conf instead of
// /etc/nix and the user's, no daemon, and a cache directory of the test's own. Nix keeps
// the narinfos it has read in XDG_CACHE_HOME/nix/binary-cache-v*.sqlite, keyed by the
// cache's URL, for days: shared between tests, a loopback server on a port an earlier test
// had used would be answered by that test's narinfos (say, unsigned ones).
func NixEnv(t testing.TB) []string {
	t.Helper()
	nixConfOnce.Do(func() {
		nixConfDir, nixConfErr = os.MkdirTemp("", "casnix-nixconf-")
		if nixConfErr == nil {
			nixConfErr = os.WriteFile(filepath.Join(nixConfDir, "nix.conf"), []byte(nixConf), 0o644)
		}
	})
	if nixConfErr != nil {
		t.Fatalf("nix.conf: %v", nixConfErr)
	}
	return []string{
		"NIX_CONF_DIR=" + nixConfDir,
		"NIX_USER_CONF_FILES=" + filepath.Join(nixConfDir, "nix.conf"),
		"NIX_CONFIG=",
		"NIX_REMOTE=",
		"NIX_PATH=",
		"XDG_CACHE_HOME=" + testCacheHome(t),
	}
}

// Store is a real Nix local store whose store directory is /nix/store and whose files live
// under Root (Nix's "chroot store", --store Root).
type Store struct {
	Root string
	env  []string
}

// NewStore makes an empty, initialised local store in a fresh temporary directory.
func NewStore(t testing.TB) *Store {
	t.Helper()
	RequireHostNix(t)
	s := &Store{Root: filepath.Join(t.TempDir(), "root"), env: NixEnv(t)}
	s.NixStore(t, "--init")
	return s
}

// OpenStore wraps an existing store root (ROOT/nix/store, ROOT/nix/var/nix/db).
func OpenStore(t testing.TB, root string) *Store {
	t.Helper()
	RequireHostNix(t)
	return &Store{Root: root, env: NixEnv(t)}
}

// DBPath is the store's SQLite database.
func (s *Store) DBPath() string { return filepath.Join(s.Root, "nix", "var", "nix", "db", "db.sqlite") }

// RealPath is where the files of a store path are on disk.
func (s *Store) RealPath(storePath string) string { return filepath.Join(s.Root, storePath) }

// Cmd returns a command for a Nix tool (nix-store, nix, nix-build, nix-instantiate…)
// working on this store.
func (s *Store) Cmd(tool string, args ...string) *Cmd {
	return &Cmd{Name: tool, Args: append([]string{"--store", s.Root}, args...), Env: s.env}
}

// NixStore runs nix-store on this store and returns its stdout.
func (s *Store) NixStore(t testing.TB, args ...string) []byte {
	t.Helper()
	return s.Cmd("nix-store", args...).Run(t).Stdout
}

// Nix runs the nix command on this store and returns its stdout.
func (s *Store) Nix(t testing.TB, args ...string) []byte {
	t.Helper()
	return s.Cmd("nix", args...).Run(t).Stdout
}

// Add adds a file or directory with `nix-store --add` (content-addressed, fixed:r:sha256).
func (s *Store) Add(t testing.TB, path string) string {
	t.Helper()
	return strings.TrimSpace(string(s.NixStore(t, "--add", path)))
}

// AddFixed adds a file or directory with `nix-store --add-fixed [--recursive] ALGO PATH`.
func (s *Store) AddFixed(t testing.TB, algo string, recursive bool, path string) string {
	t.Helper()
	args := []string{"--add-fixed"}
	if recursive {
		args = append(args, "--recursive")
	}
	return strings.TrimSpace(string(s.NixStore(t, append(args, algo, path)...)))
}

// AllPaths lists every valid path, sorted.
func (s *Store) AllPaths(t testing.TB) []string {
	t.Helper()
	return SortedLines(s.Nix(t, "path-info", "--all"))
}

// Closure lists the closure of paths (nix-store -qR), sorted.
func (s *Store) Closure(t testing.TB, paths ...string) []string {
	t.Helper()
	return SortedLines(s.NixStore(t, append([]string{"-qR"}, paths...)...))
}

// PathInfos returns `nix path-info --json` of paths (every valid path when none are
// given), keyed by path, with narHash normalised to sha256:<nixbase32>. Invalid paths are
// left out. It always asks for --all and filters: the nix command reads a .drv path given
// as an argument as its outputs (and --derivation maps outputs to their .drv).
func (s *Store) PathInfos(t testing.TB, paths ...string) map[string]PathInfo {
	t.Helper()
	out := s.Nix(t, "path-info", "--json", "--all")
	infos, err := ParsePathInfoJSON(out)
	if err != nil {
		t.Fatalf("nix path-info --json: %v\n%s", err, tail(out, 4<<10))
	}
	if len(paths) == 0 {
		return infos
	}
	picked := make(map[string]PathInfo, len(paths))
	for _, p := range paths {
		if pi, ok := infos[p]; ok {
			picked[p] = pi
		}
	}
	return picked
}

// DumpCmd is the command that writes the NAR of a store path to stdout: `nix-store --dump`
// of its files under Root, which is what the local store itself serves. (`nix-store --store
// ROOT --dump /nix/store/…` would read the host's /nix/store, and `nix store dump-path`
// reads a .drv argument as the derivation's outputs.)
func (s *Store) DumpCmd(path string) *Cmd {
	return &Cmd{Name: "nix-store", Args: []string{"--dump", s.RealPath(path)}, Env: s.env}
}

// Dump streams the NAR of a store path into a Digest.
func (s *Store) Dump(t testing.TB, path string) Digest {
	t.Helper()
	w := NewDigestWriter()
	c := s.DumpCmd(path)
	c.Stdout = w
	c.Timeout = 30 * time.Minute
	c.Run(t)
	return w.Digest()
}

// Sign signs paths with the secret key in keyFile.
func (s *Store) Sign(t testing.TB, keyFile string, paths ...string) {
	t.Helper()
	s.Nix(t, append([]string{"store", "sign", "--key-file", keyFile}, paths...)...)
}

// Verify runs nix-store --verify --check-contents and fails the test on any problem.
func (s *Store) Verify(t testing.TB) {
	t.Helper()
	r := s.Cmd("nix-store", "--verify", "--check-contents").Run(t)
	if msg := string(r.Stderr); strings.Contains(msg, "error") || strings.Contains(msg, "modified") || strings.Contains(msg, "warning") {
		t.Fatalf("nix-store --verify --check-contents complained:\n%s", r.Stderr)
	}
}

// PathInfo is one element of `nix path-info --json` (Nix 2.8's array form), which is also
// what `casnix path-info --json` prints.
type PathInfo struct {
	Path             string   `json:"path"`
	NarHash          string   `json:"narHash,omitempty"`
	NarSize          int64    `json:"narSize,omitempty"`
	References       []string `json:"references"`
	Deriver          string   `json:"deriver,omitempty"`
	CA               string   `json:"ca,omitempty"`
	Signatures       []string `json:"signatures,omitempty"`
	RegistrationTime int64    `json:"registrationTime,omitempty"`
	Ultimate         bool     `json:"ultimate,omitempty"`
	Valid            *bool    `json:"valid,omitempty"` // false for an invalid path
}

// ParsePathInfoJSON parses the output of `nix path-info --json` or `casnix path-info
// --json`: the array form of Nix ≤ 2.18 or the object form keyed by path of newer Nix.
// Entries marked "valid": false are dropped; narHash is normalised to sha256:<nixbase32>;
// references and signatures are sorted.
func ParsePathInfoJSON(b []byte) (map[string]PathInfo, error) {
	var list []PathInfo
	if err := json.Unmarshal(b, &list); err != nil {
		var obj map[string]*PathInfo
		if err2 := json.Unmarshal(b, &obj); err2 != nil {
			return nil, err
		}
		for p, pi := range obj {
			if pi == nil {
				continue
			}
			pi.Path = p
			list = append(list, *pi)
		}
	}
	out := make(map[string]PathInfo, len(list))
	for _, pi := range list {
		if pi.Valid != nil && !*pi.Valid {
			continue
		}
		if pi.Path == "" {
			return nil, fmt.Errorf("entry without a path: %+v", pi)
		}
		if _, dup := out[pi.Path]; dup {
			return nil, fmt.Errorf("path %s listed twice", pi.Path)
		}
		h, err := NormalizeSHA256(pi.NarHash)
		if err != nil {
			return nil, fmt.Errorf("%s: narHash: %w", pi.Path, err)
		}
		pi.NarHash = h
		if pi.References == nil {
			pi.References = []string{}
		}
		slices.Sort(pi.References)
		slices.Sort(pi.Signatures)
		out[pi.Path] = pi
	}
	return out, nil
}

// SortedLines returns the non-empty lines of b, trimmed and sorted: command
// output compared as a set.
func SortedLines(b []byte) []string {
	var out []string
	for _, l := range strings.Split(string(b), "\n") {
		if l = strings.TrimSpace(l); l != "" {
			out = append(out, l)
		}
	}
	slices.Sort(out)
	return out
}
