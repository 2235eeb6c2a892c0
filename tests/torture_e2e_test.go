package tests

import (
	"bufio"
	"bytes"
	"crypto/sha256"
	"encoding/hex"
	"encoding/json"
	"errors"
	"fmt"
	"io"
	"maps"
	"math/rand/v2"
	"os"
	"os/exec"
	"path/filepath"
	"slices"
	"strconv"
	"strings"
	"syscall"
	"testing"
	"time"

	"github.com/klauspost/compress/zstd"

	"github.com/casnix/casnix/binarycache"
	"github.com/casnix/casnix/blobs"
	"github.com/casnix/casnix/nar"
	"github.com/casnix/casnix/proto"
	"github.com/casnix/casnix/tests/crashfs"
	"github.com/casnix/casnix/tests/nixtest"
)

// tortureRoundsEnv overrides how many rounds TestTorture runs (the CI default is
// tortureRounds); CASNIX_TORTURE_ROUNDS=1000 is the long run.
const (
	tortureRoundsEnv = "CASNIX_TORTURE_ROUNDS"
	tortureRounds    = 24
)

// tPhase is one kind of load a torture round puts on casnix before the cut.
type tPhase int

const (
	tImport  tPhase = iota // casnix import --nar, one process per path
	tDaemon                // casnix serve + proto.Client.AddToStoreNar
	tBackup                // casnix backup to a dir on the same crashfs mount
	tGC                    // casnix gc --min-dead 0.01 after some roots are removed
	tRestore               // casnix restore --force from the last acknowledged backup
	tNixCopy               // casnix serve + real `nix copy --to unix://` of closures from a Nix store
	tExport                // casnix export of valid closures to a binary cache dir on the mount
	tPhases
)

var tPhaseNames = [tPhases]string{"import", "daemon", "backup", "gc", "restore", "nixcopy", "export"}

// tortureStats is the summary a run prints.
type tortureStats struct {
	rounds, cuts        [tPhases]int // rounds per phase; rounds whose cut landed inside the phase
	fsyncCuts, timeCuts int          // how the cuts inside a phase were triggered
	acked               int          // acknowledged paths (this round's) checked after the cut
	carried             int          // paths valid after an earlier cut, checked again
	backups             int          // acknowledged backups verified after the cut
	exports             int          // acknowledged exported paths (all since the cache was made) checked
	losses              int          // acknowledged (or earlier durable) paths missing or wrong
	invalid             int          // verify failures or valid sets not closed under references
	manual              int          // restarts that did not open the data dir by themselves
	phaseErrors         int          // casnix commands that failed with no cut inside the phase
	failed              []string     // "round N (phase, seed S): what"
}

// torture drives rounds against one data dir whose state accumulates across cuts: the
// backing dir of round N's crashfs mount, written by its cut, is what round N+1 mounts.
type torture struct {
	t                     *testing.T
	bin, work, seedName   string
	backing, mnt, sock    string
	seed                  uint64
	rng                   *rand.Rand
	env                   []string
	next                  int               // counter for unique store path names
	expected              map[string]string // path -> narHash that must survive the next cut
	backup                string            // last acknowledged and verified backup (dir name under backing)
	backupPaths           map[string]string
	calFsyncs             [tPhases]int64 // most fsyncs a phase made without a cut inside it
	calDur                [tPhases]time.Duration
	ackLog                string                   // outside the data dir: one line per acknowledgement
	exportLog             string                   // outside the data dir: one line per path acknowledged by export
	valid                 map[string]pathInfoJSONT // path-infos of expected (references for export)
	fix                   *nixtest.Fixture         // source of nixcopy's closures (nil without nixcopy)
	fixRoots              []string                 // closures of the source store that nixcopy copies along
	copyPool              []nixCopySet             // built, not yet copied
	copyBatches           int
	phases                []tPhase
	lenient               bool // negative control: count failures instead of failing
	st                    tortureStats
	roundSeed, roundCutAt int64
}

// TestTorture is the torture suite's driver: rounds that each mount crashfs over the data
// dir the previous round's cut left, run one load phase (imports, daemon uploads, backup,
// gc with compaction, restore), cut the power inside it (at the Nth fsync, N spread over
// the fsyncs the phase made in earlier rounds, or at a random time through the control
// file), and check the state on the backing dir after casnix restarts on it:
//
//   - I1: every path acknowledged before the cut (import or backup exit 0,
//     AddToStoreNar's reply, restore exit 0), and every path valid after an earlier cut
//     that gc was not allowed to take, is valid with its narHash; an acknowledged backup
//     verifies and holds the paths valid when it started.
//   - I2: `casnix verify` renders every valid path to its narHash, and the valid set is
//     closed under references.
//   - I3: every path an export (exit 0) acknowledged has its narinfo and NAR file in the
//     cache dir on the mount, the file of the narinfo's FileSize and FileHash, holding
//     the NAR of the narinfo's (and the acknowledged) NarHash.
//   - I4: casnix opens the data dir with no manual step.
//
// nixcopy rounds copy closures built in a real Nix store (fresh ones of random data, and
// small ones in the shapes of nixtest's fixture that the fresh ones refer to) with host
// Nix's `nix copy --to unix://…` into casnix serve; a closure is acknowledged when nix
// copy exits 0, and after the cut must be valid with the source's narHash and references.
// A short run (CI) cuts inside every phase it repeats; a long one stops at the test's
// deadline with its summary.
func TestTorture(t *testing.T) {
	rounds := tortureRounds
	if s := os.Getenv(tortureRoundsEnv); s != "" {
		n, err := strconv.Atoi(s)
		if err != nil || n < 1 {
			t.Fatalf("%s=%q: want a positive number", tortureRoundsEnv, s)
		}
		rounds = n
	}
	tt := newTorture(t, "torture", []tPhase{tImport, tDaemon, tBackup, tGC, tNixCopy, tRestore, tExport,
		tImport, tDaemon, tNixCopy, tGC, tExport})
	tt.run(rounds)
	st := tt.st
	if st.losses != 0 || st.invalid != 0 || st.manual != 0 {
		t.Errorf("torture: %d losses, %d invalid states, %d manual restarts:\n%s", st.losses, st.invalid, st.manual, strings.Join(st.failed, "\n"))
	}
	// The run must have cut the power inside every phase it ran more than once (the
	// first round of a phase only calibrates): a phase no cut reached proved nothing.
	for p := range tPhases {
		if st.rounds[p] >= 2 && st.cuts[p] == 0 {
			t.Errorf("torture: %d %s rounds and no cut inside the phase", st.rounds[p], tPhaseNames[p])
		}
	}
}

