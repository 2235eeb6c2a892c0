package tests

import (
	"context"
	"encoding/hex"
	"errors"
	"io"
	"maps"
	"math/rand/v2"
	"os"
	"path/filepath"
	"slices"
	"strconv"
	"strings"
	"sync"
	"syscall"
	"testing"
	"time"

	"github.com/casnix/casnix/nar"
	"github.com/casnix/casnix/proto"
	"github.com/casnix/casnix/tests/nixtest"
)

// TestCopyToCrash kills `casnix serve` with SIGKILL crashKills times while clients push
// paths into it: a real `nix copy --to unix://` of the whole fixture store, and a protocol
// client that uploads path after path with AddToStoreNar and records each
// acknowledgement. After every kill the data dir is opened again: every acknowledged path
// is valid with the source's path-info, the valid set is closed under references. At the
// end a last copy completes, `casnix verify` is clean and every path dumps byte-identical
// to the source.
func TestCopyToCrash(t *testing.T) {
	nixtest.RequireHostNix(t)
	nixtest.CasnixBinary(t)
	f := nixtest.PopulateFixture(t)
	want := f.PathInfos(t)
	order := topoOrder(want)
	var total int64
	for _, pi := range want {
		total += pi.NarSize
	}
	seed := uint64(time.Now().UnixNano())
	if s := os.Getenv("CASNIX_E2E_SEED"); s != "" {
		seed, _ = strconv.ParseUint(s, 10, 64)
	}
	rng := rand.New(rand.NewPCG(seed, 1))
	t.Logf("source: %d paths, %d NAR bytes; seed %d (CASNIX_E2E_SEED repeats the kill delays)", len(order), total, seed)

	// Calibration: a clean copy into a scratch data dir takes full; kills land at random
	// points of it, so that they hit every phase (small paths, big ones, commits).
	from := "local?root=" + f.Root
	scratch := nixtest.NewCasnix(t)
	sd := scratch.Serve(t, filepath.Join(t.TempDir(), "scratch.sock"))
	start := time.Now()
	(&nixtest.Cmd{Name: "nix", Args: []string{"copy", "--no-check-sigs", "--all", "--from", from, "--to", sd.URL()}, Env: nixtest.NixEnv(t)}).Run(t)
	full := time.Since(start)
	sd.Stop(10 * time.Second)
	os.RemoveAll(scratch.DataDir)
	t.Logf("a clean nix copy --to casnix takes %s", full.Round(time.Millisecond))

	cas := nixtest.NewCasnix(t)
	sock := filepath.Join(t.TempDir(), "casnix.sock")
	acked := map[string]bool{}
	var mu sync.Mutex
	for kill := 0; kill < crashKills; kill++ {
		d := cas.Serve(t, sock)
		ctx, cancel := context.WithCancel(context.Background())
		copyCmd := (&nixtest.Cmd{Name: "nix", Args: []string{"copy", "--no-check-sigs", "--all", "--from", from, "--to", d.URL()},
			Env: nixtest.NixEnv(t)}).Exec(ctx)
		if err := copyCmd.Start(); err != nil {
			t.Fatal(err)
		}
		var wg sync.WaitGroup
		wg.Add(1)
		go func() {
			defer wg.Done()
			uploadUntilError(t, d.Socket, f, want, order, acked, &mu)
		}()
		delay := time.Duration((0.05 + 0.9*rng.Float64()) * float64(full))
		time.Sleep(delay)
		syscall.Kill(d.Pid(), syscall.SIGKILL)
		copyCmd.Wait()
		cancel()
		wg.Wait()
		d.Stop(time.Second)

		mu.Lock()
		var ack []string
		for p := range acked {
			ack = append(ack, p)
		}
		mu.Unlock()
		valid := cas.ValidPaths(t, order)
		for _, p := range ack {
			if _, ok := valid[p]; !ok {
				t.Errorf("kill %d (after %s): %s was acknowledged and is not valid after the restart", kill, delay.Round(time.Millisecond), p)
			}
		}
		checkClosed(t, kill, valid)
		for p, pi := range valid {
			if diff := nixtest.ComparePathInfo(pi, want[p]); len(diff) > 0 {
				t.Errorf("kill %d: %s: %s", kill, p, strings.Join(diff, "; "))
			}
		}
		t.Logf("kill %d after %s: %d acknowledged, %d/%d valid", kill, delay.Round(time.Millisecond), len(ack), len(valid), len(order))
		if t.Failed() {
			return
		}
		if len(valid) == len(order) {
			// Everything arrived before this kill: go on with an empty data dir, so that
			// every kill interrupts real work.
			checkAllDumps(t, cas, f, order)
			if r := cas.Try("verify"); !r.OK() {
				t.Fatalf("casnix verify after kill %d:\n%s", kill, r)
			}
			os.RemoveAll(cas.DataDir)
			mu.Lock()
			clear(acked)
			mu.Unlock()
		}
	}
	d := cas.Serve(t, sock)
	(&nixtest.Cmd{Name: "nix", Args: []string{"copy", "--no-check-sigs", "--all", "--from", from, "--to", d.URL()}, Env: nixtest.NixEnv(t)}).Run(t)
	d.Stop(30 * time.Second)
	if r := cas.Try("verify"); !r.OK() {
		t.Fatalf("casnix verify after %d kills:\n%s", crashKills, r)
	}
	valid := cas.ValidPaths(t, order)
	if len(valid) != len(order) {
		t.Fatalf("after the last copy %d of %d paths are valid", len(valid), len(order))
	}
	checkAllDumps(t, cas, f, order)
}

