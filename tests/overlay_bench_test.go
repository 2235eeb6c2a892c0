package tests

import (
	"fmt"
	"net/url"
	"os"
	"path/filepath"
	"strings"
	"testing"
	"time"

	"github.com/casnix/casnix/tests/nixtest"
)

// BenchmarkLocalOverlay times Nix 2.34 (sid) working through a Local
// Overlay Store whose lower store is casnix, against the same work on a
// plain local store holding the same paths, in the same run:
//
//   - path-info: nix path-info -r of every output path of the corpus (each
//     lower path is looked up through the overlay: IsValidPath +
//     QueryPathInfo over casnix's socket)
//   - build: a derivation whose inputs are 50 corpus paths, built with the
//     sandbox into the upper layer (or the local store)
//
// The corpus is bench/build-corpora.sh's releases store
// (CASNIX_BENCH_CORPUS, default /var/tmp/casnix-bench/corpora/releases).
// Run: go test -run XXX -bench LocalOverlay -benchtime 3x ./tests/
func BenchmarkLocalOverlay(b *testing.B) {
	corpus := os.Getenv("CASNIX_BENCH_CORPUS")
	if corpus == "" {
		corpus = "/var/tmp/casnix-bench/corpora/releases"
	}
	if _, err := os.Stat(filepath.Join(corpus, "nix/var/nix/db/db.sqlite")); err != nil {
		nixtest.SkipOrFatal(b, "no corpus store at %s (run bench/build-corpora.sh): %v", corpus, err)
	}
	r := nixtest.RequireRoot(b, "sid")
	bin := nixtest.CasnixBinary(b)
	data := b.TempDir()
	nixtest.Run(b, bin, "-d", data, "import", "--from-nix-store", corpus)
	ents, err := os.ReadDir(filepath.Join(corpus, "nix/store"))
	if err != nil {
		b.Fatal(err)
	}
	var paths []string
	for _, e := range ents {
		if !strings.HasSuffix(e.Name(), ".drv") && !strings.HasPrefix(e.Name(), ".") {
			paths = append(paths, "/nix/store/"+e.Name())
		}
	}
	dir := b.TempDir()
	srv := startCasnixServe(b, bin, data, dir, filepath.Base(paths[0]))
	r.Bind(dir, corpus)
	r.Run(b, "mkdir", "-p", "/tmp/upper", "/tmp/work")
	r.Setup = "mount -t overlay overlay -o lowerdir=" + srv.mnt + ",upperdir=/tmp/upper,workdir=/tmp/work /nix/store"
	overlay := "local-overlay://?lower-store=" + url.QueryEscape("unix://"+srv.sock+"?real="+srv.mnt) + "&upper-layer=/tmp/upper"
	local := "local?root=" + corpus

	inputs := paths[:min(50, len(paths))]
	writeDrv := func(round int) {
		var s strings.Builder
		fmt.Fprintf(&s, "builtins.derivation { name = \"uses-lower-%d\"; system = builtins.currentSystem; builder = \"/bin/busybox\";\n", round)
		s.WriteString("  args = [ \"sh\" \"-c\" \"ls -d")
		for _, p := range inputs {
			fmt.Fprintf(&s, " ${builtins.storePath %s}", p)
		}
		s.WriteString(" > $out\" ]; }\n")
		if err := os.WriteFile(r.HostPath("/tmp/uses.nix"), []byte(s.String()), 0o644); err != nil {
			b.Fatal(err)
		}
	}
	// The local anchor builds into the corpus store itself: remove what it
	// built, so the corpus (and the caches keyed on its path set) stay as
	// bench/build-corpora.sh made them.
	var built []string
	b.Cleanup(func() {
		for _, p := range built {
			r.Try("nix-store", "--store", local, "--delete", p)
		}
	})
	timeIt := func(args ...string) time.Duration {
		start := time.Now()
		r.Run(b, args...)
		return time.Since(start)
	}
	var ovPI, locPI, ovBuild, locBuild time.Duration
	b.ResetTimer()
	for i := 0; i < b.N; i++ {
		ovPI += timeIt(append([]string{"nix", "path-info", "-r", "--store", overlay}, paths...)...)
		locPI += timeIt(append([]string{"nix", "path-info", "-r", "--store", local}, paths...)...)
		writeDrv(i) // a new derivation each round, so both builds really run
		ovBuild += timeIt("nix", "build", "--option", "sandbox", "true", "--no-link", "--store", overlay, "-f", "/tmp/uses.nix")
		start := time.Now()
		out := strings.TrimSpace(string(r.Output(b, "nix", "build", "--option", "sandbox", "true", "--no-link", "--print-out-paths", "--store", local, "-f", "/tmp/uses.nix")))
		locBuild += time.Since(start)
		drvPath := strings.TrimSpace(string(r.Output(b, "nix-store", "--store", local, "-q", "--deriver", out)))
		built = append(built, out, drvPath)
	}
	n := float64(b.N)
	b.ReportMetric(ovPI.Seconds()/n, "overlay-path-info-s")
	b.ReportMetric(locPI.Seconds()/n, "local-path-info-s")
	b.ReportMetric(ovPI.Seconds()/locPI.Seconds(), "path-info-ratio")
	b.ReportMetric(ovBuild.Seconds()/n, "overlay-build-s")
	b.ReportMetric(locBuild.Seconds()/n, "local-build-s")
	b.ReportMetric(ovBuild.Seconds()/locBuild.Seconds(), "build-ratio")
}
