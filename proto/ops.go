package proto

import (
	"context"
	"crypto/sha256"
	"encoding/hex"
	"errors"
	"fmt"
	"io"
	"slices"
	"strings"

	"github.com/casnix/casnix/db"
	"github.com/casnix/casnix/store"
	"github.com/casnix/casnix/subst"
)

// Op codes (worker-protocol.hh).
const (
	opIsValidPath                 = 1
	opHasSubstitutes              = 3
	opQueryReferrers              = 6
	opAddToStore                  = 7
	opAddTextToStore              = 8
	opBuildPaths                  = 9
	opEnsurePath                  = 10
	opAddTempRoot                 = 11
	opAddIndirectRoot             = 12
	opSyncWithGC                  = 13
	opFindRoots                   = 14
	opQueryDeriver                = 18
	opSetOptions                  = 19
	opCollectGarbage              = 20
	opQuerySubstitutablePathInfo  = 21
	opQueryDerivationOutputs      = 22
	opQueryAllValidPaths          = 23
	opQueryFailedPaths            = 24
	opClearFailedPaths            = 25
	opQueryPathInfo               = 26
	opQueryDerivationOutputNames  = 28
	opQueryPathFromHashPart       = 29
	opQuerySubstitutablePathInfos = 30
	opQueryValidPaths             = 31
	opQuerySubstitutablePaths     = 32
	opQueryValidDerivers          = 33
	opOptimiseStore               = 34
	opVerifyStore                 = 35
	opBuildDerivation             = 36
	opAddSignatures               = 37
	opNarFromPath                 = 38
	opAddToStoreNar               = 39
	opQueryMissing                = 40
	opQueryDerivationOutputMap    = 41
	opRegisterDrvOutput           = 42
	opQueryRealisation            = 43
	opAddMultipleToStore          = 44
	opAddBuildLog                 = 45
	opBuildPathsWithResults       = 46
	opAddPermRoot                 = 47
)

var opNames = map[uint64]string{
	1: "IsValidPath", 3: "HasSubstitutes", 4: "QueryPathHash", 5: "QueryReferences", 6: "QueryReferrers",
	7: "AddToStore", 8: "AddTextToStore", 9: "BuildPaths", 10: "EnsurePath", 11: "AddTempRoot",
	12: "AddIndirectRoot", 13: "SyncWithGC", 14: "FindRoots", 16: "ExportPath", 18: "QueryDeriver",
	19: "SetOptions", 20: "CollectGarbage", 21: "QuerySubstitutablePathInfo", 22: "QueryDerivationOutputs",
	23: "QueryAllValidPaths", 24: "QueryFailedPaths", 25: "ClearFailedPaths", 26: "QueryPathInfo",
	27: "ImportPaths", 28: "QueryDerivationOutputNames", 29: "QueryPathFromHashPart",
	30: "QuerySubstitutablePathInfos", 31: "QueryValidPaths", 32: "QuerySubstitutablePaths",
	33: "QueryValidDerivers", 34: "OptimiseStore", 35: "VerifyStore", 36: "BuildDerivation",
	37: "AddSignatures", 38: "NarFromPath", 39: "AddToStoreNar", 40: "QueryMissing",
	41: "QueryDerivationOutputMap", 42: "RegisterDrvOutput", 43: "QueryRealisation",
	44: "AddMultipleToStore", 45: "AddBuildLog", 46: "BuildPathsWithResults", 47: "AddPermRoot",
}

func opName(op uint64) string {
	if n, ok := opNames[op]; ok {
		return n
	}
	return fmt.Sprintf("op %d", op)
}

