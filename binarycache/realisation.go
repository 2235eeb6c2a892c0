package binarycache

import (
	"context"
	"errors"
	"fmt"
	"net/http"
	"slices"
	"strconv"
	"strings"

	"github.com/casnix/casnix/store"
)

// RealisationPuller is what a Puller that also knows upstream
// realisations implements (subst.PullThrough): where a content-addressed
// derivation's output went, as an upstream has it (acceptable under the
// substitution signature rules), nil if none has it.
type RealisationPuller interface {
	PullRealisation(ctx context.Context, id string) (*store.Realisation, error)
}

// serveRealisation answers realisations/<id>.doi, which Nix asks a binary
// cache for before substituting a floating content-addressed derivation's
// output: the store's realisation of id, else (pull-through) an
// upstream's, whose output path the client then asks for as any other.
// The JSON is Nix's, with the id (Nix before 2.3x requires it, 2.34
// ignores it); with Key, signed by it too, as narinfos are.
func (s *Server) serveRealisation(w http.ResponseWriter, r *http.Request, id string) {
	if hash, out, ok := strings.Cut(id, "!"); !ok || out == "" || !strings.Contains(hash, ":") ||
		strings.ContainsAny(id, "/\\") || len(id) > 512 {
		http.NotFound(w, r)
		return
	}
	real, err := s.Store.Realisation(r.Context(), id)
	if err != nil {
		s.fail(w, r.URL.Path, err)
		return
	}
	if rp, ok := s.Pull.(RealisationPuller); ok && real == nil {
		if real, err = rp.PullRealisation(r.Context(), id); err != nil {
			// As pullFailed, without the narinfo counts (the route's own
			// request counts tell realisations apart).
			switch {
			case errors.Is(err, ErrNotFound):
				http.NotFound(w, r)
			case r.Context().Err() == nil:
				if s.Logger != nil {
					pullWarnings.Warn(s.Logger, "pull-through realisation failed", "request", r.URL.Path, "err", err)
				}
				http.Error(w, "upstream fetch failed", http.StatusBadGateway)
			}
			return
		}
	}
	if real == nil {
		http.NotFound(w, r)
		return
	}
	if s.Key != nil {
		signed := *real
		signed.Signatures = slices.Clone(real.Signatures)
		if err := s.Key.SignRealisation(&signed); err != nil {
			s.fail(w, r.URL.Path, fmt.Errorf("sign realisation %s: %w", id, err))
			return
		}
		real = &signed
	}
	body := real.JSON()
	w.Header().Set("Content-Type", "application/json")
	w.Header().Set("Content-Length", strconv.Itoa(len(body)))
	if r.Method == http.MethodGet {
		w.Write([]byte(body))
	}
}
