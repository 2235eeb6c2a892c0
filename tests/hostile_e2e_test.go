package tests

import (
	"crypto/sha256"
	"encoding/hex"
	"encoding/json"
	"errors"
	"fmt"
	"io"
	"maps"
	"math/rand/v2"
	"net"
	"os"
	"path/filepath"
	"slices"
	"strconv"
	"strings"
	"sync"
	"sync/atomic"
	"testing"
	"time"

	"github.com/nix-community/go-nix/pkg/narinfo/signature"
	"golang.org/x/sys/unix"

	"github.com/casnix/casnix/proto"
	"github.com/casnix/casnix/store"
	"github.com/casnix/casnix/tests/nixtest"
)

// Parameters of TestHostileClients.
const (
	hostileConns       = 64              // attacking connections (goroutines) of the untrusted user
	hostileReaders     = 16              // honest readers (root), every answer checked
	hostileStall       = 5 * time.Second // casnix serve --stall-timeout and --handshake-timeout
	hostileVmDataLimit = 256 << 20       // the daemon's committed memory (VmData) must stay below this
	// hostileMemoryLimit is the daemon's --memory-limit: its default (auto) grows with the
	// machine, and the test checks that a daemon held to 128 MiB stays within it.
	hostileMemoryLimit  = "128MiB"
	hostileFloodSize    = 100              // connections one flooding attacker opens at once
	hostileCloseSlack   = 20 * time.Second // how long past the stall timeout a stalled connection may stay open
	hostileUID          = 65534
	hostileAttackerEnv  = "CASNIX_HOSTILE_ATTACKER" // set: this test binary is the attacker (see TestMain)
	hostileCopyClosures = 4
)

// hostileSeconds is how long the attack runs: 45 s, or CASNIX_HOSTILE_SECONDS.
func hostileSeconds(t *testing.T) int {
	if s := os.Getenv("CASNIX_HOSTILE_SECONDS"); s != "" {
		n, err := strconv.Atoi(s)
		if err != nil || n <= 0 {
			t.Fatalf("CASNIX_HOSTILE_SECONDS=%q", s)
		}
		return n
	}
	return 45
}

// hostileConfig is what the attacker process is told (as JSON in hostileAttackerEnv).
type hostileConfig struct {
	Socket  string
	Seconds int
	Stall   time.Duration
	Big     string   // the path with the biggest NAR
	Valid   []string // valid paths
	// Target is a valid input-addressed path that forged derivations claim as their output.
	Target string
	// RealisationID is registered (by root) to a valid path; ForgedRealisation maps it to
	// another one and carries a valid signature by a key the daemon trusts.
	RealisationID     string
	ForgedRealisation string
}

// hostileReport is what the attacker prints when it is done.
type hostileReport struct {
	Counts map[string]int
	// Failures are outcomes the daemon must never produce (an incompatible realisation
	// accepted, a stalled connection held forever, an untrusted delete allowed, …).
	Failures []string
	// ForgedDrvs are the forged derivations the daemon accepted as text paths.
	ForgedDrvs []string
}

