package nixtest

import (
	"bytes"
	"context"
	"encoding/binary"
	"io"
	"net"
	"os"
	"path/filepath"
	"strings"
	"testing"
	"time"
)

// rootSuites are the Debian roots the daemon tests use, with the Nix version each holds.
var rootSuites = []struct{ suite, version string }{
	{"trixie", "2.26."},
	{"sid", "2.34."},
}

// hiNix is the tiny derivation of the brief, and one that fails unless it is built in
// Nix's sandbox (where the root's /usr and /etc are not visible).
const hiNix = `{
  hi = builtins.derivation {
    name = "hi";
    system = builtins.currentSystem;
    builder = "/bin/busybox";
    args = [ "sh" "-c" "echo hi > $out" ];
  };
  sandboxed = builtins.derivation {
    name = "sandboxed";
    system = builtins.currentSystem;
    builder = "/bin/busybox";
    args = [ "sh" "-c" "if [ -e /usr/bin/nix ] || [ -e /etc/nix/nix.conf ]; then echo not in a sandbox >&2; exit 1; fi; echo sandboxed > $out" ];
  };
}
`

func TestRoots(t *testing.T) {
	for _, s := range rootSuites {
		t.Run(s.suite, func(t *testing.T) {
			r := RequireRoot(t, s.suite)

			t.Run("version", func(t *testing.T) {
				out := string(r.Output(t, "nix", "--version"))
				if !strings.Contains(out, " "+s.version) {
					t.Errorf("nix --version = %q, want %sx", out, s.version)
				}
				if v := r.NixVersion(t); !strings.HasPrefix(v, s.version) {
					t.Errorf("NixVersion = %q, want %sx", v, s.version)
				}
				r.Run(t, "ssh", "-V") // for ssh-ng
			})

			t.Run("sandboxed build in the test's /nix", func(t *testing.T) {
				writeFile(t, r.HostPath("/tmp/hi.nix"), hiNix, 0o644)
				out := r.Output(t, "nix", "build", "--option", "sandbox", "true", "--no-link",
					"--print-out-paths", "-f", "/tmp/hi.nix", "hi", "sandboxed")
				paths := strings.Fields(string(out))
				if len(paths) != 2 || !strings.HasSuffix(paths[0], "-hi") || !strings.HasSuffix(paths[1], "-sandboxed") {
					t.Fatalf("nix build printed %q", out)
				}
				// The store is the test's own, on the host under NixDir.
				if b, err := os.ReadFile(r.HostPath(paths[0])); err != nil || string(b) != "hi\n" {
					t.Errorf("%s on the host (%s): %q, %v", paths[0], r.HostPath(paths[0]), b, err)
				}
				if !strings.HasPrefix(r.HostPath(paths[0]), r.NixDir+"/store/") {
					t.Errorf("HostPath(%s) = %s, not in NixDir %s", paths[0], r.HostPath(paths[0]), r.NixDir)
				}
				infos := r.PathInfos(t, "", paths[0])
				pi, ok := infos[paths[0]]
				if !ok || pi.NarSize != 120 || pi.NarHash != hiNarHash(t) || !strings.HasSuffix(pi.Deriver, "-hi.drv") || len(pi.References) != 0 {
					t.Errorf("path-info of %s: %+v", paths[0], infos)
				}
				// The cached root's own /nix stays untouched.
				if ents, _ := os.ReadDir(filepath.Join(r.Base, "nix", "store")); len(ents) != 0 {
					t.Errorf("the cached root's /nix/store has %d entries", len(ents))
				}
			})

			t.Run("local?root store (forced sandbox)", func(t *testing.T) {
				writeFile(t, r.HostPath("/tmp/hi.nix"), hiNix, 0o644)
				store := "local?root=/tmp/chroot-store"
				out := r.Output(t, "nix", "build", "--store", store, "--no-link", "--print-out-paths", "-f", "/tmp/hi.nix", "hi")
				p := strings.TrimSpace(string(out))
				infos := r.PathInfos(t, store, p)
				if pi, ok := infos[p]; !ok || pi.NarSize != 120 || pi.NarHash != hiNarHash(t) {
					t.Errorf("path-info of %s in %s: %+v", p, store, infos)
				}
				if b, err := os.ReadFile(r.HostPath("/tmp/chroot-store" + p)); err != nil || string(b) != "hi\n" {
					t.Errorf("%s in the chroot store: %q, %v", p, b, err)
				}
			})

			t.Run("bound host directory and socket", func(t *testing.T) {
				r := RequireRoot(t, s.suite)
				dir := t.TempDir()
				writeFile(t, filepath.Join(dir, "from-host"), "host\n", 0o644)
				sock := filepath.Join(dir, "daemon.sock")
				magic := listenOnce(t, sock)
				r.Bind(dir)
				r.Env = append(r.Env, "CASNIX_TEST_VAR=x y")
				out := r.Output(t, "sh", "-c", `cat "$1/from-host"; echo inside > "$1/from-root"; printf '%s\n' "$CASNIX_TEST_VAR"`, "sh", dir)
				if string(out) != "host\nx y\n" {
					t.Errorf("inside the root: %q", out)
				}
				if b, err := os.ReadFile(filepath.Join(dir, "from-root")); err != nil || string(b) != "inside\n" {
					t.Errorf("file written inside, on the host: %q, %v", b, err)
				}
				// A real Nix client inside reaches a socket a host process listens on: the
				// listener gets the client's worker-protocol magic, then hangs up.
				res := r.Try("nix", "store", "info", "--store", "unix://"+sock)
				select {
				case m := <-magic:
					if m != 0x6e697863 {
						t.Errorf("client sent magic %#x, want 0x6e697863\n%s", m, res)
					}
				case <-time.After(30 * time.Second):
					t.Errorf("no client connected to %s\n%s", sock, res)
				}
				// The host's environment does not leak into the root.
				t.Setenv("CASNIX_LEAK", "1")
				if out := r.Output(t, "sh", "-c", "echo ${CASNIX_LEAK:-none} $HOME $PATH"); !strings.HasPrefix(string(out), "none /root /usr/local/sbin") {
					t.Errorf("environment inside: %q", out)
				}
			})
		})
	}
}