// TestTortureNegativeControl runs the torture rounds against a casnix whose pack writes
// are not fsynced (blobs.UnsafeNoPackFsyncEnv) and asserts that the harness reports
// acknowledged paths lost: it shows the suite can fail.
func TestTortureNegativeControl(t *testing.T) {
	tt := newTorture(t, "negative", []tPhase{tImport, tDaemon})
	tt.env = append(tt.env, blobs.UnsafeNoPackFsyncEnv+"=lose-acknowledged-data")
	tt.lenient = true
	const rounds = 12
	tt.run(rounds)
	if tt.st.losses == 0 {
		t.Fatalf("with pack fsync off, %d rounds lost no acknowledged path: the harness cannot see a lost write", rounds)
	}
	t.Logf("negative control caught %d lost paths (%d invalid states, %d manual restarts) as it should:\n%s",
		tt.st.losses, tt.st.invalid, tt.st.manual, strings.Join(tt.st.failed, "\n"))
}

func newTorture(t *testing.T, name string, phases []tPhase) *torture {
	if os.Geteuid() != 0 {
		nixtest.SkipOrFatal(t, "the torture suite needs root to mount FUSE")
	}
	if _, err := os.Stat("/dev/fuse"); err != nil {
		nixtest.SkipOrFatal(t, "the torture suite needs /dev/fuse: %v", err)
	}
	work := t.TempDir()
	seed := uint64(time.Now().UnixNano())
	if s := os.Getenv("CASNIX_TORTURE_SEED"); s != "" {
		var err error
		if seed, err = strconv.ParseUint(s, 10, 64); err != nil {
			t.Fatalf("CASNIX_TORTURE_SEED=%q: %v", s, err)
		}
	}
	t.Logf("%s: seed %d (CASNIX_TORTURE_SEED=%d reproduces the run)", name, seed, seed)
	tt := &torture{
		t: t, bin: nixtest.CasnixBinary(t), work: work, seedName: name, seed: seed,
		backing: filepath.Join(work, "backing"), mnt: filepath.Join(work, "mnt"),
		sock: filepath.Join(work, "daemon.sock"),
		rng:  rand.New(rand.NewPCG(seed, 0x7047)),
		// Full checks in backup and restore, whatever the caller's environment says.
		env: slices.DeleteFunc(os.Environ(), func(kv string) bool {
			return strings.HasPrefix(kv, "CASNIX_BACKUP_QUICK=") || strings.HasPrefix(kv, "CASNIX_RESTORE_QUICK=")
		}),
		expected:  map[string]string{},
		ackLog:    filepath.Join(work, "acks.log"),
		exportLog: filepath.Join(work, "exports.log"),
		phases:    phases,
	}
	if slices.Contains(phases, tNixCopy) {
		nixtest.RequireHostNix(t)
		tt.populateCopySource()
	}
	for _, d := range []string{tt.backing, tt.mnt} {
		if err := os.Mkdir(d, 0o755); err != nil {
			t.Fatal(err)
		}
	}
	tt.prepare()
	return tt
}

// prepare fills the data dir with a few rooted paths, outside crashfs (so durable).
func (tt *torture) prepare() {
	data := filepath.Join(tt.backing, "data")
	for range 4 {
		p, narFile, h := tt.newPath()
		runCasnix(tt.t, tt.bin, data, "import", "--nar", narFile, "--path", p)
		tt.expected[p] = h
	}
	tt.writeRoots()
	var err error
	if tt.valid, err = tt.validInfos(data); err != nil {
		tt.t.Fatal(err)
	}
}

// newPath writes a random tree's NAR outside the data dir and returns a fresh store
// path for it, the NAR file, and its narHash.
func (tt *torture) newPath() (string, string, string) {
	tt.next++
	name := fmt.Sprintf("%032d-tort-%d", tt.next, tt.next)
	tree := filepath.Join(tt.work, "trees", name)
	writeRandomTree(tt.t, tt.rng, tree, 16<<10+tt.rng.IntN(96<<10))
	var buf bytes.Buffer
	if _, err := nar.DumpPath(&buf, tree); err != nil {
		tt.t.Fatal(err)
	}
	narFile := tree + ".nar"
	if err := os.WriteFile(narFile, buf.Bytes(), 0o644); err != nil {
		tt.t.Fatal(err)
	}
	if err := os.RemoveAll(tree); err != nil {
		tt.t.Fatal(err)
	}
	sum := sha256.Sum256(buf.Bytes())
	return "/nix/store/" + name, narFile, "sha256:" + nixtest.NixBase32Encode(sum[:])
}

