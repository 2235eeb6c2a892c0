package nixtest

import (
	"crypto/sha1"
	"crypto/sha256"
	_ "embed"
	"encoding/hex"
	"encoding/json"
	"os"
	"path/filepath"
	"slices"
	"strings"
	"testing"
	"time"
)

//go:embed fixture.nix
var fixtureNix []byte

//go:embed eval-fixture.nix
var evalFixtureNix []byte

// Fixture is a Store populated by PopulateFixture.
type Fixture struct {
	*Store
	// Outputs maps "attr" (the "out" output) and "attr.output" (every output) of
	// fixture.nix to store paths, and each name added with nix-store --add* (see Added)
	// to its path.
	Outputs map[string]string
	// Drvs maps each derivation attribute of fixture.nix to its .drv path.
	Drvs map[string]string
	// Added maps the names of paths added with nix-store --add and --add-fixed to their
	// store paths.
	Added map[string]string
	// Signed lists the paths that carry signatures; SecretKeys and PublicKeys are the
	// keys that signed them.
	Signed                 []string
	SecretKeys, PublicKeys []string
	// Busybox is the static busybox in the store that every fixture derivation uses as
	// its builder.
	Busybox string
}

// Path returns the store path of an output or added path of the fixture ("tree",
// "multi.dev", "add-dir"), failing the test when there is none.
func (f *Fixture) Path(t testing.TB, name string) string {
	t.Helper()
	p, ok := f.Outputs[name]
	if !ok {
		t.Fatalf("fixture has no path %q", name)
	}
	return p
}

// BuildExpr builds the Nix expression expr in the fixture's store, with `busybox` bound to
// the fixture's builder (with its store path in the string's context, so the build sandbox
// holds it), and returns the output paths that nix-build prints.
func (f *Fixture) BuildExpr(t testing.TB, expr string) []string {
	t.Helper()
	file := filepath.Join(t.TempDir(), "expr.nix")
	wrapped := "{ bbPath }:\nlet busybox = \"${builtins.storePath bbPath}/bin/busybox\"; in\n" + expr + "\n"
	writeFile(t, file, wrapped, 0o644)
	return SortedLines(f.Cmd("nix-build", file, "--no-out-link", "--argstr", "bbPath", f.Path(t, "busybox-src")).Run(t).Stdout)
}

