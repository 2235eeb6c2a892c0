package tests

import (
	"bufio"
	"context"
	"crypto/sha256"
	"encoding/hex"
	"encoding/json"
	"errors"
	"fmt"
	"maps"
	"math/rand/v2"
	"net"
	"os"
	"os/exec"
	"path/filepath"
	"slices"
	"strconv"
	"strings"
	"sync"
	"syscall"
	"testing"
	"time"

	"github.com/casnix/casnix/proto"
	"github.com/casnix/casnix/tests/nixtest"
)

// The kill-cycle tests' knobs: how many cycles TestKillDuringCopy runs and how many kills
// TestKillDuringRecovery lands. The defaults keep each test to a minute or two here;
// CASNIX_KILL_CYCLES=1000 and CASNIX_RECOVERY_KILLS=200 are the long runs.
const (
	killCyclesEnv        = "CASNIX_KILL_CYCLES"
	killCyclesDefault    = 24
	recoveryKillsEnv     = "CASNIX_RECOVERY_KILLS"
	recoveryKillsDefault = 30
)

// envCount reads a positive count from env, def when unset.
func envCount(t *testing.T, env string, def int) int {
	t.Helper()
	s := os.Getenv(env)
	if s == "" {
		return def
	}
	n, err := strconv.Atoi(s)
	if err != nil || n < 1 {
		t.Fatalf("%s=%q: want a positive number", env, s)
	}
	return n
}

// killSeed is the seed of a kill test's random choices: $CASNIX_E2E_SEED, else the clock.
func killSeed(t *testing.T) uint64 {
	t.Helper()
	seed := uint64(time.Now().UnixNano())
	if s := os.Getenv("CASNIX_E2E_SEED"); s != "" {
		var err error
		if seed, err = strconv.ParseUint(s, 10, 64); err != nil {
			t.Fatalf("CASNIX_E2E_SEED=%q: %v", s, err)
		}
	}
	t.Logf("seed %d (CASNIX_E2E_SEED repeats the choices and kill delays)", seed)
	return seed
}

// serveProc is a `casnix serve` the kill tests start and SIGKILL. Unlike nixtest.Serve,
// starting it reports a failure instead of ending the test, so that a restart that does
// not come up by itself is counted (a "manual restart") and shown with the daemon's log.
type serveProc struct {
	cmd  *exec.Cmd
	log  syncLog
	done chan struct{}
	err  error // of Wait, once done is closed
}

// startServe starts `casnix serve --socket sock` on cas's data dir. With wait it returns
// once the socket accepts a connection, or an error when the process exits first or does
// not serve within a minute; without, at once (to kill it while it opens the store).
func startServe(t *testing.T, cas *nixtest.Casnix, sock string, wait bool) (*serveProc, error) {
	t.Helper()
	sp := &serveProc{done: make(chan struct{})}
	c := cas.Cmd("serve", "--socket", sock)
	c.Stdout, c.Stderr = &sp.log, &sp.log
	sp.cmd = c.Exec(context.Background())
	if err := sp.cmd.Start(); err != nil {
		t.Fatalf("start casnix serve: %v", err)
	}
	go func() {
		sp.err = sp.cmd.Wait()
		close(sp.done)
	}()
	t.Cleanup(sp.kill)
	if !wait {
		return sp, nil
	}
	deadline := time.Now().Add(time.Minute)
	for {
		if conn, err := net.DialTimeout("unix", sock, 5*time.Second); err == nil {
			conn.Close()
			return sp, nil
		}
		select {
		case <-sp.done:
			return nil, fmt.Errorf("casnix serve exited before serving (%v):\n%s", sp.err, sp.log.String())
		case <-time.After(10 * time.Millisecond):
		}
		if time.Now().After(deadline) {
			sp.kill()
			return nil, fmt.Errorf("casnix serve does not serve a minute after its start:\n%s", sp.log.String())
		}
	}
}

// kill sends SIGKILL to the daemon's process group and waits for it to exit.
func (sp *serveProc) kill() {
	syscall.Kill(-sp.cmd.Process.Pid, syscall.SIGKILL)
	<-sp.done
}

// exited reports whether the daemon's process has ended.
func (sp *serveProc) exited() bool {
	select {
	case <-sp.done:
		return true
	default:
		return false
	}
}

// killSource is the source store of TestKillDuringCopy: the fixture plus a family of
// closures built for it (leaves of random and of compressible data, mids that refer to a
// few leaves, tops that refer to a few mids and leaves), so that closures overlap and a
// copy often finds part of its closure present.
type killSource struct {
	f     *nixtest.Fixture
	want  map[string]nixtest.PathInfo // every valid path of the source store
	roots []string                    // what a cycle copies (with its closure)
	big   []string                    // the roots with the largest closures: tops and mids
}

