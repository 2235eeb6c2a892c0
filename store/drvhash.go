package store

import (
	"bytes"
	"context"
	"crypto/sha256"
	"encoding/hex"
	"errors"
	"fmt"
	"io"
	"maps"
	"slices"
	"strings"
	"sync"

	"github.com/nix-community/go-nix/pkg/derivation"

	"github.com/casnix/casnix/castore"
)

// Derivation outputs are recorded (drv_outputs) only for a derivation whose
// output paths are the ones its own contents give, as Nix's
// checkDerivationOutputs requires when it registers a .drv: anyone may add
// a .drv (it is content-addressed text), so without this check a client
// could claim that any path in the store is the output of its derivation,
// and QueryValidDerivers, QueryDerivationOutputMap and BuildPaths would
// repeat the claim.
//
// An input-addressed output's path is made from the hash of the derivation
// with its output paths blanked and each input derivation replaced by that
// input's "hash modulo" (Nix's hashDerivationModulo): for a fixed-output
// derivation, the hash of "fixed:out:<method+algo>:<hash>:<path>"; for any
// other, the hash of its ATerm with its own inputs replaced the same way,
// recursively. Input derivations are read from the batch being added or
// from the store; hashes of stored ones are cached.

// maxDrvDepth bounds the recursion through input derivations (real
// bootstrap chains are a few hundred deep).
const maxDrvDepth = 4096

// maxDrvHashCache bounds the cache of hashes modulo (64 hex bytes plus a
// name each); it is emptied when full.
const maxDrvHashCache = 1 << 17

// drvHashCache holds hashes modulo of stored derivations, by basename: a
// derivation's name is content-addressed, so its hash never changes.
type drvHashCache struct {
	mu sync.Mutex
	m  map[string]string
}

func (c *drvHashCache) get(name string) (string, bool) {
	c.mu.Lock()
	defer c.mu.Unlock()
	h, ok := c.m[name]
	return h, ok
}

func (c *drvHashCache) put(hashes map[string]string) {
	c.mu.Lock()
	defer c.mu.Unlock()
	if c.m == nil || len(c.m)+len(hashes) > maxDrvHashCache {
		c.m = make(map[string]string, len(hashes))
	}
	maps.Copy(c.m, hashes)
}

// drvChecker computes hashes modulo for one Add: pending holds the hashes
// modulo of the derivations added earlier in the same batch (not yet
// readable from the store), found collects hashes computed from stored
// files for the cache.
type drvChecker struct {
	s       *Store
	ctx     context.Context
	pending map[string]string
	found   map[string]string
}

// errNotDrv is wrapped when a file named .drv does not parse as one.
var errNotDrv = errors.New("not a parseable derivation")

// checkDrvOutputs parses a .drv and returns its outputs (name -> basename,
// "" for an output whose path is not fixed in advance) if every output
// path it claims is the one its contents give, and otherwise nil (with
// the reason). It also returns the derivation's own hash modulo (for
// derivations added after it in the same batch), "" if unknown.
func (s *Store) checkDrvOutputs(ctx context.Context, name string, contents []byte, pending map[string]string) (map[string]string, string, error) {
	drv, err := derivation.ReadDerivation(bytes.NewReader(contents))
	if err != nil {
		return nil, "", fmt.Errorf("%w: %v", errNotDrv, err)
	}
	c := &drvChecker{s: s, ctx: ctx, pending: pending, found: map[string]string{}}
	defer func() { s.drvHashes.put(c.found) }()
	repl, err := c.replacements(drv, 0)
	if err != nil {
		return nil, "", err
	}
	self, err := hashModuloOf(drv, repl)
	if err != nil {
		return nil, "", fmt.Errorf("hash derivation: %w", err)
	}
	prefix := s.StoreDir + "/"
	out := map[string]string{}
	claims := false
	for o, v := range drv.Outputs {
		if v.Path == "" {
			out[o] = ""
			continue
		}
		if !strings.HasPrefix(v.Path, prefix) || ValidateName(v.Path[len(prefix):]) != nil {
			return nil, self, fmt.Errorf("output %s: %q is not a store path in %s", o, v.Path, s.StoreDir)
		}
		out[o] = v.Path[len(prefix):]
		claims = true
	}
	if !claims {
		return out, self, nil
	}
	want, err := c.outputPaths(name, drv, repl)
	if err != nil {
		return nil, self, err
	}
	for o, p := range out {
		if p != "" && want[o] != p {
			return nil, self, fmt.Errorf("output %s is %s, but the derivation gives %s", o, s.Full(p), s.Full(want[o]))
		}
	}
	return out, self, nil
}