// dispatch runs one op. It reports whether the connection can go on.
func (c *conn) dispatch(op uint64) (keep bool, err error) {
	c.log.Debug("op", "op", opName(op))
	switch op {
	case opIsValidPath:
		err = c.isValidPath()
	case opQueryReferrers:
		err = c.pathSetQuery(c.s.Store.Referrers)
	case opQueryValidDerivers:
		err = c.pathSetQuery(c.s.Store.ValidDerivers)
	case opAddToStore:
		err = c.addToStore()
	case opAddTextToStore:
		err = c.addTextToStore()
	case opBuildPaths:
		err = c.buildPaths(false)
	case opBuildPathsWithResults:
		err = c.buildPaths(true)
	case opEnsurePath:
		err = c.ensurePath()
	case opAddTempRoot:
		err = c.addTempRoot()
	case opAddIndirectRoot:
		err = c.addIndirectRoot()
	case opAddPermRoot:
		err = c.addPermRoot()
	case opSyncWithGC, opOptimiseStore:
		// casnix is always deduplicated, and has no GC lock to wait on.
		c.last()
		c.w.u64(1)
	case opFindRoots:
		err = c.findRoots()
	case opQueryDeriver:
		err = c.queryDeriver()
	case opSetOptions:
		err = c.setOptions()
	case opCollectGarbage:
		err = c.collectGarbage()
	case opHasSubstitutes:
		err = c.hasSubstitutes()
	case opQuerySubstitutablePathInfo:
		err = c.querySubstitutablePathInfo()
	case opQueryDerivationOutputs:
		err = c.queryDerivationOutputs(false)
	case opQueryDerivationOutputNames:
		err = c.queryDerivationOutputs(true)
	case opQueryAllValidPaths:
		err = c.queryAllValidPaths()
	case opQueryPathInfo:
		err = c.queryPathInfo()
	case opQueryPathFromHashPart:
		err = c.queryPathFromHashPart()
	case opQuerySubstitutablePathInfos:
		err = c.querySubstitutablePathInfos()
	case opQueryValidPaths:
		err = c.queryValidPaths()
	case opQuerySubstitutablePaths:
		err = c.querySubstitutablePaths()
	case opVerifyStore:
		err = c.verifyStore()
	case opAddSignatures:
		err = c.addSignatures()
	case opNarFromPath:
		err = c.narFromPath()
	case opAddToStoreNar:
		err = c.addToStoreNar()
	case opAddMultipleToStore:
		err = c.addMultipleToStore()
	case opAddBuildLog:
		err = c.addBuildLog()
	case opQueryMissing:
		err = c.queryMissing()
	case opQueryDerivationOutputMap:
		err = c.queryDerivationOutputMap()
	case opRegisterDrvOutput:
		err = c.registerDrvOutput()
	case opQueryRealisation:
		err = c.queryRealisation()
	case opBuildDerivation:
		// Its BasicDerivation argument is not read, so the connection
		// cannot continue after the refusal.
		c.sendError(fmt.Sprintf("casnix does not build derivations (%s); build with a local or overlay store and copy the result in", opName(op)))
		return false, nil
	default:
		// An unknown op's arguments cannot be skipped: report and close.
		c.sendError(fmt.Sprintf("invalid operation %d: casnix does not support %s", op, opName(op)))
		return false, nil
	}
	var oe *opError
	switch {
	case err == nil:
		return true, nil
	case errors.As(err, &oe):
		// The op was read to its end: the connection stays usable.
		c.sendError(oe.msg)
		return true, nil
	case errors.Is(err, errProtocol):
		c.sendError(fmt.Sprintf("%s: %v", opName(op), err))
		return false, err
	default:
		return false, err
	}
}

func (c *conn) readPath() (string, error) {
	p, err := c.r.str(maxPath)
	if err != nil {
		return "", err
	}
	return c.parsePath(p)
}

// readValidPath reads a path that must be valid in the store; what
// follows "is not valid" in the error says why the op needs it.
func (c *conn) readValidPath(why string) (string, error) {
	name, err := c.readPath()
	if err != nil {
		return "", err
	}
	ok, err := c.s.Store.IsValid(c.ctx, name)
	if err != nil {
		return "", c.storeErr(err)
	}
	if !ok {
		return "", errorf("path '%s' is not valid%s", c.full(name), why)
	}
	return name, nil
}