// newKillSource builds the source store; rng picks the sizes and the reference graph.
func newKillSource(t *testing.T, rng *rand.Rand) *killSource {
	t.Helper()
	f := nixtest.PopulateFixture(t)
	const leaves, mids, tops = 32, 12, 8
	var b strings.Builder
	b.WriteString(`let
  mk = name: refs: script: derivation {
    inherit name;
    system = builtins.currentSystem;
    builder = busybox;
    args = [ "sh" "-euc" ("mkdir $out; echo ${toString refs} > $out/refs; " + script) ];
  };
`)
	for i := range leaves {
		size := 128<<10 + rng.IntN(3500<<10)
		script := fmt.Sprintf("head -c %d /dev/urandom > $out/blob", size)
		switch i % 4 {
		case 1: // compressible, and shared by every such leaf: chunks dedup across paths
			script = fmt.Sprintf("yes shared-line | head -c %d > $out/text; echo %d > $out/id", size, i)
		case 2: // an executable and a symlink
			script += "; printf '#!/bin/sh\\n' > $out/run; chmod 755 $out/run; ln -s blob $out/link"
		}
		fmt.Fprintf(&b, "  l%d = mk \"kc-leaf-%d\" [ ] %q;\n", i, i, script)
	}
	pickRefs := func(prefix string, n, lo, hi int) string {
		k := lo + rng.IntN(hi-lo+1)
		var refs []string
		for _, j := range rng.Perm(n)[:k] {
			refs = append(refs, fmt.Sprintf("%s%d", prefix, j))
		}
		return strings.Join(refs, " ")
	}
	for i := range mids {
		fmt.Fprintf(&b, "  m%d = mk \"kc-mid-%d\" [ %s ] %q;\n", i, i, pickRefs("l", leaves, 2, 5),
			fmt.Sprintf("head -c %d /dev/urandom > $out/blob", 4<<10+rng.IntN(256<<10)))
	}
	for i := range tops {
		fmt.Fprintf(&b, "  t%d = mk \"kc-top-%d\" [ %s %s ] \"echo top > $out/top\";\n", i, i,
			pickRefs("m", mids, 1, 3), pickRefs("l", leaves, 0, 2))
	}
	b.WriteString("in [")
	for _, p := range []struct {
		prefix string
		n      int
	}{{"l", leaves}, {"m", mids}, {"t", tops}} {
		for i := range p.n {
			fmt.Fprintf(&b, " %s%d", p.prefix, i)
		}
	}
	b.WriteString(" ]")
	built := f.BuildExpr(t, "(\n"+b.String()+"\n)")
	if len(built) != leaves+mids+tops {
		t.Fatalf("built %d paths, want %d", len(built), leaves+mids+tops)
	}
	ks := &killSource{f: f, want: f.PathInfos(t)}
	// Roots: every built path, and the fixture's outputs (other shapes: multiple outputs,
	// content addresses, signatures, self references). Not .drv files: the nix command
	// takes a .drv argument for its outputs.
	ks.roots = append(ks.roots, built...)
	ks.roots = append(ks.roots, slices.Sorted(maps.Values(f.Outputs))...)
	slices.Sort(ks.roots)
	ks.roots = slices.Compact(ks.roots)
	for _, p := range built {
		if strings.Contains(p, "-kc-top-") || strings.Contains(p, "-kc-mid-") {
			ks.big = append(ks.big, p)
		}
	}
	var total int64
	for _, pi := range ks.want {
		total += pi.NarSize
	}
	t.Logf("kill source: %d paths, %d NAR bytes, %d copy roots", len(ks.want), total, len(ks.roots))
	return ks
}

// closure is the closure of roots in the source store.
func (ks *killSource) closure(roots []string) []string {
	seen := map[string]bool{}
	var visit func(string)
	visit = func(p string) {
		if seen[p] {
			return
		}
		seen[p] = true
		for _, r := range ks.want[p].References {
			visit(r)
		}
	}
	for _, r := range roots {
		visit(r)
	}
	return slices.Sorted(maps.Keys(seen))
}

// ackEvent is one line of the acknowledgement log TestKillDuringCopy keeps outside the
// data dir: a copy that exited 0 (its closure must stay valid) or a deletion that exited 0
// (its paths are no longer owed).
type ackEvent struct {
	Cycle   int               `json:"cycle"`
	Copied  map[string]string `json:"copied,omitempty"` // path -> source narHash
	Deleted []string          `json:"deleted,omitempty"`
}

// ackLog is the acknowledgement log: appended by the test, replayed for every check.
type ackLog struct{ path string }

func (l ackLog) add(t *testing.T, ev ackEvent) {
	t.Helper()
	f, err := os.OpenFile(l.path, os.O_APPEND|os.O_CREATE|os.O_WRONLY, 0o644)
	if err != nil {
		t.Fatal(err)
	}
	if err := json.NewEncoder(f).Encode(ev); err != nil {
		t.Fatal(err)
	}
	if err := f.Close(); err != nil {
		t.Fatal(err)
	}
}

// owed replays the log: every path some acknowledged copy holds and no later acknowledged
// deletion removed, with its narHash.
func (l ackLog) owed(t *testing.T) map[string]string {
	t.Helper()
	out := map[string]string{}
	f, err := os.Open(l.path)
	if errors.Is(err, os.ErrNotExist) {
		return out
	}
	if err != nil {
		t.Fatal(err)
	}
	defer f.Close()
	sc := bufio.NewScanner(f)
	sc.Buffer(nil, 16<<20)
	for sc.Scan() {
		var ev ackEvent
		if err := json.Unmarshal(sc.Bytes(), &ev); err != nil {
			t.Fatalf("ack log %s: %v", l.path, err)
		}
		maps.Copy(out, ev.Copied)
		for _, p := range ev.Deleted {
			delete(out, p)
		}
	}
	if err := sc.Err(); err != nil {
		t.Fatal(err)
	}
	return out
}

// storeCheck is what a check after a restart found.
type storeCheck struct {
	valid   map[string]*proto.PathInfo // what the restarted daemon holds
	losses  []string                   // owed paths missing, or with another narHash or NAR
	invalid []string                   // broken invariants of the store itself
}

