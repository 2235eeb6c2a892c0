package blobs

import (
	"bytes"
	"context"
	"errors"
	"fmt"
	"io"
	"io/fs"
	"os"

	"github.com/casnix/casnix/blobs/pack"
	"github.com/casnix/casnix/db"
	"github.com/casnix/casnix/digest"
)

// Damage describes one indexed chunk that cannot be read back intact.
type Damage struct {
	Chunk digest.Digest
	Pack  int64
	Off   int64 // of the frame record
	Err   error
}

func (d Damage) Error() string {
	return fmt.Sprintf("chunk %s (pack %d, frame at %d): %v", d.Chunk, d.Pack, d.Off, d.Err)
}

// Verify re-reads every committed frame, checks its record header against
// the index, decompresses it and re-hashes every chunk. It returns the
// damaged chunks (nil if none); the error is for failures to run at all.
// Frames are read straight from disk, bypassing the cache.
func (s *Store) Verify(ctx context.Context, progress func(done, total int64)) ([]Damage, error) {
	total, err := s.db.FrameCount(ctx)
	if err != nil {
		return nil, err
	}
	var damaged []Damage
	var done int64
	// Uploaded packs are checked in the bucket, where their bytes live,
	// not in a local copy or the cache.
	uploaded := map[int64]bool{}
	if s.remote != nil {
		ids, err := s.db.UploadedPacks(ctx)
		if err != nil {
			return nil, err
		}
		for _, id := range ids {
			uploaded[id] = true
		}
	}
	err = s.db.EachFrame(ctx, func(f db.Frame, chunks []db.ChunkInFrame) error {
		if err := ctx.Err(); err != nil {
			return err
		}
		done++
		if progress != nil {
			progress(done, total)
		}
		bad := func(err error) {
			for _, c := range chunks {
				damaged = append(damaged, Damage{c.Digest, f.Pack, f.Offset, err})
			}
		}
		var r io.ReaderAt
		if uploaded[f.Pack] {
			// One GET for the whole record (header and data), not one each.
			rec := make([]byte, f.DataOff+f.CLen-f.Offset)
			if _, err := (&bucketPack{remote: s.remote, id: f.Pack}).ReadAt(rec, f.Offset); err != nil {
				bad(err)
				return nil
			}
			r = &memRange{rec, f.Offset}
		} else {
			var err error
			if r, err = s.reader(f.Pack); err != nil {
				bad(err)
				return nil
			}
		}
		if err := s.checkRecord(r, f, chunks); err != nil {
			bad(err)
			return nil
		}
		data, _, err := s.decodeFrameFrom(r, f, true)
		if err != nil {
			bad(err)
			return nil
		}
		for _, c := range chunks {
			if c.Off+c.Len > int64(len(data)) {
				damaged = append(damaged, Damage{c.Digest, f.Pack, f.Offset, fmt.Errorf("%w: chunk outside frame", ErrCorrupt)})
				continue
			}
			if got := digest.Sum(data[c.Off : c.Off+c.Len]); got != c.Digest {
				damaged = append(damaged, Damage{c.Digest, f.Pack, f.Offset, fmt.Errorf("%w: content hashes to %s", ErrCorrupt, got)})
			}
		}
		return nil
	})
	return damaged, err
}

// checkRecord reads the frame's record header from the pack and checks
// that it lists every chunk the index places in this frame.
func (s *Store) checkRecord(r io.ReaderAt, f db.Frame, chunks []db.ChunkInFrame) error {
	rec, err := pack.ReadRecord(io.NewSectionReader(r, f.Offset, f.DataOff-f.Offset))
	if err != nil {
		return fmt.Errorf("%w: record header: %v", ErrCorrupt, err)
	}
	if rec.CLen != f.CLen || rec.RawLen != f.RawLen || f.Offset+rec.HdrLen != f.DataOff {
		return fmt.Errorf("%w: record header disagrees with index", ErrCorrupt)
	}
	var off int64
	at := map[int64]pack.Entry{}
	for _, e := range rec.Entries {
		at[off] = e
		off += int64(e.Len)
	}
	for _, c := range chunks {
		e, ok := at[c.Off]
		if !ok || !bytes.Equal(e.Digest[:], c.Digest[:]) || int64(e.Len) != c.Len {
			return fmt.Errorf("%w: record does not list chunk %s at %d", ErrCorrupt, c.Digest, c.Off)
		}
	}
	return nil
}

// PackDamage is a pack file whose header is not the one casnix writes.
type PackDamage struct {
	Pack int64
	Err  error
}

func (d PackDamage) Error() string { return fmt.Sprintf("pack %d: %v", d.Pack, d.Err) }

// VerifyHeaders checks the 16-byte header of every indexed pack file. A
// pack row without its file is left to the frame check (a crash between
// allocating a pack id and creating its file leaves such a row, harmless
// while no frame names it), and so is a file shorter than its header that
// no frame names (a crash before the new header was durable).
func (s *Store) VerifyHeaders(ctx context.Context) ([]PackDamage, error) {
	ids, err := s.db.Packs(ctx)
	if err != nil {
		return nil, err
	}
	var out []PackDamage
	want := pack.Header()
	uploaded := map[int64]bool{}
	if s.remote != nil {
		up, err := s.db.UploadedPacks(ctx)
		if err != nil {
			return nil, err
		}
		for _, id := range up {
			uploaded[id] = true
		}
	}
	for _, id := range ids {
		if err := ctx.Err(); err != nil {
			return nil, err
		}
		if uploaded[id] {
			h := make([]byte, len(want))
			if _, err := (&bucketPack{remote: s.remote, id: id}).ReadAt(h, 0); err != nil {
				out = append(out, PackDamage{id, err})
			} else if !bytes.Equal(h, want) {
				out = append(out, PackDamage{id, fmt.Errorf("%w: header in the bucket: %v", ErrCorrupt, pack.CheckHeader(h))})
			}
			continue
		}
		f, err := os.Open(s.PackPath(id))
		if errors.Is(err, fs.ErrNotExist) {
			continue
		}
		if err != nil {
			out = append(out, PackDamage{id, err})
			continue
		}
		h := make([]byte, len(want))
		_, err = io.ReadFull(f, h)
		f.Close()
		if errors.Is(err, io.EOF) || errors.Is(err, io.ErrUnexpectedEOF) {
			// Shorter than its header: a crash after the file was created but
			// before its header was durable. Harmless while no frame names
			// the pack (the next writer to take it rewrites the header).
			end, eerr := s.db.PackEnd(ctx, id)
			if eerr != nil {
				return nil, eerr
			}
			if end == 0 {
				continue
			}
		}
		switch {
		case err != nil:
			out = append(out, PackDamage{id, fmt.Errorf("%w: read header: %v", ErrCorrupt, err)})
		case !bytes.Equal(h, want):
			err := pack.CheckHeader(h)
			if err == nil {
				err = errors.New("reserved header bytes are not zero")
			}
			out = append(out, PackDamage{id, fmt.Errorf("%w: header: %v", ErrCorrupt, err)})
		}
	}
	return out, nil
}

// memRange is the bytes of a pack from off on, read into memory.
type memRange struct {
	b   []byte
	off int64
}

func (m *memRange) ReadAt(p []byte, off int64) (int, error) {
	if off < m.off || off-m.off > int64(len(m.b)) {
		return 0, io.ErrUnexpectedEOF
	}
	n := copy(p, m.b[off-m.off:])
	if n < len(p) {
		return n, io.ErrUnexpectedEOF
	}
	return n, nil
}
