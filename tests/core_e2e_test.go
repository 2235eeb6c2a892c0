package tests

import (
	"bytes"
	"os"
	"path/filepath"
	"regexp"
	"slices"
	"strconv"
	"strings"
	"testing"

	"github.com/casnix/casnix/tests/nixtest"
)

// TestImportFromNixStore imports the fixture store with `casnix import --from-nix-store`
// and checks every valid path against the source store: NAR bytes, path-info fields,
// then idempotence, closure imports, verify, ls and cat.
func TestImportFromNixStore(t *testing.T) {
	cas := nixtest.NewCasnix(t) // builds casnix first: fail fast when it does not build
	f := nixtest.PopulateFixture(t)
	want := f.PathInfos(t)
	paths := sortedKeys(want)

	r := cas.ImportFromNixStore(t, f.Store)
	t.Logf("first import: %s", summaryLine(r))
	if n, ok := importedCount(r); ok && n != len(paths) {
		t.Errorf("first import reports %d paths imported, want %d: %s", n, len(paths), summaryLine(r))
	}

	got := cas.PathInfos(t, paths...)
	checkPathInfos(t, got, want, true)
	checkNARs(t, f.Store, cas, paths, want)

	// Nix's own printing of the NAR hash (nix-store -q --hash) equals casnix's narHash.
	hashes := strings.Fields(string(f.NixStore(t, append([]string{"-q", "--hash"}, paths...)...)))
	if len(hashes) != len(paths) {
		t.Fatalf("nix-store -q --hash printed %d hashes for %d paths", len(hashes), len(paths))
	}
	for i, p := range paths {
		if got[p].NarHash != hashes[i] {
			t.Errorf("%s: casnix narHash %s, nix-store -q --hash %s", p, got[p].NarHash, hashes[i])
		}
	}

	t.Run("Idempotent", func(t *testing.T) {
		r := cas.ImportFromNixStore(t, f.Store)
		t.Logf("second import: %s", summaryLine(r))
		n, ok := importedCount(r)
		if !ok {
			t.Errorf("cannot find the number of imported paths in the summary %q", summaryLine(r))
		} else if n != 0 {
			t.Errorf("second import imported %d paths, want 0: %s", n, summaryLine(r))
		}
		again := cas.PathInfos(t, paths...)
		for _, p := range paths {
			if d := nixtest.ComparePathInfo(again[p], got[p]); len(d) > 0 || again[p].RegistrationTime != got[p].RegistrationTime {
				t.Errorf("%s changed by the second import: %s (registrationTime %d → %d)", p, strings.Join(d, "; "), got[p].RegistrationTime, again[p].RegistrationTime)
			}
		}
	})

	t.Run("Verify", func(t *testing.T) {
		r := cas.Run(t, "verify")
		t.Logf("casnix verify: %s", summaryLine(r))
	})

	t.Run("PathInfoRecursive", func(t *testing.T) {
		top, chain := f.Path(t, "diamond-top"), f.Path(t, "chain4")
		r := cas.Run(t, "path-info", "--json", "--recursive", top, chain)
		infos, err := nixtest.ParsePathInfoJSON(r.Stdout)
		if err != nil {
			t.Fatalf("%v\n%s", err, r)
		}
		if closure := f.Closure(t, top, chain); !slices.Equal(sortedKeys(infos), closure) {
			t.Errorf("path-info --recursive lists %q, want the closure %q", sortedKeys(infos), closure)
		}
	})

	t.Run("InvalidPath", func(t *testing.T) {
		bogus := nixtest.StoreDir + "/00000000000000000000000000000000-not-there"
		// As nix path-info --json (2.8) does, the JSON form lists an invalid
		// path as {"path": …, "valid": false} and exits 0.
		if r := cas.Try("path-info", "--json", bogus); r.Err != nil || r.ExitCode != 0 ||
			!strings.Contains(string(r.Stdout), `"valid":false`) {
			t.Errorf("casnix path-info --json of an invalid path:\n%s", r)
		}
		for _, args := range [][]string{{"path-info", bogus}, {"dump", bogus}, {"ls", bogus}, {"cat", bogus + "/x"}} {
			r := cas.Try(args...)
			if r.Err != nil {
				t.Fatalf("%s", r)
			}
			if r.ExitCode == 0 {
				t.Errorf("casnix %s exited 0 for an invalid path:\n%s", strings.Join(args, " "), r)
			} else if len(bytes.TrimSpace(r.Stderr)) == 0 {
				t.Errorf("casnix %s failed without a message on stderr", strings.Join(args, " "))
			}
		}
	})

	t.Run("LsCat", func(t *testing.T) { checkLsCat(t, f, cas) })

	t.Run("Closure", func(t *testing.T) {
		// The closure of one path, then of three more (one of them already there), then
		// everything: each import adds exactly what is missing.
		cas2 := nixtest.NewCasnix(t)
		var roots, had []string
		for _, step := range [][]string{{"diamond-top"}, {"diamond-left", "chain4", "uses-dev"}} {
			var add []string
			for _, name := range step {
				add = append(add, f.Path(t, name))
			}
			roots = append(roots, add...)
			closure := f.Closure(t, roots...)
			r := cas2.ImportFromNixStore(t, f.Store, add...)
			t.Logf("import of the closure of %v: %s", step, summaryLine(r))
			if n, ok := importedCount(r); ok && n != len(closure)-len(had) {
				t.Errorf("closure import of %v reports %d imported, want %d", step, n, len(closure)-len(had))
			}
			valid := cas2.ValidPaths(t, paths)
			if got := sortedKeys(valid); !slices.Equal(got, closure) {
				t.Errorf("after importing the closure of %q casnix holds\n%q\nwant\n%q", roots, got, closure)
			}
			checkPathInfos(t, valid, pick(want, closure), true)
			checkNARs(t, f.Store, cas2, closure, want)
			had = closure
		}
		r := cas2.ImportFromNixStore(t, f.Store)
		if n, ok := importedCount(r); ok && n != len(paths)-len(had) {
			t.Errorf("full import after the closure imports reports %d imported, want %d: %s", n, len(paths)-len(had), summaryLine(r))
		}
		checkPathInfos(t, cas2.PathInfos(t, paths...), want, true)
	})

	t.Run("ImportNAR", func(t *testing.T) { checkImportNAR(t, f, want) })
}