// readPaths reads a set of paths. A malformed one is an op error, reported
// after the whole set was read.
func (c *conn) readPaths() ([]string, error) {
	ps, err := c.r.strings(maxPath)
	if err != nil {
		return nil, err
	}
	out := make([]string, 0, len(ps))
	var bad error
	for _, p := range ps {
		n, err := c.parsePath(p)
		if err != nil && bad == nil {
			bad = err
		}
		out = append(out, n)
	}
	return out, bad
}

func (c *conn) storeErr(err error) error {
	if err == nil {
		return nil
	}
	var oe *opError
	if errors.As(err, &oe) {
		return err
	}
	if errors.Is(err, store.ErrNotValid) {
		return errorf("%v", err)
	}
	if c.ctx.Err() != nil {
		if c.hungUp() {
			// Nobody to answer: the connection ends (serve logs it).
			return fmt.Errorf("%w: %v", errHungUp, err)
		}
		return errorf("casnix is shutting down")
	}
	c.log.Error("store error", "err", err)
	return errorf("casnix: %v", err)
}

func (c *conn) isValidPath() error {
	name, err := c.readPath()
	if err != nil {
		return err
	}
	ok, err := c.s.Store.IsValid(c.ctx, name)
	if err == nil && !ok && c.s.Lazy != nil {
		var v map[string]bool
		v, err = c.s.Lazy.Valid(c.ctx, []string{name})
		ok = v[name]
	}
	if err != nil {
		return c.storeErr(err)
	}
	c.last()
	c.w.boolean(ok)
	return nil
}

// info is the path-info of name; under a lazy store, an upstream's too.
func (c *conn) info(name string) (*store.PathInfo, error) {
	if c.s.Lazy != nil {
		return c.s.Lazy.Info(c.ctx, name)
	}
	return c.s.Store.Info(c.ctx, name)
}

// pathSetQuery answers ops that map one path to a set of paths.
func (c *conn) pathSetQuery(q func(context.Context, string) ([]string, error)) error {
	name, err := c.readPath()
	if err != nil {
		return err
	}
	res, err := q(c.ctx, name)
	if err != nil {
		return c.storeErr(err)
	}
	c.last()
	c.writePaths(res)
	return nil
}

func (c *conn) queryValidPaths() error {
	names, err := c.readPaths()
	substitute := false
	if c.minor >= 27 {
		s, rerr := c.r.boolean()
		if rerr != nil {
			return rerr
		}
		substitute = s
	}
	if err != nil {
		return err
	}
	defer c.watchHangup()()
	if substitute {
		if err := c.substituteMissing(names); err != nil {
			return err
		}
	}
	var valid []string
	if c.s.Lazy != nil {
		v, err := c.s.Lazy.Valid(c.ctx, names)
		if err != nil {
			return c.storeErr(err)
		}
		for n := range v {
			valid = append(valid, n)
		}
	} else {
		for _, n := range names {
			ok, err := c.s.Store.IsValid(c.ctx, n)
			if err != nil {
				return c.storeErr(err)
			}
			if ok {
				valid = append(valid, n)
			}
		}
	}
	slices.Sort(valid)
	valid = slices.Compact(valid)
	c.last()
	c.writePaths(valid)
	return nil
}

func (c *conn) writeUnkeyedInfo(pi *store.PathInfo) {
	c.writePath(pi.Deriver)
	c.w.hexStr(pi.NarHash[:])
	c.writePaths(pi.References)
	c.w.u64(uint64(pi.Registered.Unix()))
	c.w.u64(uint64(pi.NarSize))
	if c.minor >= 16 {
		c.w.boolean(pi.Ultimate)
		c.w.strings(pi.Sigs)
		c.w.str(pi.CA)
	}
}

func (c *conn) queryPathInfo() error {
	name, err := c.readPath()
	if err != nil {
		return err
	}
	pi, err := c.info(name)
	if errors.Is(err, store.ErrNotValid) {
		if c.minor < 17 {
			return errorf("path '%s' is not valid", c.full(name))
		}
		c.last()
		c.w.boolean(false)
		return nil
	}
	if err != nil {
		return c.storeErr(err)
	}
	c.last()
	if c.minor >= 17 {
		c.w.boolean(true)
	}
	c.writeUnkeyedInfo(pi)
	return nil
}