// checkServed asks the daemon on sock for every valid path and checks: every owed path
// is valid with its narHash; every valid path is a source path with the source's narHash
// and references, and the valid set is closed under references; the paths of render
// stream (NarFromPath) to their source narHash; and `casnix verify` (every valid path
// rendered and hashed) is clean.
func checkServed(cas *nixtest.Casnix, sock string, src map[string]nixtest.PathInfo, owed map[string]string, render []string, verify bool) storeCheck {
	var sc storeCheck
	cl, err := proto.Dial(sock)
	if err != nil {
		sc.invalid = append(sc.invalid, fmt.Sprintf("the restarted daemon: %v", err))
		return sc
	}
	defer cl.Close()
	all, err := cl.QueryAllValidPaths()
	if err != nil {
		sc.invalid = append(sc.invalid, fmt.Sprintf("QueryAllValidPaths: %v", err))
		return sc
	}
	sc.valid = map[string]*proto.PathInfo{}
	for _, p := range all {
		pi, err := cl.QueryPathInfo(p)
		if err != nil || pi == nil {
			sc.invalid = append(sc.invalid, fmt.Sprintf("%s is listed valid but QueryPathInfo says %v, %v", p, pi, err))
			continue
		}
		sc.valid[p] = pi
		want, ok := src[p]
		switch {
		case !ok:
			sc.invalid = append(sc.invalid, fmt.Sprintf("%s is valid and no source path", p))
		case !sameNarHash(pi.NarHash, want.NarHash) || !slices.Equal(slices.Sorted(slices.Values(pi.References)), want.References):
			sc.invalid = append(sc.invalid, fmt.Sprintf("%s: narHash %s references %q, source %s %q", p, pi.NarHash, pi.References, want.NarHash, want.References))
		}
	}
	for p, pi := range sc.valid {
		for _, r := range pi.References {
			if _, ok := sc.valid[r]; !ok {
				sc.invalid = append(sc.invalid, fmt.Sprintf("%s is valid but its reference %s is not", p, r))
			}
		}
	}
	for _, p := range slices.Sorted(maps.Keys(owed)) {
		if pi, ok := sc.valid[p]; !ok {
			sc.losses = append(sc.losses, p+": acknowledged and not valid")
		} else if !sameNarHash(pi.NarHash, owed[p]) {
			sc.losses = append(sc.losses, fmt.Sprintf("%s: acknowledged with narHash %s, now %s", p, owed[p], pi.NarHash))
		}
	}
	for _, p := range render {
		if _, ok := sc.valid[p]; !ok {
			continue // an owed one is a loss already
		}
		h := sha256.New()
		if _, err := cl.NarFromPath(p, h); err != nil {
			sc.losses = append(sc.losses, fmt.Sprintf("%s: NarFromPath: %v", p, err))
			// The connection is unusable after a failed stream.
			if cl, err = proto.Dial(sock); err != nil {
				sc.invalid = append(sc.invalid, fmt.Sprintf("the restarted daemon: %v", err))
				return sc
			}
			defer cl.Close()
			continue
		}
		if got := "sha256:" + nixtest.NixBase32Encode(h.Sum(nil)); got != src[p].NarHash {
			sc.losses = append(sc.losses, fmt.Sprintf("%s renders to %s, source %s", p, got, src[p].NarHash))
		}
	}
	if !verify {
		return sc
	}
	if r := cas.Try("verify"); !r.OK() {
		sc.invalid = append(sc.invalid, fmt.Sprintf("casnix verify:\n%s", r))
	}
	return sc
}

// sameNarHash compares the daemon's base16 narHash with a sha256:<nixbase32> one.
func sameNarHash(daemon, nixHash string) bool {
	b, err := nixtest.ParseSHA256(nixHash)
	return err == nil && strings.EqualFold(strings.TrimPrefix(daemon, "sha256:"), hex.EncodeToString(b))
}

// referrerClosure is p and every valid path that refers to it, directly or not: a set
// that can be deleted, since no valid path outside it refers into it.
func referrerClosure(valid map[string]*proto.PathInfo, p string) []string {
	referrers := map[string][]string{}
	for q, pi := range valid {
		for _, r := range pi.References {
			if r != q {
				referrers[r] = append(referrers[r], q)
			}
		}
	}
	seen := map[string]bool{}
	var visit func(string)
	visit = func(q string) {
		if !seen[q] {
			seen[q] = true
			for _, r := range referrers[q] {
				visit(r)
			}
		}
	}
	visit(p)
	return slices.Sorted(maps.Keys(seen))
}

// deleteThrough deletes paths with a real `nix-store --delete` through the daemon on sock
// and fails the test if that fails, except when casnix refuses because a path is alive:
// then nothing was deleted, and it logs the roots and reports false. Roots outside the
// test can keep a path: runtime roots count every process on this machine that names it
// (in its environment, say), and other tests build fixtures with the same paths.
func deleteThrough(t *testing.T, host *nixtest.NixClient, sock string, del []string) bool {
	t.Helper()
	r := host.Try(append([]string{"nix-store", "--store", "unix://" + sock, "--delete"}, del...)...)
	switch {
	case r.OK():
		return true
	case strings.Contains(string(r.Stderr), "since it is still alive"):
		roots := host.Try(append([]string{"nix-store", "--store", "unix://" + sock, "--query", "--roots"}, del...)...)
		t.Logf("deletion refused, a path is alive; its roots:\n%s", roots.Stdout)
		return false
	}
	t.Fatalf("nix-store --delete with no kill pending:\n%s", r)
	return false
}

