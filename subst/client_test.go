package subst

import (
	"context"
	"slices"
	"testing"
)

// TestSelect: a client's substituter URLs name casnix's upstreams by
// scheme, host and path (queries and a trailing slash aside), opt-in ones
// included; the others are ignored, and a context's selection leaves
// unselected upstreams out of every lookup's order. Without a selection,
// every upstream but the opt-in ones is used.
func TestSelect(t *testing.T) {
	s, err := New(nil, []string{"https://cache.nixos.org?priority=40", "http://127.0.0.1:8080/ci/", "file:///srv/cache"},
		Options{StoreDir: "/nix/store", OptIn: []string{"https://opt.example?priority=5", "file:///srv/cache"}})
	if err != nil {
		t.Fatal(err)
	}
	defer s.Close()
	if s.Len() != 4 || s.Default().Len() != 3 {
		t.Fatalf("Len %d, Default().Len %d; want 4, 3 (a URL in both lists is not opt-in)", s.Len(), s.Default().Len())
	}
	for _, tc := range []struct {
		base    *Selection
		urls    []string
		on      []int
		ignored []string
	}{
		{nil, nil, nil, nil},
		{s.Default(), nil, []int{0, 1, 2}, nil},
		{nil, []string{"https://cache.nixos.org/"}, []int{0}, nil},
		{nil, []string{"https://cache.nixos.org?priority=10", "https://cache.nixos.org"}, []int{0}, nil},
		{nil, []string{"http://127.0.0.1:8080/ci", "file:///srv/cache/"}, []int{1, 2}, nil},
		{nil, []string{"http://127.0.0.1:8080/", "https://cache.nixos.org/extra", "s3://bucket"}, nil,
			[]string{"http://127.0.0.1:8080/", "https://cache.nixos.org/extra", "s3://bucket"}},
		{nil, []string{"file:///srv/cache", "%zz"}, []int{2}, []string{"%zz"}},
		{nil, []string{"https://opt.example/"}, []int{3}, nil},
		{s.Default(), []string{"https://opt.example", "https://cache.nixos.org"}, []int{0, 1, 2, 3}, nil},
	} {
		sel, ignored := s.Select(tc.base, tc.urls)
		var on []int
		for i := range s.ups {
			if s.allowed(WithSelection(context.Background(), sel), i) {
				on = append(on, i)
			}
		}
		if !slices.Equal(on, tc.on) || sel.Len() != len(tc.on) || !slices.Equal(ignored, tc.ignored) {
			t.Errorf("Select(%v, %q): upstreams %v (Len %d), ignored %q; want %v, %q", tc.base != nil, tc.urls, on, sel.Len(), ignored, tc.on, tc.ignored)
		}
		// A selection of upstreams whose priority the URL gives: ordered
		// contacts none and keeps exactly the selected, lowest number first.
		if slices.Contains(tc.on, 1) || slices.Contains(tc.on, 2) {
			continue
		}
		want := slices.Clone(on)
		slices.Reverse(want) // opt.example (5) before cache.nixos.org (40)
		if got := s.ordered(WithSelection(context.Background(), sel)); !slices.Equal(got, want) {
			t.Errorf("Select(%q): ordered %v, want %v", tc.urls, got, want)
		}
	}
	for i, want := range []bool{true, true, true, false} {
		if s.allowed(context.Background(), i) != want || s.allowed(WithSelection(context.Background(), nil), i) != want {
			t.Errorf("upstream %d without a selection: allowed %v", i, !want)
		}
	}
}