// TestHostileClients runs `casnix serve` on the fixture store while a trusted real
// `nix copy --to` (host Nix 2.8) adds new closures and 16 readers check every answer, and
// 64 connections of another uid (nobody) attack the daemon with everything a local user
// can send: lengths announcing 1 GiB with nothing behind them (strings, lists, NARs,
// framed chunks), ops stalled half-way, NARs requested and never read, unknown ops and
// garbage, connection floods, indirect roots pointing anywhere (/etc/passwd/x), perm
// roots, forged .drv files claiming existing paths as outputs, an incompatible (but
// validly signed) realisation for an existing one, loops of `--gc --print-dead` and of
// VerifyStore hung up at once, untrusted deletions and repairs. Then: every copy
// completed and its paths are valid with the source's path-info; no reader saw a wrong
// answer or an error; the daemon's committed memory (VmData) stayed under 256 MiB; the
// forged derivations changed no answer about the paths they claim; the realisation is
// unchanged; no hung-up VerifyStore is left running and one whose client hangs up frees
// verify.lock at once; `casnix gc` and `casnix verify` work and are clean; the daemon
// stops cleanly.
func TestHostileClients(t *testing.T) {
	nixtest.RequireHostNix(t)
	sf := newServedFixture(t)
	exp := newLoadExpect(t, sf)
	exp.allValidMayGrow = true

	// New closures for the trusted copies, built after the import so casnix lacks them;
	// they refer to no fixture path, so the readers' referrer answers do not change.
	var copies [][]string
	for i := range hostileCopyClosures {
		copies = append(copies, sf.BuildExpr(t, fmt.Sprintf(`builtins.genList (j: derivation {
  name = "hostile-copy-%d-${toString j}";
  system = builtins.currentSystem;
  builder = busybox;
  args = [ "sh" "-euc" "mkdir -p $out/d; head -c $((1500000 + %d * 1000 + ${toString j})) /dev/urandom > $out/data; seq 1 20000 > $out/d/seq; echo ${toString j} > $out/d/j" ];
}) 6`, i, i)))
	}
	allCopied := slices.Concat(copies...)
	srcInfos := sf.PathInfos(t, allCopied...)

	// The socket and the attacker binary must be reachable by nobody.
	sockDir := t.TempDir()
	attackDir := t.TempDir()
	for _, p := range []string{sockDir, filepath.Dir(sockDir), attackDir, filepath.Dir(attackDir)} {
		if err := os.Chmod(p, 0o755); err != nil {
			t.Fatal(err)
		}
	}
	socket := filepath.Join(sockDir, "casnix.sock")
	d := sf.Cas.Serve(t, socket, "--memory-limit", hostileMemoryLimit, "--stall-timeout", hostileStall.String(), "--handshake-timeout", hostileStall.String(),
		"--trusted-public-keys", sf.PublicKeys[0])

	// A realisation registered by root, and an incompatible one, validly signed, for the
	// attacker to try.
	target := sf.Path(t, "random")
	other := sf.Path(t, "big-file")
	rid := "sha256:" + hex.EncodeToString(sha256Of("casnix hostile realisation")) + "!out"
	good := signedRealisation(t, sf.SecretKeys[0], rid, target)
	forged := signedRealisation(t, sf.SecretKeys[0], rid, other)
	root, err := rawDial(socket)
	if err != nil {
		t.Fatal(err)
	}
	defer root.Close()
	if err := root.registerDrvOutput(good); err != nil {
		t.Fatalf("root: RegisterDrvOutput: %v", err)
	}
	derivers0, err := root.queryValidDerivers(target)
	if err != nil {
		t.Fatalf("QueryValidDerivers %s: %v", target, err)
	}

	cfg := hostileConfig{
		Socket: socket, Seconds: hostileSeconds(t), Stall: hostileStall, Big: exp.big, Valid: exp.valid,
		Target: target, RealisationID: rid, ForgedRealisation: forged,
	}
	attacker := startAttacker(t, attackDir, cfg)

	// Committed memory, every 200 ms.
	start := time.Now()
	deadline := start.Add(time.Duration(cfg.Seconds) * time.Second)
	var vmMax atomic.Int64
	var vmSamples atomic.Int64
	samplerDone := make(chan struct{})
	go func() {
		defer close(samplerDone)
		for time.Now().Before(deadline.Add(hostileCloseSlack)) && !d.Exited() {
			if v, err := d.VmData(); err == nil {
				vmSamples.Add(1)
				for old := vmMax.Load(); v > old && !vmMax.CompareAndSwap(old, v); old = vmMax.Load() {
				}
			}
			time.Sleep(200 * time.Millisecond)
		}
	}()

	// Honest readers, as root: every answer checked.
	st := &loadStats{}
	var wg sync.WaitGroup
	for i := range hostileReaders {
		wg.Add(1)
		go func() {
			defer wg.Done()
			rng := rand.New(rand.NewPCG(uint64(i), uint64(start.UnixNano())))
			var cl *proto.Client
			defer func() {
				if cl != nil {
					cl.Close()
				}
			}()
			for time.Now().Before(deadline) {
				if cl == nil {
					var err error
					if cl, err = proto.Dial(socket); err != nil {
						st.fail("reader %d: dial: %v", i, err)
						time.Sleep(100 * time.Millisecond)
						continue
					}
				}
				t0 := time.Now()
				if err := exp.randomOp(cl, rng, st); err != nil {
					st.fail("reader %d: %v", i, err)
					cl.Close()
					cl = nil
				}
				if d := time.Since(t0); d > 10*time.Second {
					st.fail("reader %d: one read took %s", i, d.Round(time.Millisecond))
				}
			}
		}()
	}

	// Trusted copies, one closure after another, spread over the attack.
	copyErrs := make(chan error, len(copies))
	copyTimes := make([]time.Duration, len(copies))
	wg.Add(1)
	go func() {
		defer wg.Done()
		gap := time.Duration(cfg.Seconds) * time.Second / time.Duration(len(copies)+1)
		for i, paths := range copies {
			time.Sleep(time.Until(start.Add(time.Duration(i+1) * gap)))
			t0 := time.Now()
			cmd := &nixtest.Cmd{Name: "nix", Args: append([]string{"copy", "--no-check-sigs", "--from", "local?root=" + sf.Root, "--to", d.URL()}, paths...),
				Env: nixtest.NixEnv(t), Timeout: 3 * time.Minute}
			if r := cmd.Try(); !r.OK() {
				copyErrs <- fmt.Errorf("nix copy of closure %d during the attack:\n%s", i, r)
			}
			copyTimes[i] = time.Since(t0)
		}
	}()

	wg.Wait()
	rep := attacker.wait(t)
	<-samplerDone

	t.Logf("attack: %s", fmtCounts(rep.Counts))
	t.Logf("readers: %d ops (%s)", st.ops.Load(), st.perOp())
	t.Logf("trusted nix copy of %d closures (%d paths) took %v", len(copies), len(allCopied), copyTimes)
	t.Logf("daemon VmData: max %.1f MiB over %d samples (limit %d MiB)", float64(vmMax.Load())/(1<<20), vmSamples.Load(), hostileVmDataLimit>>20)

	for _, f := range rep.Failures {
		t.Errorf("attacker: %s", f)
	}
	for _, e := range st.errors() {
		t.Errorf("reader: %s", e)
	}
	close(copyErrs)
	for err := range copyErrs {
		t.Error(err)
	}
	if d.Exited() {
		t.Fatalf("casnix serve died during the attack: %v\n%s", d.Stop(0), clipOutput([]byte(d.Output())))
	}
	if vmMax.Load() > hostileVmDataLimit {
		t.Errorf("daemon VmData reached %.1f MiB, limit %d MiB", float64(vmMax.Load())/(1<<20), hostileVmDataLimit>>20)
	}
	if vmSamples.Load() == 0 {
		t.Errorf("no VmData sample")
	}
	for _, kind := range hostileAttacks {
		if rep.Counts[kind.name] == 0 {
			t.Errorf("attack %q never ran", kind.name)
		}
	}

	// The copies are all there, as the source has them.
	got := sf.Cas.PathInfos(t, allCopied...)
	for _, p := range allCopied {
		if diff := nixtest.ComparePathInfo(got[p], srcInfos[p]); len(diff) > 0 {
			t.Errorf("%s after the attack: %s", p, strings.Join(diff, "; "))
		}
	}

	// Forged derivations changed nothing about the paths they claim.
	root2, err := rawDial(socket)
	if err != nil {
		t.Fatalf("root after the attack: %v", err)
	}
	defer root2.Close()
	if derivers, err := root2.queryValidDerivers(target); err != nil {
		t.Errorf("QueryValidDerivers %s after the attack: %v", target, err)
	} else if !slices.Equal(derivers, derivers0) {
		t.Errorf("QueryValidDerivers %s = %q after the attack, %q before: forged derivations were believed", target, derivers, derivers0)
	}
	for _, drv := range rep.ForgedDrvs {
		m, err := root2.queryDerivationOutputMap(drv)
		if err != nil {
			continue // refusing to answer about a bogus derivation is fine
		}
		for out, p := range m {
			if p == target {
				t.Errorf("QueryDerivationOutputMap %s: output %s = %s, a path that derivation did not build", drv, out, p)
			}
		}
	}
	// The realisation is the one root registered.
	if rs, err := root2.queryRealisation(rid); err != nil || len(rs) != 1 {
		t.Errorf("QueryRealisation %s after the attack: %q, %v", rid, rs, err)
	} else if r, err := store.ParseRealisation(rs[0]); err != nil || r.OutPath != filepath.Base(target) {
		t.Errorf("QueryRealisation %s after the attack: %s (%v), want out path %s", rid, rs[0], err, target)
	}

	checkVerifyHangup(t, socket, sf.Cas.DataDir)

	// casnix gc works beside the daemon (whatever roots the attacker made), and keeps
	// what it is told to; verify is clean.
	keep := filepath.Join(t.TempDir(), "keep")
	if err := os.WriteFile(keep, []byte(strings.Join(slices.Concat(sf.All, allCopied), "\n")+"\n"), 0o644); err != nil {
		t.Fatal(err)
	}
	if r := sf.Cas.Try("gc", "--keep", keep); !r.OK() {
		t.Errorf("casnix gc after the attack:\n%s", r)
	}
	if r := sf.Cas.Try("verify"); !r.OK() {
		t.Errorf("casnix verify after the attack:\n%s", r)
	}
	if missing := slices.DeleteFunc(slices.Clone(slices.Concat(sf.All, allCopied)), func(p string) bool {
		return sf.Cas.Try("path-info", p).OK()
	}); len(missing) > 0 {
		t.Errorf("after the attack and gc, %d kept paths are gone: %q", len(missing), missing)
	}
	// The daemon drains open connections on SIGTERM: hang up first.
	root.Close()
	root2.Close()
	if err := d.Stop(30 * time.Second); err != nil {
		t.Errorf("casnix serve after SIGTERM: %v\n%s", err, clipOutput([]byte(d.Output())))
	}
	checkServeLog(t, d)
}