// outputPaths computes the basenames the outputs of drv (stored as name)
// must have: fixed-output ones from their content address, the others from
// the derivation's hash with outputs masked (Nix's
// DerivationOutput::path and hashDerivationModulo with maskOutputs).
func (c *drvChecker) outputPaths(name string, drv *derivation.Derivation, repl map[string]string) (map[string]string, error) {
	drvName := strings.TrimSuffix(nameOf(name), ".drv")
	out := map[string]string{}
	var masked []byte
	for o, v := range drv.Outputs {
		if v.Path == "" {
			continue
		}
		if v.HashAlgorithm != "" {
			if o != "out" || len(drv.Outputs) != 1 {
				return nil, fmt.Errorf("fixed output %s in a derivation with %d outputs", o, len(drv.Outputs))
			}
			m, algo, err := ParseCAMethod(v.HashAlgorithm)
			if err != nil {
				return nil, fmt.Errorf("output %s: %w", o, err)
			}
			h, err := parseHash(algo, v.Hash)
			if err != nil {
				return nil, fmt.Errorf("output %s: %w", o, err)
			}
			p, err := CA{Method: m, Algo: algo, Hash: h}.Path(c.s.StoreDir, drvName, nil, false)
			if err != nil {
				return nil, fmt.Errorf("output %s: %w", o, err)
			}
			out[o] = p
			continue
		}
		if masked == nil {
			h, err := hashModuloOf(maskOutputs(drv), repl)
			if err != nil {
				return nil, fmt.Errorf("hash derivation: %w", err)
			}
			if masked, err = hex.DecodeString(h); err != nil {
				return nil, err
			}
		}
		outName := drvName
		if o != "out" {
			outName += "-" + o
		}
		out[o] = makeStorePath(c.s.StoreDir, "output:"+o, "sha256", masked, outName)
	}
	return out, nil
}

// replacements maps each input derivation's full path to its hash modulo.
func (c *drvChecker) replacements(drv *derivation.Derivation, depth int) (map[string]string, error) {
	repl := make(map[string]string, len(drv.InputDerivations))
	prefix := c.s.StoreDir + "/"
	for p := range drv.InputDerivations {
		base, ok := strings.CutPrefix(p, prefix)
		if !ok || ValidateName(base) != nil {
			return nil, fmt.Errorf("input derivation %q is not a store path in %s", p, c.s.StoreDir)
		}
		h, err := c.hashModulo(base, depth+1)
		if err != nil {
			return nil, err
		}
		repl[p] = h
	}
	return repl, nil
}

// hashModulo is Nix's hashDerivationModulo (unmasked) of the stored or
// pending derivation name, hex-encoded.
func (c *drvChecker) hashModulo(name string, depth int) (string, error) {
	if depth > maxDrvDepth {
		return "", errors.New("input derivations nest too deep")
	}
	if h, ok := c.found[name]; ok {
		return h, nil
	}
	if h, ok := c.pending[name]; ok {
		return h, nil
	}
	if h, ok := c.s.drvHashes.get(name); ok {
		return h, nil
	}
	contents, err := c.s.readDrv(c.ctx, name)
	if err != nil {
		return "", fmt.Errorf("input derivation %s: %w", c.s.Full(name), err)
	}
	drv, err := derivation.ReadDerivation(bytes.NewReader(contents))
	if err != nil {
		return "", fmt.Errorf("input derivation %s: %w", c.s.Full(name), err)
	}
	repl, err := c.replacements(drv, depth)
	if err != nil {
		return "", err
	}
	h, err := hashModuloOf(drv, repl)
	if err != nil {
		return "", fmt.Errorf("input derivation %s: %w", c.s.Full(name), err)
	}
	c.found[name] = h
	return h, nil
}

// floatingCA reports whether drv is a floating content-addressed
// derivation (ca-derivations): its outputs name a hash algorithm but no
// hash, and no path.
func floatingCA(drv *derivation.Derivation) bool {
	for _, o := range drv.Outputs {
		if o.HashAlgorithm != "" && o.Hash == "" {
			return true
		}
	}
	return false
}

