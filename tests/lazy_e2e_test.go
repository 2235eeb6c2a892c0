package tests

import (
	"net/http"
	"net/http/httptest"
	"net/url"
	"os"
	"path/filepath"
	"slices"
	"strings"
	"testing"

	"github.com/casnix/casnix/tests/nixtest"
)

// lazyNix: prog runs a script that reads dep (a reference); app is built from input,
// which refers to dep too.
const lazyNix = `rec {
  dep = builtins.derivation {
    name = "dep";
    system = builtins.currentSystem;
    builder = "/bin/busybox";
    args = [ "sh" "-c" "mkdir -p $out/share; echo dep-data > $out/share/data" ];
  };
  prog = builtins.derivation {
    name = "prog";
    system = builtins.currentSystem;
    builder = "/bin/busybox";
    args = [ "sh" "-c" "mkdir -p $out/bin; printf '#!/bin/sh\ncat ${dep}/share/data\n' > $out/bin/prog; chmod +x $out/bin/prog" ];
  };
  input = builtins.derivation {
    name = "input";
    system = builtins.currentSystem;
    builder = "/bin/busybox";
    args = [ "sh" "-c" "mkdir -p $out; echo input > $out/v; ln -s ${dep} $out/dep" ];
  };
  app = builtins.derivation {
    name = "app";
    system = builtins.currentSystem;
    builder = "/bin/busybox";
    args = [ "sh" "-c" "cat ${input}/v ${input}/dep/share/data > $out; echo ${input} >> $out" ];
  };
}
`

