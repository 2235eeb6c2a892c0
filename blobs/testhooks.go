package blobs

import (
	"context"

	"github.com/casnix/casnix/db"
	"github.com/casnix/casnix/digest"
)

// Hooks for repair, tests and benchmarks of the packages above blobs (a NAR render
// must decode each frame once, and is measured with a cold cache).

// FrameDecodes is how many frames the process has decoded so far.
func FrameDecodes() int64 { return frameDecodes.Load() }

// BackgroundDecodes is how many of those read-ahead's decoders did.
func BackgroundDecodes() int64 { return backgroundDecodes.Load() }

// DropCache empties the decoded-frame cache and the location cache (repair, after replacing
// packs; tests, to make reads go to the packs). Readers holding entries
// keep them until they release them; decodes in flight finish unlisted.
// Entries are unlisted one by one, so read-ahead's share (aheadBytes)
// drops with them rather than counting frames no longer listed.
func (s *Store) DropCache() {
	s.locs.clear()
	s.dropFrames()
}

// dropFrames empties the decoded-frame cache alone.
func (s *Store) dropFrames() {
	c := s.cache
	var freed []*frameEntry
	c.mu.Lock()
	for el := c.lru.Back(); el != nil; {
		prev := el.Prev()
		c.unlist(el, el.Value.(*frameEntry), &freed)
		el = prev
	}
	c.mu.Unlock()
	for _, e := range freed {
		putFrameBuf(e.data)
	}
}

// BlobFrames lists the frames holding blob d's chunks, in blob order, each
// once.
func (s *Store) BlobFrames(ctx context.Context, d digest.Digest) ([]db.Frame, error) {
	br, err := s.Open(ctx, d)
	if err != nil {
		return nil, err
	}
	var out []db.Frame
	seen := map[int64]bool{}
	for i := range br.chunks {
		loc, err := br.locate(i)
		if err != nil {
			return nil, err
		}
		if !seen[loc.ID] {
			seen[loc.ID] = true
			out = append(out, loc.Frame)
		}
	}
	return out, nil
}