// hashModuloOf is Nix's hashDerivationModulo of drv, hex-encoded, given the
// hashes modulo of its input derivations (repl, by full path). It is
// go-nix's CalculateDrvReplacement except for a floating
// content-addressed derivation, which that takes for a fixed-output one
// (an "out" with a hash algorithm) and hashes as "fixed:out:…" with an
// empty hash; Nix hashes it as any other derivation, its ATerm with the
// input derivations replaced.
func hashModuloOf(drv *derivation.Derivation, repl map[string]string) (string, error) {
	if !floatingCA(drv) {
		return drv.CalculateDrvReplacement(repl)
	}
	d := *drv
	d.InputDerivations = make(map[string][]string, len(drv.InputDerivations))
	for p, outs := range drv.InputDerivations {
		h, ok := repl[p]
		if !ok {
			return "", fmt.Errorf("no hash for input derivation %s", p)
		}
		// Nix keys the inputs by hash and merges the output names of
		// inputs with the same hash; two such inputs are two fixed-output
		// derivations of the same output, so their names are both "out".
		d.InputDerivations[h] = slices.Compact(slices.Sorted(slices.Values(append(slices.Clone(d.InputDerivations[h]), outs...))))
	}
	h := sha256.New()
	if err := d.WriteDerivation(h); err != nil {
		return "", fmt.Errorf("hash derivation: %w", err)
	}
	return hex.EncodeToString(h.Sum(nil)), nil
}

// maskOutputs returns a copy of drv with its output paths, and the
// environment variables named after its outputs, blanked (Nix's
// hashDerivationModulo with maskOutputs).
func maskOutputs(drv *derivation.Derivation) *derivation.Derivation {
	m := *drv
	m.Outputs = make(map[string]*derivation.Output, len(drv.Outputs))
	for k, v := range drv.Outputs {
		m.Outputs[k] = &derivation.Output{HashAlgorithm: v.HashAlgorithm, Hash: v.Hash}
	}
	m.Env = maps.Clone(drv.Env)
	for k := range drv.Outputs {
		if _, ok := m.Env[k]; ok {
			m.Env[k] = ""
		}
	}
	return &m
}

// RealisationID returns the DrvOutput id ("sha256:<hex>!<output>") under
// which the output of the stored derivation drv is realised
// (RealisationIDs), or an error if drv has no such output.
func (s *Store) RealisationID(ctx context.Context, drv, output string) (string, error) {
	ids, err := s.RealisationIDs(ctx, drv)
	if err != nil {
		return "", err
	}
	id, ok := ids[output]
	if !ok {
		return "", fmt.Errorf("derivation %s has no output %q", s.Full(drv), output)
	}
	return id, nil
}

// RealisationIDs returns, by output name, the DrvOutput ids under which
// the outputs of the stored derivation drv are realised: Nix's
// staticOutputHashes, the derivation's hash modulo with its outputs masked
// (their paths and the environment variables named after them blanked),
// one hash for every output. It is what clients and binary caches key
// realisations by (realisations/<id>.doi), for the outputs whose paths a
// derivation does not fix: those of floating content-addressed
// derivations.
func (s *Store) RealisationIDs(ctx context.Context, drv string) (map[string]string, error) {
	contents, err := s.readDrv(ctx, drv)
	if err != nil {
		return nil, fmt.Errorf("derivation %s: %w", s.Full(drv), err)
	}
	d, err := derivation.ReadDerivation(bytes.NewReader(contents))
	if err != nil {
		return nil, fmt.Errorf("derivation %s: %w", s.Full(drv), err)
	}
	c := &drvChecker{s: s, ctx: ctx, found: map[string]string{}}
	defer func() { s.drvHashes.put(c.found) }()
	repl, err := c.replacements(d, 0)
	if err != nil {
		return nil, err
	}
	h, err := hashModuloOf(maskOutputs(d), repl)
	if err != nil {
		return nil, fmt.Errorf("derivation %s: %w", s.Full(drv), err)
	}
	ids := make(map[string]string, len(d.Outputs))
	for o := range d.Outputs {
		ids[o] = "sha256:" + h + "!" + o
	}
	return ids, nil
}

// readDrv reads a stored .drv file (a regular file of at most maxDrvSize).
func (s *Store) readDrv(ctx context.Context, name string) ([]byte, error) {
	row, err := s.db.PathRoot(ctx, name)
	if err != nil {
		return nil, err
	}
	root, err := rootOf(row)
	if err != nil {
		return nil, err
	}
	if root.Kind != castore.KindFile || root.Size > maxDrvSize {
		return nil, errors.New("not a derivation file")
	}
	r, err := s.OpenBlob(ctx, root.Digest)
	if err != nil {
		return nil, err
	}
	return io.ReadAll(io.LimitReader(r, maxDrvSize))
}