func (c *conn) queryDeriver() error {
	name, err := c.readPath()
	if err != nil {
		return err
	}
	pi, err := c.info(name)
	if err != nil {
		return c.storeErr(err)
	}
	c.last()
	c.writePath(pi.Deriver)
	return nil
}

func (c *conn) queryAllValidPaths() error {
	defer c.watchHangup()()
	all, err := c.s.Store.All(c.ctx)
	if err != nil {
		return c.storeErr(err)
	}
	c.last()
	c.writePaths(all)
	return nil
}

func (c *conn) queryPathFromHashPart() error {
	h, err := c.r.str(maxPath)
	if err != nil {
		return err
	}
	var name string
	if len(h) == 32 && !strings.ContainsAny(h, "-/.") {
		if c.s.Lazy != nil {
			name, err = c.s.Lazy.ByHashPart(c.ctx, h)
		} else {
			name, err = c.s.Store.PathByHashPart(c.ctx, h)
		}
		if err != nil {
			return c.storeErr(err)
		}
	}
	c.last()
	c.writePath(name)
	return nil
}

func (c *conn) setOptions() error {
	// keepFailed keepGoing tryFallback verbosity maxBuildJobs maxSilentTime
	// useBuildHook verboseBuild logType printBuildTrace buildCores: all
	// about building, which casnix does not do; then useSubstitutes.
	for i := 0; i < 12; i++ {
		v, err := c.r.u64()
		if err != nil {
			return err
		}
		if i == 11 {
			c.useSubstitutes = v != 0
		}
	}
	if c.minor >= 12 { // setting overrides
		// Of a client's settings only its substituters and (trusted
		// clients') trusted-public-keys change what casnix does
		// (substituters.go); the others are about building or the client's
		// own side.
		st, err := c.readSubstituterSettings()
		if err != nil {
			return err
		}
		c.selectSubstituters(st)
		c.applyClientKeys(st)
	}
	c.last()
	return nil
}

func (c *conn) ensurePath() error {
	name, err := c.readPath()
	if err != nil {
		return err
	}
	ok, err := c.s.Store.IsValid(c.ctx, name)
	if err != nil {
		return c.storeErr(err)
	}
	if !ok {
		if !c.substituting() {
			return errorf("path '%s' is not valid, and casnix cannot substitute or build it", c.full(name))
		}
		stop := c.watchHangup()
		err := c.substitute([]string{name})
		stop()
		if err != nil {
			if c.ctx.Err() != nil {
				return c.storeErr(err)
			}
			return errorf("path '%s' does not exist and cannot be substituted:\n%s", c.full(name), substErrText(err))
		}
	}
	c.last()
	c.w.u64(1)
	return nil
}

func isOpError(err error) bool {
	var oe *opError
	return errors.As(err, &oe)
}

func (c *conn) queryDerivationOutputs(namesOnly bool) error {
	drv, err := c.readPath()
	if err != nil {
		return err
	}
	outs, err := c.s.Store.DrvOutputs(c.ctx, drv)
	if err != nil {
		return c.storeErr(err)
	}
	var res []string
	for _, o := range outs {
		if namesOnly {
			res = append(res, o.Name)
		} else if o.Path != "" {
			res = append(res, c.full(o.Path))
		}
	}
	c.last()
	c.w.strings(res)
	return nil
}

func (c *conn) queryDerivationOutputMap() error {
	drv, err := c.readValidPath("")
	if err != nil {
		return err
	}
	outs, err := c.drvOutputs(drv)
	if err != nil {
		return c.storeErr(err)
	}
	c.last()
	c.w.u64(uint64(len(outs)))
	for _, o := range outs {
		c.w.str(o.Name)
		c.writePath(o.Path)
	}
	return nil
}