// TestLazyLocalOverlayStore: real Nix (2.26 and 2.34) uses an EMPTY `casnix serve --lazy`
// as the lower store of its Local Overlay Store, with an upstream cache real Nix wrote
// (signed) served by a static HTTP server on loopback. Path-info of upstream-only paths
// answers from the narinfo without fetching; running a program of such a path through the
// overlay fetches its closure on lookup; a sandboxed build whose input only the upstream
// has works, and only its output lands in the upper layer; nix store verify --all passes.
// A floating content-addressed derivation (ca-derivations) whose signed realisation only
// the upstream has "builds" in the overlay with building forbidden: the overlay asks its
// lower store for the realisation, casnix answers from the upstream, and the output is
// fetched into casnix (not the upper layer) when read.
func TestLazyLocalOverlayStore(t *testing.T) {
	for _, suite := range []string{"trixie", "sid"} {
		t.Run(suite, func(t *testing.T) {
			r := nixtest.RequireRoot(t, suite)
			bin := nixtest.CasnixBinary(t)
			t.Logf("Nix %s", r.NixVersion(t))
			if err := os.WriteFile(r.HostPath("/tmp/l.nix"), []byte(lazyNix), 0o644); err != nil {
				t.Fatal(err)
			}
			if err := os.WriteFile(r.HostPath("/tmp/ca.nix"), []byte(caExpr), 0o644); err != nil {
				t.Fatal(err)
			}
			paths := map[string]string{}
			for _, a := range []string{"dep", "prog", "input"} {
				paths[a] = strings.TrimSpace(string(r.Output(t, "nix", "build", "--store", "local?root=/tmp/src",
					"--no-link", "--print-out-paths", "-f", "/tmp/l.nix", a)))
			}
			secret := r.Output(t, "nix", "key", "generate-secret", "--key-name", "up-1")
			if err := os.WriteFile(r.HostPath("/tmp/key"), secret, 0o600); err != nil {
				t.Fatal(err)
			}
			pubCmd := r.Cmd("nix", "key", "convert-secret-to-public")
			pubCmd.Stdin = strings.NewReader(string(secret))
			pub := strings.TrimSpace(string(pubCmd.Run(t).Stdout))
			r.Run(t, "nix", "copy", "--from", "local?root=/tmp/src", "--to", "file:///tmp/cache?compression=xz&secret-key=/tmp/key",
				paths["prog"], paths["input"])
			// A floating content-addressed derivation (ca-derivations), built and signed
			// (realisation too) and copied with its realisation.
			caCmd := func(args ...string) *nixtest.Cmd {
				cmd := r.Cmd(args...)
				cmd.Env = append(cmd.Env, "NIX_CONFIG=experimental-features = nix-command local-overlay-store ca-derivations\nsecret-key-files = /tmp/key")
				return cmd
			}
			caOut := strings.TrimSpace(string(caCmd("nix", "build", "--store", "local?root=/tmp/src", "--no-link", "--print-out-paths", "-f", "/tmp/ca.nix").Run(t).Stdout))
			caCmd("nix", "copy", "--from", "local?root=/tmp/src", "--to", "file:///tmp/cache?compression=xz&secret-key=/tmp/key", "-f", "/tmp/ca.nix").Run(t)
			up := httptest.NewServer(http.FileServer(http.Dir(r.HostPath("/tmp/cache"))))
			defer up.Close()

			data := t.TempDir()
			dir := t.TempDir()
			srv := startCasnixServe(t, bin, data, dir, "", "--lazy", "--substituters", up.URL, "--trusted-public-keys", pub)
			casnixHolds := func() []string {
				var names []string
				for _, l := range nixtest.SortedLines(nixtest.Run(t, bin, "-d", data, "path-info", "--all")) {
					names = append(names, strings.Fields(l)[0])
				}
				return names
			}
			if got := casnixHolds(); len(got) != 0 {
				t.Fatalf("casnix starts with %q", got)
			}
			r.Bind(dir)
			r.Run(t, "mkdir", "-p", "/tmp/upper", "/tmp/work")
			r.Setup = "mount -t overlay overlay -o lowerdir=" + srv.mnt + ",upperdir=/tmp/upper,workdir=/tmp/work /nix/store"
			lower := "unix://" + srv.sock + "?real=" + srv.mnt
			store := "local-overlay://?lower-store=" + url.QueryEscape(lower) + "&upper-layer=/tmp/upper"

			// Path-info from the narinfo, nothing fetched.
			infos := r.PathInfos(t, store, paths["prog"])
			if pi, ok := infos[paths["prog"]]; !ok || !slices.Equal(pi.References, []string{paths["dep"]}) {
				t.Fatalf("path-info of upstream-only %s: %+v", paths["prog"], infos)
			}
			if got := casnixHolds(); len(got) != 0 {
				t.Fatalf("path-info fetched %q", got)
			}

			// Running the program fetches its closure.
			if out := r.Output(t, paths["prog"]+"/bin/prog"); string(out) != "dep-data\n" {
				t.Fatalf("upstream program printed %q", out)
			}
			if got, want := casnixHolds(), []string{paths["dep"], paths["prog"]}; !slices.Equal(got, sorted(want)) {
				t.Fatalf("casnix holds %q after running the program, want %q", got, want)
			}

			// A sandboxed build whose input only the upstream has.
			app := strings.TrimSpace(string(r.Output(t, "nix", "build", "--option", "sandbox", "true", "--store", store,
				"--out-link", "/tmp/result", "--print-out-paths", "-f", "/tmp/l.nix", "app")))
			if out := r.Output(t, "cat", app); string(out) != "input\ndep-data\n"+paths["input"]+"\n" {
				t.Fatalf("%s holds %q", app, out)
			}
			if _, err := os.Stat(r.HostPath("/tmp/upper/" + filepath.Base(app))); err != nil {
				t.Fatalf("built path not in the upper layer: %v", err)
			}
			for _, a := range []string{"dep", "prog", "input"} {
				if _, err := os.Stat(r.HostPath("/tmp/upper/" + filepath.Base(paths[a]))); err == nil {
					t.Errorf("the lower path %s was copied into the upper layer", paths[a])
				}
			}
			if got, want := casnixHolds(), []string{paths["dep"], paths["prog"], paths["input"]}; !slices.Equal(got, sorted(want)) {
				t.Fatalf("casnix holds %q after the build, want %q", got, want)
			}
			r.Run(t, "nix", "store", "verify", "--store", store, "--all", "--no-trust")
			r.Run(t, "nix", "store", "verify", "--store", store, "--option", "trusted-public-keys", pub, paths["prog"], paths["input"], paths["dep"])

			// The CA derivation, evaluated in the overlay, may not be built (--max-jobs 0):
			// its realisation comes from casnix (QueryRealisation, answered from the
			// upstream), its output is valid in the lower store and fetched when read.
			caBuilt := caCmd("nix", "build", "--store", store, "--max-jobs", "0", "--no-link", "--print-out-paths", "-f", "/tmp/ca.nix").Try()
			if !caBuilt.OK() || strings.TrimSpace(string(caBuilt.Stdout)) != caOut {
				t.Fatalf("nix build of the CA derivation in the overlay: want %s\n%s", caOut, caBuilt)
			}
			if out := r.Output(t, "head", "-n", "1", caOut); string(out) != "top\n" {
				t.Fatalf("%s holds %q", caOut, out)
			}
			if _, err := os.Stat(r.HostPath("/tmp/upper/" + filepath.Base(caOut))); err == nil {
				t.Errorf("the lower CA output %s was copied into the upper layer", caOut)
			}
			if got := casnixHolds(); !slices.Contains(got, caOut) {
				t.Errorf("casnix holds %q after the CA output was read", got)
			}
			r.Run(t, "nix", "store", "verify", "--store", store, "--all", "--no-trust")
		})
	}
}

func sorted(s []string) []string {
	s = slices.Clone(s)
	slices.Sort(s)
	return s
}
