package proto

import (
	"testing"
	"time"
)

// TestDeadlineMoved: a deadline is set when there is none, when the new
// one is earlier (a shorter phase), or when it would move on by more than
// the slack; not for a move within it.
func TestDeadlineMoved(t *testing.T) {
	t0 := time.Unix(1000, 0)
	tests := []struct {
		name      string
		set, want time.Time
		timeout   time.Duration
		move      bool
	}{
		{"none set", time.Time{}, t0, time.Minute, true},
		{"earlier (shorter phase)", t0, t0.Add(-time.Millisecond), time.Minute, true},
		{"within the slack", t0, t0.Add(900 * time.Millisecond), time.Minute, false},
		{"past the slack (1 s at most)", t0, t0.Add(1100 * time.Millisecond), time.Minute, true},
		{"a short timeout's slack is a sixteenth", t0, t0.Add(7 * time.Millisecond), 100 * time.Millisecond, true},
		{"same", t0, t0, time.Minute, false},
	}
	for _, tc := range tests {
		t.Run(tc.name, func(t *testing.T) {
			if got := moved(tc.set, tc.want, tc.timeout); got != tc.move {
				t.Errorf("moved(%v, %v, %v) = %v, want %v", tc.set, tc.want, tc.timeout, got, tc.move)
			}
		})
	}
}