// writeRoots makes backing/data/gcroots hold exactly one root per expected path, so a
// gc may take only what a round chose to unroot.
func (tt *torture) writeRoots() {
	roots := filepath.Join(tt.backing, "data", "gcroots")
	ents, err := os.ReadDir(roots)
	if err != nil && !errors.Is(err, os.ErrNotExist) {
		tt.t.Fatal(err)
	}
	for _, e := range ents {
		if e.Type()&os.ModeSymlink != 0 {
			if err := os.Remove(filepath.Join(roots, e.Name())); err != nil {
				tt.t.Fatal(err)
			}
		}
	}
	if err := os.MkdirAll(roots, 0o755); err != nil {
		tt.t.Fatal(err)
	}
	for p := range tt.expected {
		if err := os.Symlink(p, filepath.Join(roots, filepath.Base(p))); err != nil {
			tt.t.Fatal(err)
		}
	}
}

func (tt *torture) run(rounds int) {
	// A long run stops early, with its summary, when the test's deadline (go test
	// -timeout) is near: a round takes seconds, its check at most a few minutes.
	deadline, hasDeadline := tt.t.Deadline()
	ran := 0
	for r := range rounds {
		if hasDeadline && time.Until(deadline) < 3*time.Minute {
			tt.t.Logf("torture: stopping after %d of %d rounds: the test's deadline is near", r, rounds)
			break
		}
		tt.round(r)
		ran++
	}
	st := &tt.st
	var b strings.Builder
	fmt.Fprintf(&b, "torture summary (%s, seed %d): %d rounds\n", tt.seedName, tt.seed, ran)
	for p := range tPhases {
		if st.rounds[p] > 0 {
			fmt.Fprintf(&b, "  %-8s %4d rounds, %4d cut inside the phase\n", tPhaseNames[p], st.rounds[p], st.cuts[p])
		}
	}
	fmt.Fprintf(&b, "  cuts: %d at an fsync, %d at a random time (the rest after the phase)\n", st.fsyncCuts, st.timeCuts)
	fmt.Fprintf(&b, "  acknowledged paths checked: %d (plus %d earlier durable paths re-checked, %d backups verified, %d exported paths checked)\n", st.acked, st.carried, st.backups, st.exports)
	fmt.Fprintf(&b, "  losses: %d, invalid states: %d, restarts needing a manual step: %d, commands failing with no cut: %d", st.losses, st.invalid, st.manual, st.phaseErrors)
	tt.t.Log(b.String())
}

// proc is a casnix process started by a phase.
type proc struct {
	cmd  *exec.Cmd
	out  bytes.Buffer
	done chan error
}

func (tt *torture) start(dataDir string, args ...string) *proc {
	cmd := exec.Command(tt.bin, append([]string{"--data-dir", dataDir}, args...)...)
	cmd.Env = tt.env
	return tt.startCmd(cmd)
}

// startCmd starts cmd (a casnix or Nix process) as a proc.
func (tt *torture) startCmd(cmd *exec.Cmd) *proc {
	p := &proc{cmd: cmd, done: make(chan error, 1)}
	p.cmd.Stdout, p.cmd.Stderr = &p.out, &p.out
	if err := p.cmd.Start(); err != nil {
		tt.t.Fatal(err)
	}
	go func() { p.done <- p.cmd.Wait() }()
	return p
}

// wait waits for p to exit, killing it after timeout (a process stuck after a cut).
func (p *proc) wait(timeout time.Duration) error {
	select {
	case err := <-p.done:
		p.done <- err
		return err
	case <-time.After(timeout):
		p.kill()
		return fmt.Errorf("killed after %v", timeout)
	}
}

// waitOrCut waits for p to exit, but once cfs is cut gives it only a few seconds more: a
// client whose daemon hangs on the dead mount would otherwise wait the full timeout.
func (p *proc) waitOrCut(cfs *crashfs.FS, timeout time.Duration) error {
	select {
	case err := <-p.done:
		p.done <- err
		return err
	case <-cfs.Done():
		return p.wait(5 * time.Second)
	case <-time.After(timeout):
		p.kill()
		return fmt.Errorf("killed after %v", timeout)
	}
}

// kill stops p if it still runs and waits for it.
func (p *proc) kill() {
	_ = p.cmd.Process.Signal(syscall.SIGKILL)
	err := <-p.done
	p.done <- err
}

// roundResult is what a phase reports for the check.
type roundResult struct {
	backupDir  string              // backup acknowledged (exit 0), under backing
	backupWant map[string]string   // paths valid when the backup started
	restored   bool                // restore exited 0
	restoreTry bool                // a restore ran (acknowledged or not)
	refs       map[string][]string // nixcopy: the source's references of acknowledged paths
}