func sha256Of(s string) []byte {
	h := sha256.Sum256([]byte(s))
	return h[:]
}

// signedRealisation returns the JSON of a realisation of id to path, signed with the
// secret key in keyFile.
func signedRealisation(t *testing.T, keyFile, id, path string) string {
	t.Helper()
	b, err := os.ReadFile(keyFile)
	if err != nil {
		t.Fatal(err)
	}
	sk, err := signature.LoadSecretKey(strings.TrimSpace(string(b)))
	if err != nil {
		t.Fatal(err)
	}
	r := &store.Realisation{ID: id, OutPath: filepath.Base(path), DependentRealisations: map[string]string{}}
	sig, err := sk.Sign(nil, r.Fingerprint())
	if err != nil {
		t.Fatal(err)
	}
	r.Signatures = []string{sig.String()}
	return r.JSON()
}

func fmtCounts(m map[string]int) string {
	var parts []string
	for _, k := range slices.Sorted(maps.Keys(m)) {
		parts = append(parts, fmt.Sprintf("%s %d", k, m[k]))
	}
	return strings.Join(parts, ", ")
}

// attackerProc is the attacker: this test binary, run as nobody.
type attackerProc struct {
	cmd  *nixtest.Cmd
	done chan *nixtest.Result
}

// startAttacker copies the test binary where nobody can run it and starts it as nobody,
// with cfg in hostileAttackerEnv (TestMain then runs hostileAttackerMain).
func startAttacker(t *testing.T, dir string, cfg hostileConfig) *attackerProc {
	t.Helper()
	self, err := os.Executable()
	if err != nil {
		t.Fatal(err)
	}
	bin := filepath.Join(dir, "attacker")
	nixtest.Run(t, "cp", self, bin)
	if err := os.Chmod(bin, 0o755); err != nil {
		t.Fatal(err)
	}
	js, err := json.Marshal(cfg)
	if err != nil {
		t.Fatal(err)
	}
	a := &attackerProc{done: make(chan *nixtest.Result, 1)}
	a.cmd = &nixtest.Cmd{
		Name:    "setpriv",
		Args:    []string{"--reuid=" + strconv.Itoa(hostileUID), "--regid=" + strconv.Itoa(hostileUID), "--clear-groups", "--", bin, "-test.run=^$"},
		Env:     []string{hostileAttackerEnv + "=" + string(js), "HOME=" + dir},
		Timeout: time.Duration(cfg.Seconds)*time.Second + 2*hostileCloseSlack + time.Minute,
	}
	go func() { a.done <- a.cmd.Try() }()
	return a
}