// TestVerifyDetectsDamage flips one byte in the middle of casnix's largest pack file and
// expects `casnix verify` to fail naming a damaged path, and every dump to either fail or
// stay byte-identical: damage must never be served as data.
func TestVerifyDetectsDamage(t *testing.T) {
	cas := nixtest.NewCasnix(t)
	f := nixtest.PopulateFixture(t)
	want := f.PathInfos(t)
	paths := sortedKeys(want)
	cas.ImportFromNixStore(t, f.Store)
	cas.Run(t, "verify")

	var biggest string
	var size int64
	filepath.WalkDir(cas.DataDir, func(p string, d os.DirEntry, err error) error {
		if err == nil && d.Type().IsRegular() && strings.HasSuffix(p, ".pack") {
			if fi, err := d.Info(); err == nil && fi.Size() > size {
				biggest, size = p, fi.Size()
			}
		}
		return nil
	})
	if biggest == "" {
		t.Fatalf("no *.pack file under %s after an import: casnix wrote no pack", cas.DataDir)
	}
	fh, err := os.OpenFile(biggest, os.O_RDWR, 0)
	if err != nil {
		t.Fatal(err)
	}
	var b [1]byte
	if _, err := fh.ReadAt(b[:], size/2); err != nil {
		t.Fatal(err)
	}
	b[0] ^= 0x55
	if _, err := fh.WriteAt(b[:], size/2); err != nil {
		t.Fatal(err)
	}
	fh.Close()
	t.Logf("flipped byte %d of %s (%d bytes)", size/2, biggest, size)

	r := cas.Try("verify")
	if r.Err != nil {
		t.Fatal(r)
	}
	if r.ExitCode == 0 {
		t.Fatalf("casnix verify exited 0 after damage:\n%s", r)
	}
	out := string(r.Stdout) + string(r.Stderr)
	var named []string
	for _, p := range paths {
		if strings.Contains(out, p) {
			named = append(named, p)
		}
	}
	if len(named) == 0 {
		t.Errorf("casnix verify failed without naming a store path:\n%s", r)
	}
	t.Logf("verify named %d damaged paths: %q", len(named), named)

	for _, p := range paths {
		d, r := cas.TryDump(p)
		if r.Err != nil {
			t.Fatal(r)
		}
		if r.ExitCode == 0 && d.NixHash() != want[p].NarHash {
			t.Errorf("casnix dump %s exited 0 with a wrong NAR (%s, want %s)", p, d, want[p].NarHash)
		}
		if r.ExitCode != 0 && !slices.Contains(named, p) {
			t.Errorf("casnix dump %s fails, but verify did not name it:\n%s", p, r)
		}
	}
}

