package subst

import (
	"context"
	"fmt"
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
		sel, ign := s.Select(tc.base, tc.urls, false)
		var ignored []string
		for _, ig := range ign {
			if ig.Err != nil {
				t.Errorf("Select(%q) for an untrusted client: %s ignored with %v, want no error", tc.urls, ig.URL, ig.Err)
			}
			ignored = append(ignored, ig.URL)
		}
		var on []int
		for i := range s.list() {
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

// TestSelectTrusted: a trusted client's URL naming none of the upstreams
// adds one, as nix-daemon uses any cache a trusted client names: opt-in
// (no other client's default), never an untrusted client's even if it
// names it, one per URL however many clients name it, only http(s) and
// file caches, at most MaxClientUpstreams.
func TestSelectTrusted(t *testing.T) {
	s, err := New(nil, []string{"https://cache.nixos.org"}, Options{StoreDir: "/nix/store"})
	if err != nil {
		t.Fatal(err)
	}
	defer s.Close()
	on := func(sel *Selection) []int {
		var out []int
		for i := range s.list() {
			if s.allowed(WithSelection(context.Background(), sel), i) {
				out = append(out, i)
			}
		}
		return out
	}
	if bare, _ := New(nil, nil, Options{StoreDir: "/nix/store"}); bare.Configured() {
		t.Error("a substituter without upstreams is Configured")
	} else if bare.Select(nil, []string{"https://ci.example"}, true); bare.Configured() || bare.Len() != 1 {
		t.Errorf("after a trusted client added a cache: Configured %v, Len %d; want false, 1", bare.Configured(), bare.Len())
	}
	if !s.Configured() {
		t.Error("a substituter with an upstream is not Configured")
	}
	sel, ign := s.Select(nil, []string{"https://cache.nixos.org/", "https://ci.example/cache?priority=3"}, true)
	if got := on(sel); !slices.Equal(got, []int{0, 1}) || len(ign) != 0 || s.Len() != 2 {
		t.Fatalf("trusted Select: upstreams %v, ignored %v, Len %d; want [0 1], none, 2", got, ign, s.Len())
	}
	if got := on(s.Default()); !slices.Equal(got, []int{0}) {
		t.Errorf("Default after a trusted client added a cache: %v, want [0]", got)
	}
	if s.allowed(context.Background(), 1) {
		t.Error("an added cache is used without a selection (the lazy store's, the pull-through's)")
	}
	// Another trusted client naming it gets the same upstream; an untrusted one, nothing.
	if sel, _ := s.Select(nil, []string{"https://ci.example/cache/"}, true); !slices.Equal(on(sel), []int{1}) || s.Len() != 2 {
		t.Errorf("second trusted Select: %v, Len %d", on(sel), s.Len())
	}
	sel, ign = s.Select(nil, []string{"https://ci.example/cache"}, false)
	if got := on(sel); len(got) != 0 || len(ign) != 1 || ign[0].Err != nil {
		t.Errorf("untrusted Select of an added cache: upstreams %v, ignored %v; want none, it ignored", got, ign)
	}
	// What casnix cannot fetch from is refused with a reason.
	for _, u := range []string{"s3://bucket", "%zz", "ssh://host", "https://x.example?priority=no"} {
		if sel, ign := s.Select(nil, []string{u}, true); sel.Len() != 0 || len(ign) != 1 || ign[0].Err == nil {
			t.Errorf("trusted Select(%q): Len %d, ignored %v; want it ignored with a reason", u, sel.Len(), ign)
		}
	}
	if s.Len() != 2 {
		t.Errorf("Len %d after refused URLs, want 2", s.Len())
	}
	// The bound.
	for i := s.Len() - 1; i < MaxClientUpstreams; i++ {
		if _, ign := s.Select(nil, []string{fmt.Sprintf("https://c%d.example", i)}, true); len(ign) != 0 {
			t.Fatalf("cache %d refused: %v", i, ign)
		}
	}
	if _, ign := s.Select(nil, []string{"https://one-too-many.example"}, true); len(ign) != 1 || ign[0].Err == nil {
		t.Errorf("cache %d: ignored %v, want refused", MaxClientUpstreams+1, ign)
	}
	if s.Len() != 1+MaxClientUpstreams {
		t.Errorf("Len %d, want %d", s.Len(), 1+MaxClientUpstreams)
	}
}