func (a *attackerProc) wait(t *testing.T) *hostileReport {
	t.Helper()
	r := <-a.done
	if !r.OK() {
		t.Fatalf("attacker process failed:\n%s", r)
	}
	var rep hostileReport
	if err := json.Unmarshal(r.Stdout, &rep); err != nil {
		t.Fatalf("attacker report: %v\n%s", err, r)
	}
	return &rep
}

// hostileAttackerMain is the attacker process: it runs the attacks of cfg for its
// duration on hostileConns connections and prints a hostileReport as JSON.
func hostileAttackerMain() int {
	var cfg hostileConfig
	if err := json.Unmarshal([]byte(os.Getenv(hostileAttackerEnv)), &cfg); err != nil {
		fmt.Fprintln(os.Stderr, "attacker config:", err)
		return 2
	}
	if os.Getuid() == 0 {
		fmt.Fprintln(os.Stderr, "the attacker must not run as root")
		return 2
	}
	a := &attack{cfg: cfg, deadline: time.Now().Add(time.Duration(cfg.Seconds) * time.Second), counts: map[string]int{}}
	var wg sync.WaitGroup
	for i := range hostileConns {
		wg.Add(1)
		go func() {
			defer wg.Done()
			kind := hostileAttacks[i%len(hostileAttacks)]
			rng := rand.New(rand.NewPCG(uint64(i), uint64(time.Now().UnixNano())))
			for n := 0; time.Now().Before(a.deadline); n++ {
				if err := kind.run(a, rng, i, n); err != nil {
					if isRemote(err) { // only the handshake returns the daemon's errors
						a.count("refused in the handshake")
						time.Sleep(200 * time.Millisecond)
						continue
					}
					a.count(kind.name + ": connection error")
					time.Sleep(50 * time.Millisecond)
					continue
				}
				a.count(kind.name)
			}
		}()
	}
	wg.Wait()
	a.mu.Lock()
	defer a.mu.Unlock()
	for i, f := range a.failures {
		if n := a.failSeen[f]; n > 1 {
			a.failures[i] = fmt.Sprintf("%s (%d times)", f, n)
		}
	}
	out, err := json.Marshal(hostileReport{Counts: a.counts, Failures: a.failures, ForgedDrvs: a.forged})
	if err != nil {
		fmt.Fprintln(os.Stderr, err)
		return 2
	}
	os.Stdout.Write(out)
	return 0
}