func (tt *torture) round(r int) {
	t := tt.t
	ph := tt.phases[r%len(tt.phases)]
	if ph == tRestore && tt.backup == "" {
		ph = tBackup
	}
	tt.st.rounds[ph]++
	data := filepath.Join(tt.backing, "data")

	// Before the mount (durable): gc may take a random half of the paths.
	if ph == tGC {
		for _, p := range slices.Sorted(maps.Keys(tt.expected)) {
			if tt.rng.IntN(2) == 0 {
				delete(tt.expected, p)
			}
		}
		tt.writeRoots()
	}
	var copies []nixCopySet
	prepStart := time.Now()
	switch ph {
	case tNixCopy:
		// Closures are built in batches (one evaluation each), outside the mount.
		k := 1 + tt.rng.IntN(2)
		if len(tt.copyPool) < k {
			tt.copyPool = append(tt.copyPool, tt.buildCopies(tCopyBatch)...)
		}
		copies, tt.copyPool = tt.copyPool[:k], tt.copyPool[k:]
	case tExport:
		// Now and then (and before it grows big: crashfs holds it all in memory) the
		// cache dir starts afresh, so export also creates it under a cut.
		if tt.rng.IntN(4) == 0 || tt.exportsLogged() > 150 {
			if err := os.RemoveAll(filepath.Join(tt.backing, tCacheDir)); err != nil {
				t.Fatal(err)
			}
			if err := os.Remove(tt.exportLog); err != nil && !errors.Is(err, os.ErrNotExist) {
				t.Fatal(err)
			}
		}
	}
	prep := time.Since(prepStart)
	// Only the last acknowledged backup is kept; a new backup needs an absent dir.
	ents, err := os.ReadDir(tt.backing)
	if err != nil {
		t.Fatal(err)
	}
	for _, e := range ents {
		if strings.HasPrefix(e.Name(), "backup-") && e.Name() != tt.backup {
			if err := os.RemoveAll(filepath.Join(tt.backing, e.Name())); err != nil {
				t.Fatal(err)
			}
		}
	}

	// Where to cut: calibration (the first round of each phase) cuts after the phase;
	// then one round in eight too (everything acknowledged, e.g. a whole backup or
	// restore, must hold), one in four at a random time, the others at an fsync within
	// the range the phase has made so far.
	var cutAt int64
	var cutAfter time.Duration
	mode := "after"
	switch n := tt.rng.IntN(8); {
	case tt.calFsyncs[ph] == 0:
	case tt.st.cuts[ph] == 0:
		// No cut has landed inside this phase yet: one in the first half of its
		// fsyncs does, so even a short run cuts inside every phase it repeats.
		mode = "fsync"
		cutAt = 1 + tt.rng.Int64N((tt.calFsyncs[ph]+1)/2)
	case n == 0:
	case n <= 2:
		mode = "time"
		cutAfter = time.Duration(tt.rng.Int64N(int64(tt.calDur[ph]) + 1))
	default:
		mode = "fsync"
		cutAt = 1 + tt.rng.Int64N(tt.calFsyncs[ph])
	}
	tt.roundSeed, tt.roundCutAt = int64(tt.seed)^int64(r)<<20, cutAt
	cfs, err := crashfs.Mount(tt.backing, tt.mnt, crashfs.Options{Seed: tt.roundSeed, CutAtFsync: cutAt})
	if err != nil {
		t.Fatalf("round %d: mount: %v", r, err)
	}
	defer cfs.Unmount()
	timerFired := make(chan bool, 1)
	var timer *time.Timer
	if mode == "time" {
		timer = time.AfterFunc(cutAfter, func() {
			// As an outside driver would: through the control file.
			err := os.WriteFile(filepath.Join(tt.mnt, crashfs.DefaultControlName), []byte("cut"), 0)
			timerFired <- err == nil
		})
	}

	began := time.Now()
	mdata := filepath.Join(tt.mnt, "data")
	var procs []*proc
	start := func(args ...string) *proc {
		p := tt.start(mdata, args...)
		procs = append(procs, p)
		return p
	}
	res := roundResult{refs: map[string][]string{}}
	acked := 0
	logAck := func(log, line string) {
		f, err := os.OpenFile(log, os.O_WRONLY|os.O_APPEND|os.O_CREATE, 0o644)
		if err != nil {
			t.Fatal(err)
		}
		_, err = f.WriteString(line)
		if cerr := f.Close(); err == nil {
			err = cerr
		}
		if err != nil {
			t.Fatal(err)
		}
		acked++
	}
	ack := func(path, hash string) { logAck(tt.ackLog, fmt.Sprintf("%d\t%s\t%s\n", r, path, hash)) }
	switch ph {
	case tImport:
		for range 3 {
			p, narFile, h := tt.newPath()
			args := []string{"import", "--nar", narFile, "--path", p}
			if ref := tt.anyExpected(); ref != "" {
				args = append(args, "--references", ref)
			}
			if start(args...).wait(2*time.Minute) != nil {
				break
			}
			ack(p, h)
		}
	case tDaemon:
		os.Remove(tt.sock)
		srv := start("serve", "--socket", tt.sock, "--no-require-sigs", "--shutdown-timeout", "1s")
		if tt.waitSocket(srv) {
			cl, err := proto.Dial(tt.sock)
			if err == nil {
				for range 4 {
					p, narFile, h := tt.newPath()
					b, err := os.ReadFile(narFile)
					if err != nil {
						t.Fatal(err)
					}
					sum := sha256.Sum256(b)
					var refs []string
					if ref := tt.anyExpected(); ref != "" {
						refs = []string{ref}
					}
					err = cl.AddToStoreNar(proto.AddInfo{
						Path: p, NarHash: hex.EncodeToString(sum[:]), NarSize: uint64(len(b)),
						References: refs, DontCheckSigs: true,
					}, bytes.NewReader(b))
					if err != nil {
						var re *proto.RemoteError
						if errors.As(err, &re) && mode == "after" {
							t.Errorf("round %d: casnix refused %s with no cut: %v", r, p, err)
						}
						break
					}
					ack(p, h)
				}
				cl.Close()
			}
		}
	case tBackup:
		name := fmt.Sprintf("backup-%d", r)
		want := maps.Clone(tt.expected)
		if start("backup", filepath.Join(tt.mnt, name)).wait(2*time.Minute) == nil {
			res.backupDir, res.backupWant = name, want
		}
	case tGC:
		args := []string{"gc", "--min-dead", "0.01", "--no-runtime-roots"}
		if len(tt.expected) == 0 {
			args = append(args, "--force")
		}
		start(args...).wait(2 * time.Minute)
	case tRestore:
		res.restoreTry = true
		res.restored = start("restore", "--force", filepath.Join(tt.mnt, tt.backup)).wait(2*time.Minute) == nil
	case tNixCopy:
		os.Remove(tt.sock)
		srv := start("serve", "--socket", tt.sock, "--no-require-sigs", "--shutdown-timeout", "1s")
		if !tt.waitSocket(srv) {
			break
		}
		for _, c := range copies {
			cmd := exec.Command("nix", append([]string{"copy", "--no-check-sigs", "--from", "local?root=" + tt.fix.Root,
				"--to", "unix://" + tt.sock}, c.roots...)...)
			cmd.Env = append(os.Environ(), nixtest.NixEnv(t)...)
			p := tt.startCmd(cmd)
			procs = append(procs, p)
			if p.waitOrCut(cfs, 2*time.Minute) != nil {
				break
			}
			for _, q := range slices.Sorted(maps.Keys(c.closure)) {
				pi := c.closure[q]
				ack(q, pi.NarHash)
				res.refs[q] = pi.References
			}
		}
	case tExport:
		// Two exports, so that a cut in the second finds the first's acknowledged.
		cache := filepath.Join(tt.mnt, tCacheDir)
	exports:
		for range 2 {
			roots := tt.someExpected(1 + tt.rng.IntN(3))
			if len(roots) == 0 {
				break
			}
			if start(append([]string{"export", "--to", "file://" + cache}, roots...)...).wait(2*time.Minute) != nil {
				break
			}
			for _, p := range closureOf(roots, tt.valid) {
				// Acknowledged once its narinfo is there (seen through the mount: an
				// error other than "not there" means the power is already off).
				_, err := os.Stat(filepath.Join(cache, narinfoName(p)))
				switch {
				case err == nil:
					logAck(tt.exportLog, fmt.Sprintf("%s\t%s\n", p, tt.valid[p].NarHash))
				case errors.Is(err, os.ErrNotExist):
					tt.fail(r, ph, "casnix export %s exited 0 with no narinfo for %s", roots, p)
				default:
					break exports
				}
			}
		}
	}
	dur := time.Since(began)
	fsyncs := cfs.Stats().Fsyncs

	inside := false
	switch mode {
	case "fsync":
		inside = cutAt <= fsyncs
		if inside {
			tt.st.fsyncCuts++
		}
	case "time":
		if !timer.Stop() {
			inside = <-timerFired
			if inside {
				tt.st.timeCuts++
			}
		}
	}
	if inside {
		tt.st.cuts[ph]++
	} else {
		tt.calFsyncs[ph] = max(tt.calFsyncs[ph], fsyncs)
		tt.calDur[ph] = max(tt.calDur[ph], dur)
	}
	report, err := cfs.PowerCut()
	if err != nil {
		t.Fatalf("round %d: cut: %v", r, err)
	}
	for _, p := range procs {
		p.kill()
	}
	if err := cfs.Unmount(); err != nil {
		t.Fatalf("round %d: unmount: %v", r, err)
	}
	t.Logf("round %d %s: cut %s (fsync %d of %d, %v after %v preparing), inside=%v, %d acknowledged; %+v", r, tPhaseNames[ph], mode, cutAt, fsyncs, dur.Round(time.Millisecond), prep.Round(time.Millisecond), inside, acked, report)
	if !inside {
		// With no cut inside the phase, every process must have succeeded (serve was
		// killed by the harness, after the cut).
		for _, p := range procs {
			if p.cmd.ProcessState.Success() || p.cmd.Args[3] == "serve" {
				continue
			}
			tt.st.phaseErrors++
			t.Errorf("round %d: casnix %q failed with no cut inside the phase:\n%s", r, p.cmd.Args[1:], p.out.String())
		}
	}
	tt.check(r, ph, data, res)
}