func (c *conn) queryRealisation() error {
	id, err := c.r.str(maxString)
	if err != nil {
		return err
	}
	r, err := c.s.Store.Realisation(c.ctx, id)
	if err == nil && r == nil && c.s.Lazy != nil {
		// A lazy store answers for what its upstreams have, as for paths
		// (its mount fetches the output path on first use).
		r, err = c.s.Lazy.Realisation(c.ctx, id)
	}
	if err != nil {
		return c.storeErr(err)
	}
	c.last()
	// Before 1.31 the answer is the set of output paths, after it the set
	// of realisations as JSON; either way empty when casnix has none (which
	// the local overlay store relies on: never an error).
	var out []string
	if r != nil {
		if c.minor < 31 {
			out = []string{c.full(r.OutPath)}
		} else {
			out = []string{r.JSON()}
		}
	}
	c.w.strings(out)
	return nil
}

func (c *conn) registerDrvOutput() error {
	var r *store.Realisation
	var bad error
	if c.minor < 31 {
		id, err := c.r.str(maxString)
		if err != nil {
			return err
		}
		p, err := c.readPath()
		if err != nil && !isOpError(err) {
			return err
		}
		bad = err
		r = &store.Realisation{ID: id, OutPath: p}
	} else {
		text, err := c.r.str(maxString)
		if err != nil {
			return err
		}
		if r, err = store.ParseRealisation(text); err != nil {
			bad = errorf("%v", err)
		}
	}
	if bad != nil {
		return bad
	}
	// As nix-daemon: realisations are always checked against
	// require-sigs, whoever registers them.
	if c.s.RequireSigs && c.s.PublicKeys.VerifyFingerprint(r.Fingerprint(), r.Signatures) == 0 {
		return errorf("cannot register realisation '%s' because it lacks a signature by a trusted key", r.ID)
	}
	if err := c.s.Store.RegisterRealisation(c.ctx, r); err != nil {
		if errors.Is(err, store.ErrNotValid) || errors.Is(err, store.ErrBadPath) || errors.Is(err, store.ErrRealisationConflict) {
			return errorf("%v", err)
		}
		return c.storeErr(err)
	}
	c.last()
	return nil
}

// verifyStore runs VerifyStore. As nix-daemon: anyone may check, only
// trusted users may ask for repair (which casnix cannot do anyway: it keeps
// one copy of each chunk). A check with contents reads every pack and
// renders every path (without, the database is still read through), so it
// is bounded: one at a time per data directory (an untrusted client finding
// one running is refused rather than queued; a trusted one waits), and it
// stops, waiting or running, when the client hangs up (watchHangup) or
// the daemon's drain ends.
func (c *conn) verifyStore() error {
	checkContents, err := c.r.boolean()
	if err != nil {
		return err
	}
	repair, err := c.r.boolean()
	if err != nil {
		return err
	}
	if repair && !c.trusted {
		return errorf("you are not privileged to repair paths")
	}
	if repair {
		return errorf("casnix cannot repair paths: it keeps one copy of each chunk (restore from a backup)")
	}
	// Also while a trusted client waits for the lock.
	defer c.watchHangup()()
	unlock, err := c.s.Store.LockVerify(c.ctx, c.trusted)
	if errors.Is(err, store.ErrVerifyBusy) {
		return errorf("%v; try again later", err)
	}
	if err != nil {
		return c.storeErr(err)
	}
	// Without --check-contents Nix checks that its database is
	// consistent: here, the database checks alone.
	var rep *store.VerifyReport
	if checkContents {
		rep, err = c.s.Store.Verify(c.ctx, nil)
	} else {
		rep, err = c.s.Store.CheckDatabase(c.ctx)
	}
	unlock()
	if err != nil {
		return c.storeErr(err)
	}
	for _, d := range rep.DB {
		c.log.Warn("damaged database", "problem", d)
	}
	for _, d := range rep.Packs {
		c.log.Warn("damaged pack", "err", d)
	}
	for _, d := range rep.Damaged {
		c.log.Warn("damaged path", "path", c.full(d.Name), "err", d.Err)
	}
	c.last()
	c.w.boolean(!rep.OK())
	return nil
}

func (c *conn) addSignatures() error {
	name, err := c.readPath()
	if err != nil {
		return err
	}
	sigs, err := c.r.strings(maxString)
	if err != nil {
		return err
	}
	if !c.trusted {
		return errorf("you are not privileged to add signatures")
	}
	if err := c.s.Store.AddSignatures(c.ctx, name, sigs); err != nil {
		return c.storeErr(err)
	}
	c.last()
	c.w.u64(1)
	return nil
}