// attack is the attacker's shared state.
type attack struct {
	cfg      hostileConfig
	deadline time.Time

	mu       sync.Mutex
	counts   map[string]int
	failures []string
	failSeen map[string]int
	forged   []string
}

func (a *attack) count(what string) {
	a.mu.Lock()
	a.counts[what]++
	a.mu.Unlock()
}

func (a *attack) fail(format string, args ...any) {
	msg := fmt.Sprintf(format, args...)
	a.mu.Lock()
	defer a.mu.Unlock()
	if a.failSeen == nil {
		a.failSeen = map[string]int{}
	}
	// The same failure of many attempts is one message, counted.
	if a.failSeen[msg]++; a.failSeen[msg] == 1 && len(a.failures) < 30 {
		a.failures = append(a.failures, msg)
	}
}

// expectClosed waits for the daemon to close a connection that stalls in the middle of
// an op (an error reported first is fine): it must do so within its stall timeout plus
// some slack, and never answer the op.
func (a *attack) expectClosed(rc *rawConn, what string) {
	opened := time.Now()
	rc.c.SetReadDeadline(opened.Add(a.cfg.Stall + hostileCloseSlack))
	err := rc.result()
	if err == nil {
		a.fail("%s: the daemon answered the op", what)
		return
	}
	if isRemote(err) {
		_, err = io.Copy(io.Discard, rc.r) // then it closes
	}
	var ne net.Error
	if errors.As(err, &ne) && ne.Timeout() {
		a.fail("%s: the daemon held the stalled connection for %s", what, time.Since(opened).Round(time.Millisecond))
	}
}

