package proto

import (
	"context"
	"errors"
	"fmt"
	"maps"
	"slices"
	"strings"

	"github.com/casnix/casnix/store"
	"github.com/casnix/casnix/subst"
)

// Substitution ops, answered as nix-daemon answers them: paths the store
// lacks are looked up in the upstream caches of Server.Subst (none: the
// answers of a daemon without substituters) and fetched on demand when a
// client asks for them to be made valid (EnsurePath, BuildPaths,
// QueryValidPaths with substitute). A connection substitutes only while
// its client's useSubstitutes option is on. Signatures are checked unless
// the server does not require them (serve --no-require-sigs) or the
// upstream is marked ?trusted=1, whoever the client: nix-daemon opens its
// store, whose require-sigs the substitution goal reads, before a client
// sends its options, so no client turns the check off for substitution
// (a trusted one copies with --no-check-sigs instead). The keys it checks
// against are a trusted client's trusted-public-keys when it sends them
// (read when the first check happens, after the options), and the client's
// substituters setting chooses among the upstreams (substituters.go).

// substituting reports whether this connection's ops may use upstreams.
func (c *conn) substituting() bool {
	if c.s.Subst == nil || !c.useSubstitutes {
		return false
	}
	sel := c.sel
	if sel == nil {
		sel = c.s.Subst.Default()
	}
	return sel.Len() > 0
}

// substCtx is the op's context restricted to the upstreams the client
// selected, checking signatures against a trusted client's keys.
func (c *conn) substCtx() context.Context {
	ctx := c.ctx
	if c.sel != nil {
		ctx = subst.WithSelection(ctx, c.sel)
	}
	if c.keys != nil {
		ctx = subst.WithKeys(ctx, c.keys)
	}
	return ctx
}

// checkSigs reports whether substituted paths need a trusted signature.
func (c *conn) checkSigs() bool { return c.s.RequireSigs }

// warn sends the client a line it prints (STDERR_NEXT).
func (c *conn) warn(msg string) {
	c.w.u64(stderrNext)
	c.w.str(msg + "\n")
}

// substitute fetches the closures of names that the store lacks. The
// error names each path that could not be had and why.
func (c *conn) substitute(names []string) error {
	if !c.substituting() || len(names) == 0 {
		return nil
	}
	p, err := c.s.Subst.Resolve(c.substCtx(), names, c.checkSigs())
	if err != nil {
		return err
	}
	// As Nix's substitution goal, root what is asked for and what is about
	// to be fetched for this connection first: a collection between a
	// fetch and the client's use (or the referrer's commit) must not
	// delete it.
	roots := slices.Clone(names)
	for n := range p.Fetch {
		roots = append(roots, n)
	}
	slices.Sort(roots)
	for _, n := range slices.Compact(roots) {
		if err := c.addTemp(n); err != nil {
			return err
		}
	}
	done, err := c.s.Subst.Fetch(c.substCtx(), p)
	if len(done) > 0 {
		c.log.Info("substituted", "paths", len(done))
	}
	return err
}

// hasSubstitutes answers HasSubstitutes: whether an upstream has the path.
func (c *conn) hasSubstitutes() error {
	name, err := c.readPath()
	if err != nil {
		return err
	}
	found := false
	if c.s.Subst != nil {
		f, err := c.s.Subst.Query(c.substCtx(), name)
		if err != nil && c.ctx.Err() != nil {
			return c.storeErr(err)
		}
		found = f != nil
	}
	c.last()
	c.w.boolean(found)
	return nil
}

// querySubstitutablePaths answers with the paths an upstream has (Nix
// does not look at the local store here either).
func (c *conn) querySubstitutablePaths() error {
	names, err := c.readPaths()
	if err != nil {
		return err
	}
	defer c.watchHangup()()
	infos, err := c.substitutableInfos(names)
	if err != nil {
		return err
	}
	var res []string
	for n := range infos {
		res = append(res, n)
	}
	slices.Sort(res)
	res = slices.Compact(res)
	c.last()
	c.writePaths(res)
	return nil
}

// substitutableInfos looks each path up; paths no upstream has are left
// out, as Nix's querySubstitutablePathInfos leaves them out.
func (c *conn) substitutableInfos(names []string) (map[string]*subst.Found, error) {
	if c.s.Subst == nil {
		return map[string]*subst.Found{}, nil
	}
	res, err := c.s.Subst.QueryMany(c.substCtx(), names)
	if err != nil {
		return nil, c.storeErr(err)
	}
	return res, nil
}

func (c *conn) writeSubstitutableInfo(f *subst.Found) {
	in := f.Info
	c.writePath(in.Deriver)
	c.writePaths(in.References)
	c.w.u64(uint64(in.FileSize)) // downloadSize: 0 when the narinfo gives none, as in Nix
	c.w.u64(uint64(in.NarSize))
}

