package proto

import (
	"fmt"
	"maps"
	"slices"
	"strings"

	"github.com/casnix/casnix/store"
	"github.com/casnix/casnix/subst"
)

// maxClientSubstituters bounds the URLs of a client's substituters
// settings that are looked at (each is compared with every upstream).
const maxClientSubstituters = 256

// readSubstituterSettings reads SetOptions' setting overrides, keeping the
// client's substituters and trusted-public-keys (under their old names
// too), and their extra- forms (which clients older than the extra-
// prefix's folding into the setting send). Every other setting is read
// and dropped: each costs at most maxString bytes at a time.
func (c *conn) readSubstituterSettings() (st substSettings, err error) {
	n, err := c.r.u64()
	if err != nil {
		return st, err
	}
	if n > maxListLen {
		return st, fmt.Errorf("%w: list of %d pairs exceeds the limit of %d", errProtocol, n, maxListLen)
	}
	for i := uint64(0); i < n; i++ {
		name, err := c.r.str(maxString)
		if err != nil {
			return st, err
		}
		var dst *[]string
		switch name {
		case "substituters", "binary-caches":
			st.subs = []string{}
			dst = &st.subs
		case "extra-substituters", "extra-binary-caches":
			dst = &st.extra
		case "trusted-public-keys", "binary-cache-public-keys":
			st.keys = []string{}
			dst = &st.keys
		case "extra-trusted-public-keys", "extra-binary-cache-public-keys":
			dst = &st.extraKeys
		default:
			if err := c.r.skip(maxString); err != nil {
				return st, err
			}
			continue
		}
		v, err := c.r.str(maxString)
		if err != nil {
			return st, err
		}
		*dst = append(*dst, strings.Fields(v)...)
	}
	return st, nil
}

// substSettings are the settings of a client that casnix applies: each
// list nil when the client did not send it.
type substSettings struct {
	subs, extra     []string // substituters, extra-substituters
	keys, extraKeys []string // trusted-public-keys, extra-trusted-public-keys
}

// selectSubstituters applies a client's substituters settings to its
// connection as nix-daemon does: substituters, when sent, replaces the
// daemon's list (an empty one turns substitution off for the client) and
// extra-substituters adds to it. An untrusted client chooses among casnix's
// upstreams, the opt-in ones (serve --trusted-substituters) included,
// which only clients naming them use; its other URLs are ignored with
// nix-daemon's warning. A trusted client may name any http(s) or file
// cache, as with nix-daemon: one casnix was not started with is added
// for it (subst.Select: opt-in, for trusted clients naming it only).
// The client's order does not matter: casnix's upstreams keep their
// priorities, an added one its nix-cache-info's or URL's. A later
// SetOptions without substituters keeps the list an earlier one sent, as
// nix-daemon's setting stays set for the rest of the connection.
func (c *conn) selectSubstituters(st substSettings) {
	subs, extra := st.subs, st.extra
	if c.s.Subst == nil || !c.s.Subst.Configured() && !c.trusted {
		// Nothing to choose from (what trusted clients added is not for
		// this one): substitution is off whatever the client says, and a
		// client's usual substituters line is no news.
		return
	}
	if subs != nil {
		c.subs = capURLs(subs)
	}
	var base *subst.Selection // none
	if c.subs == nil {
		base = c.s.Subst.Default()
	}
	sel, ignored := c.s.Subst.Select(base, append(slices.Clone(c.subs), capURLs(extra)...), c.trusted)
	c.sel = sel
	for _, ig := range ignored {
		if ig.Err != nil {
			c.warn(fmt.Sprintf("warning: ignoring substituter '%s': %v", ig.URL, ig.Err))
			continue
		}
		c.warn(fmt.Sprintf("warning: ignoring untrusted substituter '%s', you are not a trusted user "+
			"(casnix substitutes for untrusted clients only from its --substituters and --trusted-substituters)", ig.URL))
	}
}

func capURLs(urls []string) []string {
	return urls[:min(len(urls), maxClientSubstituters)]
}

// maxClientKeys bounds the keys of a client's trusted-public-keys.
const maxClientKeys = 256

// applyClientKeys makes a trusted client's trusted-public-keys (with its
// extra-trusted-public-keys) the keys its substitutions are checked
// against, as nix-daemon's substitution goal checks them against the
// setting a trusted client may set; an untrusted client's are ignored, as
// nix-daemon ignores them (a restricted setting). Keys that do not parse
// are left out with a warning. A later SetOptions without the setting
// keeps the keys an earlier one sent.
func (c *conn) applyClientKeys(st substSettings) {
	if !c.trusted || c.s.Subst == nil || st.keys == nil && st.extraKeys == nil {
		return
	}
	var keys store.PublicKeys
	if st.keys != nil {
		keys = store.PublicKeys{}
	} else if c.keys != nil {
		keys = maps.Clone(c.keys)
	} else {
		// The daemon's own keys, plus the extras.
		keys = maps.Clone(c.s.PublicKeys)
		if keys == nil {
			keys = store.PublicKeys{}
		}
	}
	all := append(slices.Clone(st.keys), st.extraKeys...)
	for _, spec := range all[:min(len(all), maxClientKeys)] {
		k, err := store.ParsePublicKeys([]string{spec})
		if err != nil {
			c.warn(fmt.Sprintf("warning: ignoring trusted public key: %v", err))
			continue
		}
		maps.Copy(keys, k)
	}
	c.keys = keys
}
