package subst

import (
	"context"
	"slices"
	"testing"
)

// TestSelect: a client's substituter URLs name casnix's upstreams by
// scheme, host and path (queries and a trailing slash aside); the others
// are ignored, and a context's selection leaves unselected upstreams out
// of every lookup's order.
func TestSelect(t *testing.T) {
	s, err := New(nil, []string{"https://cache.nixos.org?priority=40", "http://127.0.0.1:8080/ci/", "file:///srv/cache"}, Options{StoreDir: "/nix/store"})
	if err != nil {
		t.Fatal(err)
	}
	defer s.Close()
	for _, tc := range []struct {
		urls    []string
		on      []int
		ignored []string
	}{
		{nil, nil, nil},
		{[]string{"https://cache.nixos.org/"}, []int{0}, nil},
		{[]string{"https://cache.nixos.org?priority=10", "https://cache.nixos.org"}, []int{0}, nil},
		{[]string{"http://127.0.0.1:8080/ci", "file:///srv/cache/"}, []int{1, 2}, nil},
		{[]string{"http://127.0.0.1:8080/", "https://cache.nixos.org/extra", "s3://bucket"}, nil,
			[]string{"http://127.0.0.1:8080/", "https://cache.nixos.org/extra", "s3://bucket"}},
		{[]string{"file:///srv/cache", "%zz"}, []int{2}, []string{"%zz"}},
	} {
		sel, ignored := s.Select(tc.urls)
		var on []int
		for i := range s.ups {
			if allowed(WithSelection(context.Background(), sel), i) {
				on = append(on, i)
			}
		}
		if !slices.Equal(on, tc.on) || sel.Len() != len(tc.on) || !slices.Equal(ignored, tc.ignored) {
			t.Errorf("Select(%q): upstreams %v (Len %d), ignored %q; want %v, %q", tc.urls, on, sel.Len(), ignored, tc.on, tc.ignored)
		}
		// A selection of the upstreams whose priority the URL gives: ordered
		// contacts none and keeps exactly the selected.
		if slices.Contains(tc.on, 1) || slices.Contains(tc.on, 2) {
			continue
		}
		if got := s.ordered(WithSelection(context.Background(), sel)); !slices.Equal(got, on) {
			t.Errorf("Select(%q): ordered %v, want %v", tc.urls, got, on)
		}
	}
	if !allowed(context.Background(), 1) || !allowed(WithSelection(context.Background(), nil), 1) {
		t.Error("no selection must allow every upstream")
	}
}
