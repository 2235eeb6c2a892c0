package tests

import (
	"encoding/json"
	"net/http"
	"net/http/httptest"
	"os"
	"path/filepath"
	"strings"
	"testing"

	"github.com/casnix/casnix/tests/nixtest"
)

// caExpr is a floating content-addressed derivation (ca-derivations) with another as its
// input, so its realisation's id is the hash of a derivation whose input is itself
// deferred; the builder is the root's static busybox (sandbox is off in the roots).
const caExpr = `
let
  ca = name: script: derivation {
    inherit name;
    system = builtins.currentSystem;
    builder = "/bin/busybox";
    args = [ "sh" "-c" script ];
    __contentAddressed = true;
    outputHashMode = "recursive";
    outputHashAlgo = "sha256";
  };
  dep = ca "ca-dep" "echo dependency > $out";
in ca "ca-top" "echo top > $out; echo ${dep} >> $out; cat ${dep} >> $out"
`

// TestServeSubstitutesCADerivation: Nix 2.8, 2.26 and 2.34 with ca-derivations build a
// floating content-addressed derivation that depends on another, signing what it builds
// (secret-key-files, which signs realisations too), and copies it to a binary cache
// (nix copy --to file://…: the output's closure, signed narinfos and the realisation,
// realisations/<id>.doi), served by a plain static server. `casnix serve --substituters`,
// holding only the two .drv files, then makes `nix build DRV^out` succeed without
// building: it computes the derivation's DrvOutput id (Nix's hash modulo with the inputs'
// hashes, outputs masked), finds the realisation upstream, checks its signature,
// substitutes the output's closure and registers the realisation, which `nix realisation
// info` then reads back, and what casnix holds is what the source store held; `casnix
// export` writes it into a cache a Nix that may not build substitutes it from; `nix build
// --dry-run` lists the closure as what will be fetched. (Nix 2.8 writes the input's
// realisation too, and names the derivation without ^out.)
// A Nix with its own store and no way to build substitutes the same output from
// `casnix serve --http` pulling through from the cache (realisations/<id>.doi answered
// from upstream). From a copy of the cache whose realisation has lost its signature (its
// narinfos still signed), casnix substitutes nothing and the build fails, naming the
// realisation.
func TestServeSubstitutesCADerivation(t *testing.T) {
	for _, suite := range nixtest.ClientSuites {
		t.Run(suite, func(t *testing.T) { testSubstCA(t, suite) })
	}
}

