package nixtest

import (
	"fmt"
	"path/filepath"
	"slices"
	"sync"
	"testing"
	"time"
)

// Casnix runs the casnix binary against one data directory.
type Casnix struct {
	Bin     string
	DataDir string
}

// NewCasnix returns a Casnix with a fresh data directory under the test's temporary
// directory.
func NewCasnix(t testing.TB) *Casnix {
	t.Helper()
	return &Casnix{Bin: CasnixBinary(t), DataDir: filepath.Join(t.TempDir(), "casnix")}
}

// Cmd returns a command running casnix with --data-dir and args.
func (c *Casnix) Cmd(args ...string) *Cmd {
	return &Cmd{
		Name: c.Bin,
		Args: append([]string{"--data-dir", c.DataDir}, args...),
		// CASNIX_DIR must not point anywhere else; --data-dir wins anyway.
		Env: []string{"CASNIX_DIR=" + c.DataDir},
	}
}

// Run runs casnix and fails the test unless it exits 0.
func (c *Casnix) Run(t testing.TB, args ...string) *Result {
	t.Helper()
	return c.Cmd(args...).Run(t)
}

// Try runs casnix and returns what happened.
func (c *Casnix) Try(args ...string) *Result { return c.Cmd(args...).Try() }

// ImportFromNixStore runs `casnix import --from-nix-store ROOT [PATH...]`.
func (c *Casnix) ImportFromNixStore(t testing.TB, s *Store, paths ...string) *Result {
	t.Helper()
	cmd := c.Cmd(append([]string{"import", "--from-nix-store", s.Root}, paths...)...)
	cmd.Timeout = 5 * time.Minute // the stores the tests make import in well under a minute
	return cmd.Run(t)
}

// PathInfos returns `casnix path-info --json` of paths, keyed by path, normalised like
// Store.PathInfos. It fails the test when casnix fails; use ValidPaths to ask about paths
// that may be invalid.
func (c *Casnix) PathInfos(t testing.TB, paths ...string) map[string]PathInfo {
	t.Helper()
	r := c.Run(t, append([]string{"path-info", "--json"}, paths...)...)
	infos, err := ParsePathInfoJSON(r.Stdout)
	if err != nil {
		t.Fatalf("casnix path-info --json: %v\n%s", err, r)
	}
	return infos
}

// ValidPaths returns which of candidates casnix holds as valid, with their path-info. A
// path is valid when `casnix path-info --json` lists it without "valid": false. casnix
// refuses a batch that holds an invalid path, so when the batch fails each path is asked
// about alone, a few at a time.
func (c *Casnix) ValidPaths(t testing.TB, candidates []string) map[string]PathInfo {
	t.Helper()
	out := map[string]PathInfo{}
	if len(candidates) == 0 {
		return out
	}
	if c.askValid(t, candidates, out) {
		return out
	}
	var (
		mu   sync.Mutex
		wg   sync.WaitGroup
		jobs = make(chan string)
		errs []string
	)
	for range 4 {
		wg.Add(1)
		go func() {
			defer wg.Done()
			for p := range jobs {
				one := map[string]PathInfo{}
				r := c.Try("path-info", "--json", p)
				var perr error
				if r.OK() {
					var infos map[string]PathInfo
					if infos, perr = ParsePathInfoJSON(r.Stdout); perr == nil {
						if pi, ok := infos[p]; ok {
							one[p] = pi
						}
					}
				}
				mu.Lock()
				if r.Err != nil || perr != nil {
					errs = append(errs, fmt.Sprintf("%v %v\n%s", r.Err, perr, r))
				}
				for k, v := range one {
					out[k] = v
				}
				mu.Unlock()
			}
		}()
	}
	for _, p := range candidates {
		jobs <- p
	}
	close(jobs)
	wg.Wait()
	if len(errs) > 0 {
		t.Fatalf("casnix path-info: %s", errs[0])
	}
	return out
}

// askValid asks about a batch at once; it reports false when casnix refused the batch.
func (c *Casnix) askValid(t testing.TB, batch []string, out map[string]PathInfo) bool {
	t.Helper()
	r := c.Try(append([]string{"path-info", "--json"}, batch...)...)
	if r.Err != nil {
		t.Fatalf("casnix path-info:\n%s", r)
	}
	if !r.OK() {
		return false
	}
	infos, err := ParsePathInfoJSON(r.Stdout)
	if err != nil {
		t.Fatalf("casnix path-info --json: %v\n%s", err, r)
	}
	for _, p := range batch {
		if pi, ok := infos[p]; ok {
			out[p] = pi
		}
	}
	return true
}

// Dump streams `casnix dump PATH` into a Digest and fails the test when casnix fails.
func (c *Casnix) Dump(t testing.TB, path string) Digest {
	t.Helper()
	d, r := c.TryDump(path)
	if !r.OK() {
		t.Fatalf("command failed:\n%s", r)
	}
	return d
}

// TryDump streams `casnix dump PATH` into a Digest and returns it with what happened.
func (c *Casnix) TryDump(path string) (Digest, *Result) {
	w := NewDigestWriter()
	cmd := c.Cmd("dump", path)
	cmd.Stdout = w
	cmd.Timeout = 30 * time.Minute
	r := cmd.Try()
	return w.Digest(), r
}

// ComparePathInfo lists the differences between the path-info casnix reports and the
// path-info of the source Nix store, on the fields an import must keep: narHash, narSize,
// references, deriver, ca and signatures. Both must come normalised from ParsePathInfoJSON.
func ComparePathInfo(got, want PathInfo) []string {
	var diffs []string
	if got.Path != want.Path {
		diffs = append(diffs, fmt.Sprintf("path %q, want %q", got.Path, want.Path))
	}
	if got.NarHash != want.NarHash {
		diffs = append(diffs, fmt.Sprintf("narHash %q, want %q", got.NarHash, want.NarHash))
	}
	if got.NarSize != want.NarSize {
		diffs = append(diffs, fmt.Sprintf("narSize %d, want %d", got.NarSize, want.NarSize))
	}
	if !slices.Equal(got.References, want.References) {
		diffs = append(diffs, fmt.Sprintf("references %q, want %q", got.References, want.References))
	}
	if got.Deriver != want.Deriver {
		diffs = append(diffs, fmt.Sprintf("deriver %q, want %q", got.Deriver, want.Deriver))
	}
	if got.CA != want.CA {
		diffs = append(diffs, fmt.Sprintf("ca %q, want %q", got.CA, want.CA))
	}
	if !slices.Equal(got.Signatures, want.Signatures) {
		diffs = append(diffs, fmt.Sprintf("signatures %q, want %q", got.Signatures, want.Signatures))
	}
	return diffs
}