// TestRootDaemonAcrossRoots runs trixie's nix-daemon in the background on a socket in a
// bound directory and queries it with sid's Nix: the pattern of the casnix daemon tests,
// with both ends real Nix.
func TestRootDaemonAcrossRoots(t *testing.T) {
	server := RequireRoot(t, "trixie")
	client := RequireRoot(t, "sid")
	dir := t.TempDir()
	sock := filepath.Join(dir, "socket")
	server.Bind(dir)
	client.Bind(dir)

	writeFile(t, server.HostPath("/tmp/hi.nix"), hiNix, 0o644)
	p := strings.TrimSpace(string(server.Output(t, "nix", "build", "--no-link", "--print-out-paths", "-f", "/tmp/hi.nix", "hi")))

	ctx, cancel := context.WithCancel(context.Background())
	var log bytes.Buffer
	daemon := server.Command(ctx, "nix-daemon")
	daemon.Env = append(daemon.Env, "NIX_DAEMON_SOCKET_PATH="+sock)
	daemon.Stdout, daemon.Stderr = &log, &log
	if err := daemon.Start(); err != nil {
		t.Fatal(err)
	}
	done := make(chan error, 1)
	go func() { done <- daemon.Wait() }()
	t.Cleanup(func() {
		cancel()
		<-done
		if t.Failed() {
			t.Logf("nix-daemon output:\n%s", tail(log.Bytes(), 4<<10))
		}
	})
	for start := time.Now(); ; time.Sleep(50 * time.Millisecond) {
		if _, err := os.Stat(sock); err == nil {
			break
		}
		if time.Since(start) > 30*time.Second {
			t.Fatalf("nix-daemon made no socket %s", sock)
		}
	}

	store := "unix://" + sock
	infos := client.PathInfos(t, store, p)
	if pi, ok := infos[p]; !ok || pi.NarSize != 120 {
		t.Errorf("path-info of %s through the daemon: %+v", p, infos)
	}
	// A unix:// store is a local file system store to Nix: dump-path, cat and ls read the
	// files from the client's /nix/store (or the directory of the store's real= setting),
	// not over the socket. So the client sees the daemon's store directory at /nix/store,
	// as casnix's clients will see its FUSE mount.
	if res := client.Try("nix", "store", "dump-path", "--store", store, p); res.OK() {
		t.Errorf("dump-path worked without the store directory:\n%s", res)
	}
	client.BindAt(server.HostPath("/nix/store"), "/nix/store")
	if out := client.Output(t, "nix", "store", "cat", "--store", store, p); string(out) != "hi\n" {
		t.Errorf("nix store cat: %q", out)
	}
	w := NewDigestWriter()
	dump := client.Cmd("nix", "store", "dump-path", "--store", store, p)
	dump.Stdout = w
	if res := dump.Try(); !res.OK() {
		t.Fatalf("command failed:\n%s", res)
	}
	if d := w.Digest(); d.Size != 120 || d.NixHash() != hiNarHash(t) {
		t.Errorf("nix store dump-path through the daemon: %v, want %s (120 bytes)", d, hiNarHash(t))
	}
	res := client.Run(t, "nix", "store", "info", "--store", store)
	if out := string(res.Stdout) + string(res.Stderr); !strings.Contains(out, "Version: 2.26.") { // to stderr
		t.Errorf("nix store info does not name the daemon's version: %q", out)
	}
}