// hostileAttack is one kind of attack; run makes one attempt on a connection of its own.
type hostileAttack struct {
	name string
	run  func(a *attack, rng *rand.Rand, worker, n int) error
}

// dialRun dials, runs f on the connection and closes it.
func dialRun(a *attack, f func(rc *rawConn) error) error {
	rc, err := rawDial(a.cfg.Socket)
	if err != nil {
		return err
	}
	defer rc.Close()
	return f(rc)
}

func (a *attack) pick(rng *rand.Rand) string { return a.cfg.Valid[rng.IntN(len(a.cfg.Valid))] }

// hostileAttacks is every attack an untrusted user runs in TestHostileClients.
var hostileAttacks = []hostileAttack{
	{"huge string (AddTextToStore of 1 GiB, stalled)", func(a *attack, rng *rand.Rand, _, _ int) error {
		return dialRun(a, func(rc *rawConn) error {
			rc.u64(rawOpAddTextToStore)
			rc.str("huge")
			rc.u64(1 << 30)
			rc.w.Write(make([]byte, 4096))
			if err := rc.flush(); err != nil {
				return err
			}
			a.expectClosed(rc, "AddTextToStore announcing 1 GiB")
			return nil
		})
	}},
	{"huge list (QueryValidPaths of 2^24 paths, stalled)", func(a *attack, rng *rand.Rand, _, _ int) error {
		return dialRun(a, func(rc *rawConn) error {
			rc.u64(rawOpQueryValidPaths)
			rc.u64(1 << 24)
			rc.str(a.pick(rng))
			if err := rc.flush(); err != nil {
				return err
			}
			a.expectClosed(rc, "QueryValidPaths announcing 2^24 paths")
			return nil
		})
	}},
	{"huge NAR (AddToStoreNar of 1 TiB, 64 MiB frame announced, stalled)", func(a *attack, rng *rand.Rand, _, n int) error {
		return dialRun(a, func(rc *rawConn) error {
			rc.u64(rawOpAddToStoreNar)
			rc.str(fmt.Sprintf("%s/%s-hostile-%d", nixtest.StoreDir, strings.Repeat("0", 32), n))
			rc.str("")
			rc.str(strings.Repeat("0", 64))
			rc.strs(nil)
			rc.u64(0)
			rc.u64(1 << 40) // narSize
			rc.u64(0)
			rc.strs(nil)
			rc.str("")
			rc.u64(0)
			rc.u64(0)
			rc.u64(64 << 20) // one framed chunk of 64 MiB, of which 1 KiB arrives
			rc.w.Write(make([]byte, 1024))
			if err := rc.flush(); err != nil {
				return err
			}
			a.expectClosed(rc, "AddToStoreNar announcing 1 TiB")
			return nil
		})
	}},
	{"stalled op (half a path, then nothing)", func(a *attack, rng *rand.Rand, _, _ int) error {
		return dialRun(a, func(rc *rawConn) error {
			rc.u64(26) // QueryPathInfo
			rc.u64(100)
			rc.w.WriteString("/nix/store")
			if err := rc.flush(); err != nil {
				return err
			}
			a.expectClosed(rc, "QueryPathInfo stalled half-way")
			return nil
		})
	}},
	{"NarFromPath never read", func(a *attack, rng *rand.Rand, _, _ int) error {
		return dialRun(a, func(rc *rawConn) error {
			rc.u64(rawOpNarFromPath)
			rc.str(a.cfg.Big)
			if err := rc.flush(); err != nil {
				return err
			}
			time.Sleep(2 * a.cfg.Stall)
			return nil
		})
	}},
	{"garbage op", func(a *attack, rng *rand.Rand, _, _ int) error {
		return dialRun(a, func(rc *rawConn) error {
			junk := make([]byte, 64)
			for i := range junk {
				junk[i] = byte(rng.IntN(256))
			}
			rc.u64(9999)
			rc.w.Write(junk)
			if err := rc.flush(); err != nil {
				return err
			}
			defer rc.answer(a.cfg.Stall + hostileCloseSlack)()
			if err := rc.result(); err == nil {
				a.fail("unknown op 9999 was answered")
			}
			return nil
		})
	}},
	{"connection flood", func(a *attack, rng *rand.Rand, _, _ int) error {
		var conns []net.Conn
		for range hostileFloodSize {
			c, err := net.DialTimeout("unix", a.cfg.Socket, rawDialTimeout)
			if err != nil {
				a.count("flood: dial failed")
				continue
			}
			conns = append(conns, c)
		}
		time.Sleep(a.cfg.Stall / 2)
		for _, c := range conns {
			c.Close()
		}
		return nil
	}},
	{"indirect and perm roots anywhere", func(a *attack, rng *rand.Rand, worker, n int) error {
		return dialRun(a, func(rc *rawConn) error {
			defer rc.answer(time.Minute)()
			for _, p := range []string{"/etc/passwd/x", "/etc/passwd", "relative/root", "/proc/self/cwd/x",
				"/" + strings.Repeat("a/", 1500) + "x", fmt.Sprintf("/tmp/casnix-hostile-%d-%d/../../etc/shadow", worker, n), "/dev/null/x"} {
				if err := rc.addIndirectRoot(p); err != nil && !isRemote(err) {
					return err
				}
			}
			if _, err := rc.addPermRoot(a.pick(rng), fmt.Sprintf("/tmp/casnix-hostile-perm-%d-%d", worker, n)); err == nil {
				a.fail("an untrusted client made a perm root")
			} else if !isRemote(err) {
				return err
			}
			// The connection is still in step.
			if _, err := rc.queryValidDerivers(a.pick(rng)); err != nil && !isRemote(err) {
				return err
			}
			return nil
		})
	}},
	{"forged derivation claiming an existing path", func(a *attack, rng *rand.Rand, worker, n int) error {
		return dialRun(a, func(rc *rawConn) error {
			defer rc.answer(time.Minute)()
			name := strings.SplitN(filepath.Base(a.cfg.Target), "-", 2)[1]
			drv := fmt.Sprintf(`Derive([("out","%s","","")],[],[],"x86_64-linux","/bin/sh",["-c","true"],[("builder","/bin/sh"),("name","%s"),("out","%s"),("system","x86_64-linux"),("x","%d-%d")])`,
				a.cfg.Target, name, a.cfg.Target, worker, n)
			p, err := rc.addTextToStore(name+".drv", drv, nil)
			if err != nil {
				if isRemote(err) {
					return nil // refused: what Nix does
				}
				return err
			}
			a.mu.Lock()
			if len(a.forged) < 50 {
				a.forged = append(a.forged, p)
			}
			a.mu.Unlock()
			return nil
		})
	}},
	{"incompatible signed realisation", func(a *attack, rng *rand.Rand, _, _ int) error {
		return dialRun(a, func(rc *rawConn) error {
			defer rc.answer(time.Minute)()
			err := rc.registerDrvOutput(a.cfg.ForgedRealisation)
			if err == nil {
				a.fail("an incompatible realisation of %s was accepted", a.cfg.RealisationID)
				return nil
			}
			if !isRemote(err) {
				return err
			}
			return nil
		})
	}},
	{"gc --print-dead loop, deletions", func(a *attack, rng *rand.Rand, _, n int) error {
		return dialRun(a, func(rc *rawConn) error {
			defer rc.answer(2 * time.Minute)()
			for range 5 {
				if _, err := rc.collectGarbage(rawGCReturnDead, nil); err != nil && !isRemote(err) {
					return err
				}
			}
			if _, err := rc.collectGarbage(rawGCDeleteDead, nil); err == nil {
				a.fail("an untrusted client ran a deleting GC")
			} else if !isRemote(err) {
				return err
			}
			if _, err := rc.collectGarbage(rawGCDeleteSpecific, []string{a.pick(rng)}); err == nil {
				a.fail("an untrusted client deleted a path")
			} else if !isRemote(err) {
				return err
			}
			return nil
		})
	}},
	{"VerifyStore hung up at once, repair", func(a *attack, rng *rand.Rand, _, n int) error {
		if n%2 == 1 {
			return dialRun(a, func(rc *rawConn) error {
				defer rc.answer(time.Minute)()
				if _, err := rc.verifyStore(false, true); err == nil {
					a.fail("an untrusted client ran VerifyStore --repair")
				} else if !isRemote(err) {
					return err
				}
				return nil
			})
		}
		return dialRun(a, func(rc *rawConn) error {
			rc.u64(rawOpVerifyStore)
			rc.boolean(true)
			rc.boolean(false)
			if err := rc.flush(); err != nil {
				return err
			}
			time.Sleep(100 * time.Millisecond)
			return nil
		})
	}},
	{"temp roots", func(a *attack, rng *rand.Rand, _, _ int) error {
		return dialRun(a, func(rc *rawConn) error {
			defer rc.answer(time.Minute)()
			for range 200 {
				if err := rc.addTempRoot(a.pick(rng)); err != nil {
					return err
				}
			}
			return nil
		})
	}},
}

