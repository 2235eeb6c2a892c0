package subst

import (
	"context"
	"net/http"
	"strings"
	"sync"
	"sync/atomic"
	"testing"
	"time"

	"github.com/casnix/casnix/sched"
	"github.com/casnix/casnix/store"
)

// fetchLog records, per path, whether each fetch of it ran as idle work.
type fetchLog struct {
	mu   sync.Mutex
	idle map[string][]bool
	// ordinary gets the name of each fetch that is not idle work.
	ordinary chan string
}

func recordFetches(t *testing.T) *fetchLog {
	l := &fetchLog{idle: map[string][]bool{}, ordinary: make(chan string, 16)}
	testHookFetch = func(ctx context.Context, name string) {
		idle := sched.IsIdle(ctx)
		l.mu.Lock()
		l.idle[name] = append(l.idle[name], idle)
		l.mu.Unlock()
		if !idle {
			l.ordinary <- name
		}
	}
	t.Cleanup(func() { testHookFetch = nil })
	return l
}

func (l *fetchLog) reset() {
	l.mu.Lock()
	defer l.mu.Unlock()
	clear(l.idle)
}

func (l *fetchLog) get(name string) []bool {
	l.mu.Lock()
	defer l.mu.Unlock()
	return append([]bool(nil), l.idle[name]...)
}

// TestFetchIdle: the pull-through's background fetches are idle work
// (store.Batch then ingests on idle threads); a daemon substitution's and
// a lazy lookup's are not.
func TestFetchIdle(t *testing.T) {
	f := newFixture(t)
	up := serve(t, f.cache(t, f.key))
	log := recordFetches(t)
	closure := []string{pathA, pathB, pathC}
	check := func(t *testing.T, dst *store.Store, idle bool) {
		t.Helper()
		for deadline := time.Now().Add(30 * time.Second); !valid(t, dst, pathC); time.Sleep(10 * time.Millisecond) {
			if time.Now().After(deadline) {
				t.Fatal("closure not fetched after 30 s")
			}
		}
		checkClosure(t, f, dst)
		for _, n := range closure {
			if got := log.get(n); len(got) != 1 || got[0] != idle {
				t.Fatalf("%s fetched as idle work %v, want once %v", n, got, idle)
			}
		}
	}
	t.Run("pull-through", func(t *testing.T) {
		log.reset()
		dst := openStore(t)
		hs, _, _ := pullServer(t, newSubst(t, dst, []string{up.URL}, Options{Keys: f.pub}), dst)
		if code, body := httpGet(t, hs.URL+"/"+store.HashPart(pathC)+".narinfo"); code != http.StatusOK {
			t.Fatalf("narinfo: %d %s", code, body)
		}
		check(t, dst, true)
	})
	t.Run("substitute", func(t *testing.T) {
		log.reset()
		dst := openStore(t)
		s := newSubst(t, dst, []string{up.URL}, Options{Keys: f.pub})
		s.PullThrough(true).Close() // spooled fetches, as in serve --http
		if _, err := s.Substitute(context.Background(), []string{pathC}, true); err != nil {
			t.Fatal(err)
		}
		check(t, dst, false)
	})
	t.Run("lazy", func(t *testing.T) {
		log.reset()
		dst := openStore(t)
		l := newSubst(t, dst, []string{up.URL}, Options{Keys: f.pub}).Lazy(true, 0)
		defer l.Close()
		if err := l.Ensure(context.Background(), pathC); err != nil {
			t.Fatal(err)
		}
		check(t, dst, false)
	})
}

