package tests

import (
	"bytes"
	"fmt"
	"math/rand/v2"
	"os"
	"os/exec"
	"path/filepath"
	"slices"
	"strconv"
	"strings"
	"testing"
	"time"

	"golang.org/x/sys/unix"

	"github.com/casnix/casnix/nar"
	"github.com/casnix/casnix/proto"
	"github.com/casnix/casnix/tests/nixtest"
)

// fullDiskLevels is how many fill levels TestFullDisk tries (CASNIX_FULLDISK_LEVELS
// raises it).
const fullDiskLevels = 32

// saysNoSpace reports whether casnix's output names the lack of space.
func saysNoSpace(out string) bool {
	return strings.Contains(strings.ToLower(out), "no space left on device")
}

// TestFullDisk puts casnix's data dir on a small loop-mounted ext4 and, at 32 fill levels
// (a filler file on the same file system, sized so that what is left goes from most of the
// disk down to nothing), imports a path with incompressible and one with compressible
// contents. Each import either succeeds with its path valid, or fails saying "no space
// left on device" with its path not valid; after a failure every path valid before stays
// valid and `casnix verify` is clean. Then the filler is deleted and the failed imports
// succeed with no manual step in between.
func TestFullDisk(t *testing.T) {
	bin := nixtest.CasnixBinary(t)
	mnt := mountSmallExt4(t, 128<<20)
	data := filepath.Join(mnt, "casnix")
	filler := filepath.Join(mnt, "filler")
	levels := fullDiskLevels
	if s := os.Getenv("CASNIX_FULLDISK_LEVELS"); s != "" {
		n, err := strconv.Atoi(s)
		if err != nil || n < 2 {
			t.Fatalf("CASNIX_FULLDISK_LEVELS=%q: want a number ≥ 2", s)
		}
		levels = n
	}
	seed := uint64(time.Now().UnixNano())
	if s := os.Getenv("CASNIX_E2E_SEED"); s != "" {
		seed, _ = strconv.ParseUint(s, 10, 64)
	}
	rng := rand.New(rand.NewPCG(seed, 7))
	t.Logf("%d levels, seed %d (CASNIX_E2E_SEED repeats the fill levels)", levels, seed)

	// The store grows by the incompressible part of each level: keep the total well
	// inside the image, so the last levels still have room once the filler is gone.
	randBytes := min(1536<<10, (64<<20)/levels)
	work := t.TempDir()
	makeNAR := func(name string, compressible bool) string {
		tree := filepath.Join(work, name)
		if err := os.MkdirAll(tree, 0o755); err != nil {
			t.Fatal(err)
		}
		if compressible {
			var text strings.Builder
			for text.Len() < 3<<20 {
				fmt.Fprintf(&text, "line %d of %s: %016d\n", text.Len(), name, rng.Uint64()%1000)
			}
			writeFileT(t, filepath.Join(tree, "log.txt"), []byte(text.String()))
		} else {
			raw := make([]byte, randBytes/2+rng.IntN(randBytes))
			for i := range raw {
				raw[i] = byte(rng.Uint32())
			}
			writeFileT(t, filepath.Join(tree, "random.bin"), raw)
			writeFileT(t, filepath.Join(tree, "small"), []byte(name))
		}
		var buf bytes.Buffer
		if _, err := nar.DumpPath(&buf, tree); err != nil {
			t.Fatal(err)
		}
		os.RemoveAll(tree)
		file := tree + ".nar"
		writeFileT(t, file, buf.Bytes())
		return file
	}
	run := func(args ...string) (string, error) {
		cmd := exec.Command(bin, append([]string{"--data-dir", data}, args...)...)
		out, err := cmd.CombinedOutput()
		return string(out), err
	}
	// valid lists the valid paths; with full set, a disk too full for casnix to open
	// its database is allowed, if it says so (nil, false).
	valid := func(full bool) ([]string, bool) {
		t.Helper()
		out, err := run("path-info", "--all")
		if err != nil {
			if full && saysNoSpace(out) {
				return nil, false
			}
			t.Fatalf("casnix path-info --all: %v\n%s", err, out)
		}
		var paths []string
		for _, l := range nixtest.SortedLines([]byte(out)) {
			p, _, _ := strings.Cut(l, "\t")
			paths = append(paths, p)
		}
		return paths, true
	}
	verify := func(when string, full bool) bool {
		t.Helper()
		out, err := run("verify")
		if err != nil {
			if full && saysNoSpace(out) {
				return false
			}
			t.Fatalf("%s: casnix verify: %v\n%s", when, err, out)
		}
		return true
	}
	// stillValid fails the test unless every path of before is in now.
	stillValid := func(lvl int, before, now []string) {
		t.Helper()
		for _, p := range before {
			if !slices.Contains(now, p) {
				t.Fatalf("level %d: %s was valid before the import and is not now", lvl, p)
			}
		}
	}

	// A first path, so the data dir exists before any filler.
	first := makeNAR("first", false)
	if out, err := run("import", "--nar", first, "--path", "/nix/store/"+strings.Repeat("0", 32)+"-first"); err != nil {
		t.Fatalf("first import: %v\n%s", err, out)
	}

	type outcome struct{ ok, noSpace, checkedLater int }
	var total outcome
	var summary []string
	start := time.Now()
	for lvl := range levels {
		var st unix.Statfs_t
		if err := unix.Statfs(mnt, &st); err != nil {
			t.Fatal(err)
		}
		avail := int64(st.Bavail) * st.Bsize
		// What is left after the filler: most of the free space at level 0, cubically
		// down to nothing at the last level, so that many levels fall near the size of
		// one import, where packs, fsyncs or SQLite run out in turn.
		frac := float64(levels-1-lvl) / float64(levels-1)
		left := int64(float64(avail) * frac * frac * frac)
		if lvl > 0 && lvl < levels-1 {
			left += rng.Int64N(64 << 10)
		}
		fill := max(avail-left, 0)
		makeFiller(t, filler, fill)

		before, ok := valid(true)
		if !ok {
			// Full: ask again once the space is back.
			os.Remove(filler)
			before, _ = valid(false)
			makeFiller(t, filler, fill)
		}
		type imp struct{ nar, path string }
		imps := []imp{
			{makeNAR(fmt.Sprintf("rand-%d", lvl), false), fmt.Sprintf("/nix/store/%032d-rand-%d", lvl+1, lvl)},
			{makeNAR(fmt.Sprintf("text-%d", lvl), true), fmt.Sprintf("/nix/store/%031d1-text-%d", lvl+1, lvl)},
		}
		var failed []imp
		var res []string
		checkedFull := true // validity and verify could run with the disk full
		for _, im := range imps {
			out, err := run("import", "--nar", im.nar, "--path", im.path)
			switch {
			case err == nil:
				total.ok++
				res = append(res, "ok")
			case saysNoSpace(out):
				total.noSpace++
				failed = append(failed, im)
				res = append(res, "ENOSPC:"+noSpacePhase(out))
			default:
				t.Fatalf("level %d (%d bytes left): import of %s failed without saying no space: %v\n%s", lvl, left, im.path, err, out)
			}
			now, ok := valid(true)
			if !ok {
				checkedFull = false
				continue
			}
			if got := slices.Contains(now, im.path); got != (err == nil) {
				t.Fatalf("level %d: import of %s: exit %v, path valid: %v:\n%s", lvl, im.path, err, got, out)
			}
			stillValid(lvl, before, now)
		}
		if len(failed) > 0 && checkedFull {
			checkedFull = verify(fmt.Sprintf("level %d, disk full", lvl), true)
		}
		if err := os.Remove(filler); err != nil {
			t.Fatal(err)
		}
		// With the space back, nothing committed before is lost, and what failed
		// goes in with no manual step.
		now, _ := valid(false)
		stillValid(lvl, before, now)
		for _, im := range imps {
			want := !slices.Contains(failed, im)
			if slices.Contains(now, im.path) != want {
				t.Fatalf("level %d: after freeing space, %s valid is %v, want %v", lvl, im.path, !want, want)
			}
		}
		if len(failed) > 0 {
			verify(fmt.Sprintf("level %d, space freed", lvl), false)
		}
		for _, im := range failed {
			if out, err := run("import", "--nar", im.nar, "--path", im.path); err != nil {
				t.Fatalf("level %d: import of %s after freeing the space: %v\n%s", lvl, im.path, err, out)
			}
			if now, _ := valid(false); !slices.Contains(now, im.path) {
				t.Fatalf("level %d: %s not valid after its import with space freed", lvl, im.path)
			}
		}
		if !checkedFull {
			res = append(res, "(checked after freeing)")
			total.checkedLater++
		}
		for _, im := range imps {
			os.Remove(im.nar)
		}
		summary = append(summary, fmt.Sprintf("L%d %dK:%s", lvl, left>>10, strings.Join(res, "/")))
	}
	verify("end", false)
	t.Logf("%d levels in %s: %d imports ok, %d failed with no space (then succeeded with space freed); %d levels too full for path-info/verify to open the database (they said no space; checked after freeing)",
		levels, time.Since(start).Round(time.Millisecond), total.ok, total.noSpace, total.checkedLater)
	t.Logf("per level (space left, outcomes rand/text): %s", strings.Join(summary, " "))
	if total.noSpace == 0 {
		t.Errorf("no import ran out of space: the filler did not fill the disk")
	}
}