// copyAcknowledged reports whether a `nix copy --to unix://` had the daemon's
// acknowledgement: it exited 0 and printed no "error (ignored)". Nix 2.8 can exit 0 when
// the daemon dies in the middle of AddMultipleToStore: it printed "copying path" for the
// first of three paths, "error (ignored): error: writing to file: Broken pipe", and
// exited 0 with nothing valid (TestKillDuringCopy, seed 1796452735501683312, cycle 12);
// the daemon cannot have acknowledged paths the client never sent. A real acknowledgement
// ends the stream before the daemon's reply, so it leaves no ignored write error.
func copyAcknowledged(r *nixtest.Result) bool {
	return r.OK() && !strings.Contains(string(r.Stderr), "error (ignored)")
}

// killCopyStats is TestKillDuringCopy's summary.
type killCopyStats struct {
	cycles, midCopy, midUpload, afterCopy, acked, partly, deletions, aliveRefusals, swallowed int
	ackedChecked, losses, invalid, manual, verifies                                           int
	clientCycles                                                                              map[string]int
	tCopy, tRestart, tCheck                                                                   time.Duration // copying until the kill, restarting, checking
}

// uploadMark is how many bytes the daemon must have read since a copy began for a kill to
// count as landing in its uploads: more than the queries before them read (NARs of the
// source's leaves are bigger).
const uploadMark = 64 << 10

// verifyEvery is how often (in cycles) TestKillDuringCopy runs a full casnix verify: every
// cycle would cost more than the cycle itself once the store holds a few dozen MiB, and
// each cycle streams the paths it touched anyway.
const verifyEvery = 5

// readBytes is how many bytes process pid has read (rchar of /proc/PID/io: sockets and
// files), or 0 when it cannot be read.
func readBytes(pid int) int64 {
	b, err := os.ReadFile(fmt.Sprintf("/proc/%d/io", pid))
	if err != nil {
		return 0
	}
	for _, l := range strings.Split(string(b), "\n") {
		if v, ok := strings.CutPrefix(l, "rchar: "); ok {
			n, _ := strconv.ParseInt(v, 10, 64)
			return n
		}
	}
	return 0
}

