package subst

import (
	"context"
	"fmt"
	"net/url"
	"slices"
	"strings"

	"github.com/casnix/casnix/binarycache"
	"github.com/casnix/casnix/store"
)

// A daemon client's settings shape the substitution done for it, as
// nix-daemon applies a client's settings to its connection: which
// upstreams (Selection) and, for a trusted client, which keys
// (WithKeys). Both travel in the context of the client's lookups and
// fetches; the lazy store and the HTTP pull-through have no client
// settings and use the substituter's own.

// Selection is the subset of a Substituter's upstreams that one client
// may use (its substituters setting, as nix-daemon applies a client's to
// the client's connection). Lookups and fetches made under a context
// carrying one (WithSelection) use only the upstreams it marks; a context
// without one uses every upstream but the opt-in ones (Default).
type Selection struct {
	on []bool // by index into Substituter.ups
	n  int    // upstreams marked
}

// Len is the number of upstreams the selection marks.
func (sel *Selection) Len() int { return sel.n }

type selKey struct{}

// WithSelection restricts the lookups and fetches made under the returned
// context to the upstreams sel marks; nil lifts a restriction.
func WithSelection(ctx context.Context, sel *Selection) context.Context {
	return context.WithValue(ctx, selKey{}, sel)
}

func selectionOf(ctx context.Context) *Selection {
	sel, _ := ctx.Value(selKey{}).(*Selection)
	return sel
}

// allowed reports whether ctx lets upstream i be used: its Selection
// marks it, or, without one, it is not opt-in.
func (s *Substituter) allowed(ctx context.Context, i int) bool {
	if sel := selectionOf(ctx); sel != nil {
		return i < len(sel.on) && sel.on[i]
	}
	return !s.list()[i].optIn
}

// Default is the selection of a client that names no substituters: every
// upstream but the opt-in ones (Options.OptIn, and those trusted clients
// added).
func (s *Substituter) Default() *Selection {
	ups := s.list()
	sel := &Selection{on: make([]bool, len(ups))}
	for i, up := range ups {
		if !up.optIn {
			sel.on[i] = true
			sel.n++
		}
	}
	return sel
}

// MaxClientUpstreams bounds the upstreams trusted clients may add (Select):
// each keeps its narinfo cache entries, counters and connections for the
// rest of the process's life.
const MaxClientUpstreams = 32

// Ignored is a substituter URL a Select did not take.
type Ignored struct {
	URL string
	// Err says why, for a trusted client's URL (it may name any cache);
	// nil: the URL names none of the upstreams and the client is not
	// trusted.
	Err error
}

// Select adds to base (nil: none) the upstreams a client's substituter
// URLs name, opt-in ones included. An upstream is named by its URL with or
// without the query (?priority= and ?trusted= are casnix's, or the adding
// client's) and with or without a trailing slash, since Nix clients write
// "https://cache.nixos.org/" as often as not. As nix-daemon lets an
// untrusted client choose only among its substituters and
// trusted-substituters and a trusted one any cache: a trusted client's URL
// naming no upstream adds one (opt-in, so only clients naming it use it,
// and never an untrusted client: it is the trusted client's choice, not
// the operator's), up to MaxClientUpstreams; an untrusted client's is
// ignored.
func (s *Substituter) Select(base *Selection, urls []string, trusted bool) (sel *Selection, ignored []Ignored) {
	var on []int
	for _, u := range urls {
		found := false
		for i, up := range s.list() {
			if sameUpstream(u, up.URL) && (trusted || !up.client) {
				found = true
				on = append(on, i)
			}
		}
		if found {
			continue
		}
		if !trusted {
			ignored = append(ignored, Ignored{URL: u})
			continue
		}
		i, err := s.addClient(u)
		if err != nil {
			ignored = append(ignored, Ignored{URL: u, Err: err})
			continue
		}
		on = append(on, i)
	}
	sel = &Selection{on: make([]bool, len(s.list()))}
	if base != nil {
		copy(sel.on, base.on)
	}
	for _, i := range on {
		sel.on[i] = true
	}
	for _, b := range sel.on {
		if b {
			sel.n++
		}
	}
	return sel, ignored
}

// addClient adds the upstream of a trusted client's substituter URL, or
// finds the one an earlier client added, and returns its index.
func (s *Substituter) addClient(raw string) (int, error) {
	u, err := url.Parse(raw)
	if err != nil {
		return 0, fmt.Errorf("not a URL: %w", err)
	}
	switch u.Scheme {
	case "http", "https", "file":
	default:
		return 0, fmt.Errorf("casnix substitutes only from http://, https:// and file:// binary caches")
	}
	s.upsMu.Lock()
	defer s.upsMu.Unlock()
	ups := s.list()
	added := 0
	for i, up := range ups {
		if sameUpstream(raw, up.URL) {
			return i, nil // added by a client just now
		}
		if up.client {
			added++
		}
	}
	if added >= MaxClientUpstreams {
		return 0, fmt.Errorf("trusted clients added %d caches already, the most casnix keeps", added)
	}
	up, err := s.newUpstream(raw)
	if err != nil {
		return 0, err
	}
	up.optIn, up.client = true, true
	next := append(slices.Clone(ups), up)
	s.ups.Store(&next)
	if s.opts.Logger != nil {
		s.opts.Logger.Info("substituter added by a trusted client", "url", raw)
	}
	return len(next) - 1, nil
}

// sameUpstream compares two substituter URLs by scheme, host and path.
func sameUpstream(a, b string) bool {
	return upstreamKey(a) == upstreamKey(b)
}

func upstreamKey(raw string) string {
	u, err := url.Parse(raw)
	if err != nil {
		return raw
	}
	u.RawQuery, u.ForceQuery, u.Fragment = "", false, ""
	return strings.TrimRight(u.String(), "/")
}

type keysKey struct{}

// WithKeys makes the signature checks of lookups under the returned
// context trust keys instead of Options.Keys: a trusted client's
// trusted-public-keys, which nix-daemon's substitution goal checks
// against (an untrusted client's are ignored, as nix-daemon ignores them).
func WithKeys(ctx context.Context, keys store.PublicKeys) context.Context {
	return context.WithValue(ctx, keysKey{}, keys)
}

// sigOKFor is sigOK under ctx's keys (WithKeys), if it has any.
func (s *Substituter) sigOKFor(ctx context.Context, in *binarycache.Info) bool {
	keys, ok := ctx.Value(keysKey{}).(store.PublicKeys)
	if !ok {
		return s.sigOK(in)
	}
	// Not memoized: the memo is of the substituter's own keys.
	pi := in.PathInfo()
	return keys.Verify(s.opts.StoreDir, &pi) > 0 || binarycache.CAVerified(s.opts.StoreDir, in)
}

// keysFor is the keys signature checks under ctx trust (WithKeys).
func (s *Substituter) keysFor(ctx context.Context) store.PublicKeys {
	if keys, ok := ctx.Value(keysKey{}).(store.PublicKeys); ok {
		return keys
	}
	return s.opts.Keys
}

// keyCount is how many keys ctx's checks trust, for errors.
func (s *Substituter) keyCount(ctx context.Context) int { return len(s.keysFor(ctx)) }