// querySubstitutablePathInfo answers the single-path form (op 21).
func (c *conn) querySubstitutablePathInfo() error {
	name, err := c.readPath()
	if err != nil {
		return err
	}
	infos, err := c.substitutableInfos([]string{name})
	if err != nil {
		return err
	}
	c.last()
	f := infos[name]
	c.w.boolean(f != nil)
	if f != nil {
		c.writeSubstitutableInfo(f)
	}
	return nil
}

func (c *conn) querySubstitutablePathInfos() error {
	var (
		names []string
		bad   error
	)
	if c.minor < 22 {
		if names, bad = c.readPaths(); bad != nil && !isOpError(bad) {
			return bad
		}
	} else {
		// (path, content address) pairs; the address only helps Nix find
		// a content-addressed path under another store path, which the
		// upstreams are asked by the path itself here.
		n, err := c.r.u64()
		if err != nil {
			return err
		}
		if n > maxListLen {
			return fmt.Errorf("%w: list of %d pairs exceeds the limit of %d", errProtocol, n, maxListLen)
		}
		for range n {
			p, err := c.r.str(maxPath)
			if err != nil {
				return err
			}
			if err := c.r.skip(maxString); err != nil {
				return err
			}
			name, err := c.parsePath(p)
			if err != nil && bad == nil {
				bad = err
			}
			names = append(names, name)
		}
	}
	if bad != nil {
		return bad
	}
	defer c.watchHangup()()
	infos, err := c.substitutableInfos(names)
	if err != nil {
		return err
	}
	keys := make([]string, 0, len(infos))
	for n := range infos {
		keys = append(keys, n)
	}
	slices.Sort(keys)
	c.last()
	c.w.u64(uint64(len(keys)))
	for _, n := range keys {
		c.writePath(n)
		c.writeSubstitutableInfo(infos[n])
	}
	return nil
}

// substituteMissing substitutes the paths of names the store lacks, for
// QueryValidPaths with substitute: as Nix's substitutePaths, a failure is
// a warning, and the answer says what is valid.
func (c *conn) substituteMissing(names []string) error {
	var missing []string
	for _, n := range names {
		ok, err := c.s.Store.IsValid(c.ctx, n)
		if err != nil {
			return c.storeErr(err)
		}
		if !ok {
			missing = append(missing, n)
		}
	}
	if err := c.substitute(missing); err != nil {
		if c.ctx.Err() != nil {
			return c.storeErr(err)
		}
		c.warn("warning: " + err.Error())
	}
	return nil
}

// substituteFor fetches what a build of dps lacks and an upstream has:
// opaque paths, and the output paths of derivations. A derivation the
// store lacks is fetched first, as nix-daemon's DerivationGoal does: its
// outputs are known only from it.
func (c *conn) substituteFor(dps []derivedPath) error {
	if !c.substituting() {
		return nil
	}
	var drvs []string
	for _, dp := range dps {
		if !dp.built {
			continue
		}
		ok, err := c.s.Store.IsValid(c.ctx, dp.path)
		if err != nil {
			return c.storeErr(err)
		}
		if !ok {
			drvs = append(drvs, dp.path)
		}
	}
	if err := c.substitute(drvs); err != nil {
		if c.ctx.Err() != nil {
			return c.storeErr(err)
		}
		c.warn(substErrText(err))
	}
	var want []string
	for _, dp := range dps {
		m, err := c.missing(dp)
		if err != nil {
			return c.storeErr(err)
		}
		for _, p := range m {
			if !dp.built || p != dp.path {
				want = append(want, p)
			}
		}
	}
	err := c.substitute(want)
	if err != nil && c.ctx.Err() != nil {
		return c.storeErr(err)
	}
	if err != nil {
		// The op reports what is still missing; the reasons go first.
		c.warn(substErrText(err))
	}
	return c.registerRealisations()
}

// upstreamRealisation asks the upstreams for the realisation id (a
// DrvOutput id from drvOutputs) of an output whose path the derivation
// does not fix and that the store has no realisation of (Nix's
// DrvOutputSubstitutionGoal, and its queryMissing). It returns nil when no
// upstream has a usable one, or id is "" (the derivation could not be
// hashed); the reasons, if any, go to the client as a warning, as Nix
// prints them. Under lookingUpRealisations the answer is kept, for the
// rest of the op and, in a BuildPaths, to be registered once its output
// path is substituted.
func (c *conn) upstreamRealisation(id string) (*store.Realisation, error) {
	if !c.substituting() || id == "" {
		return nil, nil
	}
	if r, ok := c.upReal[id]; ok {
		return r, nil
	}
	r, err := c.s.Subst.QueryRealisation(c.substCtx(), id, c.checkSigs())
	if err != nil {
		if c.ctx.Err() != nil {
			return nil, err
		}
		c.warn(substErrText(err))
	}
	if c.upReal != nil {
		c.upReal[id] = r
	}
	return r, nil
}

