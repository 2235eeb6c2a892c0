package tests

import (
	"encoding/json"
	"fmt"
	"net"
	"os"
	"os/exec"
	"path/filepath"
	"slices"
	"strings"
	"testing"
	"time"

	"golang.org/x/sys/unix"

	"github.com/casnix/casnix/tests/nixtest"
)

// TestContainer builds the image from the top-level Dockerfile with podman (the prebuilt
// binary form: no registry is reachable here) and checks it as a drop-in: the image's
// metadata (non-root user, volumes, port, health check, entrypoint, version label), a
// fixture imported by the container into a data directory on the host, `casnix serve` in
// the container (as its default non-root user) answering the host's real Nix 2.8 through
// the socket on a host directory (`nix path-info`), JSON logs, the health check, and a
// restart with the data intact; then, as the lower store of a Local Overlay Store (root,
// /dev/fuse, `serve --mount` on a shared host directory), `nix copy --from` the socket. Then `casnix doctor` in the image: an
// unwritable data volume and a missing /dev/fuse are named as problems (exit 1); a good
// setup passes. The HTTP binary cache on the published port 8080 answers the host's Nix
// (`nix path-info` and `nix copy --from http://…`).
func TestContainer(t *testing.T) {
	nixtest.RequirePodman(t)
	client := nixtest.RequireNixClient(t, "bookworm")
	image, version := buildImage(t)

	// The image's metadata.
	var inspect []struct {
		Config struct {
			User         string
			Entrypoint   []string
			Cmd          []string
			Volumes      map[string]any
			ExposedPorts map[string]any
			Labels       map[string]string
			Env          []string
			Healthcheck  *struct{ Test []string }
		}
		Size int64
	}
	var healthInspect []struct{ HealthCheck *struct{ Test []string } }
	out := nixtest.Run(t, "podman", "image", "inspect", image)
	if err := json.Unmarshal(out, &inspect); err != nil || len(inspect) != 1 {
		t.Fatalf("podman image inspect: %v\n%s", err, out)
	}
	if err := json.Unmarshal(out, &healthInspect); err != nil {
		t.Fatalf("podman image inspect: %v\n%s", err, out)
	}
	cfg := inspect[0].Config
	for _, c := range []struct {
		what string
		ok   bool
	}{
		{"non-root user", cfg.User == "10001:10001"},
		{"ENTRYPOINT casnix", slices.Equal(cfg.Entrypoint, []string{"casnix"})},
		{"CMD serve", slices.Equal(cfg.Cmd, []string{"serve"})},
		{"/data volume", cfg.Volumes["/data"] != nil},
		{"/run/casnix volume", cfg.Volumes["/run/casnix"] != nil},
		{"port 8080", cfg.ExposedPorts["8080/tcp"] != nil},
		{"version label", cfg.Labels["org.opencontainers.image.version"] == version},
		{"health check casnix ping", (cfg.Healthcheck != nil && slices.Contains(cfg.Healthcheck.Test, "ping")) ||
			(healthInspect[0].HealthCheck != nil && slices.Contains(healthInspect[0].HealthCheck.Test, "ping"))},
		{"CASNIX_DIR=/data", slices.Contains(cfg.Env, "CASNIX_DIR=/data")},
	} {
		if !c.ok {
			t.Errorf("image: no %s: %+v", c.what, cfg)
		}
	}
	t.Logf("image %s: %.1f MB", image, float64(inspect[0].Size)/1e6)
	if r := podman(t, "run", "--rm", image, "version"); !r.OK() || strings.TrimSpace(string(r.Stdout)) != "casnix "+version {
		t.Errorf("casnix version in the image:\n%s", r)
	}

	// A fixture imported by the container (as root: the fixture's directories are the
	// test's, mode 0700) into a host directory.
	f := nixtest.PopulateFixture(t)
	want := f.PathInfos(t)
	data := t.TempDir()
	run := t.TempDir()
	if r := podman(t, "run", "--rm", "--user", "0", "-v", data+":/data", "-v", f.Root+":/fixture",
		image, "import", "--from-nix-store", "/fixture"); !r.OK() {
		t.Fatalf("casnix import in the container:\n%s", r)
	}

	// casnix serve in the container as its own user; :U hands both directories to it.
	name := fmt.Sprintf("casnix-e2e-%d", os.Getpid())
	port := freePort(t)
	if r := podman(t, "run", "-d", "--name", name, "-p", fmt.Sprintf("127.0.0.1:%d:8080", port),
		"-v", data+":/data:U", "-v", run+":/run/casnix:U", image); !r.OK() {
		t.Fatalf("podman run:\n%s", r)
	}
	t.Cleanup(func() { podman(t, "rm", "-f", "-t", "0", name) })
	waitHealthy(t, name)
	store := "unix://" + filepath.Join(run, "daemon.sock")

	check := func(when string) {
		t.Helper()
		r := client.Run(t, append(client.PathInfoJSONArgs(t), "--all", "--store", store)...)
		got, err := nixtest.ParsePathInfoJSON(r.Stdout)
		if err != nil {
			t.Fatalf("%s: nix path-info --json: %v", when, err)
		}
		if len(got) != len(want) {
			t.Errorf("%s: nix path-info --all through the container lists %d paths, want %d", when, len(got), len(want))
		}
		for p, w := range want {
			if d := nixtest.ComparePathInfo(got[p], w); len(d) > 0 {
				t.Errorf("%s: %s: %s", when, p, strings.Join(d, "; "))
			}
		}
	}
	check("first start")

	// The HTTP binary cache (CASNIX_HTTP=:8080 in the image) on the published port.
	cacheURL := fmt.Sprintf("http://127.0.0.1:%d", port)
	top := f.Path(t, "diamond-top")
	if r := client.Run(t, "nix", "path-info", "--store", cacheURL, top); strings.TrimSpace(string(r.Stdout)) != top {
		t.Errorf("nix path-info through the container's HTTP cache:\n%s", r)
	}
	fromHTTP := filepath.Join(t.TempDir(), "from-http")
	client.Run(t, "nix", "copy", "--no-check-sigs", "--from", cacheURL, "--to", "local?root="+fromHTTP, top)
	for _, p := range f.Closure(t, top) {
		w := nixtest.NewDigestWriter()
		dump := client.Cmd("nix-store", "--dump", filepath.Join(fromHTTP, p))
		dump.Stdout = w
		dump.Run(t)
		if w.Digest() != f.Dump(t, p) {
			t.Errorf("%s copied from the container's HTTP cache differs from the source", p)
		}
	}

	// Logs: JSON lines on stderr (CASNIX_LOG_FORMAT=json in the image).
	logs := podman(t, "logs", name)
	serving := false
	for _, line := range strings.Split(strings.TrimSpace(string(logs.Stdout)+string(logs.Stderr)), "\n") {
		var entry map[string]any
		if err := json.Unmarshal([]byte(line), &entry); err != nil {
			t.Errorf("log line %q is not JSON: %v", line, err)
			continue
		}
		serving = serving || entry["msg"] == "serving"
	}
	if !serving {
		t.Errorf("no JSON \"serving\" log entry:\n%s%s", logs.Stdout, logs.Stderr)
	}

	// Restart: same data, answering again.
	if r := podman(t, "restart", "-t", "10", name); !r.OK() {
		t.Fatalf("podman restart:\n%s", r)
	}
	waitHealthy(t, name)
	check("after restart")
	if r := podman(t, "exec", name, "casnix", "verify"); !r.OK() {
		t.Errorf("casnix verify in the restarted container:\n%s", r)
	}

	// The Local Overlay Store's lower store: Nix (2.8 as much as later ones) reads a unix://
	// store's files from its file system (the store's real= directory), only metadata goes
	// through the socket. So casnix serve --mount in the container (as root, with /dev/fuse)
	// mounts the store on a host directory shared into the container, and the host's Nix
	// copies from the socket with real= pointing there, as Nix's local-overlay store does.
	if r := podman(t, "rm", "-f", "-t", "10", name); !r.OK() {
		t.Fatalf("podman rm:\n%s", r)
	}
	lower := sharedMount(t)
	if r := podman(t, "run", "-d", "--name", name, "--user", "0", "--device", "/dev/fuse", "--cap-add", "SYS_ADMIN",
		"-v", data+":/data", "-v", run+":/run/casnix", "-v", lower+":/lower:rshared", image, "serve", "--mount", "/lower/store"); !r.OK() {
		t.Fatalf("podman run with --mount:\n%s", r)
	}
	waitHealthy(t, name)
	check("serving with --mount")
	roots := []string{f.Path(t, "tree"), f.Path(t, "diamond-top")}
	dest := filepath.Join(t.TempDir(), "dest")
	from := store + "?real=" + filepath.Join(lower, "store")
	client.Run(t, append([]string{"nix", "copy", "--no-check-sigs", "--from", from, "--to", "local?root=" + dest}, roots...)...)
	closure := f.Closure(t, roots...)
	copied := nixtest.SortedLines(client.Output(t, "nix", "path-info", "--all", "--store", "local?root="+dest))
	if !slices.Equal(copied, closure) {
		t.Errorf("after nix copy --from the container the local store holds %q, want the closure %q", copied, closure)
	}
	for _, p := range closure {
		w := nixtest.NewDigestWriter()
		c := client.Cmd("nix-store", "--dump", filepath.Join(dest, p))
		c.Stdout = w
		if r := c.Try(); !r.OK() {
			t.Fatalf("dump the copy of %s:\n%s", p, r)
		}
		if got := w.Digest(); got.NixHash() != want[p].NarHash {
			t.Errorf("nix copy of %s: NAR %s, want %s", p, got.NixHash(), want[p].NarHash)
		}
	}
	// SIGTERM: casnix unmounts before it exits.
	if r := podman(t, "stop", "-t", "20", name); !r.OK() {
		t.Errorf("podman stop:\n%s", r)
	}
	if entries, err := os.ReadDir(filepath.Join(lower, "store")); err != nil || len(entries) != 0 {
		t.Errorf("after the container stopped, %s/store holds %d entries (%v): not unmounted", lower, len(entries), err)
	}

	// casnix doctor in the image.
	rootOwned := t.TempDir() // 0700 root: the container's user cannot write it
	for _, tc := range []struct {
		name    string
		args    []string
		problem string
	}{
		{"unwritable data volume", []string{"-v", rootOwned + ":/data", image, "doctor", "--skip", "fuse"}, "data dir"},
		{"no /dev/fuse", []string{"-v", t.TempDir() + ":/data:U", image, "doctor", "--skip", "overlay"}, "fuse device"},
		{"good", []string{"-v", t.TempDir() + ":/data:U", image, "doctor", "--skip", "fuse"}, ""},
	} {
		r := podman(t, append([]string{"run", "--rm"}, tc.args...)...)
		out := string(r.Stdout)
		switch {
		case tc.problem == "" && (!r.OK() || strings.Contains(out, "PROBLEM")):
			t.Errorf("doctor in the container, %s:\n%s", tc.name, r)
		case tc.problem != "" && (r.ExitCode != 1 || !strings.Contains(out, "PROBLEM  "+tc.problem) || !strings.Contains(out, "fix:")):
			t.Errorf("doctor in the container, %s: want exit 1 and PROBLEM %s:\n%s", tc.name, tc.problem, r)
		}
	}
}