// tCacheDir is export's binary cache dir, at the root of the mount (as the backups are).
const tCacheDir = "cache"

// tCopyFixture builds the closures nixcopy rounds copy along with fresh ones, in the
// shapes of nixtest's fixture (a chain, a diamond, a self reference, a symlink into
// another path, an odd name, a multi-output derivation, a content-addressed path) but
// only those: the whole fixture would double the short run's time.
const tCopyFixture = `[
  (let c1 = mk "chain-1" "echo one > $out";
       c2 = mk "chain-2" "mkdir $out; echo ${c1} > $out/dep";
   in mk "chain-3" "echo ${c2} > $out")
  (let base = mk "diamond-base" "mkdir $out; echo base > $out/base";
       left = mk "diamond-left" "mkdir $out; ln -s ${base}/base $out/base-link";
       right = mk "diamond-right" "mkdir $out; echo ${base} > $out/ref";
   in mk "diamond-top" "mkdir $out; echo ${left} ${right} > $out/refs")
  (mk "self-ref" "mkdir $out; echo $out > $out/self; ln -s $out/self $out/self-link")
  (mk "symlink" "ln -s ${mk "target" "echo target > $out"} $out")
  (mk "name+with=special?chars_.-" "echo weird > $out")
  (derivation {
    name = "multi"; system = builtins.currentSystem; builder = busybox;
    outputs = [ "out" "dev" ];
    args = [ "sh" "-euc" "mkdir $out $dev; echo $dev > $out/dev; echo dev > $dev/x" ];
  })
  (mk "uses-ca" "echo ${busybox} > $out")
]`

// populateCopySource makes the real Nix store nixcopy rounds copy from: the builder (a
// static busybox added as a content-addressed path) and tCopyFixture built in it.
func (tt *torture) populateCopySource() {
	start := time.Now()
	bb := filepath.Join(tt.work, "bb", "bin", "busybox")
	if err := os.MkdirAll(filepath.Dir(bb), 0o755); err != nil {
		tt.t.Fatal(err)
	}
	raw, err := os.ReadFile("/bin/busybox")
	if err != nil {
		nixtest.SkipOrFatal(tt.t, "nixcopy needs a static /bin/busybox as its builder: %v", err)
	}
	if err := os.WriteFile(bb, raw, 0o755); err != nil {
		tt.t.Fatal(err)
	}
	s := nixtest.NewStore(tt.t)
	tt.fix = &nixtest.Fixture{Store: s, Outputs: map[string]string{"busybox-src": s.Add(tt.t, filepath.Join(tt.work, "bb"))}}
	tt.fixRoots = tt.fix.BuildExpr(tt.t, fmt.Sprintf("let mk = name: script: derivation { inherit name; system = builtins.currentSystem; builder = busybox; args = [ \"sh\" \"-euc\" script ]; }; in %s",
		tCopyFixture))
	tt.t.Logf("nixcopy source store %s: %d closures built in %v", s.Root, len(tt.fixRoots), time.Since(start).Round(time.Millisecond))
}