func (c *conn) narFromPath() error {
	// Checked before STDERR_LAST: after it an error can only close the
	// connection.
	name, err := c.readPath()
	if err != nil {
		return err
	}
	if c.s.Lazy != nil {
		// A lazy store said the path was valid: it must serve it.
		if err := c.addTemp(name); err != nil {
			return err
		}
		if err := c.s.Lazy.Ensure(c.ctx, name); err != nil && !errors.Is(err, subst.ErrNoSubstitute) {
			return c.storeErr(err)
		}
	}
	ok, err := c.s.Store.IsValid(c.ctx, name)
	if err != nil {
		return c.storeErr(err)
	}
	if !ok {
		return errorf("path '%s' is not valid", c.full(name))
	}
	c.last()
	if _, err := c.s.Store.NarRender(c.ctx, name, c.w.w); err != nil {
		// Mid-stream: nothing can be reported, the client sees the
		// connection end.
		return fmt.Errorf("NarFromPath %s: %w", c.full(name), err)
	}
	return nil
}

// derivedPath is a BuildPaths / QueryMissing target: an opaque path, or
// outputs of a derivation ("/nix/store/…drv!out,dev" or "!*").
type derivedPath struct {
	raw     string
	path    string // basename
	outputs []string
	built   bool
}

func (c *conn) readDerivedPaths() ([]derivedPath, error) {
	raw, err := c.r.strings(maxPath)
	if err != nil {
		return nil, err
	}
	var out []derivedPath
	var bad error
	for _, s := range raw {
		p, outs, built := strings.Cut(s, "!")
		// Dynamic derivations nest further "!"; casnix treats the first
		// derivation's outputs only.
		if i := strings.IndexByte(outs, '!'); i >= 0 {
			outs = outs[:i]
		}
		name, err := c.parsePath(p)
		if err != nil && bad == nil {
			bad = err
		}
		dp := derivedPath{raw: s, path: name, built: built}
		if built {
			dp.outputs = strings.Split(outs, ",")
		}
		out = append(out, dp)
	}
	return out, bad
}

// missing reports what of dp is not in the store (nil if it all is).
func (c *conn) missing(dp derivedPath) ([]string, error) {
	ok, err := c.s.Store.IsValid(c.ctx, dp.path)
	if err != nil {
		return nil, err
	}
	if !ok {
		return []string{dp.path}, nil
	}
	if !dp.built {
		return nil, nil
	}
	outs, unknown, err := c.requestedOutputs(dp)
	if err != nil {
		return nil, err
	}
	var miss []string
	for _, o := range outs {
		if o.Path == "" {
			// A floating CA output that the store has no realisation of:
			// an upstream may know where it went.
			r, err := c.upstreamRealisation(o.id)
			if err != nil {
				return nil, err
			}
			if r == nil {
				miss = append(miss, dp.path)
				continue
			}
			o.Path = r.OutPath
		}
		ok, err := c.s.Store.IsValid(c.ctx, o.Path)
		if err != nil {
			return nil, err
		}
		if !ok {
			miss = append(miss, o.Path)
		}
	}
	if unknown {
		miss = append(miss, dp.path) // asks for an output the derivation lacks
	}
	return miss, nil
}

// requestedOutputs lists the outputs of the valid derivation dp.path that
// dp asks for ("*" is all), and whether it asks for one the derivation
// does not have. Outputs whose paths the derivation does not fix carry
// the path of their realisation in the store, if it has one.
func (c *conn) requestedOutputs(dp derivedPath) (outs []drvOutput, unknown bool, err error) {
	all, err := c.drvOutputs(dp.path)
	if err != nil {
		return nil, false, err
	}
	want := map[string]bool{}
	for _, o := range dp.outputs {
		want[o] = true
	}
	for _, o := range all {
		if want["*"] || want[o.Name] {
			outs = append(outs, o)
		}
		delete(want, o.Name)
	}
	delete(want, "*")
	return outs, len(want) > 0, nil
}

