package tests

import (
	"bufio"
	"bytes"
	"crypto/sha256"
	"encoding/hex"
	"encoding/json"
	"errors"
	"fmt"
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
	tPhases
)

var tPhaseNames = [tPhases]string{"import", "daemon", "backup", "gc", "restore"}

// tortureStats is the summary a run prints.
type tortureStats struct {
	rounds, cuts        [tPhases]int // rounds per phase; rounds whose cut landed inside the phase
	fsyncCuts, timeCuts int          // how the cuts inside a phase were triggered
	acked               int          // acknowledged paths (this round's) checked after the cut
	carried             int          // paths valid after an earlier cut, checked again
	backups             int          // acknowledged backups verified after the cut
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
	ackLog                string // outside the data dir: one line per acknowledgement
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
//   - I4: casnix opens the data dir with no manual step.
func TestTorture(t *testing.T) {
	rounds := tortureRounds
	if s := os.Getenv(tortureRoundsEnv); s != "" {
		n, err := strconv.Atoi(s)
		if err != nil || n < 1 {
			t.Fatalf("%s=%q: want a positive number", tortureRoundsEnv, s)
		}
		rounds = n
	}
	tt := newTorture(t, "torture", []tPhase{tImport, tDaemon, tBackup, tGC, tImport, tRestore, tDaemon, tGC})
	tt.run(rounds)
	st := tt.st
	if st.losses != 0 || st.invalid != 0 || st.manual != 0 {
		t.Errorf("torture: %d losses, %d invalid states, %d manual restarts:\n%s", st.losses, st.invalid, st.manual, strings.Join(st.failed, "\n"))
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
		expected: map[string]string{},
		ackLog:   filepath.Join(work, "acks.log"),
		phases:   phases,
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
	for r := range rounds {
		tt.round(r)
	}
	st := &tt.st
	var b strings.Builder
	fmt.Fprintf(&b, "torture summary (%s, seed %d): %d rounds\n", tt.seedName, tt.seed, rounds)
	for p := range tPhases {
		if st.rounds[p] > 0 {
			fmt.Fprintf(&b, "  %-8s %4d rounds, %4d cut inside the phase\n", tPhaseNames[p], st.rounds[p], st.cuts[p])
		}
	}
	fmt.Fprintf(&b, "  cuts: %d at an fsync, %d at a random time (the rest after the phase)\n", st.fsyncCuts, st.timeCuts)
	fmt.Fprintf(&b, "  acknowledged paths checked: %d (plus %d earlier durable paths re-checked, %d backups verified)\n", st.acked, st.carried, st.backups)
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
	p := &proc{cmd: exec.Command(tt.bin, append([]string{"--data-dir", dataDir}, args...)...), done: make(chan error, 1)}
	p.cmd.Env = tt.env
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

// kill stops p if it still runs and waits for it.
func (p *proc) kill() {
	_ = p.cmd.Process.Signal(syscall.SIGKILL)
	err := <-p.done
	p.done <- err
}

// roundResult is what a phase reports for the check.
type roundResult struct {
	backupDir  string            // backup acknowledged (exit 0), under backing
	backupWant map[string]string // paths valid when the backup started
	restored   bool              // restore exited 0
	restoreTry bool              // a restore ran (acknowledged or not)
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
	case tt.calFsyncs[ph] == 0 || n == 0:
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
	var res roundResult
	acked := 0
	ack := func(path, hash string) {
		f, err := os.OpenFile(tt.ackLog, os.O_WRONLY|os.O_APPEND|os.O_CREATE, 0o644)
		if err != nil {
			t.Fatal(err)
		}
		fmt.Fprintf(f, "%d\t%s\t%s\n", r, path, hash)
		if err := f.Close(); err != nil {
			t.Fatal(err)
		}
		acked++
	}
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
	t.Logf("round %d %s: cut %s (fsync %d of %d, %v), inside=%v, %d acknowledged; %+v", r, tPhaseNames[ph], mode, cutAt, fsyncs, dur.Round(time.Millisecond), inside, acked, report)
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
		tt.expected, tt.backup, tt.backupPaths = map[string]string{}, "", nil
		return
	}
	tt.expected = map[string]string{}
	for p, pi := range valid {
		tt.expected[p] = pi.NarHash
	}
	tt.writeRoots()
}