// nixCopySet is one `nix copy` of a nixcopy round: the roots it names, and their
// closure with the source store's path-infos (narHash normalized).
type nixCopySet struct {
	roots   []string
	closure map[string]nixtest.PathInfo
}

// tCopyBatch is how many closures buildCopies builds at once: one nix-build's
// evaluation costs more than the builds, and a short run needs about this many.
const tCopyBatch = 10

// buildCopies builds n fresh closures of random data in the fixture store (with fixture
// paths among their references), and pairs each with a fixture closure: one nix copy
// each.
func (tt *torture) buildCopies(n int) []nixCopySet {
	tt.copyBatches++
	// One multi-output derivation per closure (one build, three paths): out -> lib ->
	// data, lib also referring to a fixture path.
	var expr strings.Builder
	expr.WriteString("[\n")
	var fixRoots []string
	for j := range n {
		fix := tt.fixRoots[tt.rng.IntN(len(tt.fixRoots))]
		fixRoots = append(fixRoots, tt.fixRoots[tt.rng.IntN(len(tt.fixRoots))])
		fmt.Fprintf(&expr, `(derivation {
  name = "tort-copy-%d-%d";
  system = builtins.currentSystem;
  builder = busybox;
  outputs = [ "out" "lib" "data" ];
  args = [ "sh" "-euc" "mkdir $out $lib $data; head -c %d /dev/urandom > $data/blob; echo $data ${builtins.storePath %q} > $lib/refs; head -c %d /dev/urandom > $lib/blob; echo $lib > $out/lib; head -c %d /dev/urandom > $out/blob" ];
})
`, tt.copyBatches, j, 4<<10+tt.rng.IntN(96<<10), fix, 4<<10+tt.rng.IntN(96<<10), 4<<10+tt.rng.IntN(64<<10))
	}
	expr.WriteString("]")
	var tops []string
	for _, p := range tt.fix.BuildExpr(tt.t, expr.String()) {
		if !strings.HasSuffix(p, "-lib") && !strings.HasSuffix(p, "-data") {
			tops = append(tops, p)
		}
	}
	if len(tops) != n {
		tt.t.Fatalf("nixcopy: built %q, want %d out paths", tops, n)
	}
	all := tt.fix.PathInfos(tt.t)
	for p, pi := range all {
		h, err := nixtest.NormalizeSHA256(pi.NarHash)
		if err != nil {
			tt.t.Fatalf("nixcopy: %s: %v", p, err)
		}
		pi.NarHash = h
		all[p] = pi
	}
	var sets []nixCopySet
	for j, top := range tops {
		roots := []string{top, fixRoots[j]}
		c := nixCopySet{roots: roots, closure: map[string]nixtest.PathInfo{}}
		todo := slices.Clone(roots)
		for len(todo) > 0 {
			p := todo[len(todo)-1]
			todo = todo[:len(todo)-1]
			if _, seen := c.closure[p]; seen {
				continue
			}
			pi, ok := all[p]
			if !ok {
				tt.t.Fatalf("nixcopy: %s is not valid in the fixture store", p)
			}
			c.closure[p] = pi
			todo = append(todo, pi.References...)
		}
		sets = append(sets, c)
	}
	return sets
}

// someExpected returns up to n random paths that are valid and stay so: what an export
// round exports.
func (tt *torture) someExpected(n int) []string {
	ps := slices.Sorted(maps.Keys(tt.expected))
	tt.rng.Shuffle(len(ps), func(i, j int) { ps[i], ps[j] = ps[j], ps[i] })
	return ps[:min(n, len(ps))]
}

// closureOf returns the closure of roots under the references of infos, sorted.
func closureOf(roots []string, infos map[string]pathInfoJSONT) []string {
	seen := map[string]bool{}
	todo := slices.Clone(roots)
	for len(todo) > 0 {
		p := todo[len(todo)-1]
		todo = todo[:len(todo)-1]
		if !seen[p] {
			seen[p] = true
			todo = append(todo, infos[p].References...)
		}
	}
	return slices.Sorted(maps.Keys(seen))
}

// narinfoName is the narinfo file name of store path p in a binary cache.
func narinfoName(p string) string {
	return filepath.Base(p)[:32] + ".narinfo"
}

// exportsLogged counts the exported paths acknowledged since the cache dir was made.
func (tt *torture) exportsLogged() int {
	b, err := os.ReadFile(tt.exportLog)
	if err != nil && !errors.Is(err, os.ErrNotExist) {
		tt.t.Fatal(err)
	}
	return bytes.Count(b, []byte("\n"))
}

// checkExports checks every export acknowledged since the cache dir was made (I3) on
// the state the cut left, and returns what is wrong.
func (tt *torture) checkExports() []string {
	b, err := os.ReadFile(tt.exportLog)
	if err != nil && !errors.Is(err, os.ErrNotExist) {
		tt.t.Fatal(err)
	}
	cache := filepath.Join(tt.backing, tCacheDir)
	var bad []string
	seen := map[string]bool{} // a path exported again is logged again
	for line := range strings.Lines(string(b)) {
		if seen[line] {
			continue
		}
		seen[line] = true
		p, h, _ := strings.Cut(strings.TrimSuffix(line, "\n"), "\t")
		tt.st.exports++
		if err := checkExported(cache, p, h); err != nil {
			bad = append(bad, err.Error())
		}
	}
	return bad
}