// TestRootLocalOverlayStore builds, in Nix's sandbox, into a Local Overlay Store whose lower
// store is a local store in the root and whose overlayfs Root.Setup mounts at /nix/store
// before each command: the shape of the casnix overlay tests, where the lower store is
// casnix's daemon and its FUSE mount.
func TestRootLocalOverlayStore(t *testing.T) {
	for _, s := range rootSuites {
		t.Run(s.suite, func(t *testing.T) {
			r := RequireRoot(t, s.suite)
			writeFile(t, r.HostPath("/tmp/hi.nix"), hiNix, 0o644)
			writeFile(t, r.HostPath("/tmp/two.nix"), `let hi = (import /tmp/hi.nix).hi; in builtins.derivation {
  name = "two";
  system = builtins.currentSystem;
  builder = "/bin/busybox";
  args = [ "sh" "-c" "if [ -e /usr/bin/nix ]; then exit 1; fi; cat ${hi} > $out; echo ${hi} >> $out" ];
}
`, 0o644)
			hi := strings.TrimSpace(string(r.Output(t, "nix", "build", "--store", "local?root=/tmp/lower", "--no-link", "--print-out-paths", "-f", "/tmp/hi.nix", "hi")))
			r.Run(t, "mkdir", "/tmp/upper", "/tmp/work")
			r.Setup = "mount -t overlay overlay -o lowerdir=/tmp/lower/nix/store,upperdir=/tmp/upper,workdir=/tmp/work /nix/store"
			// Not root=/: Nix 2.26 then looks for an overlay mounted at //nix/store.
			store := "local-overlay://?lower-store=local%3Froot%3D/tmp/lower&upper-layer=/tmp/upper"
			two := strings.TrimSpace(string(r.Output(t, "nix", "build", "--option", "sandbox", "true", "--store", store,
				"--no-link", "--print-out-paths", "-f", "/tmp/two.nix")))
			infos := r.PathInfos(t, store, two)
			if pi := infos[two]; len(pi.References) != 1 || pi.References[0] != hi {
				t.Errorf("path-info of %s: %+v, want a reference to %s", two, infos, hi)
			}
			if out := r.Output(t, "cat", two); string(out) != "hi\n"+hi+"\n" {
				t.Errorf("%s holds %q", two, out)
			}
			// The new path is in the upper layer; its reference stays in the lower store only.
			if _, err := os.Stat(r.HostPath("/tmp/upper/" + filepath.Base(two))); err != nil {
				t.Error(err)
			}
			if _, err := os.Stat(r.HostPath("/tmp/upper/" + filepath.Base(hi))); err == nil {
				t.Errorf("%s was copied into the upper layer", hi)
			}
		})
	}
}

// listenOnce listens on a Unix socket at path and sends the first 8 bytes (a
// little-endian number) the first client sends, then closes the connection.
func listenOnce(t *testing.T, path string) <-chan uint64 {
	t.Helper()
	l, err := net.Listen("unix", path)
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { l.Close() })
	ch := make(chan uint64, 1)
	go func() {
		c, err := l.Accept()
		if err != nil {
			return
		}
		defer c.Close()
		c.SetDeadline(time.Now().Add(30 * time.Second))
		var b [8]byte
		if _, err := io.ReadFull(c, b[:]); err == nil {
			ch <- binary.LittleEndian.Uint64(b[:])
		}
	}()
	return ch
}

// hiNarHash is the NAR hash of a regular file holding "hi\n", normalised.
func hiNarHash(t *testing.T) string {
	h, err := NormalizeSHA256("sha256-EFUdrtf6Rn0LWIJufrmg8q99aT3jGfLvd1//zaJEufY=")
	if err != nil {
		t.Fatal(err)
	}
	return h
}
