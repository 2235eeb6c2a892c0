package binarycache

import (
	"context"
	"errors"
	"slices"
	"sync"
	"testing"
)

func TestRunDAG(t *testing.T) {
	// d → c → b → a, e → a; b fails.
	deps := map[string][]string{"a": nil, "b": {"a"}, "c": {"b", "c"}, "d": {"c"}, "e": {"a", "outside"}}
	nodes := []string{"e", "d", "c", "b", "a"}
	boom := errors.New("boom")
	for _, tc := range []struct {
		name      string
		keepGoing bool
		wantRan   []string
	}{
		{"keep going", true, []string{"a", "b", "e"}},
		{"stop", false, nil},
	} {
		t.Run(tc.name, func(t *testing.T) {
			var mu sync.Mutex
			var order []string
			res, err := RunDAG(context.Background(), nodes, func(n string) []string { return deps[n] }, 3, tc.keepGoing,
				func(_ context.Context, n string) error {
					mu.Lock()
					defer mu.Unlock()
					for _, d := range deps[n] {
						if d != n && d != "outside" && !slices.Contains(order, d) {
							t.Errorf("%s ran before its dependency %s", n, d)
						}
					}
					order = append(order, n)
					if n == "b" {
						return boom
					}
					return nil
				})
			if !errors.Is(err, boom) && !tc.keepGoing {
				t.Errorf("err = %v, want boom", err)
			}
			if !errors.Is(res["b"], boom) || !errors.Is(res["c"], ErrDependency) || !errors.Is(res["d"], ErrDependency) {
				t.Errorf("results %v", res)
			}
			if tc.keepGoing {
				slices.Sort(order)
				if !slices.Equal(order, tc.wantRan) || res["a"] != nil || res["e"] != nil {
					t.Errorf("ran %v (%v), want %v", order, res, tc.wantRan)
				}
			}
		})
	}
	// A cycle cannot be ordered: reported, not a hang.
	_, err := RunDAG(context.Background(), []string{"x", "y"}, func(n string) []string {
		return map[string][]string{"x": {"y"}, "y": {"x"}}[n]
	}, 2, true, func(context.Context, string) error { return nil })
	if err == nil {
		t.Error("cycle not reported")
	}
}
