package subst

import (
	"context"
	"errors"
	"fmt"
	"net/http"
	"os"
	"path/filepath"
	"slices"
	"strings"
	"sync/atomic"
	"syscall"
	"testing"
	"time"

	"github.com/casnix/casnix/fusefs"
	"github.com/casnix/casnix/store"
	"github.com/casnix/casnix/tests/nixtest"
)

// mountLazy mounts st at a new directory as `serve --lazy --mount` does.
func mountLazy(t *testing.T, l *Lazy, st *store.Store) string {
	t.Helper()
	nixtest.RequireFUSE(t)
	mnt := t.TempDir()
	srv, err := fusefs.Mount(mnt, st, fusefs.Options{ListRoot: true, Deletions: st.Deletions, Fetch: func(_ context.Context, name string) error {
		err := l.Ensure(context.Background(), name)
		if errors.Is(err, ErrNoSubstitute) {
			return fmt.Errorf("%w: %v", fusefs.ErrNotFound, err)
		}
		return err
	}})
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() {
		if err := srv.Unmount(); err != nil {
			t.Errorf("unmount: %v", err)
		}
	})
	return mnt
}

// TestLazyMount: the first lookup of a path only the upstream has fetches
// its closure and serves its bytes, rooted; a slow fetch blocks only
// lookups of its own path; a failing upstream gives EIO and a later
// lookup fetches once it is back; a path nobody has is ENOENT.
func TestLazyMount(t *testing.T) {
	f := newFixture(t)
	srv := serve(t, f.cache(t, f.key))
	release := make(chan struct{})
	var failNars atomic.Bool
	srv.hook = func(w http.ResponseWriter, r *http.Request, n int) bool {
		if !strings.HasPrefix(r.URL.Path, "/nar/") {
			return false
		}
		if failNars.Load() {
			http.Error(w, "down", http.StatusServiceUnavailable)
			return true
		}
		<-release
		return false
	}
	dst := openStore(t)
	s := newSubst(t, dst, []string{srv.URL}, Options{Keys: f.pub, Retries: -1})
	l := s.Lazy(true, 0)
	t.Cleanup(l.Close)
	mnt := mountLazy(t, l, dst)

	// A's fetch hangs in the upstream; meanwhile other lookups answer.
	done := make(chan error, 1)
	go func() {
		_, err := os.Stat(filepath.Join(mnt, pathA, "big"))
		done <- err
	}()
	for deadline := time.Now().Add(10 * time.Second); len(srv.narRequests()) == 0; {
		if time.Now().After(deadline) {
			t.Fatal("no NAR requested")
		}
		time.Sleep(5 * time.Millisecond)
	}
	t0 := time.Now()
	if _, err := os.Stat(filepath.Join(mnt, pathX)); !errors.Is(err, syscall.ENOENT) {
		t.Fatalf("path nobody has: %v", err)
	}
	if d := time.Since(t0); d > 5*time.Second {
		t.Fatalf("another lookup waited %v for a slow fetch", d)
	}
	select {
	case err := <-done:
		t.Fatalf("lookup returned before its fetch: %v", err)
	default:
	}
	close(release)
	if err := <-done; err != nil {
		t.Fatal(err)
	}

	// The upstream fails: EIO, nothing valid; back: the next lookup fetches.
	failNars.Store(true)
	if _, err := os.Stat(filepath.Join(mnt, pathC)); !errors.Is(err, syscall.EIO) {
		t.Fatalf("lookup with the upstream failing: %v", err)
	}
	if valid(t, dst, pathC) || valid(t, dst, pathB) {
		t.Fatal("a failed fetch left paths")
	}
	failNars.Store(false)
	got, err := os.ReadFile(filepath.Join(mnt, pathC, "sub", "x"))
	if err != nil {
		t.Fatal(err)
	}
	if want := "#!/bin/sh\n" + pathB; string(got) != want {
		t.Fatalf("read %q, want %q", got, want)
	}
	checkClosure(t, f, dst)
	big, err := os.ReadFile(filepath.Join(mnt, pathB, "big"))
	if err != nil || len(big) != 200<<10 {
		t.Fatalf("read big: %d bytes, %v", len(big), err)
	}

	// What was fetched is rooted.
	roots, err := dst.Roots(context.Background())
	if err != nil {
		t.Fatal(err)
	}
	rooted := map[string]bool{}
	for _, names := range roots {
		for _, n := range names {
			rooted[n] = true
		}
	}
	for _, n := range []string{pathA, pathB, pathC} {
		if !rooted[n] {
			t.Errorf("%s fetched but not a root: %v", n, roots)
		}
	}
}

// TestLazyRootsExpire: a fetched path is rooted for the grace period, then
// it is an ordinary path (a collection may take it).
func TestLazyRootsExpire(t *testing.T) {
	f := newFixture(t)
	srv := serve(t, f.cache(t, f.key))
	dst := openStore(t)
	s := newSubst(t, dst, []string{srv.URL}, Options{Keys: f.pub})
	const grace = 100 * time.Millisecond
	l := s.Lazy(true, grace)
	t.Cleanup(l.Close)
	rooted := func() bool {
		roots, err := dst.Roots(context.Background())
		if err != nil {
			t.Fatal(err)
		}
		for _, names := range roots {
			for _, n := range names {
				if n == pathA {
					return true
				}
			}
		}
		return false
	}
	t0 := time.Now()
	if err := l.Ensure(context.Background(), pathA); err != nil {
		t.Fatal(err)
	}
	if !rooted() && time.Since(t0) < grace {
		t.Fatal("fetched path not rooted")
	}
	for deadline := time.Now().Add(5 * time.Second); rooted(); time.Sleep(10 * time.Millisecond) {
		if time.Now().After(deadline) {
			t.Fatal("the root outlived two grace periods by far")
		}
	}
	if d := time.Since(t0); d < grace {
		t.Fatalf("root dropped after %v, before the grace period", d)
	}
	if err := l.Ensure(context.Background(), pathX); !errors.Is(err, ErrNoSubstitute) {
		t.Fatalf("Ensure of a path nobody has: %v", err)
	}
}