// checkVerifyHangup: the attackers' VerifyStores, hung up at once, are not left running
// once the attack ends, and a VerifyStore whose client hangs up stops and frees
// verify.lock at once. That one is held inside the lock by gc.run, which this process
// takes as a collection would, so a daemon that did not notice the hang-up would keep
// verify.lock (and refuse every untrusted verify) until gc.run is released.
func checkVerifyHangup(t *testing.T, socket, dataDir string) {
	t.Helper()
	verifyLock := filepath.Join(dataDir, "verify.lock")
	free := func() bool { return !flockHeld(t, verifyLock) }
	if !waitUntil(10*time.Second, free) {
		t.Errorf("verify.lock still held 10 s after the attack ended: a hung-up VerifyStore is still running")
		return
	}
	run, err := os.OpenFile(filepath.Join(dataDir, "gc.run"), os.O_RDWR|os.O_CREATE, 0o644)
	if err != nil {
		t.Fatal(err)
	}
	defer run.Close()
	if err := unix.Flock(int(run.Fd()), unix.LOCK_EX); err != nil {
		t.Fatalf("lock gc.run: %v", err)
	}
	rc, err := rawDial(socket)
	if err != nil {
		t.Fatal(err)
	}
	defer rc.Close()
	rc.u64(rawOpVerifyStore)
	rc.boolean(true) // checkContents
	rc.boolean(false)
	if err := rc.flush(); err != nil {
		t.Fatal(err)
	}
	if !waitUntil(10*time.Second, func() bool { return !free() }) {
		t.Fatalf("VerifyStore never took verify.lock")
	}
	rc.Close()
	if !waitUntil(3*time.Second, free) {
		t.Errorf("verify.lock still held 3 s after its client hung up")
	}
}