// checkPathInfos compares casnix's path-info with the source store's for every path of want.
// registration says whether the import came from a Nix store, whose registration time
// and ultimate flag it should keep (only logged: the CLI contract does not say).
func checkPathInfos(t *testing.T, got, want map[string]nixtest.PathInfo, registration bool) {
	t.Helper()
	for _, p := range sortedKeys(want) {
		g, ok := got[p]
		if !ok {
			t.Errorf("%s: missing from casnix path-info", p)
			continue
		}
		if d := nixtest.ComparePathInfo(g, want[p]); len(d) > 0 {
			t.Errorf("%s: %s", p, strings.Join(d, "; "))
		}
		if g.RegistrationTime <= 0 {
			t.Errorf("%s: registrationTime %d", p, g.RegistrationTime)
		}
		// Not required by the CLI contract, but worth seeing when they change.
		if registration && (g.RegistrationTime != want[p].RegistrationTime || g.Ultimate != want[p].Ultimate) {
			t.Logf("%s: registrationTime %d ultimate %v; source has %d %v", p, g.RegistrationTime, g.Ultimate, want[p].RegistrationTime, want[p].Ultimate)
		}
	}
	for p := range got {
		if _, ok := want[p]; !ok {
			t.Errorf("casnix path-info lists %s, which was not asked for or is not in the source", p)
		}
	}
}

// checkNARs compares casnix dump with the source store's NAR for each path, by sha256 and
// length, and both with the narHash and narSize of the source's db.
func checkNARs(t *testing.T, src *nixtest.Store, cas *nixtest.Casnix, paths []string, want map[string]nixtest.PathInfo) {
	t.Helper()
	for _, p := range paths {
		s := src.Dump(t, p)
		c, r := cas.TryDump(p)
		if !r.OK() {
			t.Errorf("%s: casnix dump failed:\n%s", p, r)
		} else if s != c {
			t.Errorf("%s: casnix dump %s, source NAR (nix-store --dump) %s", p, c, s)
		}
		if w := want[p]; s.NixHash() != w.NarHash || s.Size != w.NarSize {
			t.Errorf("%s: source NAR %s, source db says %s (%d bytes)", p, s, w.NarHash, w.NarSize)
		}
	}
}