// TestKillDuringCopy runs cycles of: start `casnix serve` on one data dir (never wiped),
// sometimes delete a random set of paths through it (real `nix-store --delete`), run a real
// `nix copy --to unix://SOCKET` of a few random closures of the source store (host Nix 2.8
// and Nix 2.34 in turns), and SIGKILL serve at a random moment: before the copy sends
// anything, while it uploads or commits, or just after it finished. Then serve restarts
// on the same data dir and socket and every cycle checks, against a log kept outside the
// data dir: every closure whose copy was acknowledged (copyAcknowledged) and that no
// acknowledged deletion removed since is valid with its narHash; what of this cycle's
// closure is valid, and a few older owed paths, stream (NarFromPath) to their narHash; the
// valid set is the source's paths with their path-info, closed under references; the
// restart came up with no manual step; every verifyEvery cycles and in the last, `casnix
// verify` is clean. At the end the harness shows that its checks see a loss and a damaged
// pack.
func TestKillDuringCopy(t *testing.T) {
	cycles := envCount(t, killCyclesEnv, killCyclesDefault)
	nixtest.RequireHostNix(t)
	nixtest.CasnixBinary(t)
	rng := rand.New(rand.NewPCG(killSeed(t), 13))
	ks := newKillSource(t, rng)

	sockDir := t.TempDir()
	sock := filepath.Join(sockDir, "casnix.sock")
	host := nixtest.RequireNixClient(t, "bookworm")
	type client struct {
		c    *nixtest.NixClient
		from string // the source store as the client sees it
	}
	clients := []client{{host, ks.f.Root}}
	sid := nixtest.RequireNixClient(t, "sid")
	sid.Bind(sockDir)
	clients = append(clients, client{sid, copyStoreRoot(t, ks.f.Root, filepath.Join(sid.TempDir(t), "src")).Root})

	cas := nixtest.NewCasnix(t)
	log := ackLog{filepath.Join(t.TempDir(), "acks.jsonl")}
	st := killCopyStats{clientCycles: map[string]int{}}
	start := time.Now()

	sp, err := startServe(t, cas, sock, true)
	if err != nil {
		t.Fatal(err)
	}
	// For scale in the log, and to see real nix copy work against casnix before any
	// kill: a copy of every root into a scratch data dir.
	{
		scratch := nixtest.NewCasnix(t)
		ssock := filepath.Join(sockDir, "scratch.sock")
		ssp, err := startServe(t, scratch, ssock, true)
		if err != nil {
			t.Fatal(err)
		}
		r := host.Try(append([]string{"nix", "copy", "--no-check-sigs", "--from", "local?root=" + ks.f.Root, "--to", "unix://" + ssock}, ks.roots...)...)
		if !r.OK() {
			t.Fatalf("calibration copy:\n%s", r)
		}
		ssp.kill()
		os.RemoveAll(scratch.DataDir)
		t.Logf("a copy of every root into an empty store takes %s", r.Duration.Round(time.Millisecond))
	}
	// When a copy's uploads start (the daemon has read uploadMark bytes), per client (a
	// client in a root starts slower), refined by every copy: the early kills are spread
	// over the time before it.
	firstData := map[string]time.Duration{}
	for _, cl := range clients {
		firstData[cl.c.Suite] = 300 * time.Millisecond
	}
	if readBytes(sp.cmd.Process.Pid) == 0 {
		t.Fatalf("cannot read how many bytes casnix has read from /proc/%d/io: the kills in the uploads are placed by it", sp.cmd.Process.Pid)
	}

	var valid map[string]*proto.PathInfo // after the last check
	for cycle := range cycles {
		if dl, ok := t.Deadline(); ok && time.Until(dl) < 3*time.Minute {
			// A long run sized by -timeout: stop with the summary and the final checks
			// rather than be killed without them.
			t.Logf("stopping after %d of %d cycles: the test's -timeout is 3 minutes away", cycle, cycles)
			break
		}
		cl := clients[cycle%len(clients)]
		st.cycles++
		st.clientCycles[cl.c.Suite]++
		// Sometimes delete p and its referrers, so that copies keep finding part of their
		// closure present and part missing.
		if len(valid) > 0 && rng.IntN(3) == 0 {
			candidates := slices.Sorted(maps.Keys(valid))
			del := referrerClosure(valid, candidates[rng.IntN(len(candidates))])
			if deleteThrough(t, host, sock, del) {
				log.add(t, ackEvent{Cycle: cycle, Deleted: del})
				st.deletions++
			} else {
				st.aliveRefusals++
			}
		}

		// Roots, big ones half the time, mostly ones not yet valid: a closure wholly
		// present has no uploads to land a kill in.
		roots := make([]string, 1+rng.IntN(3))
		for i := range roots {
			pool := ks.roots
			if rng.IntN(2) == 0 {
				pool = ks.big
			}
			roots[i] = pool[rng.IntN(len(pool))]
			for try := 0; try < 3 && valid[roots[i]] != nil; try++ {
				roots[i] = pool[rng.IntN(len(pool))]
			}
		}
		closure := ks.closure(roots)
		present := 0
		var missing int64 // NAR bytes the copy has to send
		for _, p := range closure {
			if _, ok := valid[p]; ok {
				present++
			} else {
				missing += int64(ks.want[p].NarSize)
			}
		}
		if present > 0 && present < len(closure) {
			st.partly++
		}

		copyCmd := cl.c.Cmd(append([]string{"nix", "copy", "--no-check-sigs", "--from", "local?root=" + cl.from, "--to", "unix://" + sock}, roots...)...)
		copyCmd.Timeout = 5 * time.Minute
		copyDone := make(chan *nixtest.Result, 1)
		readBefore := readBytes(sp.cmd.Process.Pid)
		copyStart := time.Now()
		go func() { copyDone <- copyCmd.Try() }()
		// The kill, in turns of five cycles (so that every run has each kind, for both
		// clients): one at a random point before the uploads are expected to start (nix
		// starting, asking what is valid); three once the daemon has read a random number
		// of bytes between uploadMark and nine tenths of the NARs the copy must send
		// (NARs arriving, packs written, commits: placed by the bytes, not by time, so
		// that a fast machine does not finish every copy first), or early when the copy
		// has too little to send; one within 100ms after the copy ended.
		var delay time.Duration // from copyStart
		var readTarget int64    // bytes read by the daemon since copyStart
		switch kind := cycle % 5; {
		case kind == 4:
			delay = time.Hour
		case kind > 0 && missing*9/10 > uploadMark:
			readTarget = uploadMark + rng.Int64N(missing*9/10-uploadMark)
		default:
			delay = time.Duration(rng.Float64() * float64(firstData[cl.c.Suite]))
		}
		var res *nixtest.Result
		var uploadStart time.Time
	wait:
		for {
			select {
			case res = <-copyDone:
				time.Sleep(time.Duration(rng.IntN(100)) * time.Millisecond)
				break wait
			case <-time.After(2 * time.Millisecond):
			}
			read := readBytes(sp.cmd.Process.Pid) - readBefore
			if uploadStart.IsZero() && read >= uploadMark {
				uploadStart = time.Now()
			}
			if readTarget > 0 && read >= readTarget || readTarget == 0 && time.Since(copyStart) >= delay {
				break
			}
		}
		killedAt := time.Since(copyStart)
		uploading := readBytes(sp.cmd.Process.Pid)-readBefore >= uploadMark
		sp.kill()
		st.tCopy += time.Since(copyStart)
		if res == nil {
			res = <-copyDone
		}
		acked := copyAcknowledged(res)
		if res.OK() && !acked {
			st.swallowed++
			t.Logf("cycle %d: nix copy exited 0 after an error it ignored: not an acknowledgement:\n%s", cycle, res)
		}
		if acked {
			// It had every reply before the kill, even when it exited after it.
			st.afterCopy++
		} else {
			st.midCopy++
			if uploading {
				st.midUpload++
			}
		}
		if !uploadStart.IsZero() {
			firstData[cl.c.Suite] = (3*firstData[cl.c.Suite] + uploadStart.Sub(copyStart)) / 4
		}
		if acked {
			st.acked++
			copied := map[string]string{}
			for _, p := range closure {
				copied[p] = ks.want[p].NarHash
			}
			log.add(t, ackEvent{Cycle: cycle, Copied: copied})
		} else if !strings.Contains(string(res.Stderr), "error") {
			t.Errorf("cycle %d: nix copy failed with no error message:\n%s", cycle, res)
		}

		// The restart: same data dir, same socket (the killed daemon's file still there).
		restartStart := time.Now()
		next, err := startServe(t, cas, sock, true)
		st.tRestart += time.Since(restartStart)
		if err != nil {
			st.manual++
			t.Fatalf("cycle %d: the restart after the kill did not come up by itself: %v", cycle, err)
		}
		sp = next
		owed := log.owed(t)
		// Streamed: what of this cycle's closure is valid (acknowledged, or committed
		// before the kill), and a few older owed paths. Every verifyEvery cycles, and
		// in the last, casnix verify renders every valid path.
		render := slices.Clone(closure)
		olds := slices.Sorted(maps.Keys(owed))
		for range min(3, len(olds)) {
			render = append(render, olds[rng.IntN(len(olds))])
		}
		verify := cycle%verifyEvery == verifyEvery-1 || cycle == cycles-1
		if verify {
			st.verifies++
		}
		checkStart := time.Now()
		sc := checkServed(cas, sock, ks.want, owed, render, verify)
		st.tCheck += time.Since(checkStart)
		st.ackedChecked += len(owed)
		st.losses += len(sc.losses)
		if len(sc.invalid) > 0 {
			st.invalid++
		}
		for _, m := range append(sc.losses, sc.invalid...) {
			t.Errorf("cycle %d (%s, kill %s into the copy, copy ok %v): %s", cycle, cl.c.Suite, killedAt.Round(time.Millisecond), acked, m)
		}
		if t.Failed() {
			t.Logf("nix copy:\n%s\ndaemon after the restart:\n%s", res, sp.log.String())
			break
		}
		valid = sc.valid
		if testing.Verbose() && (cycle < 20 || cycle%50 == 0) {
			t.Logf("cycle %d (%s): %d roots, closure %d paths (%d present, %d NAR bytes to send), kill after %s (at %d bytes read; uploads expected after %s), copy ok %v; %d valid, %d owed",
				cycle, cl.c.Suite, len(roots), len(closure), present, missing, killedAt.Round(time.Millisecond), readTarget, firstData[cl.c.Suite].Round(time.Millisecond), acked, len(valid), len(owed))
		}
	}
	t.Logf("kill-cycles summary: %d cycles (%s), kills mid-copy %d (%d of them after the daemon had read %d KiB of it), after the copy's last reply %d; nix copy exit 0 with an ignored error (not acknowledged) %d; copies acknowledged %d (%d of closures partly present), deletions %d (%d refused: alive); acknowledged paths checked %d; losses %d, invalid states %d, manual restarts %d; full verifies %d; wall time %s (copying until the kill %s, restarts %s, checks %s); data dir %s",
		st.cycles, fmtCounts(st.clientCycles), st.midCopy, st.midUpload, uploadMark>>10, st.afterCopy, st.swallowed, st.acked, st.partly, st.deletions, st.aliveRefusals, st.ackedChecked,
		st.losses, st.invalid, st.manual, st.verifies, time.Since(start).Round(time.Second),
		st.tCopy.Round(time.Second), st.tRestart.Round(time.Second), st.tCheck.Round(time.Second), dirSize(t, cas.DataDir))
	if t.Failed() {
		return
	}
	if st.midUpload == 0 || st.acked == 0 {
		t.Errorf("%d kills landed in a copy's uploads and %d copies were acknowledged: the cycles did not test both", st.midUpload, st.acked)
	}
	killCheckSelfTest(t, cas, sock, sp, host, ks, log)
}