func testSubstCA(t *testing.T, suite string) {
	c := nixtest.RequireNixClient(t, suite)
	tmp := c.TempDir(t) // the same path for the client and here
	secret := c.Output(t, "nix", "key", "generate-secret", "--key-name", "ca-upstream-1")
	keyFile := filepath.Join(tmp, "key.sec")
	if err := os.WriteFile(keyFile, secret, 0o600); err != nil {
		t.Fatal(err)
	}
	pubCmd := c.Cmd("nix", "key", "convert-secret-to-public")
	pubCmd.Stdin = strings.NewReader(string(secret))
	pub := strings.TrimSpace(string(pubCmd.Run(t).Stdout))
	expr := filepath.Join(tmp, "ca.nix")
	if err := os.WriteFile(expr, []byte(caExpr), 0o644); err != nil {
		t.Fatal(err)
	}
	// A chroot store builds in a sandbox, which needs the builder mapped in.
	caConf := "experimental-features = nix-command ca-derivations\nextra-sandbox-paths = /bin/busybox\n"
	c.Env = []string{"NIX_CONFIG=" + caConf + "secret-key-files = " + keyFile}

	// Build in a store of the test's own, and copy the output to the cache.
	srcRoot := filepath.Join(tmp, "src")
	src := "local?root=" + srcRoot
	out := builtOut(t, c.Run(t, "nix", "build", "--store", src, "-f", expr, "--no-link", "--json"))
	drv := strings.TrimSpace(string(c.Output(t, "nix", "path-info", "--store", src, "--derivation", "-f", expr)))
	if !strings.HasPrefix(out, nixtest.StoreDir+"/") || !strings.HasSuffix(drv, ".drv") {
		t.Fatalf("build gave %q from %q", out, drv)
	}
	cache := filepath.Join(tmp, "cache")
	c.Run(t, "nix", "copy", "--from", src, "--to", "file://"+cache+"?compression=zstd&secret-key="+keyFile, "-f", expr)
	dois, _ := filepath.Glob(filepath.Join(cache, "realisations", "*.doi"))
	if len(dois) == 0 {
		t.Fatalf("nix copy wrote no realisation to %s", cache)
	}
	closure := nixtest.SortedLines(c.Output(t, "nix-store", "--store", src, "-qR", out))
	t.Logf("Nix %s built %s (closure %d paths), realisations %v", c.Version(t), out, len(closure), baseNames(dois))
	// The client reads the .drv from its store directory: the source store's (real=).
	real := "?real=" + srcRoot + nixtest.StoreDir

	// The same cache with the realisations' signatures removed.
	unsigned := filepath.Join(tmp, "unsigned")
	if r := (&nixtest.Cmd{Name: "cp", Args: []string{"-a", cache, unsigned}}).Try(); !r.OK() {
		t.Fatal(r)
	}
	for _, f := range dois {
		p := filepath.Join(unsigned, "realisations", filepath.Base(f))
		var j map[string]any
		b, err := os.ReadFile(p)
		if err == nil {
			err = json.Unmarshal(b, &j)
		}
		if err != nil {
			t.Fatalf("%s: %v", p, err)
		}
		if sigs, _ := j["signatures"].([]any); len(sigs) == 0 {
			t.Fatalf("%s carries no signature: %s", p, b)
		}
		j["signatures"] = []string{}
		b, _ = json.Marshal(j)
		if err := os.WriteFile(p, b, 0o644); err != nil {
			t.Fatal(err)
		}
	}

	for _, tc := range []struct {
		name, dir string
		ok        bool
	}{{"unsigned realisation", unsigned, false}, {"signed", cache, true}} {
		t.Run(tc.name, func(t *testing.T) {
			srv := httptest.NewServer(http.FileServer(http.Dir(tc.dir)))
			defer srv.Close()
			// Under the bound tmp: a Bind here would outlive this subtest's directory.
			sockDir, err := os.MkdirTemp(tmp, "sock")
			if err != nil {
				t.Fatal(err)
			}
			cas := nixtest.NewCasnix(t)
			d := cas.Serve(t, filepath.Join(sockDir, "casnix.sock"),
				"--substituters", srv.URL, "--trusted-public-keys", pub)
			c.Env = []string{"NIX_CONFIG=" + caConf + "substituters = " + srv.URL + "\ntrusted-public-keys = " + pub}
			c.Run(t, "nix", "copy", "--no-check-sigs", "--derivation", "--from", src, "--to", d.URL(), drv)
			if r := c.Try("nix", "path-info", "--store", d.URL(), out); r.OK() {
				t.Fatalf("%s is valid in casnix before the build:\n%s", out, r)
			}
			installable := drv + "^out"
			if !c.AtLeast(t, 2, 9) {
				installable = drv // Nix 2.8 has no ^ syntax: all outputs (out only)
			}
			dry := c.Try("nix", "build", "--store", d.URL()+real, "--dry-run", installable)
			build := c.Try("nix", "build", "--store", d.URL()+real, "--no-link", "--json", installable)
			if !tc.ok {
				if build.OK() {
					t.Fatalf("nix build %s through casnix substituted from an unsigned realisation:\n%s", installable, build)
				}
				if !strings.Contains(string(build.Stderr), "realisation") {
					t.Errorf("the failure does not name the realisation:\n%s", build)
				}
				if r := c.Try("nix", "path-info", "--store", d.URL(), out); r.OK() {
					t.Errorf("%s became valid from an unsigned realisation", out)
				}
				t.Logf("refused: %s", strings.TrimSpace(nixtest.StripNixNoise(build.Stderr)))
				return
			}
			if !dry.OK() || !strings.Contains(string(dry.Stderr), "will be fetched") || !strings.Contains(string(dry.Stderr), out) {
				t.Errorf("nix build --dry-run %s does not list %s as fetched:\n%s", installable, out, dry)
			}
			if !build.OK() || builtOut(t, build) != out {
				t.Fatalf("nix build %s through casnix: want %s\n%s\ncasnix:\n%s", installable, out, build, d.Output())
			}
			got := nixtest.SortedLines(c.Output(t, "nix-store", "--store", d.URL(), "-qR", out))
			if strings.Join(got, " ") != strings.Join(closure, " ") {
				t.Errorf("closure in casnix %q, want %q", got, closure)
			}
			info := c.Output(t, "nix", "realisation", "info", "--store", d.URL()+real, "--json", installable)
			if !strings.Contains(string(info), strings.TrimPrefix(out, nixtest.StoreDir+"/")) || !strings.Contains(string(info), "ca-upstream-1:") {
				t.Errorf("nix realisation info %s: %s", installable, info)
			}
			// What casnix holds is what the source store holds (a unix:// client reads
			// files from its own store directory, so casnix renders them itself).
			for _, p := range closure {
				w := nixtest.NewDigestWriter()
				w.Write(c.Output(t, "nix-store", "--dump", srcRoot+p))
				if got, want := cas.Dump(t, p), w.Digest(); got != want {
					t.Errorf("%s: casnix has %s, the source store %s", p, got, want)
				}
			}
			// Asked again, the output is there: no fetch, the same answer.
			if again := c.Try("nix", "build", "--store", d.URL()+real, "--no-link", "--json", installable); !again.OK() || builtOut(t, again) != out {
				t.Errorf("second nix build %s: %s", installable, again)
			}

			// casnix export writes the realisation beside the closure (as nix copy --to
			// does): a Nix that may not build substitutes the output from that cache.
			exported := filepath.Join(tmp, "exported-"+filepath.Base(sockDir))
			cas.Run(t, "export", "--to", "file://"+exported, out)
			// The realisations the upstream has: the output's, and with Nix before 2.3x its
			// input's too (recorded in the output's as a dependency, and registered with it).
			if got, _ := filepath.Glob(filepath.Join(exported, "realisations", "*.doi")); strings.Join(baseNames(got), " ") != strings.Join(baseNames(dois), " ") {
				t.Errorf("casnix export of %s wrote realisations %q, want %q", out, baseNames(got), baseNames(dois))
			}
			fromExport, err := os.MkdirTemp(tmp, "client")
			if err != nil {
				t.Fatal(err)
			}
			c.Run(t, "nix", "copy", "--no-check-sigs", "--derivation", "--from", src, "--to", "local?root="+fromExport, drv)
			c.Env = []string{"NIX_CONFIG=" + caConf + "substituters = file://" + exported + "\ntrusted-public-keys = " + pub}
			if r := c.Try("nix", "build", "--store", "local?root="+fromExport, "--max-jobs", "0", "--no-link", "--json", installable); builtOut(t, r) != out {
				t.Errorf("nix build %s from casnix export's cache: want %s\n%s", installable, out, r)
			}

			// The HTTP pull-through: a Nix with its own (chroot) store and no way to build
			// (--max-jobs 0) substitutes the output from casnix serve --http, which holds
			// nothing and answers the realisation, narinfos and NARs from the cache.
			hd, hurl := nixtest.NewCasnix(t).ServeHTTP(t, "--substituters", srv.URL, "--trusted-public-keys", pub)
			client, err := os.MkdirTemp(tmp, "client")
			if err != nil {
				t.Fatal(err)
			}
			local := "local?root=" + client
			c.Run(t, "nix", "copy", "--no-check-sigs", "--derivation", "--from", src, "--to", local, drv)
			c.Env = []string{"NIX_CONFIG=" + caConf + "substituters = " + hurl + "\ntrusted-public-keys = " + pub}
			viaHTTP := c.Try("nix", "build", "--store", local, "--max-jobs", "0", "--no-link", "--json", installable)
			if !viaHTTP.OK() || builtOut(t, viaHTTP) != out {
				t.Fatalf("nix build %s from casnix serve --http: want %s\n%s\ncasnix:\n%s", installable, out, viaHTTP, hd.Output())
			}
			c.Run(t, "nix", "store", "verify", "--store", local, "-r", out)
			if info := c.Output(t, "nix", "realisation", "info", "--store", local, "--json", installable); !strings.Contains(string(info), strings.TrimPrefix(out, nixtest.StoreDir+"/")) {
				t.Errorf("nix realisation info %s in the client's store: %s", installable, info)
			}
		})
	}
}

// builtOut is the "out" output a successful `nix build --json` printed ("" when it failed
// or printed none); Nix 2.8 has no --print-out-paths.
func builtOut(t *testing.T, r *nixtest.Result) string {
	t.Helper()
	var res []struct {
		Outputs map[string]string `json:"outputs"`
	}
	if !r.OK() || json.Unmarshal(r.Stdout, &res) != nil || len(res) != 1 {
		return ""
	}
	return res[0].Outputs["out"]
}

func baseNames(paths []string) []string {
	var out []string
	for _, p := range paths {
		out = append(out, filepath.Base(p))
	}
	return out
}