// checkLsCat checks casnix ls and cat on the fixture's tree and single-file outputs
// against the files in the source store.
func checkLsCat(t *testing.T, f *nixtest.Fixture, cas *nixtest.Casnix) {
	tree := f.Path(t, "tree")
	real := f.RealPath(tree)
	for _, sub := range []string{
		"/share/data/big.txt",
		"/empty-file",
		"/binary",
		"/no-newline",
		"/a/b/c/d/e/f/g/h/i/j/deep.txt",
		"/names/with space",
		"/names/uml\u00e4ut",
		"/names/" + strings.Repeat("0", 199) + "7",
		"/.config/.hidden",
		"/bin/tool",
		"/bin/empty-exe",
	} {
		wantBytes, err := os.ReadFile(real + sub)
		if err != nil {
			t.Fatal(err)
		}
		r := cas.Run(t, "cat", tree+sub)
		if !bytes.Equal(r.Stdout, wantBytes) {
			t.Errorf("casnix cat %s: %d bytes differing from the source's %d", tree+sub, len(r.Stdout), len(wantBytes))
		}
	}
	for _, name := range []string{"file", "exe", "empty-file", "big-file"} {
		p := f.Path(t, name)
		wantBytes, err := os.ReadFile(f.RealPath(p))
		if err != nil {
			t.Fatal(err)
		}
		if r := cas.Run(t, "cat", p); !bytes.Equal(r.Stdout, wantBytes) {
			t.Errorf("casnix cat %s (a single-file path): %d bytes differing from the source's %d", p, len(r.Stdout), len(wantBytes))
		}
	}
	for _, sub := range []string{"/share", "/nope", "/share/data/nope", "/empty-file/below"} {
		if r := cas.Try("cat", tree+sub); r.Err != nil || r.ExitCode == 0 {
			t.Errorf("casnix cat %s (a directory or missing) did not fail:\n%s", tree+sub, r)
		}
	}

	for _, sub := range []string{"", "/bin", "/names", "/empty-dir", "/share/data", "/a/b"} {
		entries, err := os.ReadDir(real + sub)
		if err != nil {
			t.Fatal(err)
		}
		r := cas.Run(t, "ls", tree+sub)
		for _, e := range entries {
			if !lsHas(string(r.Stdout), e.Name()) {
				t.Errorf("casnix ls %s does not list %q:\n%s", tree+sub, e.Name(), clip(r.Stdout))
			}
		}
		if len(entries) == 0 && len(bytes.TrimSpace(r.Stdout)) != 0 {
			t.Errorf("casnix ls of the empty directory %s printed %q", tree+sub, r.Stdout)
		}
	}
	if r := cas.Try("ls", tree+"/nope"); r.Err != nil || r.ExitCode == 0 {
		t.Errorf("casnix ls of a missing entry did not fail:\n%s", r)
	}
	// A symlink is listed, not followed.
	r := cas.Run(t, "ls", tree+"/bin")
	if !strings.Contains(string(r.Stdout), "tool-link") {
		t.Errorf("casnix ls %s/bin lacks the symlink:\n%s", tree, r.Stdout)
	}
}

// lsHas reports whether an ls listing names an entry: a line that is the name, or ends
// with it after a space or slash, or shows it as a symlink ("name -> target").
func lsHas(out, name string) bool {
	for _, l := range strings.Split(out, "\n") {
		l = strings.TrimRight(l, " \t\r")
		if l == name || strings.HasSuffix(l, " "+name) || strings.HasSuffix(l, "/"+name) ||
			strings.Contains(l, " "+name+" -> ") || strings.Contains(l, "/"+name+" -> ") || strings.HasPrefix(l, name+" -> ") ||
			strings.HasSuffix(l, "\t"+name) {
			return true
		}
	}
	return false
}