// killCheckSelfTest shows that checkServed sees what it is there for, on the data dir
// the cycles left: an owed path deleted behind the log's back is a loss, and a damaged
// pack makes the check fail.
func killCheckSelfTest(t *testing.T, cas *nixtest.Casnix, sock string, sp *serveProc, host *nixtest.NixClient, ks *killSource, log ackLog) {
	owed := log.owed(t)
	sc := checkServed(cas, sock, ks.want, owed, nil, true)
	if len(sc.losses)+len(sc.invalid) > 0 || len(owed) == 0 {
		t.Fatalf("self-test: the store before any damage: %d owed, %q %q", len(owed), sc.losses, sc.invalid)
	}
	var victim string
	for _, p := range slices.Sorted(maps.Keys(owed)) {
		if deleteThrough(t, host, sock, referrerClosure(sc.valid, p)) {
			victim = p
			break
		}
	}
	if victim == "" {
		t.Fatalf("self-test: no owed path could be deleted")
	}
	sc = checkServed(cas, sock, ks.want, owed, nil, false)
	if !slices.ContainsFunc(sc.losses, func(s string) bool { return strings.HasPrefix(s, victim+":") }) {
		t.Errorf("self-test: %s deleted unlogged, and the check reports losses %q", victim, sc.losses)
	}
	// Damage: flip bytes through every pack (the frames' checksums must catch it).
	sp.kill()
	packs, _ := filepath.Glob(filepath.Join(cas.DataDir, "packs", "*", "*.pack"))
	for _, p := range packs {
		f, err := os.OpenFile(p, os.O_RDWR, 0)
		if err != nil {
			t.Fatal(err)
		}
		fi, _ := f.Stat()
		for _, frac := range []int64{3, 5, 7} {
			off := fi.Size() * frac / 10
			b := make([]byte, 1)
			if _, err := f.ReadAt(b, off); err == nil {
				b[0] ^= 0x55
				f.WriteAt(b, off)
			}
		}
		f.Close()
	}
	if _, err := startServe(t, cas, sock, true); err != nil {
		t.Fatal(err)
	}
	owed = log.owed(t)
	var render []string
	for p := range owed {
		if _, ok := sc.valid[p]; ok {
			render = append(render, p)
		}
	}
	sc = checkServed(cas, sock, ks.want, owed, render, true)
	if len(sc.invalid) == 0 {
		t.Errorf("self-test: %d packs damaged, and the check reports no invalid state (losses %d)", len(packs), len(sc.losses))
	}
	t.Logf("self-test: deleting %s unlogged showed as a loss; damaging %d packs showed %d invalid-state findings and %d losses",
		victim, len(packs), len(sc.invalid), len(sc.losses))
}

