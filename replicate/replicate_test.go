package replicate_test

import (
	"bytes"
	"context"
	"fmt"
	"os"
	"os/exec"
	"path/filepath"
	"slices"
	"sort"
	"strings"
	"sync"
	"sync/atomic"
	"testing"
	"time"

	"github.com/benbjohnson/litestream"

	"github.com/casnix/casnix/db"
	"github.com/casnix/casnix/nar"
	"github.com/casnix/casnix/objstore"
	"github.com/casnix/casnix/replicate"
	"github.com/casnix/casnix/store"
	"github.com/casnix/casnix/tests/nixtest"
)

// The follower runs in a process of its own (see the package doc): this test binary,
// started again with these variables set, is that process.
const (
	followURL = "CASNIX_TEST_FOLLOW_URL"
	followOut = "CASNIX_TEST_FOLLOW_OUT"
)

func TestMain(m *testing.M) {
	if u := os.Getenv(followURL); u != "" {
		loc, err := objstore.ParseURL(u)
		if err == nil {
			err = replicate.Follow(context.Background(), loc, os.Getenv(followOut), 100*time.Millisecond, nil)
		}
		if err != nil {
			fmt.Fprintln(os.Stderr, err)
			os.Exit(1)
		}
		os.Exit(0)
	}
	os.Exit(m.Run())
}

// fileNAR is the NAR of a single regular file.
func fileNAR(t testing.TB, contents string) []byte {
	t.Helper()
	p := filepath.Join(t.TempDir(), "f")
	if err := os.WriteFile(p, []byte(contents), 0o644); err != nil {
		t.Fatal(err)
	}
	var b bytes.Buffer
	if _, err := nar.DumpPath(&b, p); err != nil {
		t.Fatal(err)
	}
	return b.Bytes()
}

// addPath adds path number i, referring to path i-1 (a chain, so a replica that showed
// a path without its reference would be caught).
func addPath(t testing.TB, st *store.Store, i int) string {
	t.Helper()
	name := fmt.Sprintf("%032d-p%d", i, i)
	var refs []string
	if i > 0 {
		refs = []string{fmt.Sprintf("%032d-p%d", i-1, i-1)}
	}
	b := st.NewBatch(context.Background())
	if _, err := b.Add(bytes.NewReader(fileNAR(t, name)), store.PathInfo{Name: name, References: refs}); err != nil {
		t.Fatal(err)
	}
	if _, err := b.Commit(); err != nil {
		t.Fatal(err)
	}
	return name
}

func names(t testing.TB, d *db.DB) []string {
	t.Helper()
	n, err := d.PathNames(context.Background())
	if err != nil {
		t.Fatal(err)
	}
	sort.Strings(n)
	return n
}