// checkImportNAR imports NARs of fixture paths with `casnix import --nar` and every piece
// of path-info as flags, in closure order, into a fresh casnix, and checks the result.
func checkImportNAR(t *testing.T, f *nixtest.Fixture, want map[string]nixtest.PathInfo) {
	cas := nixtest.NewCasnix(t)
	top := f.Path(t, "diamond-top")
	// nix-store -qR lists a closure dependencies first.
	order := strings.Fields(string(f.NixStore(t, "-qR", top, f.Path(t, "fod-flat"), f.Path(t, "self-ref"), f.Path(t, "text-ref"))))
	dir := t.TempDir()
	for i, p := range order {
		nar := filepath.Join(dir, strconv.Itoa(i)+".nar")
		out, err := os.Create(nar)
		if err != nil {
			t.Fatal(err)
		}
		c := f.DumpCmd(p)
		c.Stdout = out
		c.Run(t)
		out.Close()
		w := want[p]
		args := []string{"import", "--nar", nar, "--path", p, "--nar-hash", w.NarHash}
		for _, ref := range w.References {
			args = append(args, "--references", ref)
		}
		if w.Deriver != "" {
			args = append(args, "--deriver", w.Deriver)
		}
		if w.CA != "" {
			args = append(args, "--ca", w.CA)
		}
		for _, s := range w.Signatures {
			args = append(args, "--sig", s)
		}
		if i == 0 {
			// A path whose references are not valid is refused, as Nix refuses it: the
			// store must stay closed under references.
			nar := filepath.Join(dir, "top.nar")
			out, err := os.Create(nar)
			if err != nil {
				t.Fatal(err)
			}
			c := f.DumpCmd(top)
			c.Stdout = out
			c.Run(t)
			out.Close()
			args := []string{"import", "--nar", nar, "--path", top}
			for _, ref := range want[top].References {
				args = append(args, "--references", ref)
			}
			if r := cas.Try(args...); r.Err != nil || r.ExitCode == 0 {
				t.Errorf("casnix import --nar of a path whose references are not valid did not fail:\n%s", r)
			}
			if v := cas.ValidPaths(t, []string{top}); len(v) != 0 {
				t.Errorf("%s valid though its references are not", top)
			}
		}
		if p == top {
			// A wrong --nar-hash is refused and leaves the path invalid.
			bad := slices.Clone(args)
			bad[6] = f.PathInfos(t, f.Path(t, "file"))[f.Path(t, "file")].NarHash
			if r := cas.Try(bad...); r.Err != nil || r.ExitCode == 0 {
				t.Errorf("casnix import --nar with a wrong --nar-hash did not fail:\n%s", r)
			}
			if v := cas.ValidPaths(t, []string{p}); len(v) != 0 {
				t.Errorf("%s valid after an import with a wrong --nar-hash", p)
			}
		}
		cas.Run(t, args...)
	}
	slices.Sort(order)
	checkPathInfos(t, cas.PathInfos(t, order...), pick(want, order), false)
	checkNARs(t, f.Store, cas, order, want)
	cas.Run(t, "verify")
}

var countRE = []*regexp.Regexp{
	regexp.MustCompile(`(?i)\bimported\D{0,12}?(\d+)`),
	regexp.MustCompile(`(?i)(\d+)\s+(?:new\b|(?:\w+\s+)?(?:paths?\s+)?imported\b)`),
}

// importedCount finds the number of newly imported paths in an import's summary line
// ("imported 3 paths", "3 new", "3 paths imported").
func importedCount(r *nixtest.Result) (int, bool) {
	line := summaryLine(r)
	for _, re := range countRE {
		if m := re.FindStringSubmatch(line); m != nil {
			n, err := strconv.Atoi(m[1])
			return n, err == nil
		}
	}
	return 0, false
}

// summaryLine is the last non-empty line a command printed, on stdout or else stderr.
func summaryLine(r *nixtest.Result) string {
	for _, out := range [][]byte{r.Stdout, r.Stderr} {
		lines := strings.Split(strings.TrimSpace(string(out)), "\n")
		if l := strings.TrimSpace(lines[len(lines)-1]); l != "" {
			return l
		}
	}
	return ""
}

func sortedKeys[V any](m map[string]V) []string {
	keys := make([]string, 0, len(m))
	for k := range m {
		keys = append(keys, k)
	}
	slices.Sort(keys)
	return keys
}

func pick(m map[string]nixtest.PathInfo, keys []string) map[string]nixtest.PathInfo {
	out := make(map[string]nixtest.PathInfo, len(keys))
	for _, k := range keys {
		out[k] = m[k]
	}
	return out
}

func clip(b []byte) string {
	if len(b) > 2000 {
		return string(b[:2000]) + "…"
	}
	return string(b)
}
