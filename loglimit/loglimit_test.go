package loglimit

import (
	"bytes"
	"log/slog"
	"strings"
	"testing"
	"time"
)

// TestLogLimiter: a burst of the same warning logs once, and the next one
// after the interval says how many were left out.
func TestLogLimiter(t *testing.T) {
	var buf bytes.Buffer
	log := slog.New(slog.NewTextHandler(&buf, nil))
	l := &Limiter{Interval: 50 * time.Millisecond}
	for range 1000 {
		l.Warn(log, "refusing connection", "uid", 1)
	}
	l.Warn(log, "another kind")
	if got := strings.Count(buf.String(), "\n"); got != 2 {
		t.Fatalf("%d lines after a burst, want 2:\n%s", got, buf.String())
	}
	time.Sleep(60 * time.Millisecond)
	l.Warn(log, "refusing connection", "uid", 1)
	if !strings.Contains(buf.String(), "suppressed=999") {
		t.Errorf("the line after the interval does not count the suppressed ones:\n%s", buf.String())
	}
}