// buildImage builds the top-level Dockerfile with podman from a context holding a casnix
// binary built for it (BINARY=prebuilt), tagged uniquely and removed after the test. It
// returns the image and the version baked into it.
func buildImage(t *testing.T) (image, version string) {
	t.Helper()
	root := nixtest.ModuleRoot()
	ctx := t.TempDir()
	version = fmt.Sprintf("e2e-%d", time.Now().Unix())
	build := exec.Command("go", "build", "-trimpath", "-ldflags", "-s -w -X github.com/casnix/casnix/cli.Version="+version,
		"-o", filepath.Join(ctx, "casnix"), ".")
	build.Dir = root
	build.Env = append(os.Environ(), "CGO_ENABLED=0")
	if out, err := build.CombinedOutput(); err != nil {
		t.Fatalf("go build: %v\n%s", err, out)
	}
	nixtest.Run(t, "cp", "-a", filepath.Join(root, "Dockerfile"), filepath.Join(root, "contrib"), ctx)
	image = "localhost/casnix-e2e:" + version
	dangling := func() []string {
		return strings.Fields(string(nixtest.Run(t, "podman", "images", "-a", "-q", "--no-trunc", "-f", "dangling=true")))
	}
	before := dangling()
	start := time.Now()
	r := podman(t, "build", "--format", "docker", "--build-arg", "BINARY=prebuilt", "--build-arg", "VERSION="+version, "-t", image, ctx)
	if !r.OK() {
		t.Fatalf("podman build:\n%s", r)
	}
	t.Logf("podman build in %s", time.Since(start).Round(time.Millisecond))
	// The build leaves its intermediate stage behind untagged: remove it with the image.
	var stages []string
	for _, id := range dangling() {
		if !slices.Contains(before, id) {
			stages = append(stages, id)
		}
	}
	t.Cleanup(func() { podman(t, append([]string{"rmi", "-f", image}, stages...)...) })
	return image, version
}

