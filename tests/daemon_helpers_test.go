package tests

import (
	"fmt"
	"maps"
	"os"
	"path/filepath"
	"slices"
	"strings"
	"testing"

	"github.com/casnix/casnix/tests/nixtest"
)

// servedFixture is the fixture store imported into casnix, which the daemon tests serve.
type servedFixture struct {
	*nixtest.Fixture
	Cas  *nixtest.Casnix
	Want map[string]nixtest.PathInfo // path-info of every valid path of the source store
	All  []string                    // every valid path of the source store, sorted
}

// newServedFixture builds the fixture store and imports all of it into a fresh casnix data
// directory.
func newServedFixture(t *testing.T) *servedFixture {
	t.Helper()
	cas := nixtest.NewCasnix(t) // builds casnix first: fail fast when it does not build
	f := nixtest.PopulateFixture(t)
	cas.ImportFromNixStore(t, f.Store)
	want := f.PathInfos(t)
	return &servedFixture{Fixture: f, Cas: cas, Want: want, All: slices.Sorted(maps.Keys(want))}
}

// referrersOf inverts the reference graph of infos: path → sorted paths that refer to it
// (including itself for self references), as the daemon's QueryReferrers answers.
func referrersOf(infos map[string]nixtest.PathInfo) map[string][]string {
	out := map[string][]string{}
	for p, pi := range infos {
		for _, r := range pi.References {
			out[r] = append(out[r], p)
		}
	}
	for _, v := range out {
		slices.Sort(v)
	}
	return out
}

// copyStoreRoot copies the chroot store under src (ROOT/nix/…) to dst with cp -a, so that a
// real nix-daemon of another Nix version can serve the same paths and database without
// touching the source.
func copyStoreRoot(t testing.TB, src, dst string) *nixtest.Store {
	t.Helper()
	if err := os.MkdirAll(filepath.Dir(dst), 0o755); err != nil {
		t.Fatal(err)
	}
	nixtest.Run(t, "cp", "-a", src, dst)
	return nixtest.OpenStore(t, dst)
}

// sameLineSet compares two outputs as sets of lines (order ignored, empty lines dropped).
func sameLineSet(a, b []byte) bool {
	return slices.Equal(nixtest.SortedLines(a), nixtest.SortedLines(b))
}

// diffPathInfos lists the differences between two normalised path-info maps on every
// field, registration time and ultimate flag included.
func diffPathInfos(got, want map[string]nixtest.PathInfo) []string {
	var diffs []string
	for _, p := range slices.Sorted(maps.Keys(want)) {
		g, ok := got[p]
		if !ok {
			diffs = append(diffs, p+": missing")
			continue
		}
		w := want[p]
		d := nixtest.ComparePathInfo(g, w)
		if g.RegistrationTime != w.RegistrationTime {
			d = append(d, fmt.Sprintf("registrationTime %d, want %d", g.RegistrationTime, w.RegistrationTime))
		}
		if g.Ultimate != w.Ultimate {
			d = append(d, fmt.Sprintf("ultimate %v, want %v", g.Ultimate, w.Ultimate))
		}
		if len(d) > 0 {
			diffs = append(diffs, p+": "+strings.Join(d, "; "))
		}
	}
	for _, p := range slices.Sorted(maps.Keys(got)) {
		if _, ok := want[p]; !ok {
			diffs = append(diffs, p+": not expected")
		}
	}
	return diffs
}

// clipOutput shortens command output for messages.
func clipOutput(b []byte) string {
	const max = 3000
	if len(b) > max {
		return string(b[:max]) + fmt.Sprintf("… [%d more bytes]", len(b)-max)
	}
	return string(b)
}

// checkServeLog fails the test when casnix serve logged a panic, a Go runtime error or an
// error-level message.
func checkServeLog(t *testing.T, d *nixtest.Daemon) {
	t.Helper()
	out := d.Output()
	for _, bad := range []string{"panic:", "fatal error:", "level=ERROR", "DATA RACE"} {
		if strings.Contains(out, bad) {
			// The lines themselves first: a long log is clipped, and
			// what matters may be in the part cut.
			var hits []string
			for _, l := range strings.Split(out, "\n") {
				if strings.Contains(l, bad) && len(hits) < 20 {
					hits = append(hits, l)
				}
			}
			t.Errorf("casnix serve logged %q:\n%s\nwhole log:\n%s", bad, strings.Join(hits, "\n"), clipOutput([]byte(out)))
			return
		}
	}
}