// checkAllDumps compares casnix dump of every path with the source's NAR.
func checkAllDumps(t *testing.T, cas *nixtest.Casnix, f *nixtest.Fixture, paths []string) {
	t.Helper()
	for _, p := range paths {
		if got, src := cas.Dump(t, p), f.Dump(t, p); got != src {
			t.Errorf("%s: casnix dump %s, source %s", p, got, src)
		}
	}
}

// uploadUntilError pushes the paths of order not yet acknowledged with AddToStoreNar, one
// connection, until the daemon goes away; acknowledged paths go into acked.
func uploadUntilError(t *testing.T, socket string, f *nixtest.Fixture, want map[string]nixtest.PathInfo, order []string, acked map[string]bool, mu *sync.Mutex) {
	cl, err := proto.Dial(socket)
	if err != nil {
		return // killed before we connected
	}
	defer cl.Close()
	for _, p := range order {
		mu.Lock()
		done := acked[p]
		mu.Unlock()
		if done {
			continue
		}
		pi := want[p]
		h, err := nixtest.ParseSHA256(pi.NarHash)
		if err != nil {
			t.Errorf("%s: %v", p, err)
			return
		}
		pr, pw := io.Pipe()
		go func() {
			_, err := nar.DumpPath(pw, f.RealPath(p))
			pw.CloseWithError(err)
		}()
		err = cl.AddToStoreNar(proto.AddInfo{
			Path: p, Deriver: pi.Deriver, NarHash: hex.EncodeToString(h), References: pi.References,
			NarSize: uint64(pi.NarSize), Sigs: pi.Signatures, CA: pi.CA, DontCheckSigs: true,
		}, pr)
		pr.Close()
		if err != nil {
			t.Logf("upload of %s ended: %v", p, err)
			var re *proto.RemoteError
			if errors.As(err, &re) {
				t.Errorf("casnix refused %s: %v", p, err)
			}
			return
		}
		mu.Lock()
		acked[p] = true
		mu.Unlock()
	}
}

// topoOrder sorts paths so that references come before their referrers.
func topoOrder(infos map[string]nixtest.PathInfo) []string {
	var out []string
	seen := map[string]bool{}
	var visit func(p string)
	visit = func(p string) {
		if seen[p] {
			return
		}
		seen[p] = true
		for _, r := range infos[p].References {
			if r != p {
				visit(r)
			}
		}
		out = append(out, p)
	}
	for _, p := range slices.Sorted(maps.Keys(infos)) {
		visit(p)
	}
	return out
}
