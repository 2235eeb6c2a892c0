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

// RequireFUSE is SkipOrFatal unless this process can mount FUSE (root and /dev/fuse): the
// one check of the packages whose tests make real mounts (fusefs, subst's lazy mount,
// crashfs).
func RequireFUSE(t testing.TB) {
	t.Helper()
	if os.Geteuid() != 0 {
		SkipOrFatal(t, "FUSE mounts need root")
	}
	if _, err := os.Stat("/dev/fuse"); err != nil {
		SkipOrFatal(t, "FUSE mounts need /dev/fuse: %v", err)
	}
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

var (
	raceOnce sync.Once
	racePath string
	raceErr  error
)

// CasnixRaceBinary returns the path of a casnix binary built with the race detector
// (`go build -race`, which needs cgo and a C compiler), once per test process, or
// $CASNIX_RACE_BIN when set. A race it detects makes the process print "WARNING: DATA
// RACE" and exit with status 66, so a test using it sees races in any casnix process it
// runs. The build takes minutes on a small machine the first time (the standard library
// is compiled again with -race), seconds once Go's build cache has it.
func CasnixRaceBinary(t testing.TB) string {
	t.Helper()
	raceOnce.Do(func() {
		if p := os.Getenv("CASNIX_RACE_BIN"); p != "" {
			racePath, raceErr = filepath.Abs(p)
			return
		}
		if _, err := exec.LookPath("gcc"); err != nil {
			raceNoCC = fmt.Errorf("go build -race needs a C compiler: %w", err)
			return
		}
		dir, err := os.MkdirTemp("", "casnix-race-bin-")
		if err != nil {
			raceErr = err
			return
		}
		raceDir = dir
		out := filepath.Join(dir, "casnix")
		r := (&Cmd{
			Name:    "go",
			Args:    []string{"build", "-race", "-o", out, "."},
			Env:     []string{"CGO_ENABLED=1"},
			Dir:     ModuleRoot(),
			Timeout: 20 * time.Minute,
		}).Try()
		if !r.OK() {
			raceErr = fmt.Errorf("building casnix with -race:\n%s", r)
			return
		}
		racePath = out
	})
	if raceNoCC != nil {
		SkipOrFatal(t, "%v", raceNoCC)
	}
	if raceErr != nil {
		t.Fatalf("casnix race binary: %v", raceErr)
	}
	return racePath
}

var (
	raceDir  string
	raceNoCC error // the missing prerequisite, when there is no C compiler
)

// Main runs the tests and removes what the harness left outside the tests' own temporary
// directories. Use it as `func TestMain(m *testing.M) { os.Exit(nixtest.Main(m)) }`.
func Main(m *testing.M) int {
	code := m.Run()
	for _, d := range []string{buildDir, raceDir} {
		if d != "" {
			os.RemoveAll(d)
		}
	}
	if nixConfDir != "" {
		os.RemoveAll(nixConfDir)
	}
	return code
}