// checkExported checks that the cache dir holds p's narinfo, and the NAR file it names
// with its FileSize and FileHash, decompressing to a NAR of narHash.
func checkExported(cache, p, narHash string) error {
	f, err := os.Open(filepath.Join(cache, narinfoName(p)))
	if err != nil {
		return fmt.Errorf("exported %s: %w", p, err)
	}
	in, err := binarycache.ParseNarinfo(f, nixtest.StoreDir)
	f.Close()
	if err != nil {
		return fmt.Errorf("exported %s: %w", p, err)
	}
	if got := "sha256:" + nixtest.NixBase32Encode(in.NarHash[:]); in.Name != filepath.Base(p) || got != narHash {
		return fmt.Errorf("exported %s: narinfo says %s with NarHash %s, want NarHash %s", p, in.Name, got, narHash)
	}
	file, err := os.ReadFile(filepath.Join(cache, filepath.FromSlash(in.URL)))
	if err != nil {
		return fmt.Errorf("exported %s: NAR file: %w", p, err)
	}
	fileHash := sha256.Sum256(file)
	if int64(len(file)) != in.FileSize || !bytes.Equal(fileHash[:], in.FileHash) {
		return fmt.Errorf("exported %s: NAR file %s has %d bytes and hash %x, narinfo says %d and %x", p, in.URL, len(file), fileHash, in.FileSize, in.FileHash)
	}
	var nr io.Reader = bytes.NewReader(file)
	switch in.Compression {
	case "zstd":
		d, err := zstd.NewReader(nr)
		if err != nil {
			return fmt.Errorf("exported %s: %w", p, err)
		}
		defer d.Close()
		nr = d
	case "none":
	default:
		return fmt.Errorf("exported %s: compression %q, want zstd (export's default)", p, in.Compression)
	}
	h := sha256.New()
	n, err := io.Copy(h, nr)
	if err != nil {
		return fmt.Errorf("exported %s: decompress %s: %w", p, in.URL, err)
	}
	if got := h.Sum(nil); n != in.NarSize || !bytes.Equal(got, in.NarHash[:]) {
		return fmt.Errorf("exported %s: NAR file %s holds %d bytes of NAR hash %x, narinfo says %d and %x", p, in.URL, n, got, in.NarSize, in.NarHash)
	}
	return nil
}

// anyExpected returns a random path that is valid and stays so (or "" if none): a
// reference for a new path.
func (tt *torture) anyExpected() string {
	if len(tt.expected) == 0 || tt.rng.IntN(2) == 0 {
		return ""
	}
	ps := slices.Sorted(maps.Keys(tt.expected))
	return ps[tt.rng.IntN(len(ps))]
}

// waitSocket waits for the daemon's socket, or for srv to exit (a cut while it opens).
func (tt *torture) waitSocket(srv *proc) bool {
	for range 400 {
		if _, err := os.Stat(tt.sock); err == nil {
			return true
		}
		select {
		case err := <-srv.done:
			srv.done <- err
			return false
		case <-time.After(25 * time.Millisecond):
		}
	}
	tt.t.Fatalf("casnix serve did not listen in 10s:\n%s", srv.out.String())
	return false
}

// fail records a broken invariant: a test failure, or in the negative control a count.
func (tt *torture) fail(r int, ph tPhase, format string, args ...any) {
	msg := fmt.Sprintf("round %d (%s, crashfs seed %d, cut at fsync %d): ", r, tPhaseNames[ph], tt.roundSeed, tt.roundCutAt) + fmt.Sprintf(format, args...)
	tt.st.failed = append(tt.st.failed, msg)
	if !tt.lenient {
		tt.t.Error(msg)
	}
}

// validInfos opens dir with casnix (a restart) and returns its valid paths' infos.
func (tt *torture) validInfos(dir string) (map[string]pathInfoJSONT, error) {
	cmd := exec.Command(tt.bin, "--data-dir", dir, "path-info", "--all", "--json")
	cmd.Env = tt.env
	var stderr bytes.Buffer
	cmd.Stderr = &stderr
	out, err := cmd.Output()
	if err != nil {
		return nil, fmt.Errorf("casnix path-info --all: %v\n%s", err, stderr.String())
	}
	var list []pathInfoJSONT
	if err := json.Unmarshal(out, &list); err != nil {
		return nil, fmt.Errorf("casnix path-info --all --json: %v", err)
	}
	m := map[string]pathInfoJSONT{}
	for _, pi := range list {
		h, err := nixtest.NormalizeSHA256(pi.NarHash)
		if err != nil {
			return nil, err
		}
		pi.NarHash = h
		m[pi.Path] = pi
	}
	return m, nil
}

// pathInfoJSONT is the part of casnix path-info --json the checks use.
type pathInfoJSONT struct {
	Path       string   `json:"path"`
	NarHash    string   `json:"narHash"`
	References []string `json:"references"`
}

func (tt *torture) verify(dir string) error {
	cmd := exec.Command(tt.bin, "--data-dir", dir, "verify")
	cmd.Env = tt.env
	if out, err := cmd.CombinedOutput(); err != nil {
		return fmt.Errorf("casnix verify: %v\n%s", err, out)
	}
	return nil
}

// dumpHash renders p with casnix dump and returns its NAR's hash.
func (tt *torture) dumpHash(dir, p string) (string, error) {
	cmd := exec.Command(tt.bin, "--data-dir", dir, "dump", p)
	cmd.Env = tt.env
	h := sha256.New()
	var stderr bytes.Buffer
	cmd.Stdout, cmd.Stderr = h, &stderr
	if err := cmd.Run(); err != nil {
		return "", fmt.Errorf("casnix dump: %v: %s", err, bytes.TrimSpace(stderr.Bytes()))
	}
	return "sha256:" + nixtest.NixBase32Encode(h.Sum(nil)), nil
}