// podman runs podman with runc: crun refuses this machine's hybrid cgroup layout (cgroup v1
// controllers plus a cgroup2 mount with a controller), runc copes. Containers get limits at
// or below the test's own (--ulimit): the runtime may not raise them where the test lacks
// CAP_SYS_RESOURCE, and podman's defaults for root are higher.
func podman(t *testing.T, args ...string) *nixtest.Result {
	t.Helper()
	if len(args) > 0 && args[0] == "run" {
		var nofile unix.Rlimit
		if err := unix.Getrlimit(unix.RLIMIT_NOFILE, &nofile); err != nil {
			t.Fatal(err)
		}
		n := min(nofile.Max, 65536)
		args = append([]string{"run", "--ulimit", fmt.Sprintf("nofile=%d:%d", n, n), "--ulimit", "nproc=4096:4096"}, args[1:]...)
	}
	return (&nixtest.Cmd{Name: "podman", Args: append([]string{"--runtime", "runc"}, args...), Timeout: 5 * time.Minute}).Try()
}

// waitHealthy runs the image's health check (casnix ping) until it passes.
func waitHealthy(t *testing.T, name string) {
	t.Helper()
	deadline := time.Now().Add(60 * time.Second)
	for {
		r := podman(t, "healthcheck", "run", name)
		if r.OK() {
			return
		}
		if time.Now().After(deadline) {
			logs := podman(t, "logs", name)
			t.Fatalf("container %s not healthy after 60s:\n%s\nlogs:\n%s%s", name, r, logs.Stdout, logs.Stderr)
		}
		time.Sleep(100 * time.Millisecond)
	}
}

// sharedMount returns a new directory bind-mounted onto itself as a shared mount, so mounts
// made below it inside a container (-v DIR:/x:rshared) appear on the host; unmounted (with
// anything left below it) at the end of the test.
func sharedMount(t *testing.T) string {
	t.Helper()
	dir := t.TempDir()
	nixtest.Run(t, "mount", "--bind", dir, dir)
	t.Cleanup(func() {
		exec.Command("umount", "-l", filepath.Join(dir, "store")).Run()
		if out, err := exec.Command("umount", "-l", dir).CombinedOutput(); err != nil {
			t.Errorf("umount %s: %v\n%s", dir, err, out)
		}
	})
	nixtest.Run(t, "mount", "--make-shared", dir)
	return dir
}

// freePort returns a TCP port on 127.0.0.1 that was free a moment ago.
func freePort(t *testing.T) int {
	t.Helper()
	ln, err := net.Listen("tcp", "127.0.0.1:0")
	if err != nil {
		t.Fatal(err)
	}
	defer ln.Close()
	return ln.Addr().(*net.TCPAddr).Port
}