// noSpacePhase names where an import ran out of space, from its error message.
func noSpacePhase(out string) string {
	for _, p := range []struct{ say, phase string }{
		{"sync pack", "fsync"}, {"write pack", "pack"}, {"allocate pack", "newpack"},
		{"create pack", "newpack"}, {"database or disk is full", "sqlite"}, {"disk I/O error", "open"},
		{"temp root", "temproot"},
	} {
		if strings.Contains(out, p.say) {
			return p.phase
		}
	}
	return "other"
}

// mountSmallExt4 makes an ext4 image of size bytes, loop-mounts it under the test's
// temporary directory, and unmounts it at the end of the test.
func mountSmallExt4(t *testing.T, size int64) string {
	t.Helper()
	if os.Geteuid() != 0 {
		nixtest.SkipOrFatal(t, "a loop-mounted file system needs root")
	}
	if _, err := exec.LookPath("mkfs.ext4"); err != nil {
		r := (&nixtest.Cmd{Name: "sh", Args: []string{"-c", "apt-get install -y -q --no-install-recommends e2fsprogs || (apt-get update -q && apt-get install -y -q --no-install-recommends e2fsprogs)"}, Timeout: 5 * time.Minute}).Try()
		if !r.OK() {
			nixtest.SkipOrFatal(t, "installing e2fsprogs (mkfs.ext4):\n%s", r)
		}
	}
	for _, tool := range []string{"mkfs.ext4", "losetup", "mount", "umount"} {
		if _, err := exec.LookPath(tool); err != nil {
			nixtest.SkipOrFatal(t, "a loop-mounted ext4 needs %s: %v", tool, err)
		}
	}
	dir := t.TempDir()
	img := filepath.Join(dir, "disk.img")
	f, err := os.Create(img)
	if err != nil {
		t.Fatal(err)
	}
	if err := f.Truncate(size); err != nil {
		t.Fatal(err)
	}
	f.Close()
	// -m 0: no blocks reserved for root (the tests run as root, who could use them).
	if out, err := exec.Command("mkfs.ext4", "-q", "-F", "-m", "0", img).CombinedOutput(); err != nil {
		nixtest.SkipOrFatal(t, "mkfs.ext4: %v\n%s", err, out)
	}
	mnt := filepath.Join(dir, "mnt")
	if err := os.Mkdir(mnt, 0o755); err != nil {
		t.Fatal(err)
	}
	if out, err := exec.Command("mount", "-o", "loop", img, mnt).CombinedOutput(); err != nil {
		nixtest.SkipOrFatal(t, "loop mount of an ext4 image: %v\n%s", err, out)
	}
	t.Cleanup(func() {
		if out, err := exec.Command("umount", mnt).CombinedOutput(); err != nil {
			// A process still holding it (a daemon being stopped): detach lazily.
			t.Logf("umount %s: %v\n%s", mnt, err, out)
			exec.Command("umount", "-l", mnt).Run()
		}
	})
	return mnt
}