// lookingUpRealisations makes the op's upstream realisation lookups
// (upstreamRealisation) remembered until the returned func is called: an
// op asks for each output more than once (what to fetch, then what is
// still missing), and the client should hear each refusal once.
func (c *conn) lookingUpRealisations() func() {
	c.upReal = map[string]*store.Realisation{}
	return func() { c.upReal = nil }
}

// maxRealisationWalk bounds the realisations one op registers.
const maxRealisationWalk = 1024

// registerRealisations registers the upstream realisations of this
// BuildPaths whose output paths are now valid (nix-daemon's
// DerivationGoal registers a substituted output's realisation after its
// path), and those they depend on (dependentRealisations, which Nix
// before 2.3x fills with the realisations of CA inputs) whose output
// paths are valid: the output's closure was fetched, so theirs usually
// are. One that conflicts with the store's own is a warning: the store's
// stays, and the output is reported by it.
func (c *conn) registerRealisations() error {
	todo := slices.Sorted(maps.Keys(c.upReal))
	seen := map[string]bool{}
	for len(todo) > 0 {
		id := todo[0]
		todo = todo[1:]
		if seen[id] {
			continue
		}
		if len(seen) >= maxRealisationWalk {
			// An upstream's realisations name their dependencies: a bound
			// keeps a hostile one from costing a request per name.
			c.warn(fmt.Sprintf("warning: more than %d realisations depend on each other here; the rest are not registered", maxRealisationWalk))
			break
		}
		seen[id] = true
		r, asked := c.upReal[id]
		if !asked {
			// A dependency of one registered below (Nix before 2.3x records
			// the realisations of a CA output's CA inputs, and copies, and
			// expects, them with it).
			var err error
			if r, err = c.s.Subst.QueryRealisation(c.substCtx(), id, c.checkSigs()); err != nil {
				if c.ctx.Err() != nil {
					return c.storeErr(err)
				}
				c.warn(substErrText(err))
			}
		}
		if r == nil {
			continue
		}
		for dep := range r.DependentRealisations {
			todo = append(todo, dep)
		}
		ok, err := c.s.Store.IsValid(c.ctx, r.OutPath)
		if err != nil {
			return c.storeErr(err)
		}
		if !ok {
			continue
		}
		if err := c.s.Store.RegisterRealisation(c.ctx, r); err != nil {
			if errors.Is(err, store.ErrRealisationConflict) || errors.Is(err, store.ErrNotValid) {
				c.warn("warning: " + err.Error())
				continue
			}
			return c.storeErr(err)
		}
		c.log.Info("substituted realisation", "id", id, "path", r.OutPath)
	}
	return nil
}

// substErrText renders a substitution error, one path per line.
func substErrText(err error) string {
	var lines []string
	var j interface{ Unwrap() []error }
	if errors.As(err, &j) {
		for _, e := range j.Unwrap() {
			lines = append(lines, "error: "+e.Error())
		}
	} else {
		lines = append(lines, "error: "+err.Error())
	}
	return strings.Join(lines, "\n")
}

// missingPlan sorts the paths dps lack into those upstreams can supply
// (with their closures' missing paths) and those nobody can, for
// QueryMissing.
func (c *conn) missingPlan(dps []derivedPath) (willSubstitute, unknown []string, download, narSize int64, err error) {
	var want []string
	for _, dp := range dps {
		m, err := c.missing(dp)
		if err != nil {
			return nil, nil, 0, 0, c.storeErr(err)
		}
		for _, p := range m {
			if dp.built && p == dp.path {
				unknown = append(unknown, p)
			} else {
				want = append(want, p)
			}
		}
	}
	if !c.substituting() || len(want) == 0 {
		return nil, append(unknown, want...), 0, 0, nil
	}
	// Nix's queryMissing asks querySubstitutablePathInfos, which does not
	// check signatures: neither does this estimate.
	p, err := c.s.Subst.Resolve(c.substCtx(), want, false)
	if err != nil {
		return nil, nil, 0, 0, c.storeErr(err)
	}
	for n := range p.Fetch {
		willSubstitute = append(willSubstitute, n)
	}
	for _, n := range want {
		if _, bad := p.Missing[n]; bad {
			unknown = append(unknown, n)
		}
	}
	download, narSize = p.Sizes()
	return willSubstitute, unknown, download, narSize, nil
}