func (c *conn) queryMissing() error {
	dps, err := c.readDerivedPaths()
	if err != nil {
		return err
	}
	defer c.watchHangup()()
	defer c.lookingUpRealisations()()
	will, unknown, download, narSize, err := c.missingPlan(dps)
	if err != nil {
		return err
	}
	slices.Sort(will)
	will = slices.Compact(will)
	slices.Sort(unknown)
	unknown = slices.Compact(unknown)
	c.last()
	c.w.strings(nil) // willBuild
	c.writePaths(will)
	c.writePaths(unknown)
	c.w.u64(uint64(download))
	c.w.u64(uint64(narSize))
	return nil
}

func (c *conn) buildPaths(withResults bool) error {
	dps, perr := c.readDerivedPaths()
	if perr != nil && !isOpError(perr) {
		return perr
	}
	mode := uint64(0)
	if withResults || c.minor >= 15 {
		m, err := c.r.u64()
		if err != nil {
			return err
		}
		mode = m
	}
	if perr != nil {
		return perr
	}
	if mode == 1 && !c.trusted {
		return errorf("repairing is not allowed because you are not in 'trusted-users'")
	}
	defer c.watchHangup()()
	defer c.lookingUpRealisations()()
	if err := c.substituteFor(dps); err != nil {
		return err
	}
	var failures []string
	results := make([]string, len(dps)) // error message per path, "" = valid
	for i, dp := range dps {
		m, err := c.missing(dp)
		if err != nil {
			return c.storeErr(err)
		}
		if len(m) > 0 {
			why := "casnix does not build or substitute"
			if c.substituting() {
				why = "no substituter supplied it, and casnix does not build"
			}
			what := strings.Join(c.fullAll(m), ", ") + " is not in the store"
			if dp.built && slices.Contains(m, dp.path) {
				// missing names the derivation itself for an output it
				// cannot place: see whether the derivation is there.
				ok, err := c.s.Store.IsValid(c.ctx, dp.path)
				if err != nil {
					return c.storeErr(err)
				}
				if ok {
					what = "no path is known for the output (a content-addressed output without a realisation, or one the derivation lacks)"
				}
			}
			results[i] = fmt.Sprintf("cannot build '%s': %s and %s", dp.raw, what, why)
			failures = append(failures, results[i])
		}
	}
	if !withResults {
		if len(failures) > 0 {
			return errorf("%s", strings.Join(failures, "; "))
		}
		c.last()
		c.w.u64(1)
		return nil
	}
	built := make([][]builtOutput, len(dps))
	for i, dp := range dps {
		if results[i] != "" || !dp.built {
			continue
		}
		outs, err := c.builtOutputs(dp)
		if err != nil {
			return c.storeErr(err)
		}
		built[i] = outs
	}
	c.last()
	c.w.u64(uint64(len(dps)))
	for i, dp := range dps {
		c.w.str(dp.raw)
		if results[i] == "" {
			c.writeBuildResult(2, "", built[i]) // AlreadyValid
		} else {
			c.writeBuildResult(9, results[i], nil) // MiscFailure
		}
	}
	return nil
}

// builtOutput is one output of an already-valid derivation, as
// BuildPathsWithResults reports it (a DrvOutput id and a realisation).
type builtOutput struct {
	id, json string
}

// builtOutputs lists the requested outputs of a valid derivation. Clients
// (nix build DRV^out) take the output name and path from these to print
// and link results. An output realised by a realisation (a floating CA
// derivation's) is reported by it, under Nix's DrvOutput id, which CA
// clients key it by. For the others the id's hash is casnix's own (SHA-256
// of the .drv path and output name), not Nix's derivation hash modulo,
// which would mean reading every input derivation: for input-addressed
// derivations clients use only the name and path.
func (c *conn) builtOutputs(dp derivedPath) ([]builtOutput, error) {
	outs, _, err := c.requestedOutputs(dp)
	if err != nil {
		return nil, err
	}
	var res []builtOutput
	for _, o := range outs {
		if o.Path == "" {
			continue
		}
		if o.real != nil {
			res = append(res, builtOutput{o.real.ID, o.real.JSON()})
			continue
		}
		h := sha256.Sum256([]byte(c.full(dp.path) + "!" + o.Name))
		r := store.Realisation{ID: "sha256:" + hex.EncodeToString(h[:]) + "!" + o.Name, OutPath: o.Path}
		res = append(res, builtOutput{r.ID, r.JSON()})
	}
	return res, nil
}