// TestLazyLookupFlood: many lookups at once of a path nobody has make one
// upstream request, and the miss is cached.
func TestLazyLookupFlood(t *testing.T) {
	f := newFixture(t)
	srv := serve(t, f.cache(t, f.key))
	slow := make(chan struct{})
	srv.hook = func(w http.ResponseWriter, r *http.Request, n int) bool {
		if strings.HasSuffix(r.URL.Path, ".narinfo") {
			<-slow
		}
		return false
	}
	s := newSubst(t, openStore(t), []string{srv.URL}, Options{Keys: f.pub})
	l := s.Lazy(true, 0)
	t.Cleanup(l.Close)
	errs := make(chan error, 50)
	for range 50 {
		go func() {
			v, err := l.Valid(context.Background(), []string{pathX})
			if err == nil && v[pathX] {
				err = errors.New("valid")
			}
			errs <- err
		}()
	}
	time.Sleep(200 * time.Millisecond)
	close(slow)
	for range 50 {
		if err := <-errs; err != nil {
			t.Fatal(err)
		}
	}
	if _, err := l.Info(context.Background(), pathX); err == nil {
		t.Fatal("path-info of a path nobody has")
	}
	if n := srv.n("/" + pathX[:32] + ".narinfo"); n != 1 {
		t.Fatalf("%d narinfo requests", n)
	}
}

// TestLazyUpstreamErrors: a narinfo request that fails is an error of the
// query (not "not valid") and of Ensure (not "no such path"); once the
// upstream answers again, the path is valid and fetched.
func TestLazyUpstreamErrors(t *testing.T) {
	f := newFixture(t)
	srv := serve(t, f.cache(t, f.key))
	var failing atomic.Bool
	failing.Store(true)
	srv.hook = func(w http.ResponseWriter, r *http.Request, n int) bool {
		if failing.Load() && strings.HasSuffix(r.URL.Path, ".narinfo") {
			http.Error(w, "down", http.StatusInternalServerError)
			return true
		}
		return false
	}
	dst := openStore(t)
	s := newSubst(t, dst, []string{srv.URL}, Options{Keys: f.pub, Retries: -1})
	l := s.Lazy(true, 0)
	t.Cleanup(l.Close)
	ctx := context.Background()
	if _, err := l.Info(ctx, pathA); err == nil || errors.Is(err, store.ErrNotValid) {
		t.Fatalf("Info with the upstream failing: %v", err)
	}
	if v, err := l.Valid(ctx, []string{pathA}); err == nil {
		t.Fatalf("Valid with the upstream failing: %v", v)
	}
	if err := l.Ensure(ctx, pathA); err == nil || errors.Is(err, ErrNoSubstitute) {
		t.Fatalf("Ensure with the upstream failing: %v", err)
	}
	failing.Store(false)
	if pi, err := l.Info(ctx, pathB); err != nil || !slices.Equal(pi.References, []string{pathA}) {
		t.Fatalf("Info: %v %v", pi, err)
	}
	if err := l.Ensure(ctx, pathB); err != nil || !valid(t, dst, pathA) || !valid(t, dst, pathB) {
		t.Fatalf("Ensure: %v", err)
	}
}

// TestLazyRefetchAfterGC: a collection during the grace period keeps what
// a lookup fetched; afterwards it may delete it, and the next lookup
// fetches it again.
func TestLazyRefetchAfterGC(t *testing.T) {
	f := newFixture(t)
	srv := serve(t, f.cache(t, f.key))
	dst := openStore(t)
	s := newSubst(t, dst, []string{srv.URL}, Options{Keys: f.pub})
	const grace = 300 * time.Millisecond
	l := s.Lazy(true, grace)
	t.Cleanup(l.Close)
	mnt := mountLazy(t, l, dst)
	file := filepath.Join(mnt, pathB, "sub", "x")
	if _, err := os.ReadFile(file); err != nil {
		t.Fatal(err)
	}
	ctx := context.Background()
	res, err := dst.GC(ctx, store.GCOptions{Action: store.GCDeleteDead})
	if err != nil {
		t.Fatal(err)
	}
	if len(res.Paths) != 0 {
		t.Fatalf("a collection in the grace period deleted %v", res.Paths)
	}
	time.Sleep(2*grace + 100*time.Millisecond)
	res, err = dst.GC(ctx, store.GCOptions{Action: store.GCDeleteDead})
	if err != nil {
		t.Fatal(err)
	}
	if !slices.Equal(res.Paths, []string{pathA, pathB}) {
		t.Fatalf("the collection after the grace period deleted %v", res.Paths)
	}
	// The mount invalidates the deleted entries within a second or so;
	// then a lookup fetches the closure again.
	for deadline := time.Now().Add(10 * time.Second); !valid(t, dst, pathB); time.Sleep(50 * time.Millisecond) {
		if time.Now().After(deadline) {
			t.Fatal("not fetched again after its collection")
		}
		os.Stat(filepath.Join(mnt, pathB))
	}
	got, err := os.ReadFile(file)
	if err != nil || string(got) != "#!/bin/sh\n"+pathA {
		t.Fatalf("read after refetch: %q %v", got, err)
	}
}