// missing lists the paths of want that valid lacks or holds with another narHash.
func missing(want map[string]string, valid map[string]pathInfoJSONT) []string {
	var out []string
	for p, h := range want {
		if pi, ok := valid[p]; !ok {
			out = append(out, p+" (not valid)")
		} else if pi.NarHash != h {
			out = append(out, fmt.Sprintf("%s (narHash %s, want %s)", p, pi.NarHash, h))
		}
	}
	slices.Sort(out)
	return out
}

// check restarts casnix on the state the cut left and checks I1, I2 and I4; then the
// valid set becomes what the next round must keep.
func (tt *torture) check(r int, ph tPhase, data string, res roundResult) {
	bad := len(tt.st.failed)
	// This round's acknowledgements, from the log outside the data dir.
	ackedNow := map[string]string{}
	f, err := os.Open(tt.ackLog)
	if err != nil && !errors.Is(err, os.ErrNotExist) {
		tt.t.Fatal(err)
	}
	if f != nil {
		sc := bufio.NewScanner(f)
		prefix := strconv.Itoa(r) + "\t"
		for sc.Scan() {
			if rest, ok := strings.CutPrefix(sc.Text(), prefix); ok {
				p, h, _ := strings.Cut(rest, "\t")
				ackedNow[p] = h
			}
		}
		f.Close()
	}

	valid, err := tt.validInfos(data)
	if err != nil {
		// I4: the data dir does not open by itself; everything acknowledged is lost to
		// the clients.
		tt.st.manual++
		tt.st.losses += len(ackedNow) + len(tt.expected)
		tt.fail(r, ph, "restart: %v", err)
	} else {
		verr := tt.verify(data)
		if verr != nil {
			tt.st.invalid++
			tt.fail(r, ph, "%v", verr)
		}
		for p, pi := range valid {
			for _, ref := range pi.References {
				if _, ok := valid[ref]; !ok {
					tt.st.invalid++
					tt.fail(r, ph, "%s is valid but its reference %s is not", p, ref)
				}
			}
		}
		want := maps.Clone(tt.expected)
		switch {
		case res.restored:
			want = tt.backupPaths
		case res.restoreTry:
			// Cut inside the restore: the old contents or the backup's, whole.
			if len(missing(want, valid)) > 0 && len(missing(tt.backupPaths, valid)) == 0 {
				want = tt.backupPaths
			}
		}
		tt.st.carried += len(want)
		maps.Copy(want, ackedNow)
		tt.st.acked += len(ackedNow)
		m := missing(want, valid)
		// nixcopy: the path-info must be the source's, references included.
		for _, p := range slices.Sorted(maps.Keys(res.refs)) {
			if pi, ok := valid[p]; ok && !slices.Equal(slices.Sorted(slices.Values(pi.References)), slices.Sorted(slices.Values(res.refs[p]))) {
				m = append(m, fmt.Sprintf("%s (references %q, nix copy sent %q)", p, pi.References, res.refs[p]))
			}
		}
		// Valid is not enough: the path must render to its narHash. verify checked
		// every path; this round's acknowledged ones, and all of them once verify
		// failed, are rendered one by one to name the lost ones.
		for _, p := range slices.Sorted(maps.Keys(want)) {
			if _, ok := valid[p]; !ok || valid[p].NarHash != want[p] {
				continue
			}
			if _, now := ackedNow[p]; !now && verr == nil {
				continue
			}
			if got, err := tt.dumpHash(data, p); err != nil || got != want[p] {
				m = append(m, fmt.Sprintf("%s (does not render: %s %v)", p, got, err))
			}
		}
		if len(m) > 0 {
			tt.st.losses += len(m)
			tt.fail(r, ph, "%d acknowledged or durable paths lost: %s", len(m), strings.Join(m, ", "))
		}
	}
	if res.backupDir != "" {
		dir := filepath.Join(tt.backing, res.backupDir)
		bvalid, err := tt.validInfos(dir)
		if err == nil {
			err = tt.verify(dir)
		}
		tt.st.backups++
		switch {
		case err != nil:
			tt.st.losses += len(res.backupWant)
			tt.fail(r, ph, "acknowledged backup %s: %v", res.backupDir, err)
		case len(missing(res.backupWant, bvalid)) > 0:
			m := missing(res.backupWant, bvalid)
			tt.st.losses += len(m)
			tt.fail(r, ph, "acknowledged backup %s lacks %s", res.backupDir, strings.Join(m, ", "))
		default:
			tt.backup, tt.backupPaths = res.backupDir, map[string]string{}
			for p, pi := range bvalid {
				tt.backupPaths[p] = pi.NarHash
			}
		}
	}
	if ph == tExport {
		if m := tt.checkExports(); len(m) > 0 {
			tt.st.losses += len(m)
			tt.fail(r, ph, "%d acknowledged exports lost: %s", len(m), strings.Join(m, "; "))
		}
	}
	if len(tt.st.failed) > bad {
		// Only the negative control goes on after a failure: from an empty data dir.
		if !tt.lenient {
			tt.t.FailNow()
		}
		if err := os.RemoveAll(tt.backing); err != nil {
			tt.t.Fatal(err)
		}
		if err := os.Mkdir(tt.backing, 0o755); err != nil {
			tt.t.Fatal(err)
		}
		if err := os.Remove(tt.exportLog); err != nil && !errors.Is(err, os.ErrNotExist) {
			tt.t.Fatal(err)
		}
		tt.expected, tt.valid, tt.backup, tt.backupPaths = map[string]string{}, nil, "", nil
		return
	}
	tt.expected, tt.valid = map[string]string{}, valid
	for p, pi := range valid {
		tt.expected[p] = pi.NarHash
	}
	tt.writeRoots()
}