// drvOutput is an output of a valid derivation (drvOutputs).
type drvOutput struct {
	db.DrvOutput // Path "": neither the derivation nor a realisation places it
	// id is the DrvOutput id of an output whose path the derivation does
	// not fix ("" if casnix could not hash the derivation), and real the
	// store's realisation of it, if any.
	id   string
	real *store.Realisation
}

// drvOutputs lists the outputs of the valid derivation drv, each output
// whose path the derivation does not fix (a floating content-addressed
// derivation's) with its DrvOutput id and the path of its realisation in
// the store, if there is one. As Nix's queryPartialDerivationOutputMap
// with ca-derivations on.
func (c *conn) drvOutputs(drv string) ([]drvOutput, error) {
	rows, err := c.s.Store.DrvOutputs(c.ctx, drv)
	if err != nil {
		return nil, err
	}
	outs := make([]drvOutput, len(rows))
	for i, row := range rows {
		outs[i].DrvOutput = row
	}
	var ids map[string]string // hashed once, for the first output that needs it
	for i, row := range rows {
		if row.Path != "" {
			continue
		}
		if ids == nil {
			if ids, err = c.s.Store.RealisationIDs(c.ctx, drv); err != nil {
				if c.ctx.Err() != nil {
					return nil, err
				}
				// The outputs stay unknown, as they were before
				// realisations were looked up: a derivation casnix cannot
				// hash (inputs nested too deep, say) must not fail every op
				// that lists its outputs.
				c.log.Warn("no realisation id", "drv", drv, "err", err)
				return outs, nil
			}
		}
		id, ok := ids[row.Name]
		if !ok {
			continue // recorded outputs are the derivation's own: not reached
		}
		outs[i].id = id
		r, err := c.s.Store.Realisation(c.ctx, id)
		if err != nil {
			return nil, err
		}
		if r != nil {
			outs[i].Path, outs[i].real = r.OutPath, r
		}
	}
	return outs, nil
}

func (c *conn) writeBuildResult(status uint64, msg string, outs []builtOutput) {
	c.w.u64(status)
	c.w.str(msg)
	if c.minor >= 29 {
		c.w.u64(0) // timesBuilt
		c.w.boolean(false)
		c.w.u64(0) // startTime
		c.w.u64(0) // stopTime
	}
	if c.minor >= 37 {
		c.w.u64(0) // cpuUser: none
		c.w.u64(0) // cpuSystem: none
	}
	if c.minor >= 28 {
		c.w.u64(uint64(len(outs)))
		for _, o := range outs {
			c.w.str(o.id)
			c.w.str(o.json)
		}
	}
}

func (c *conn) addBuildLog() error {
	if _, err := c.r.str(maxPath); err != nil {
		return err
	}
	if err := (&framedReader{w: &c.r}).drain(); err != nil {
		return err
	}
	return errorf("casnix does not store build logs")
}

// pullReader asks the client for data with STDERR_READ (protocol 1.21-1.22).
type pullReader struct {
	c   *conn
	err error // the transport error that ended the upload
}

func (p *pullReader) Read(b []byte) (int, error) {
	if p.err != nil {
		return 0, p.err
	}
	b = b[:min(len(b), maxFrameChunk)]
	p.c.w.u64(stderrRead)
	p.c.w.u64(uint64(len(b)))
	if err := p.c.w.flush(); err != nil {
		p.err = err
		return 0, err
	}
	n, err := p.c.r.into(b)
	if err != nil {
		p.err = err
		return 0, err
	}
	if n == 0 {
		p.err = io.ErrUnexpectedEOF
		return 0, p.err
	}
	return n, nil
}
