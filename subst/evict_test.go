package subst

import (
	"bytes"
	"context"
	"errors"
	"fmt"
	"path/filepath"
	"slices"
	"sync"
	"testing"
	"time"

	"github.com/casnix/casnix/binarycache"
	"github.com/casnix/casnix/store"
)

// Paths of the eviction fixture: each 200 KiB of random bytes (addTree),
// so each costs about the same disk.
const (
	evPinDep = "01000000000000000000000000000000-pin-dep"
	evPinTop = "02000000000000000000000000000000-pin-top" // → pin-dep, pinned
	evRoot   = "03000000000000000000000000000000-rooted"  // gcroot
	evTemp   = "04000000000000000000000000000000-temp"    // temp root of a live "connection"
	evLib    = "05000000000000000000000000000000-lib"
	evApp    = "06000000000000000000000000000000-app" // → lib
	evLocal  = "07000000000000000000000000000000-local"
)

func evA(i int) string { return fmt.Sprintf("1%d000000000000000000000000000000-a%d", i, i) }

// TestEvictLRU fills a store by substitution past a budget and evicts:
// least recently used substituted paths first (reads count as use, and a
// path goes only after its referrers), never the pinned closure, a gcroot,
// a temp root or a path a client added; readers during the eviction get
// the right NAR or an error for an evicted path; verify is clean after.
func TestEvictLRU(t *testing.T) {
	ctx := context.Background()
	src := openStore(t)
	key, pub := keyPair(t, "up-1")
	order := []string{evPinDep, evPinTop, evRoot, evTemp, evLib, evApp}
	for i := 1; i <= 6; i++ {
		order = append(order, evA(i))
	}
	for _, n := range order {
		var refs []string
		switch n {
		case evPinTop:
			refs = []string{evPinDep}
		case evApp:
			refs = []string{evLib}
		}
		addTree(t, src, n, refs...)
	}
	dir := t.TempDir()
	ex := &binarycache.Exporter{Store: src, Dir: dir, StoreDir: "/nix/store", Compression: "zstd", Key: key, Jobs: 2}
	if _, err := ex.Export(ctx, order); err != nil {
		t.Fatal(err)
	}
	srv := serve(t, dir)
	want := map[string][]byte{}
	for _, n := range order {
		want[n] = narOf(t, src, n)
	}

	for _, tc := range []struct {
		name  string
		reads []string // read (NarRender) after all are substituted
		// evictOrder: what must go first, in order; the evicted set must
		// be a prefix of it.
		evictOrder []string
		// tiny: a budget below what must stay: every evictable path goes,
		// nothing else.
		tiny bool
	}{
		{"no reads", nil, []string{evApp, evLib, evA(1), evA(2), evA(3), evA(4), evA(5), evA(6)}, false},
		{"reads", []string{evA(1), evA(2), evApp}, []string{evA(3), evA(4), evA(5), evA(6), evA(1), evA(2), evApp, evLib}, false},
		{"tiny budget", nil, []string{evApp, evLib, evA(1), evA(2), evA(3), evA(4), evA(5), evA(6)}, true},
	} {
		t.Run(tc.name, func(t *testing.T) {
			dst := openStore(t)
			dst.EnableAccessTimes()
			addTree(t, dst, evLocal)
			s := newSubst(t, dst, []string{srv.URL}, Options{Keys: pub})
			for _, n := range order {
				if _, err := s.Substitute(ctx, []string{n}, true); err != nil {
					t.Fatal(err)
				}
				time.Sleep(3 * time.Millisecond) // access times are in ms
			}
			if _, err := dst.AddPermRoot(ctx, evRoot, filepath.Join(dst.GCRoots(), "r")); err != nil {
				t.Fatal(err)
			}
			tr, err := dst.NewTempRoots()
			if err != nil {
				t.Fatal(err)
			}
			defer tr.Close()
			if err := tr.Add(ctx, evTemp); err != nil {
				t.Fatal(err)
			}
			for _, n := range tc.reads {
				time.Sleep(3 * time.Millisecond)
				if got := narOf(t, dst, n); !bytes.Equal(got, want[n]) {
					t.Fatalf("%s: wrong NAR", n)
				}
			}
			used, err := dst.DiskUsage()
			if err != nil {
				t.Fatal(err)
			}
			per := used / int64(len(order)+1)
			maxSize := used - per // over by about one path: evicts to 90%
			if tc.tiny {
				maxSize = 1
			}

			// Readers render every path throughout the eviction, through a
			// store of their own on the same data dir (another process,
			// say): their reads must not reorder what is evicted.
			rst, err := store.Open(ctx, dst.Dir(), store.Options{StoreDir: "/nix/store"})
			if err != nil {
				t.Fatal(err)
			}
			defer rst.Close()
			stop := make(chan struct{})
			var wg sync.WaitGroup
			var mu sync.Mutex
			failed := map[string]error{}
			for r := 0; r < 2; r++ {
				wg.Add(1)
				go func() {
					defer wg.Done()
					for {
						select {
						case <-stop:
							return
						default:
						}
						for _, n := range order {
							var b bytes.Buffer
							_, err := rst.NarRender(ctx, n, &b)
							if err == nil && !bytes.Equal(b.Bytes(), want[n]) {
								err = errors.New("WRONG BYTES")
							}
							if err != nil {
								mu.Lock()
								failed[n] = err
								mu.Unlock()
							}
						}
					}
				}()
			}
			res, err := dst.Evict(ctx, store.EvictOptions{MaxSize: maxSize, Pin: []string{evPinTop}})
			close(stop)
			wg.Wait()
			if err != nil {
				t.Fatal(err)
			}
			t.Logf("used %d, budget %d: evicted %v in %d rounds, %d → %d bytes", used, maxSize, res.Paths, res.Rounds, res.Before, res.After)
			if tc.tiny && len(res.Paths) != len(tc.evictOrder) {
				t.Fatalf("evicted %v, want every evictable path %v", res.Paths, tc.evictOrder)
			}
			if len(res.Paths) == 0 || (!tc.tiny && res.After > maxSize) {
				t.Fatalf("evicted %v, %d bytes left, budget %d", res.Paths, res.After, maxSize)
			}
			if len(res.Paths) > len(tc.evictOrder) {
				t.Fatalf("evicted %v, more than the evictable %v", res.Paths, tc.evictOrder)
			}
			wantGone := slices.Sorted(slices.Values(tc.evictOrder[:len(res.Paths)]))
			if !slices.Equal(res.Paths, wantGone) {
				t.Fatalf("evicted %v, want the least recently used %v", res.Paths, wantGone)
			}
			for _, n := range append(slices.Clone(order), evLocal) {
				gone := slices.Contains(res.Paths, n)
				if valid(t, dst, n) == gone {
					t.Fatalf("%s: valid %v after evicting %v", n, !gone, res.Paths)
				}
				var b bytes.Buffer
				_, err := dst.NarRender(ctx, n, &b)
				if gone && !errors.Is(err, store.ErrNotValid) {
					t.Fatalf("%s evicted: render gives %v, want not valid", n, err)
				}
				if !gone && n != evLocal && (err != nil || !bytes.Equal(b.Bytes(), want[n])) {
					t.Fatalf("%s: %v or wrong NAR", n, err)
				}
				if err := failed[n]; err != nil && !gone {
					t.Fatalf("reader of kept path %s: %v", n, err)
				}
			}
			// An evicted path reads as not valid, also to a reader that
			// started before it went (not as damage: "directory not found").
			for n, err := range failed {
				if !errors.Is(err, store.ErrNotValid) {
					t.Fatalf("reader of evicted %s: %v, want not valid", n, err)
				}
			}
			rep, err := dst.Verify(ctx, nil)
			if err != nil || !rep.OK() {
				t.Fatalf("verify: %+v %v", rep, err)
			}
			if st := dst.EvictStats(); st.Paths != int64(len(res.Paths)) || st.Runs != 1 {
				t.Fatalf("evict stats %+v", st)
			}
		})
	}
}
