package store

import (
	"bytes"
	"context"
	"encoding/json"
	"errors"
	"fmt"
	"slices"
	"strings"

	"github.com/casnix/casnix/db"
)

// Realisation records which output path a content-addressed derivation's
// output resolved to (Nix's Realisation, experimental ca-derivations).
type Realisation struct {
	ID         string // DrvOutput: "sha256:<hash modulo>!<output name>"
	OutPath    string // basename
	Signatures []string
	// DependentRealisations maps DrvOutput ids to output basenames.
	DependentRealisations map[string]string
}

// realisationJSON is Nix's serialisation; encoding/json writes the keys in
// this (sorted) order, as nlohmann's json does, so fingerprints match.
type realisationJSON struct {
	DependentRealisations map[string]string `json:"dependentRealisations"`
	ID                    string            `json:"id"`
	OutPath               string            `json:"outPath"`
	Signatures            []string          `json:"signatures,omitempty"`
}

// ParseRealisation reads a realisation as the daemon protocol (≥ 1.31)
// carries it.
func ParseRealisation(s string) (*Realisation, error) {
	var j realisationJSON
	dec := json.NewDecoder(strings.NewReader(s))
	if err := dec.Decode(&j); err != nil {
		return nil, fmt.Errorf("realisation: %w", err)
	}
	r := &Realisation{ID: j.ID, OutPath: j.OutPath, Signatures: j.Signatures, DependentRealisations: j.DependentRealisations}
	return r, r.Validate()
}

// Validate checks the id's form and the output paths' names.
func (r *Realisation) Validate() error {
	hash, out, ok := strings.Cut(r.ID, "!")
	if !ok || out == "" || !strings.Contains(hash, ":") || strings.ContainsAny(r.ID, " /\n") {
		return fmt.Errorf("realisation id %q is not <algo>:<hash>!<output>", r.ID)
	}
	if err := ValidateName(r.OutPath); err != nil {
		return fmt.Errorf("realisation %s: out path: %w", r.ID, err)
	}
	for id, p := range r.DependentRealisations {
		if err := ValidateName(p); err != nil {
			return fmt.Errorf("realisation %s: dependency %s: %w", r.ID, id, err)
		}
	}
	return nil
}

func (r *Realisation) encode(withSigs bool) string {
	j := realisationJSON{ID: r.ID, OutPath: r.OutPath, DependentRealisations: r.DependentRealisations}
	if j.DependentRealisations == nil {
		j.DependentRealisations = map[string]string{}
	}
	if withSigs {
		j.Signatures = slices.Sorted(slices.Values(r.Signatures))
		if j.Signatures == nil {
			j.Signatures = []string{}
		}
	}
	var b bytes.Buffer
	enc := json.NewEncoder(&b)
	enc.SetEscapeHTML(false)
	enc.Encode(j) // a struct of strings cannot fail to encode
	return strings.TrimSuffix(b.String(), "\n")
}

// JSON is the realisation as Nix serialises it.
func (r *Realisation) JSON() string { return r.encode(true) }

// Fingerprint is what a realisation signature signs: its JSON without the
// signatures.
func (r *Realisation) Fingerprint() string { return r.encode(false) }

// ErrRealisationConflict is wrapped by the error of RegisterRealisation
// when the store already has a different output path for the same id.
var ErrRealisationConflict = errors.New("conflicts with the realisation already registered")

// RegisterRealisation records r; its output path must be valid. As Nix's
// LocalStore::registerDrvOutput: registering a realisation that is already
// known with the same output path only adds its signatures; one with a
// different output path is refused (a client must not be able to redirect
// an output that others already resolved).
func (s *Store) RegisterRealisation(ctx context.Context, r *Realisation) error {
	if err := r.Validate(); err != nil {
		return err
	}
	err := s.db.Write(ctx, func(tx *db.Tx) error {
		text, _, err := tx.Realisation(ctx, r.ID)
		switch {
		case errors.Is(err, db.ErrNotFound):
			return tx.PutRealisation(ctx, r.ID, r.OutPath, r.JSON())
		case err != nil:
			return err
		}
		old, err := ParseRealisation(text)
		if err != nil {
			return fmt.Errorf("stored realisation %s: %w", r.ID, err)
		}
		if old.OutPath != r.OutPath {
			return fmt.Errorf("realisation of '%s' with output '%s' %w (output '%s')",
				r.ID, s.Full(r.OutPath), ErrRealisationConflict, s.Full(old.OutPath))
		}
		merged := *old
		merged.Signatures = slices.Compact(slices.Sorted(slices.Values(append(slices.Clone(old.Signatures), r.Signatures...))))
		if slices.Equal(merged.Signatures, slices.Sorted(slices.Values(old.Signatures))) {
			return nil
		}
		return tx.PutRealisation(ctx, r.ID, r.OutPath, merged.JSON())
	})
	if errors.Is(err, db.ErrNotFound) {
		return fmt.Errorf("realisation %s: path '%s' %w", r.ID, s.Full(r.OutPath), ErrNotValid)
	}
	if err != nil {
		return err
	}
	return s.syncMeta(ctx)
}

// Realisation returns the realisation id, or nil if there is none.
func (s *Store) Realisation(ctx context.Context, id string) (*Realisation, error) {
	text, _, err := s.db.Realisation(ctx, id)
	if errors.Is(err, db.ErrNotFound) {
		return nil, nil
	}
	if err != nil {
		return nil, err
	}
	return ParseRealisation(text)
}

// RealisationsOf returns the realisations whose output path is name.
func (s *Store) RealisationsOf(ctx context.Context, name string) ([]*Realisation, error) {
	texts, err := s.db.RealisationsOf(ctx, name)
	if err != nil {
		return nil, err
	}
	out := make([]*Realisation, 0, len(texts))
	for _, t := range texts {
		r, err := ParseRealisation(t)
		if err != nil {
			return nil, fmt.Errorf("stored realisation of %s: %w", s.Full(name), err)
		}
		out = append(out, r)
	}
	return out, nil
}
