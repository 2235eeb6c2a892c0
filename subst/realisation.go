package subst

import (
	"context"
	"encoding/json"
	"fmt"
	"io"
	"strings"

	"github.com/casnix/casnix/binarycache"
	"github.com/casnix/casnix/store"
)

// Realisations: where a content-addressed derivation's output went. A
// binary cache keeps them as realisations/<DrvOutput id>.doi, the JSON
// Nix writes (outPath, signatures, and in Nix before 2.3x the id and
// dependentRealisations; Nix 2.34 reads only outPath and signatures, the
// id being the file's name).
//
// Nix 2.34's substitution goal takes an upstream's realisation unchecked
// and relies on the output path's narinfo; but a floating CA path's
// narinfo is valid by its content address alone, so an upstream (or
// anyone between it and casnix) could then point any derivation's output
// at any content it holds. casnix, serving many users, checks the
// realisation's own signature as LocalStore::registerDrvOutput checks a
// client's (Nix signs realisations it builds with secret-key-files):
// unless signatures are not required or the upstream is ?trusted=1, a
// realisation without a signature by a trusted key is refused.

// maxRealisationSize bounds a .doi file (a few hundred bytes in practice).
const maxRealisationSize = 64 << 10

// realisationKey is a realisation's key in the narinfo cache: no narinfo
// hash part contains a "/".
func realisationKey(id string) string { return "realisations/" + id }

// QueryRealisation asks the upstreams, in priority order, for the
// realisation id (a DrvOutput, "sha256:<hex>!<output>") and returns the
// first one found that may be used: with checkSigs, signed by a trusted
// key unless its upstream is trusted. It returns nil, nil when no upstream
// has one; an error when some upstream failed or had only a refused one
// and none had a usable one.
func (s *Substituter) QueryRealisation(ctx context.Context, id string, checkSigs bool) (*store.Realisation, error) {
	if strings.ContainsAny(id, "/\\") || strings.Contains(id, "..") || !strings.Contains(id, "!") {
		return nil, fmt.Errorf("realisation id %q is not <algo>:<hash>!<output>", id)
	}
	var found *store.Realisation
	err := s.firstUpstream(ctx, func(i int, up *Upstream) (bool, error) {
		r, err := s.realisation(ctx, i, id)
		if err != nil || r == nil {
			return false, err
		}
		if checkSigs && !up.trusted && s.keysFor(ctx).VerifyFingerprint(r.Fingerprint(), r.Signatures) == 0 {
			return false, fmt.Errorf("%s: realisation %s of %s: %w", up.URL, id, s.opts.StoreDir+"/"+r.OutPath,
				&binarycache.UntrustedError{Sigs: len(r.Signatures), Keys: s.keyCount(ctx)})
		}
		found = r
		return true, nil
	})
	return found, err
}

// realisation returns upstream i's realisation id, nil if it has none;
// cached with the narinfos' TTLs.
func (s *Substituter) realisation(ctx context.Context, i int, id string) (*store.Realisation, error) {
	k := cacheKey{i, realisationKey(id)}
	now := s.opts.Now()
	if e, ok := s.cached(k, now); ok {
		return e.real, nil
	}
	var r *store.Realisation
	found, err := s.fetchFile(ctx, k, realisationKey(id)+".doi", now, func(rd io.Reader) error {
		b, err := io.ReadAll(io.LimitReader(rd, maxRealisationSize+1))
		if err != nil {
			return err
		}
		if len(b) > maxRealisationSize {
			return fmt.Errorf("%s.doi is larger than %d bytes", realisationKey(id), maxRealisationSize)
		}
		r, err = parseDOI(b, id, s.opts.StoreDir)
		return err
	})
	if !found {
		return nil, err
	}
	s.list()[i].stats.hits.Add(1)
	s.put(k, cacheEntry{real: r, expires: now.Add(s.opts.PositiveTTL)})
	return r, nil
}

