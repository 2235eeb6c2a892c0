package proto

import (
	"log/slog"
	"sync"
	"time"
)

// logLimiter lets one message of a kind through per interval and counts the
// rest into the next one. Refusals are logged per connection attempt, and a
// local user can make attempts as fast as the kernel accepts them: unlimited,
// they would fill the journal's disk.
type logLimiter struct {
	interval time.Duration // zero: a second

	mu      sync.Mutex
	last    map[string]time.Time
	dropped map[string]int
}

// warn logs msg at warning level unless one of the same msg was logged
// within the interval; then it only counts it.
func (l *logLimiter) warn(log *slog.Logger, msg string, args ...any) {
	now := time.Now()
	l.mu.Lock()
	if l.last == nil {
		l.last, l.dropped = map[string]time.Time{}, map[string]int{}
	}
	iv := l.interval
	if iv == 0 {
		iv = time.Second
	}
	if t, ok := l.last[msg]; ok && now.Sub(t) < iv {
		l.dropped[msg]++
		l.mu.Unlock()
		return
	}
	n := l.dropped[msg]
	l.last[msg], l.dropped[msg] = now, 0
	l.mu.Unlock()
	if n > 0 {
		args = append(args, "suppressed", n)
	}
	log.Warn(msg, args...)
}