// PopulateFixture makes a new Store holding the fixture: every derivation of fixture.nix
// built (so its outputs and .drv files are valid), content-addressed paths added with
// nix-store --add and --add-fixed, and a few paths signed. It takes a few seconds.
func PopulateFixture(t testing.TB) *Fixture {
	t.Helper()
	start := time.Now()
	s := NewStore(t)
	f := &Fixture{Store: s, Outputs: map[string]string{}, Drvs: map[string]string{}, Added: map[string]string{}}
	work := t.TempDir()

	// The builder: a static busybox, copied into the store as the source path ./bb.
	bb := filepath.Join(work, "bb", "bin", "busybox")
	copyFile(t, "/bin/busybox", bb, 0o755)
	writeFile(t, filepath.Join(work, "fixture.nix"), string(fixtureNix), 0o644)
	writeFile(t, filepath.Join(work, "eval-fixture.nix"), string(evalFixtureNix), 0o644)

	// Hashes of the fixed-output derivations' outputs, computed here from the same bytes
	// the builders write.
	fodFlat := sha256.Sum256([]byte("fixed output\n"))
	fodFlatSha1 := sha1.Sum([]byte("sha1 fixed\n"))
	recDir := filepath.Join(work, "fod-rec")
	writeFile(t, filepath.Join(recDir, "hello"), "hello\n", 0o644)
	writeFile(t, filepath.Join(recDir, "bin", "x"), "#!/bin/sh\n", 0o755)
	recNAR := NewDigestWriter()
	c := &Cmd{Name: "nix-store", Args: []string{"--dump", recDir}, Env: s.env, Stdout: recNAR}
	c.Run(t)
	recDigest := recNAR.Digest()
	args := []string{
		"--argstr", "fodFlatSha256", hex.EncodeToString(fodFlat[:]),
		"--argstr", "fodFlatSha1", hex.EncodeToString(fodFlatSha1[:]),
		"--argstr", "fodRecSha256", hex.EncodeToString(recDigest.SHA256[:]),
	}

	build := s.Cmd("nix-build", append([]string{filepath.Join(work, "fixture.nix"), "--no-out-link"}, args...)...)
	build.Dir = work
	build.Run(t)
	eval := s.Cmd("nix-instantiate", append([]string{"--eval", "--strict", "--json", filepath.Join(work, "eval-fixture.nix")}, args...)...)
	eval.Dir = work
	var attrs map[string]struct {
		DrvPath string            `json:"drvPath"`
		Outputs map[string]string `json:"outputs"`
		Path    string            `json:"path"`
	}
	out := eval.Run(t).Stdout
	if err := json.Unmarshal(out, &attrs); err != nil {
		t.Fatalf("fixture evaluation: %v\n%s", err, out)
	}
	for name, a := range attrs {
		if a.Path != "" {
			f.Outputs[name] = a.Path
			continue
		}
		f.Drvs[name] = a.DrvPath
		for o, p := range a.Outputs {
			f.Outputs[name+"."+o] = p
			if o == "out" {
				f.Outputs[name] = p
			}
		}
	}

	f.Busybox = f.Path(t, "busybox-src") + "/bin/busybox"

	// Content-addressed paths added from files made here.
	addDir := filepath.Join(work, "add", "added-dir")
	writeFile(t, filepath.Join(addDir, "bin", "run"), "#!/bin/sh\nexit 0\n", 0o755)
	writeFile(t, filepath.Join(addDir, "empty"), "", 0o644)
	writeFile(t, filepath.Join(addDir, "nested", "deeper", "file.txt"), "nested\n", 0o644)
	mkdir(t, filepath.Join(addDir, "empty-dir"))
	symlink(t, "bin/run", filepath.Join(addDir, "run-link"))
	addFile := filepath.Join(work, "add", "added-file.txt")
	writeFile(t, addFile, "added with nix-store --add\n", 0o644)
	flatFile := filepath.Join(work, "add", "flat-sha256.txt")
	writeFile(t, flatFile, "added with --add-fixed sha256\n", 0o644)
	flatSha1 := filepath.Join(work, "add", "flat-sha1.txt")
	writeFile(t, flatSha1, "added with --add-fixed sha1\n", 0o644)
	flatExe := filepath.Join(work, "add", "flat-exe")
	writeFile(t, flatExe, "#!/bin/sh\necho flat\n", 0o755)
	recDir512 := filepath.Join(work, "add", "rec-sha512")
	writeFile(t, filepath.Join(recDir512, "x"), "recursive sha512\n", 0o644)
	symlink(t, "x", filepath.Join(recDir512, "link"))
	recLink := filepath.Join(work, "add", "added-symlink")
	symlink(t, "/nix/store/nowhere", recLink)

	f.Added["add-dir"] = s.Add(t, addDir)
	f.Added["add-file"] = s.Add(t, addFile)
	f.Added["add-symlink"] = s.Add(t, recLink)
	f.Added["add-fixed-sha256"] = s.AddFixed(t, "sha256", false, flatFile)
	f.Added["add-fixed-sha1"] = s.AddFixed(t, "sha1", false, flatSha1)
	f.Added["add-fixed-exe"] = s.AddFixed(t, "sha256", false, flatExe)
	f.Added["add-fixed-rec-sha512"] = s.AddFixed(t, "sha512", true, recDir512)
	for k, v := range f.Added {
		f.Outputs[k] = v
	}

	// Signatures: two keys on one path, one key on a few others.
	for _, name := range []string{"casnix-test-1", "casnix-test-2"} {
		sk := filepath.Join(work, name+".sec")
		secret := s.Nix(t, "key", "generate-secret", "--key-name", name)
		writeFile(t, sk, string(secret), 0o600)
		pub := (&Cmd{Name: "nix", Args: []string{"key", "convert-secret-to-public"}, Env: s.env, Stdin: strings.NewReader(string(secret))}).Run(t).Stdout
		f.SecretKeys = append(f.SecretKeys, sk)
		f.PublicKeys = append(f.PublicKeys, strings.TrimSpace(string(pub)))
	}
	f.Signed = []string{f.Outputs["diamond-top"], f.Outputs["tree"], f.Outputs["fod-flat"], f.Added["add-dir"]}
	s.Sign(t, f.SecretKeys[0], f.Signed...)
	s.Sign(t, f.SecretKeys[1], f.Outputs["diamond-top"])
	slices.Sort(f.Signed)

	s.Verify(t)
	t.Logf("fixture store %s: %d valid paths in %s", s.Root, len(s.AllPaths(t)), time.Since(start).Round(time.Millisecond))
	return f
}

func writeFile(t testing.TB, path, content string, mode os.FileMode) {
	t.Helper()
	mkdir(t, filepath.Dir(path))
	if err := os.WriteFile(path, []byte(content), mode); err != nil {
		t.Fatal(err)
	}
	if err := os.Chmod(path, mode); err != nil {
		t.Fatal(err)
	}
}

func copyFile(t testing.TB, from, to string, mode os.FileMode) {
	t.Helper()
	b, err := os.ReadFile(from)
	if err != nil {
		t.Fatal(err)
	}
	writeFile(t, to, string(b), mode)
}

func mkdir(t testing.TB, path string) {
	t.Helper()
	if err := os.MkdirAll(path, 0o755); err != nil {
		t.Fatal(err)
	}
}

func symlink(t testing.TB, target, path string) {
	t.Helper()
	mkdir(t, filepath.Dir(path))
	if err := os.Symlink(target, path); err != nil {
		t.Fatal(err)
	}
}