// TestReplicateRestoreFollow: a primary's casnix.db is replicated to a real S3 server
// while paths are added; a restore gives the same paths; a restore to a time gives
// exactly the paths committed by then; a follower in another process keeps a replica
// current within a bounded lag while readers read it without error and never see a path
// without its reference.
func TestReplicateRestoreFollow(t *testing.T) {
	srv := nixtest.StartS3(t)
	srv.SetEnv(t)
	ctx := context.Background()
	loc, err := objstore.ParseURL(srv.URL("store1"))
	if err != nil {
		t.Fatal(err)
	}
	dir := t.TempDir()
	// Packs in the bucket too: a replica shows a path only once its packs are there.
	st, err := store.Open(ctx, dir, store.Options{Packs: srv.URL("store1")})
	if err != nil {
		t.Fatal(err)
	}
	defer st.Close()
	var added []string
	for i := range 5 {
		added = append(added, addPath(t, st, i))
	}
	if err := st.UploadAll(ctx); err != nil {
		t.Fatal(err)
	}
	p, err := replicate.StartPrimary(ctx, filepath.Join(dir, store.DBFile), loc, replicate.Options{SyncInterval: 200 * time.Millisecond})
	if err != nil {
		t.Fatal(err)
	}
	defer p.Close(ctx)
	if err := p.Sync(ctx); err != nil {
		t.Fatal(err)
	}
	mid := time.Now()
	time.Sleep(1500 * time.Millisecond) // timestamps in the bucket have second granularity
	added = append(added, addPath(t, st, 5))
	if err := st.UploadAll(ctx); err != nil {
		t.Fatal(err)
	}
	if err := p.Sync(ctx); err != nil {
		t.Fatal(err)
	}

	// Newest state.
	out := filepath.Join(t.TempDir(), "restored.db")
	if err := replicate.Restore(ctx, loc, out, time.Time{}); err != nil {
		t.Fatal(err)
	}
	r, err := db.OpenReplica(ctx, out)
	if err != nil {
		t.Fatal(err)
	}
	if got := names(t, r); !slices.Equal(got, added) {
		t.Fatalf("restored paths %v, want %v", got, added)
	}
	r.Close()
	// As of mid: the first five.
	out = filepath.Join(t.TempDir(), "restored-mid.db")
	if err := replicate.Restore(ctx, loc, out, mid); err != nil {
		t.Fatal(err)
	}
	if r, err = db.OpenReplica(ctx, out); err != nil {
		t.Fatal(err)
	}
	if got := names(t, r); !slices.Equal(got, added[:5]) {
		t.Errorf("restored as of %s: paths %v, want %v", mid.Format(time.RFC3339Nano), got, added[:5])
	}
	r.Close()
	// Nothing under another prefix.
	other, _ := objstore.ParseURL(srv.URL("nothing-here"))
	if err := replicate.Restore(ctx, other, filepath.Join(t.TempDir(), "x.db"), time.Time{}); err == nil {
		t.Error("restore from an empty prefix succeeded")
	}

	// A follower in another process.
	rep := filepath.Join(t.TempDir(), "replica.db")
	cmd := exec.Command(os.Args[0], "-test.run=^$")
	cmd.Env = append(os.Environ(), followURL+"="+loc.String(), followOut+"="+rep)
	var flog bytes.Buffer
	cmd.Stdout, cmd.Stderr = &flog, &flog
	if err := cmd.Start(); err != nil {
		t.Fatal(err)
	}
	defer func() {
		cmd.Process.Kill()
		cmd.Wait()
	}()
	deadline := time.Now().Add(time.Minute)
	for {
		if id, _ := replicate.AppliedTXID(rep); id > 0 {
			break
		}
		if time.Now().After(deadline) {
			t.Fatalf("follower did not restore within a minute:\n%s", flog.String())
		}
		time.Sleep(50 * time.Millisecond)
	}
	if r, err = db.OpenReplica(ctx, rep); err != nil {
		t.Fatal(err)
	}
	defer r.Close()
	// Readers beside the follower: never an error, never a path without its reference.
	var stop atomic.Bool
	var reads atomic.Int64
	var wg sync.WaitGroup
	readErr := make(chan error, 2)
	for range 2 {
		wg.Add(1)
		go func() {
			defer wg.Done()
			for !stop.Load() {
				ns, err := r.PathNames(ctx)
				if err != nil {
					readErr <- err
					return
				}
				have := map[string]bool{}
				for _, n := range ns {
					have[n] = true
				}
				for i := range len(ns) {
					if !have[fmt.Sprintf("%032d-p%d", i, i)] {
						readErr <- fmt.Errorf("replica shows %d paths but not path %d: %v", len(ns), i, ns)
						return
					}
				}
				reads.Add(1)
			}
		}()
	}
	var lags []time.Duration
	for i := 6; i < 26; i++ {
		name := addPath(t, st, i)
		committed := time.Now()
		if i < 9 {
			// Before its pack is in the bucket, the replica has the path's metadata
			// (the follower applied it) but does not show the path.
			if err := p.Sync(ctx); err != nil {
				t.Fatal(err)
			}
			want, err := replicate.AppliedTXID(rep)
			if err != nil {
				t.Fatal(err)
			}
			for deadline := time.Now().Add(time.Minute); ; {
				got, _ := replicate.AppliedTXID(rep)
				if got > want {
					break
				}
				if time.Now().After(deadline) {
					t.Fatalf("follower stuck at transaction %d", got)
				}
				time.Sleep(10 * time.Millisecond)
			}
			if ok, err := r.HasPath(ctx, name); err != nil || ok {
				t.Fatalf("path %d shown on the replica before its pack is in the bucket (%v)", i, err)
			}
		}
		if err := st.UploadAll(ctx); err != nil {
			t.Fatal(err)
		}
		for {
			ok, err := r.HasPath(ctx, name)
			if err != nil {
				t.Fatal(err)
			}
			if ok {
				break
			}
			if time.Since(committed) > time.Minute {
				t.Fatalf("path %d not on the replica a minute after its commit:\n%s\nbucket: %s", i, flog.String(), listing(t, loc))
			}
			time.Sleep(10 * time.Millisecond)
		}
		if i >= 9 {
			lags = append(lags, time.Since(committed))
		}
	}
	stop.Store(true)
	wg.Wait()
	close(readErr)
	for err := range readErr {
		t.Error(err)
	}
	slices.Sort(lags)
	t.Logf("replica lag over %d commits, pack upload included (sync and follow every 200/100 ms): median %s, max %s; %d reads beside the follower",
		len(lags), lags[len(lags)/2].Round(time.Millisecond), lags[len(lags)-1].Round(time.Millisecond), reads.Load())
	if lags[len(lags)/2] > 10*time.Second {
		t.Errorf("median replica lag %s", lags[len(lags)/2])
	}
}

// listing names every object under loc, for failure messages.
func listing(t *testing.T, loc objstore.Location) string {
	b, err := objstore.Open(context.Background(), loc, objstore.Options{})
	if err != nil {
		return err.Error()
	}
	var out []string
	err = b.List(context.Background(), "", func(i objstore.Info) error {
		out = append(out, fmt.Sprintf("%s (%d bytes, %s)", i.Name, i.Size, i.Modified.Format(time.TimeOnly)))
		return nil
	})
	if err != nil {
		out = append(out, err.Error())
	}
	return strings.Join(out, "\n")
}

// TestAppliedTXIDWaitsForTheDatabase: the first restore writes its transaction file just
// before the database appears by rename; in between, nothing is applied yet (a reader that
// trusted the file alone opened a database that was not there).
func TestAppliedTXIDWaitsForTheDatabase(t *testing.T) {
	out := filepath.Join(t.TempDir(), "replica.db")
	if err := litestream.WriteTXIDFile(out, 7); err != nil { // as the follower's restore does
		t.Fatal(err)
	}
	for _, c := range []struct {
		name string
		db   bool
		want uint64
	}{
		{"transaction file, no database yet", false, 0},
		{"both", true, 7},
	} {
		if c.db {
			if err := os.WriteFile(out, nil, 0o644); err != nil {
				t.Fatal(err)
			}
		}
		got, err := replicate.AppliedTXID(out)
		if err != nil || got != c.want {
			t.Errorf("%s: AppliedTXID = %d, %v; want %d", c.name, got, err, c.want)
		}
	}
}