// waitUntil polls cond until it holds or within passes.
func waitUntil(within time.Duration, cond func() bool) bool {
	for end := time.Now().Add(within); ; time.Sleep(10 * time.Millisecond) {
		if cond() {
			return true
		}
		if time.Now().After(end) {
			return false
		}
	}
}

// flockHeld reports whether some process holds a flock on path, from /proc/locks, so
// the test sees a lock the daemon holds without taking it.
func flockHeld(t *testing.T, path string) bool {
	t.Helper()
	var st unix.Stat_t
	if err := unix.Stat(path, &st); err != nil {
		if errors.Is(err, os.ErrNotExist) {
			return false
		}
		t.Fatal(err)
	}
	id := fmt.Sprintf("%02x:%02x:%d", unix.Major(st.Dev), unix.Minor(st.Dev), st.Ino)
	locks, err := os.ReadFile("/proc/locks")
	if err != nil {
		t.Fatalf("reading /proc/locks: %v", err)
	}
	for line := range strings.Lines(string(locks)) {
		// "1: FLOCK  ADVISORY  WRITE 1234 00:2d:5678 0 EOF"; a waiter has "->" after the number.
		if f := strings.Fields(line); len(f) >= 6 && f[1] == "FLOCK" && f[5] == id {
			return true
		}
	}
	return false
}
