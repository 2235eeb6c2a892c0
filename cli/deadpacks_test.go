package cli

import (
	"bytes"
	"context"
	"log/slog"
	"os"
	"path/filepath"
	"strings"
	"sync"
	"testing"
	"time"

	narpkg "github.com/casnix/casnix/nar"
	"github.com/casnix/casnix/store"
	"github.com/casnix/casnix/tests/nixtest"
)

// lockedBuffer is a log destination goroutines may write while the test reads it.
type lockedBuffer struct {
	mu sync.Mutex
	b  bytes.Buffer
}

func (l *lockedBuffer) Write(p []byte) (int, error) {
	l.mu.Lock()
	defer l.mu.Unlock()
	return l.b.Write(p)
}

func (l *lockedBuffer) String() string {
	l.mu.Lock()
	defer l.mu.Unlock()
	return l.b.String()
}

// TestDeadPackDeleter: serve's background round deletes a dead pack's object when
// store.DeleteDeadPacks may (here: no replica, WithoutReplica, the clock past the
// margin), logs it, and counts it for /metrics.
func TestDeadPackDeleter(t *testing.T) {
	srv := nixtest.StartS3(t)
	srv.SetEnv(t)
	st, err := store.Open(t.Context(), t.TempDir(), store.Options{Packs: srv.URL("deleter")})
	if err != nil {
		t.Fatal(err)
	}
	defer st.Close()
	const a = "00000000000000000000000000000000-a"
	var nar bytes.Buffer
	f := filepath.Join(t.TempDir(), "f")
	os.WriteFile(f, []byte("contents of a"), 0o644)
	if _, err := narpkg.DumpPath(&nar, f); err != nil {
		t.Fatal(err)
	}
	b := st.NewBatch(t.Context())
	if _, err := b.Add(&nar, store.PathInfo{Name: a}); err != nil {
		t.Fatal(err)
	}
	if _, err := b.Commit(); err != nil {
		t.Fatal(err)
	}
	if err := st.UploadAll(t.Context()); err != nil {
		t.Fatal(err)
	}
	if _, err := st.GC(t.Context(), store.GCOptions{Action: store.GCDeleteSpecific, Paths: []string{a}}); err != nil {
		t.Fatal(err)
	}
	if n, err := st.DeadPacksWaiting(t.Context()); err != nil || n != 1 {
		t.Fatalf("%d dead packs (%v), want 1", n, err)
	}
	var logs lockedBuffer
	ctx, cancel := context.WithCancel(t.Context())
	done := make(chan struct{})
	go func() {
		defer close(done)
		deadPackDeleter(ctx, st, store.DeadPackOptions{Margin: time.Millisecond, WithoutReplica: true,
			Now: func() time.Time { return time.Now().Add(time.Hour) }}, 20*time.Millisecond, slog.New(slog.NewTextHandler(&logs, nil)))
	}()
	defer func() { cancel(); <-done }()
	for deadline := time.Now().Add(time.Minute); ; time.Sleep(20 * time.Millisecond) {
		if n, err := st.DeadPacksWaiting(t.Context()); err != nil {
			t.Fatal(err)
		} else if n == 0 {
			break
		}
		if time.Now().After(deadline) {
			t.Fatalf("dead pack still waiting a minute later; log:\n%s", logs.String())
		}
	}
	for deadline := time.Now().Add(10 * time.Second); !strings.Contains(logs.String(), "deleted dead packs from the bucket"); time.Sleep(20 * time.Millisecond) {
		if time.Now().After(deadline) {
			t.Fatalf("no log of the deletion:\n%s", logs.String())
		}
	}
	var metrics bytes.Buffer
	packsMetrics(&metrics, st)
	for _, want := range []string{"\ncasnix_packs_dead_waiting 0\n", "\ncasnix_packs_deleted_from_bucket_total 1\n"} {
		if !strings.Contains(metrics.String(), want) {
			t.Fatalf("metrics lack %q:\n%s", want, metrics.String())
		}
	}
}
