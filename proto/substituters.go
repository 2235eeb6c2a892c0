package proto

import (
	"fmt"
	"slices"

	"github.com/casnix/casnix/subst"
	"strings"
)

// maxClientSubstituters bounds the URLs of a client's substituters
// settings that are looked at (each is compared with every upstream).
const maxClientSubstituters = 256

// readSubstituterSettings reads SetOptions' setting overrides, keeping the
// client's substituters (or its alias binary-caches) and
// extra-substituters (extra-binary-caches, which clients older than the
// extra- prefix's folding into the setting send); subs is nil when the
// client did not send substituters. Every other setting is read and
// dropped: each costs at most maxString bytes at a time.
func (c *conn) readSubstituterSettings() (subs, extra []string, err error) {
	n, err := c.r.u64()
	if err != nil {
		return nil, nil, err
	}
	if n > maxListLen {
		return nil, nil, fmt.Errorf("%w: list of %d pairs exceeds the limit of %d", errProtocol, n, maxListLen)
	}
	for i := uint64(0); i < n; i++ {
		name, err := c.r.str(maxString)
		if err != nil {
			return nil, nil, err
		}
		switch name {
		case "substituters", "binary-caches":
			v, err := c.r.str(maxString)
			if err != nil {
				return nil, nil, err
			}
			subs = append(make([]string, 0), strings.Fields(v)...)
		case "extra-substituters", "extra-binary-caches":
			v, err := c.r.str(maxString)
			if err != nil {
				return nil, nil, err
			}
			extra = append(extra, strings.Fields(v)...)
		default:
			if err := c.r.skip(maxString); err != nil {
				return nil, nil, err
			}
		}
	}
	return subs, extra, nil
}

// selectSubstituters applies a client's substituters settings to its
// connection as nix-daemon does: substituters, when sent, replaces the
// daemon's list (an empty one turns substitution off for the client) and
// extra-substituters adds to it, each URL kept only if the daemon may use
// it: one of casnix's upstreams, the opt-in ones (serve
// --trusted-substituters) included, which only clients naming them use.
// casnix substitutes only from its own upstreams, so a URL naming none of
// them is ignored with a warning, whether the client is trusted or not
// (nix-daemon would add a trusted client's). The client's order and
// ?priority= do not matter: the upstreams keep casnix's priorities. A
// later SetOptions without substituters keeps the list an earlier one
// sent, as nix-daemon's setting stays set for the rest of the connection.
func (c *conn) selectSubstituters(subs, extra []string) {
	if c.s.Subst == nil || c.s.Subst.Len() == 0 {
		// Nothing to choose from: substitution is off whatever the client
		// says, and a client's usual substituters line is no news.
		return
	}
	if subs != nil {
		c.subs = capURLs(subs)
	}
	var base *subst.Selection // none
	if c.subs == nil {
		base = c.s.Subst.Default()
	}
	sel, ignored := c.s.Subst.Select(base, append(slices.Clone(c.subs), capURLs(extra)...))
	c.sel = sel
	for _, u := range ignored {
		c.warn(fmt.Sprintf("warning: ignoring substituter '%s': casnix substitutes only from the upstreams it was started with "+
			"(casnix serve --substituters, --trusted-substituters)", u))
	}
}

func capURLs(urls []string) []string {
	return urls[:min(len(urls), maxClientSubstituters)]
}
