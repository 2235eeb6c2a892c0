package tests

import (
	"errors"
	"io/fs"
	"net/url"
	"os"
	"os/exec"
	"path/filepath"
	"slices"
	"strings"
	"syscall"
	"testing"
	"time"

	"github.com/casnix/casnix/tests/nixtest"
)

// overlayNix builds a lower path with files, a reference and a program,
// and a derivation on top of it that the overlay store builds.
const overlayNix = `rec {
  lib = builtins.derivation {
    name = "lib";
    system = builtins.currentSystem;
    builder = "/bin/busybox";
    args = [ "sh" "-c" "mkdir -p $out/bin $out/share; echo data > $out/share/data; printf '#!/bin/sh\necho from-lower\n' > $out/bin/tool; chmod +x $out/bin/tool; ln -s share/data $out/link" ];
  };
  late = builtins.derivation {
    name = "late";
    system = builtins.currentSystem;
    builder = "/bin/busybox";
    args = [ "sh" "-c" "echo late > $out" ];
  };
  junk = builtins.derivation {
    name = "junk";
    system = builtins.currentSystem;
    builder = "/bin/busybox";
    args = [ "sh" "-c" "mkdir -p $out; echo junk > $out/junk" ];
  };
  app = builtins.derivation {
    name = "app";
    system = builtins.currentSystem;
    builder = "/bin/busybox";
    args = [ "sh" "-c" "cat ${lib}/share/data > $out; echo ${lib} >> $out" ];
  };
}
`

// fuseSuperMagic is statfs(2)'s f_type of a FUSE file system.
const fuseSuperMagic = 0x65735546

// casnixServer runs `casnix serve --socket --mount` on the host.
type casnixServer struct {
	cmd       *exec.Cmd
	sock, mnt string
}

// It is ready once the socket and mnt/waitFor exist; with waitFor "", once the socket
// exists and mnt is a FUSE mount (a lazy store may hold nothing). extra are more flags of
// serve.
func startCasnixServe(t testing.TB, bin, data, dir string, waitFor string, extra ...string) *casnixServer {
	t.Helper()
	s := &casnixServer{sock: filepath.Join(dir, "daemon.sock"), mnt: filepath.Join(dir, "lower")}
	s.cmd = exec.Command(bin, append([]string{"-d", data, "serve", "--socket", s.sock, "--mount", s.mnt}, extra...)...)
	s.cmd.Stdout, s.cmd.Stderr = os.Stderr, os.Stderr
	if err := s.cmd.Start(); err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() {
		s.cmd.Process.Signal(syscall.SIGTERM)
		done := make(chan error, 1)
		go func() { done <- s.cmd.Wait() }()
		select {
		case err := <-done:
			if err != nil {
				t.Errorf("casnix serve: %v", err)
			}
		case <-time.After(30 * time.Second):
			s.cmd.Process.Kill()
			t.Error("casnix serve did not stop on SIGTERM")
		}
	})
	deadline := time.Now().Add(30 * time.Second)
	for {
		_, e1 := os.Stat(s.sock)
		_, e2 := os.Stat(filepath.Join(s.mnt, waitFor))
		if waitFor == "" && e2 == nil {
			var sfs syscall.Statfs_t
			if e2 = syscall.Statfs(s.mnt, &sfs); e2 == nil && sfs.Type != fuseSuperMagic {
				e2 = errors.New("not mounted yet")
			}
		}
		if e1 == nil && e2 == nil {
			return s
		}
		if time.Now().After(deadline) {
			t.Fatalf("casnix serve not ready: %v %v", e1, e2)
		}
		time.Sleep(50 * time.Millisecond)
	}
}

