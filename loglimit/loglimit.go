// Package loglimit rate-limits warnings that clients can trigger at will
// (refused connections, forged derivations), so that no one can fill the
// journal's disk through casnix's log.
package loglimit

import (
	"log/slog"
	"sync"
	"time"
)

// Limiter lets one message of a kind through per interval and counts the
// rest into the next one. Refusals are logged per connection attempt, and a
// local user can make attempts as fast as the kernel accepts them: unlimited,
// they would fill the journal's disk. The zero value is ready to use.
type Limiter struct {
	Interval time.Duration // zero: a second

	mu      sync.Mutex
	last    map[string]time.Time
	dropped map[string]int
}

// Warn logs msg at warning level unless one of the same msg was logged
// within the interval; then it only counts it.
func (l *Limiter) Warn(log *slog.Logger, msg string, args ...any) {
	now := time.Now()
	l.mu.Lock()
	if l.last == nil {
		l.last, l.dropped = map[string]time.Time{}, map[string]int{}
	}
	iv := l.Interval
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