// makeFiller makes path a file taking size bytes of the file system (allocated, not
// sparse), replacing any earlier one.
func makeFiller(t *testing.T, path string, size int64) {
	t.Helper()
	os.Remove(path)
	f, err := os.OpenFile(path, os.O_RDWR|os.O_CREATE|os.O_TRUNC, 0o644)
	if err != nil {
		t.Fatal(err)
	}
	defer f.Close()
	if size == 0 {
		return
	}
	// Fallocate can fall short of the last few blocks (metadata needs some too): take
	// what it gives, so the disk ends as full as can be.
	for size > 0 {
		err := unix.Fallocate(int(f.Fd()), 0, 0, size)
		if err == nil {
			break
		}
		if err != unix.ENOSPC {
			t.Fatalf("fallocate filler: %v", err)
		}
		size -= 64 << 10
	}
}

func writeFileT(t *testing.T, path string, b []byte) {
	t.Helper()
	if err := os.WriteFile(path, b, 0o644); err != nil {
		t.Fatal(err)
	}
}

// TestFullDiskServe runs `casnix serve` with its data dir on a small loop-mounted ext4
// and pushes into it with a real `nix copy --to unix://…` (host Nix) more than the disk
// holds: the copy fails and Nix shows the daemon's "no space left on device"; the daemon
// stays up and serves reads (path-info and `nix store verify` of what was there before,
// NARs through the daemon); what was valid before stays valid. Once the filler is deleted
// the same copy completes, and `casnix verify` is clean.
func TestFullDiskServe(t *testing.T) {
	nixtest.RequireHostNix(t)
	bin := nixtest.CasnixBinary(t)
	mnt := mountSmallExt4(t, 128<<20)
	filler := filepath.Join(mnt, "filler")

	// The source: a Nix store of random files (content-addressed, nix-store --add).
	src := nixtest.NewStore(t)
	rng := rand.New(rand.NewPCG(uint64(time.Now().UnixNano()), 11))
	work := t.TempDir()
	add := func(name string, size int) string {
		file := filepath.Join(work, name)
		raw := make([]byte, size)
		for i := range raw {
			raw[i] = byte(rng.Uint32())
		}
		writeFileT(t, file, raw)
		return src.Add(t, file)
	}
	before := []string{add("before-1", 512<<10), add("before-2", 1<<20)}
	// Space left by the filler at each level, from more than a copy needs down to none,
	// so the disk fills in turn while packs are written, synced, and SQLite commits.
	// A negative entry -d leaves d bytes more than the level's files (random, so their
	// packed size is about theirs): room for the packs but maybe not for the commit.
	lefts := []int64{16 << 20, 6 << 20, 5 << 20, 4 << 20, -512 << 10, -128 << 10, -32 << 10, -8 << 10,
		3 << 20, 1 << 20, 256 << 10, 64 << 10, 16 << 10, 0}
	sets := make([][]string, len(lefts))
	for lvl := range lefts {
		var bytes int64
		for i := range 4 {
			n := 768<<10 + rng.IntN(768<<10)
			bytes += int64(n)
			sets[lvl] = append(sets[lvl], add(fmt.Sprintf("lvl%d-%d", lvl, i), n))
		}
		if lefts[lvl] < 0 {
			lefts[lvl] = bytes - lefts[lvl]
		}
	}
	from := "local?root=" + src.Root

	cas := &nixtest.Casnix{Bin: bin, DataDir: filepath.Join(mnt, "casnix")}
	d := cas.Serve(t, filepath.Join(t.TempDir(), "casnix.sock"))
	nix := func(args ...string) *nixtest.Result {
		return (&nixtest.Cmd{Name: "nix", Args: args, Env: nixtest.NixEnv(t), Timeout: 5 * time.Minute}).Try()
	}
	copyArgs := func(paths []string) []string {
		return append([]string{"copy", "--no-check-sigs", "--from", from, "--to", d.URL()}, paths...)
	}
	if r := nix(copyArgs(before)...); !r.OK() {
		t.Fatalf("copy before filling the disk:\n%s", r)
	}
	// readsWork checks, through the daemon, that the paths are valid (nix path-info) and
	// that their NARs, rendered by casnix (NarFromPath: a unix:// Nix client would read
	// its own /nix/store instead), are the source's.
	readsWork := func(when string, paths []string) {
		t.Helper()
		if r := nix(append([]string{"path-info", "--store", d.URL()}, paths...)...); !r.OK() {
			t.Fatalf("%s: nix path-info through the daemon:\n%s", when, r)
		}
		cl, err := proto.Dial(d.Socket)
		if err != nil {
			t.Fatalf("%s: dial the daemon: %v", when, err)
		}
		defer cl.Close()
		for _, p := range paths {
			w := nixtest.NewDigestWriter()
			if _, err := cl.NarFromPath(p, w); err != nil {
				t.Fatalf("%s: NarFromPath %s: %v", when, p, err)
			}
			if got, want := w.Digest(), src.Dump(t, p); got != want {
				t.Fatalf("%s: NarFromPath %s: %s, source %s", when, p, got, want)
			}
		}
	}
	readsWork("before filling", before)

	valid := slices.Clone(before)
	failures := 0
	seen := map[string]bool{} // phases whose message was logged
	var summary []string
	start := time.Now()
	for lvl, left := range lefts {
		var st unix.Statfs_t
		if err := unix.Statfs(mnt, &st); err != nil {
			t.Fatal(err)
		}
		avail := int64(st.Bavail) * st.Bsize
		makeFiller(t, filler, max(avail-left, 0))
		r := nix(copyArgs(sets[lvl])...)
		if d.Exited() {
			t.Fatalf("level %d: the daemon exited:\n%s", lvl, d.Output())
		}
		if r.OK() {
			summary = append(summary, fmt.Sprintf("%dK:ok", left>>10))
		} else {
			msg := nixtest.StripNixNoise(r.Stderr)
			if !saysNoSpace(msg) {
				t.Fatalf("level %d (%d bytes left): nix copy failed without saying no space left:\n%s\ndaemon:\n%s", lvl, left, r, d.Output())
			}
			failures++
			if phase := noSpacePhase(msg); !seen[phase] {
				seen[phase] = true
				t.Logf("level %d: nix copy into a full disk (%s) says:\n%s", lvl, phase, lastLines(msg, 1))
			}
			// The daemon serves reads, all that was valid is, and paths the copy
			// committed before the disk filled are whole.
			var committed []string
			for _, p := range sets[lvl] {
				if nix("path-info", "--store", d.URL(), p).OK() {
					committed = append(committed, p)
				}
			}
			readsWork(fmt.Sprintf("level %d, disk full", lvl), append(slices.Clone(valid), committed...))
			summary = append(summary, fmt.Sprintf("%dK:ENOSPC:%s(%d/%d committed)", left>>10, noSpacePhase(msg), len(committed), len(sets[lvl])))
			if err := os.Remove(filler); err != nil {
				t.Fatal(err)
			}
			if r := nix(copyArgs(sets[lvl])...); !r.OK() {
				t.Fatalf("level %d: the same copy after freeing the space:\n%s\ndaemon:\n%s", lvl, r, d.Output())
			}
		}
		os.Remove(filler)
		valid = append(valid, sets[lvl]...)
		readsWork(fmt.Sprintf("level %d, after the copy", lvl), valid)
	}
	t.Logf("%d levels in %s: %s", len(lefts), time.Since(start).Round(time.Millisecond), strings.Join(summary, " "))
	if failures == 0 {
		t.Errorf("no copy ran out of space: the filler did not fill the disk")
	}
	if err := d.Stop(30 * time.Second); err != nil {
		t.Errorf("daemon stop: %v\n%s", err, d.Output())
	}
	if r := cas.Try("verify"); !r.OK() {
		t.Fatalf("casnix verify at the end:\n%s", r)
	}
}

// lastLines is the last n lines of s.
func lastLines(s string, n int) string {
	lines := strings.Split(strings.TrimSpace(s), "\n")
	return strings.Join(lines[max(0, len(lines)-n):], "\n")
}
