package nixtest

import (
	"fmt"
	"os"
	"os/exec"
	"path/filepath"
	"runtime"
	"sync"
	"testing"
	"time"
)

// Strict reports whether a missing prerequisite fails a test instead of skipping it: with
// CI=true, and by default as root. Root can install every prerequisite (apt, debootstrap),
// and `go test ./...` shows nothing of a passing package's skips, so a skip there would
// pass untested casnix behaviour off as tested. CI set to anything else (CI=false, e.g.
// offline) gives the skips back; without root there is nothing to install them with, and
// the tests skip.
func Strict() bool {
	switch os.Getenv("CI") {
	case "true":
		return true
	case "":
		return os.Geteuid() == 0
	}
	return false
}

// SkipOrFatal skips the test, or fails it when Strict, with the formatted reason. It is
// for missing prerequisites only: a casnix failure is a failure (t.Fatal), never a skip.
func SkipOrFatal(t testing.TB, format string, args ...any) {
	t.Helper()
	if Strict() {
		t.Fatalf("missing prerequisite (CI=false to skip instead): "+format, args...)
	}
	t.Skipf("SKIPPED, missing prerequisite: "+format, args...)
}

// harnessDir is the directory holding this package's source, found at run time from the
// compiled-in file name, so that scripts are found wherever `go test` runs.
func harnessDir() string {
	_, file, _, ok := runtime.Caller(0)
	if !ok {
		panic("nixtest: runtime.Caller failed")
	}
	return filepath.Dir(file)
}

// ModuleRoot is the directory of casnix's go.mod.
func ModuleRoot() string { return filepath.Dir(filepath.Dir(harnessDir())) }

// ScriptPath is the path of a script under tests/nixenv.
func ScriptPath(name string) string {
	return filepath.Join(filepath.Dir(harnessDir()), "nixenv", name)
}

var (
	hostNixOnce sync.Once
	hostNixErr  error
)

// RequireHostNix makes sure host Nix (nix-store, nix, nix-build) and /bin/busybox are
// installed, running nixenv/install-host-nix.sh once per process. When that fails the test
// is skipped, or fails when Strict. Nix needs root here: its chroot stores build in a sandbox.
func RequireHostNix(t testing.TB) {
	t.Helper()
	hostNixOnce.Do(func() {
		if os.Geteuid() != 0 {
			hostNixErr = fmt.Errorf("the end-to-end tests need root (Nix's build sandbox, apt)")
			return
		}
		r := (&Cmd{Name: "sh", Args: []string{ScriptPath("install-host-nix.sh")}, Timeout: 10 * time.Minute}).Try()
		if !r.OK() {
			hostNixErr = fmt.Errorf("install-host-nix.sh failed:\n%s", r)
			return
		}
		for _, tool := range []string{"nix-store", "nix", "nix-build", "nix-instantiate"} {
			if _, err := exec.LookPath(tool); err != nil {
				hostNixErr = fmt.Errorf("after install-host-nix.sh: %w", err)
				return
			}
		}
	})
	if hostNixErr != nil {
		SkipOrFatal(t, "host Nix unavailable: %v", hostNixErr)
	}
}

var (
	buildOnce sync.Once
	buildDir  string
	binPath   string
	buildErr  error
)

// CasnixBinary returns the path of the casnix binary: $CASNIX_BIN when set, else one built
// with CGO_ENABLED=0 from the module root, once per test process.
func CasnixBinary(t testing.TB) string {
	t.Helper()
	buildOnce.Do(func() {
		if p := os.Getenv("CASNIX_BIN"); p != "" {
			binPath, buildErr = filepath.Abs(p)
			return
		}
		buildDir, buildErr = os.MkdirTemp("", "casnix-bin-")
		if buildErr != nil {
			return
		}
		out := filepath.Join(buildDir, "casnix")
		r := (&Cmd{
			Name:    "go",
			Args:    []string{"build", "-o", out, "."},
			Env:     []string{"CGO_ENABLED=0"},
			Dir:     ModuleRoot(),
			Timeout: 10 * time.Minute,
		}).Try()
		if !r.OK() {
			buildErr = fmt.Errorf("building casnix:\n%s", r)
			return
		}
		binPath = out
	})
	if buildErr != nil {
		t.Fatalf("casnix binary: %v", buildErr)
	}
	return binPath
}

// Main runs the tests and removes what the harness left outside the tests' own temporary
// directories. Use it as `func TestMain(m *testing.M) { os.Exit(nixtest.Main(m)) }`.
func Main(m *testing.M) int {
	code := m.Run()
	if buildDir != "" {
		os.RemoveAll(buildDir)
	}
	if nixConfDir != "" {
		os.RemoveAll(nixConfDir)
	}
	return code
}