// recoveryStats is TestKillDuringRecovery's summary.
type recoveryStats struct {
	rounds, uploadRounds, restoreRounds int
	kills, duringStart, afterStart      int // recovery kills; landed before the command served (or finished), after
	journaled, journalKept              int // kills started with a restore journal present; that left it there
	killedOpeners                       map[string]int
	acked, losses, invalid, manual      int
}

// TestKillDuringRecovery makes data dirs that need recovery and SIGKILLs casnix while it
// opens them, CASNIX_RECOVERY_KILLS times in all, 0-200 ms after each start (so kills land
// in Open: SQLite's WAL recovery, the restore journal's roll-forward, the first writers
// taking packs with uncommitted tails, or just after). Rounds alternate two kinds:
//
//   - upload: `casnix serve` is killed while a protocol client (which records every
//     AddToStoreNar reply) and a real `nix copy` upload paths, so the WAL holds commits
//     and packs have uncommitted tails;
//   - restore: a backup of the store is taken, more uploads are killed as above, and a
//     `casnix restore --force` of the backup is killed after it wrote its journal (at a
//     random step of the swap).
//
// Each round then kills `casnix serve`, `casnix verify` or `casnix path-info --all` a few
// times while they start, and a normal start must serve with no manual step: every path
// acknowledged before the round's first kill (for a restore: exactly the backup's paths)
// is valid and renders to its narHash, the valid set is closed, verify is clean, no
// journal or staging dir is left.
func TestKillDuringRecovery(t *testing.T) {
	total := envCount(t, recoveryKillsEnv, recoveryKillsDefault)
	nixtest.RequireHostNix(t)
	bin := nixtest.CasnixBinary(t)
	rng := rand.New(rand.NewPCG(killSeed(t), 14))
	ks := newKillSource(t, rng)
	order := topoOrder(ks.want)
	host := nixtest.RequireNixClient(t, "bookworm")
	cas := nixtest.NewCasnix(t)
	sock := filepath.Join(t.TempDir(), "casnix.sock")
	owed := map[string]string{} // path -> narHash that must survive
	st := recoveryStats{killedOpeners: map[string]int{}}
	start := time.Now()

	sp, err := startServe(t, cas, sock, true)
	if err != nil {
		t.Fatal(err)
	}
	var valid map[string]*proto.PathInfo
	for round := 0; st.kills < total; round++ {
		st.rounds++
		restore := round%2 == 1
		// Make room: delete a few random closures of referrers, so that the uploads
		// below have work whatever the last round left valid.
		for range 3 {
			if len(valid) == 0 {
				break
			}
			del := referrerClosure(valid, slices.Sorted(maps.Keys(valid))[rng.IntN(len(valid))])
			if !deleteThrough(t, host, sock, del) {
				continue
			}
			for _, p := range del {
				delete(owed, p)
				delete(valid, p)
			}
		}
		var backup string
		var backupPaths map[string]string
		if restore {
			st.restoreRounds++
			backup = filepath.Join(t.TempDir(), "backup")
			runCasnix(t, bin, cas.DataDir, "backup", backup)
			// Nothing writes meanwhile: the backup holds what is valid now.
			sc := checkServed(cas, sock, ks.want, owed, nil, false)
			if len(sc.losses)+len(sc.invalid) > 0 {
				t.Fatalf("round %d: before the backup: %q %q", round, sc.losses, sc.invalid)
			}
			backupPaths = map[string]string{}
			for p := range sc.valid {
				backupPaths[p] = ks.want[p].NarHash
			}
		} else {
			st.uploadRounds++
		}

		// Uploads, killed once the packs have grown by a random few MiB.
		acked := map[string]bool{}
		for p := range valid {
			acked[p] = true // uploadUntilError skips these
		}
		present := len(acked)
		var mu sync.Mutex
		before := packBytes(t, cas.DataDir)
		grow := int64(2<<20 + rng.IntN(14<<20))
		copyCmd := host.Cmd(append([]string{"nix", "copy", "--no-check-sigs", "--from", "local?root=" + ks.f.Root, "--to", "unix://" + sock}, ks.roots...)...)
		copyDone := make(chan *nixtest.Result, 1)
		go func() { copyDone <- copyCmd.Try() }()
		upDone := make(chan struct{})
		go func() {
			defer close(upDone)
			uploadUntilError(t, sock, ks.f, ks.want, order, acked, &mu)
		}()
		deadline := time.Now().Add(2 * time.Minute)
		for packBytes(t, cas.DataDir)-before < grow && time.Now().Before(deadline) {
			select {
			case <-upDone:
			case <-time.After(5 * time.Millisecond):
				continue
			}
			break
		}
		sp.kill()
		<-upDone
		res := <-copyDone
		mu.Lock()
		for p := range acked {
			owed[p] = ks.want[p].NarHash
		}
		st.acked += len(acked) - present
		mu.Unlock()
		if copyAcknowledged(res) {
			// Acknowledged too (it may have finished first on a small store).
			for _, p := range ks.closure(ks.roots) {
				owed[p] = ks.want[p].NarHash
			}
		}
		if restore {
			trace := copyDataDir(t, cas.DataDir)
			names, journal := restoreSteps(t, bin, trace, backup)
			os.RemoveAll(trace)
			last := slices.Index(names, "database moved in")
			if last < journal {
				t.Fatalf("restore steps %q: no %q after the journal", names, "database moved in")
			}
			at := journal + rng.IntN(last+2-journal) // 1-based: from the journal to the database's move
			cmd := exec.Command(bin, "--data-dir", cas.DataDir, "restore", "--force", backup)
			cmd.Env = append(os.Environ(), "CASNIX_TEST_RESTORE_KILL_AT="+strconv.Itoa(at))
			out, err := cmd.CombinedOutput()
			if ee, ok := err.(*exec.ExitError); !ok || ee.ExitCode() != -1 {
				t.Fatalf("round %d: restore was not killed at step %d (%s): %v\n%s", round, at, names[at-1], err, out)
			}
			if _, err := os.Stat(filepath.Join(cas.DataDir, "restore.journal")); err != nil {
				t.Fatalf("round %d: restore killed after step %d (%s) left no journal: %v", round, at, names[at-1], err)
			}
			owed = backupPaths
		}

		// The kills while casnix opens the data dir.
		for k := 0; k < 5 && st.kills < total; k++ {
			journal := filepath.Join(cas.DataDir, "restore.journal")
			_, jerr := os.Stat(journal)
			var args []string
			switch k % 5 {
			case 2:
				args = []string{"verify"}
			case 4:
				args = []string{"path-info", "--all"}
			default:
				args = []string{"serve", "--socket", sock}
			}
			var out syncLog
			c := cas.Cmd(args...)
			c.Stdout, c.Stderr = &out, &out
			cmd := c.Exec(context.Background())
			if err := cmd.Start(); err != nil {
				t.Fatal(err)
			}
			exited := make(chan error, 1)
			go func() { exited <- cmd.Wait() }()
			// Within 0-200 ms; every other kill within the first 25 ms, where a journaled
			// restore's roll-forward runs (it takes a few ms after the process starts).
			window := 200_000
			if k%2 == 0 {
				window = 25_000
			}
			delay := time.Duration(rng.IntN(window+1)) * time.Microsecond
			var werr error
			finished := false
			select {
			case werr = <-exited:
				finished = true
			case <-time.After(delay):
				syscall.Kill(-cmd.Process.Pid, syscall.SIGKILL)
				werr = <-exited
			}
			st.kills++
			st.killedOpeners[args[0]]++
			if finished && werr != nil {
				t.Errorf("round %d: casnix %s exited by itself with %v before its kill:\n%s", round, args[0], werr, out.String())
			}
			if finished || strings.Contains(out.String(), "msg=serving") {
				st.afterStart++
			} else {
				st.duringStart++
			}
			if jerr == nil {
				st.journaled++
				if _, err := os.Stat(journal); err == nil {
					st.journalKept++
				}
			}
		}

		// The normal start.
		next, err := startServe(t, cas, sock, true)
		if err != nil {
			st.manual++
			t.Fatalf("round %d: casnix serve after the kills did not come up by itself: %v", round, err)
		}
		sp = next
		sc := checkServed(cas, sock, ks.want, owed, slices.Sorted(maps.Keys(owed)), true)
		st.losses += len(sc.losses)
		if len(sc.invalid) > 0 {
			st.invalid++
		}
		for _, m := range append(sc.losses, sc.invalid...) {
			t.Errorf("round %d (restore %v): %s", round, restore, m)
		}
		if restore && !maps.Equal(mapKeysSet(sc.valid), mapKeysSet(backupPaths)) {
			st.invalid++
			t.Errorf("round %d: after the interrupted restore %d paths are valid, the backup holds %d", round, len(sc.valid), len(backupPaths))
		}
		for _, left := range []string{"restore.journal", ".restore-*"} {
			if m, _ := filepath.Glob(filepath.Join(cas.DataDir, left)); len(m) > 0 {
				st.invalid++
				t.Errorf("round %d: %v left after the restart", round, m)
			}
		}
		if t.Failed() {
			t.Logf("daemon after the restart:\n%s", sp.log.String())
			break
		}
		if backup != "" {
			os.RemoveAll(backup)
		}
		valid = sc.valid
		t.Logf("round %d (%s): %d acknowledged uploads, %d owed, %d valid after the kills", round,
			map[bool]string{false: "upload", true: "restore"}[restore], len(acked)-present, len(owed), len(valid))
	}
	t.Logf("recovery-kills summary: %d kills in %d rounds (%d upload, %d restore), by opener %s; %d landed during start-up, %d after it served or finished; %d started on a journaled restore, %d left it journaled; %d acknowledged uploads; losses %d, invalid states %d, manual restarts %d; wall time %s",
		st.kills, st.rounds, st.uploadRounds, st.restoreRounds, fmtCounts(st.killedOpeners), st.duringStart, st.afterStart,
		st.journaled, st.journalKept, st.acked, st.losses, st.invalid, st.manual, time.Since(start).Round(time.Second))
	if !t.Failed() && (st.duringStart == 0 || st.journaled == 0) {
		t.Errorf("no kill landed during start-up (%d) or on a journaled restore (%d): the test did not test recovery", st.duringStart, st.journaled)
	}
}

// mapKeysSet is the key set of m.
func mapKeysSet[V any](m map[string]V) map[string]bool {
	out := map[string]bool{}
	for k := range m {
		out[k] = true
	}
	return out
}