// TestOrdinaryOvertakesIdle: a daemon substitution of a path an idle
// fetch (the pull-through's) is fetching does not wait for that fetch,
// which a busy machine may starve: it fetches the path at ordinary
// priority, the idle fetch's caller gets its result, and the upstream
// sends the NAR once (both follow one spool).
func TestOrdinaryOvertakesIdle(t *testing.T) {
	f := newFixture(t)
	up := serve(t, f.cache(t, f.key))
	release := make(chan struct{})
	up.hook = func(w http.ResponseWriter, r *http.Request, n int) bool {
		if strings.HasPrefix(r.URL.Path, "/nar/") {
			<-release
		}
		return false
	}
	log := recordFetches(t)
	dst := openStore(t)
	s := newSubst(t, dst, []string{up.URL}, Options{Keys: f.pub})
	p := s.PullThrough(true)
	defer p.Close()
	idleErr := make(chan error, 1)
	go func() {
		_, err := s.Substitute(sched.WithIdle(context.Background()), []string{pathA}, true)
		idleErr <- err
	}()
	for deadline := time.Now().Add(10 * time.Second); len(up.narRequests()) == 0; time.Sleep(5 * time.Millisecond) {
		if time.Now().After(deadline) {
			t.Fatal("the idle fetch did not start")
		}
	}
	ordErr := make(chan error, 1)
	go func() {
		_, err := s.Substitute(context.Background(), []string{pathA}, true)
		ordErr <- err
	}()
	select {
	case n := <-log.ordinary:
		if n != pathA {
			t.Fatalf("ordinary fetch of %s", n)
		}
	case <-time.After(10 * time.Second):
		close(release)
		t.Fatal("the ordinary substitution waits for the idle fetch")
	}
	close(release)
	for _, ch := range []chan error{ordErr, idleErr} {
		if err := <-ch; err != nil {
			t.Fatal(err)
		}
	}
	if !valid(t, dst, pathA) {
		t.Fatal("not stored")
	}
	if got := log.get(pathA); len(got) != 2 || !got[0] || got[1] {
		t.Fatalf("fetches as idle work %v, want [true false]", got)
	}
	for path, n := range up.narRequests() {
		if n != 1 {
			t.Fatalf("upstream sent %s %d times", path, n)
		}
	}
	settle(t, s)
}

// TestHoldIngest: while the HTTP server is busy (HoldIngest), a pull's
// ingest waits (its download goes on) and nothing becomes valid; once the
// server is idle the closure is ingested.
func TestHoldIngest(t *testing.T) {
	f := newFixture(t)
	up := serve(t, f.cache(t, f.key))
	dst := openStore(t)
	hs, h, _ := pullServer(t, newSubst(t, dst, []string{up.URL}, Options{Keys: f.pub}), dst)
	var busy atomic.Bool
	busy.Store(true)
	h.Pull.(*PullThrough).HoldIngest(busy.Load)
	if code, body := httpGet(t, hs.URL+"/"+store.HashPart(pathC)+".narinfo"); code != http.StatusOK {
		t.Fatalf("narinfo: %d %s", code, body)
	}
	// The references come first: the leaf's download starts, its ingest
	// waits.
	for deadline := time.Now().Add(30 * time.Second); len(up.narRequests()) < 1; time.Sleep(10 * time.Millisecond) {
		if time.Now().After(deadline) {
			t.Fatal("no NAR downloaded while the ingest was held")
		}
	}
	time.Sleep(500 * time.Millisecond)
	for _, n := range []string{pathA, pathB, pathC} {
		if valid(t, dst, n) {
			t.Fatalf("%s ingested while the server was busy", n)
		}
	}
	busy.Store(false)
	for deadline := time.Now().Add(30 * time.Second); !valid(t, dst, pathC); time.Sleep(10 * time.Millisecond) {
		if time.Now().After(deadline) {
			t.Fatal("closure not ingested 30 s after the server went idle")
		}
	}
	checkClosure(t, f, dst)
}

// TestHoldIngestBounded: a server that stays busy holds a pull's ingest
// back for maxHold at most; then the closure is stored anyway.
func TestHoldIngestBounded(t *testing.T) {
	defer func(d time.Duration) { maxHold = d }(maxHold)
	maxHold = 300 * time.Millisecond
	f := newFixture(t)
	up := serve(t, f.cache(t, f.key))
	dst := openStore(t)
	hs, h, _ := pullServer(t, newSubst(t, dst, []string{up.URL}, Options{Keys: f.pub}), dst)
	h.Pull.(*PullThrough).HoldIngest(func() bool { return true })
	if code, body := httpGet(t, hs.URL+"/"+store.HashPart(pathC)+".narinfo"); code != http.StatusOK {
		t.Fatalf("narinfo: %d %s", code, body)
	}
	for deadline := time.Now().Add(30 * time.Second); !valid(t, dst, pathC); time.Sleep(10 * time.Millisecond) {
		if time.Now().After(deadline) {
			t.Fatal("closure not stored 30 s into a server that stays busy")
		}
	}
	checkClosure(t, f, dst)
}
