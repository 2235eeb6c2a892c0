package subst

import (
	"context"
	"net/url"
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
	return !s.ups[i].optIn
}

// Default is the selection of a client that names no substituters: every
// upstream but the opt-in ones (Options.OptIn).
func (s *Substituter) Default() *Selection {
	sel := &Selection{on: make([]bool, len(s.ups))}
	for i, up := range s.ups {
		if !up.optIn {
			sel.on[i] = true
			sel.n++
		}
	}
	return sel
}

// Select adds to base (nil: none) the upstreams a client's substituter
// URLs name, opt-in ones included. An upstream is named by its URL with or
// without the query (casnix's ?priority= and ?trusted= are its own) and
// with or without a trailing slash, since Nix clients write
// "https://cache.nixos.org/" as often as not. URLs naming no upstream are
// returned as ignored: casnix substitutes only from the upstreams its
// operator configured, whoever the client (nix-daemon lets an untrusted
// client choose only among its substituters and trusted-substituters, a
// trusted one anything).
func (s *Substituter) Select(base *Selection, urls []string) (sel *Selection, ignored []string) {
	sel = &Selection{on: make([]bool, len(s.ups))}
	if base != nil {
		copy(sel.on, base.on)
		sel.n = base.n
	}
	for _, u := range urls {
		found := false
		for i, up := range s.ups {
			if sameUpstream(u, up.URL) {
				found = true
				if !sel.on[i] {
					sel.on[i] = true
					sel.n++
				}
			}
		}
		if !found {
			ignored = append(ignored, u)
		}
	}
	return sel, ignored
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

// keyCount is how many keys ctx's checks trust, for errors.
func (s *Substituter) keyCount(ctx context.Context) int {
	if keys, ok := ctx.Value(keysKey{}).(store.PublicKeys); ok {
		return len(keys)
	}
	return len(s.opts.Keys)
}