// TestLocalOverlayStore: real Nix (2.26 and 2.34) uses casnix as the lower
// store of its Local Overlay Store: the daemon socket for metadata (with
// real= naming the FUSE mount), the FUSE mount as overlayfs lowerdir.
func TestLocalOverlayStore(t *testing.T) {
	for _, suite := range []string{"trixie", "sid"} {
		t.Run(suite, func(t *testing.T) {
			r := nixtest.RequireRoot(t, suite)
			bin := nixtest.CasnixBinary(t)
			if err := os.WriteFile(r.HostPath("/tmp/o.nix"), []byte(overlayNix), 0o644); err != nil {
				t.Fatal(err)
			}
			// The source store: real Nix builds the lower paths.
			build := func(store, attr string) string {
				return strings.TrimSpace(string(r.Output(t, "nix", "build", "--store", store, "--no-link", "--print-out-paths", "-f", "/tmp/o.nix", attr)))
			}
			lib := build("local?root=/tmp/src", "lib")
			late := build("local?root=/tmp/src", "late")
			junk := build("local?root=/tmp/src", "junk")
			src := r.HostPath("/tmp/src")

			// casnix holds lib (not late yet), serving socket and mount.
			data := t.TempDir()
			nixtest.Run(t, bin, "-d", data, "import", "--from-nix-store", src, lib, junk)
			dir := t.TempDir()
			srv := startCasnixServe(t, bin, data, dir, filepath.Base(lib))
			r.Bind(dir)
			r.Run(t, "mkdir", "-p", "/tmp/upper", "/tmp/work")
			r.Setup = "mount -t overlay overlay -o lowerdir=" + srv.mnt + ",upperdir=/tmp/upper,workdir=/tmp/work /nix/store"
			lower := "unix://" + srv.sock + "?real=" + srv.mnt
			store := "local-overlay://?lower-store=" + url.QueryEscape(lower) + "&upper-layer=/tmp/upper"

			// A lower path is valid and readable through the overlay.
			infos := r.PathInfos(t, store, lib)
			if _, ok := infos[lib]; !ok {
				t.Fatalf("path-info of lower path %s: %v", lib, infos)
			}
			if out := r.Output(t, lib+"/bin/tool"); string(out) != "from-lower\n" {
				t.Fatalf("lower program printed %q", out)
			}
			// A build whose input is a lower path, sandboxed, into the upper layer.
			app := strings.TrimSpace(string(r.Output(t, "nix", "build", "--option", "sandbox", "true", "--store", store,
				"--out-link", "/tmp/result", "--print-out-paths", "-f", "/tmp/o.nix", "app")))
			if out := r.Output(t, "cat", app); string(out) != "data\n"+lib+"\n" {
				t.Fatalf("%s holds %q", app, out)
			}
			if _, err := os.Stat(r.HostPath("/tmp/upper/" + filepath.Base(app))); err != nil {
				t.Fatalf("built path not in the upper layer: %v", err)
			}
			if _, err := os.Stat(r.HostPath("/tmp/upper/" + filepath.Base(lib))); err == nil {
				t.Fatal("the lower input was copied into the upper layer")
			}
			if pi := r.PathInfos(t, store, app)[app]; len(pi.References) != 1 || pi.References[0] != lib {
				t.Fatalf("references of %s: %v", app, pi.References)
			}
			r.Run(t, "nix", "store", "verify", "--store", store, "--no-trust", lib, app)
			r.Run(t, "nix", "store", "verify", "--store", store, "--all", "--no-trust")

			// GC of the overlay store leaves lower paths alone (app roots lib).
			r.Run(t, "nix-store", "--store", store, "--gc")
			if _, err := os.Stat(filepath.Join(srv.mnt, filepath.Base(lib), "share", "data")); err != nil {
				t.Fatalf("lower path gone after overlay GC: %v", err)
			}
			r.PathInfos(t, store, lib)

			// A path imported into casnix while everything runs becomes usable.
			nixtest.Run(t, bin, "-d", data, "import", "--from-nix-store", src, late)
			if out := r.Output(t, "cat", late); string(out) != "late\n" {
				t.Fatalf("late path holds %q", out)
			}
			if _, ok := r.PathInfos(t, store, late)[late]; !ok {
				t.Fatal("late path not valid in the overlay store")
			}

			// casnix gc of the lower store, beside the running serve --mount, rooted by the
			// overlay's upper database: lib stays (app, in the upper layer, refers to it), so
			// does late (the overlay registered it in its database when it was used), junk
			// (which nothing in the overlay used) goes, and the mount stops showing it
			// although the kernel had its entry cached.
			junkOnMount := filepath.Join(srv.mnt, filepath.Base(junk), "junk")
			if _, err := os.Stat(junkOnMount); err != nil {
				t.Fatalf("junk not on the mount before gc: %v", err)
			}
			upperDB := r.HostPath("/nix/var/nix/db/db.sqlite")
			deleted := nixtest.SortedLines(nixtest.Run(t, bin, "-d", data, "gc", "--upper-db", upperDB))
			if want := []string{junk}; !slices.Equal(deleted, want) {
				t.Fatalf("gc --upper-db deleted %q, want %q", deleted, want)
			}
			if got := nixtest.SortedLines(nixtest.Run(t, bin, "-d", data, "path-info", "--all")); len(got) != 2 ||
				!strings.HasPrefix(got[0], lib) && !strings.HasPrefix(got[1], lib) {
				t.Fatalf("casnix holds %q after gc, want lib and late", got)
			}
			deadline := time.Now().Add(10 * time.Second)
			for {
				_, err := os.Stat(junkOnMount)
				if errors.Is(err, fs.ErrNotExist) {
					break
				}
				if time.Now().After(deadline) {
					t.Fatalf("deleted path still on the mount 10 s after gc: %v", err)
				}
				time.Sleep(100 * time.Millisecond)
			}
			ents, err := os.ReadDir(srv.mnt)
			if err != nil {
				t.Fatal(err)
			}
			for _, e := range ents {
				if e.Name() == filepath.Base(junk) {
					t.Errorf("the mount lists deleted %s", e.Name())
				}
			}
			if out := r.Output(t, lib+"/bin/tool"); string(out) != "from-lower\n" {
				t.Fatalf("lower program after gc printed %q", out)
			}
			if out := r.Output(t, "cat", app); string(out) != "data\n"+lib+"\n" {
				t.Fatalf("%s after gc holds %q", app, out)
			}
			r.Run(t, "nix", "store", "verify", "--store", store, "--all", "--no-trust")
			if _, ok := r.PathInfos(t, store, lib)[lib]; !ok {
				t.Fatal("lib not valid in the overlay store after gc")
			}
		})
	}
}