// parseDOI reads a binary cache's realisation of id. A file that names
// another id is refused (Nix wrote the id into the file, and signs it).
// The output path is a basename, as Nix writes it; a full path in
// storeDir is taken too.
func parseDOI(b []byte, id, storeDir string) (*store.Realisation, error) {
	var j struct {
		ID                    *string           `json:"id"`
		OutPath               string            `json:"outPath"`
		Signatures            []string          `json:"signatures"`
		DependentRealisations map[string]string `json:"dependentRealisations"`
	}
	if err := json.Unmarshal(b, &j); err != nil {
		return nil, fmt.Errorf("realisation %s: %w", id, err)
	}
	if j.ID != nil && *j.ID != id {
		return nil, fmt.Errorf("realisation %s: the file describes %s", id, *j.ID)
	}
	if j.OutPath == "" {
		return nil, fmt.Errorf("realisation %s: no outPath", id)
	}
	r := &store.Realisation{ID: id, OutPath: strings.TrimPrefix(j.OutPath, storeDir+"/"),
		Signatures: j.Signatures, DependentRealisations: j.DependentRealisations}
	if err := r.Validate(); err != nil {
		return nil, err
	}
	return r, nil
}

// PullRealisation is binarycache.RealisationPuller's: the upstream
// realisation of id that the pull-through's signature rule accepts; one
// with only unacceptable copies is not found (the client builds, or asks
// its next cache), as a path with only unacceptable narinfos is.
func (p *PullThrough) PullRealisation(ctx context.Context, id string) (*store.Realisation, error) {
	r, err := p.l.s.QueryRealisation(ctx, id, p.l.checkSigs)
	if err != nil && !onlyUntrusted(err) {
		return nil, err
	}
	if r == nil {
		return nil, fmt.Errorf("realisation %s: %w", id, binarycache.ErrNotFound)
	}
	p.keepRealisation(ctx, r)
	return r, nil
}

// maxPendingReals bounds the realisations a PullThrough keeps for output
// paths not fetched yet (a client may ask for realisations and never for
// their paths).
const maxPendingReals = 4096

// keepRealisation registers r if its output path is valid, and otherwise
// keeps it until the pull-through's fetch of that path ends (start): the
// store then answers for it itself, as the daemon's substitution does.
func (p *PullThrough) keepRealisation(ctx context.Context, r *store.Realisation) {
	s := p.l.s
	if ok, err := s.st.IsValid(ctx, r.OutPath); err == nil && ok {
		p.registerRealisations([]*store.Realisation{r})
		return
	}
	s.spoolMu.Lock()
	defer s.spoolMu.Unlock()
	for _, k := range p.reals[r.OutPath] {
		if k.ID == r.ID {
			return
		}
	}
	if len(p.reals) >= maxPendingReals {
		clear(p.reals)
	}
	p.reals[r.OutPath] = append(p.reals[r.OutPath], r)
}

// registerRealisations registers realisations whose output paths were
// fetched; one that cannot be (a conflict with the store's own, the path
// gone again) is logged and dropped.
func (p *PullThrough) registerRealisations(reals []*store.Realisation) {
	s := p.l.s
	for _, r := range reals {
		if err := s.st.RegisterRealisation(s.base, r); err != nil && s.opts.Logger != nil {
			pullWarnings.Warn(s.opts.Logger, "pull-through realisation not registered", "id", r.ID, "err", err)
		}
	}
}

// Realisation is the realisation id as a lazy store reports it when the
// store has none: the first upstream one the lazy store's signature rule
// accepts (an unacceptable one is none, as an unacceptable narinfo is no
// path), nil if none. A Local Overlay Store asks its lower store for
// realisations and then for their output paths, which the lazy store
// calls valid and its mount fetches on first use.
func (l *Lazy) Realisation(ctx context.Context, id string) (*store.Realisation, error) {
	r, err := l.s.QueryRealisation(ctx, id, l.checkSigs)
	if err != nil && onlyUntrusted(err) {
		return nil, nil
	}
	return r, err
}
