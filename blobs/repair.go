package blobs

import (
	"bytes"
	"context"
	"errors"
	"fmt"
	"io"
	"os"
	"slices"

	"github.com/casnix/casnix/blobs/pack"
	"github.com/casnix/casnix/db"
	"github.com/casnix/casnix/digest"
)

// IndexRepair is what RepairIndex found and changed.
type IndexRepair struct {
	// Packs is how many pack files were scanned; Frames and Chunks how many
	// intact frames and chunks they hold.
	Packs, Frames, Chunks int
	// Damage lists what the scan could not read: damaged records, frames
	// that do not decode, chunks that do not hash to their digest, torn
	// tails.
	Damage []string
	// Rows changed in the index.
	PacksAdded, FramesAdded, FramesDropped, ChunksAdded, ChunksDropped, BlobsDropped int
}

// Changed reports whether the index was (or, on a copy, would be) changed.
func (r *IndexRepair) Changed() bool {
	return r.PacksAdded+r.FramesAdded+r.FramesDropped+r.ChunksAdded+r.ChunksDropped+r.BlobsDropped > 0
}

// scannedFrame is a frame record read back intact from a pack: its header's
// CRC matched and its zstd frame decoded to the raw length. good holds the
// chunks whose bytes hash to their digest, by offset in the frame.
type scannedFrame struct {
	f    db.Frame // ID unset
	good map[int64]pack.Entry
}

type frameKey struct{ pack, off int64 }

type chunkSite struct {
	frame   *scannedFrame
	off, ln int64
}

// packScan is every intact frame of every pack file, and where each intact
// chunk is first found (packs in id order, frames in file order).
type packScan struct {
	frames  map[frameKey]*scannedFrame
	chunks  map[digest.Digest]chunkSite
	damage  []string
	packs   int
	maxFile int64 // largest pack file id
}

// scanPacks reads every pack file's records from its bytes alone. A record
// whose header fails its CRC is skipped by searching for the next record
// header that passes its own; a record past the end of the file (a torn
// tail) ends the pack.
func (s *Store) scanPacks(ctx context.Context, progress func(done, total int64)) (*packScan, error) {
	files, err := s.packFiles()
	if err != nil {
		return nil, err
	}
	ids := make([]int64, 0, len(files))
	for id := range files {
		ids = append(ids, id)
	}
	slices.Sort(ids)
	sc := &packScan{frames: map[frameKey]*scannedFrame{}, chunks: map[digest.Digest]chunkSite{}}
	if len(ids) > 0 {
		sc.maxFile = ids[len(ids)-1]
	}
	for _, id := range ids {
		if err := s.scanPack(ctx, id, files[id], sc); err != nil {
			return nil, err
		}
		sc.packs++
		if progress != nil {
			progress(int64(sc.packs), int64(len(ids)))
		}
	}
	return sc, nil
}

func (s *Store) scanPack(ctx context.Context, id int64, path string, sc *packScan) error {
	f, err := os.Open(path)
	if err != nil {
		return fmt.Errorf("open pack %d: %w", id, err)
	}
	defer f.Close()
	fi, err := f.Stat()
	if err != nil {
		return fmt.Errorf("stat pack %d: %w", id, err)
	}
	size := fi.Size()
	off := int64(pack.HeaderSize)
	for off < size {
		if err := ctx.Err(); err != nil {
			return err
		}
		rec, err := pack.ReadRecord(io.NewSectionReader(f, off, size-off))
		switch {
		case errors.Is(err, io.EOF), errors.Is(err, io.ErrUnexpectedEOF):
			sc.damage = append(sc.damage, fmt.Sprintf("pack %d: torn record at %d (end of file at %d)", id, off, size))
			return nil
		case errors.Is(err, pack.ErrCorrupt):
			next, err2 := nextRecord(f, off+1, size)
			if err2 != nil {
				return fmt.Errorf("pack %d: %w", id, err2)
			}
			sc.damage = append(sc.damage, fmt.Sprintf("pack %d: damaged record at %d: %v (%d bytes skipped)", id, off, err, next-off))
			off = next
			continue
		case err != nil:
			return fmt.Errorf("read pack %d at %d: %w", id, off, err)
		}
		fr := db.Frame{Pack: id, Offset: off, DataOff: off + rec.HdrLen, CLen: rec.CLen, RawLen: rec.RawLen}
		end := fr.DataOff + fr.CLen
		if end > size {
			sc.damage = append(sc.damage, fmt.Sprintf("pack %d: torn frame at %d (ends at %d, file at %d)", id, off, end, size))
			return nil
		}
		off = end
		data, err := s.decodeFrame(fr)
		if err != nil {
			sc.damage = append(sc.damage, fmt.Sprintf("pack %d: frame at %d: %v", id, fr.Offset, err))
			continue
		}
		sf := &scannedFrame{f: fr, good: map[int64]pack.Entry{}}
		var at int64
		for _, e := range rec.Entries {
			c := data[at : at+int64(e.Len)]
			if digest.Sum(c) != e.Digest {
				sc.damage = append(sc.damage, fmt.Sprintf("pack %d: frame at %d: chunk %s does not hash to its digest", id, fr.Offset, e.Digest))
			} else {
				sf.good[at] = e
				if _, ok := sc.chunks[e.Digest]; !ok {
					sc.chunks[e.Digest] = chunkSite{sf, at, int64(e.Len)}
				}
			}
			at += int64(e.Len)
		}
		putFrameBuf(data)
		sc.frames[frameKey{id, fr.Offset}] = sf
	}
	return nil
}

// nextRecord finds the first offset at or after from where a record header
// that passes its CRC begins (size: none).
func nextRecord(f *os.File, from, size int64) (int64, error) {
	magic := []byte("FRM1")
	buf := make([]byte, 1<<20)
	for pos := from; pos < size; {
		n, err := f.ReadAt(buf, pos)
		if err != nil && !errors.Is(err, io.EOF) {
			return 0, err
		}
		if n < len(magic) {
			break
		}
		w := buf[:n]
		for i := 0; ; {
			j := bytes.Index(w[i:], magic)
			if j < 0 {
				break
			}
			at := pos + int64(i+j)
			if _, err := pack.ReadRecord(io.NewSectionReader(f, at, size-at)); err == nil {
				return at, nil
			}
			i += j + 1
		}
		// Overlap by the magic's length less one so a header straddling
		// the window's end is found in the next one.
		pos += int64(n - len(magic) + 1)
	}
	return size, nil
}

// RepairIndex (progress, if set, is called after each pack file scanned)
// makes the packs, frames and chunks tables match what the pack
// files really hold, in tx:
//   - a chunks row stays only if its frame row matches an intact record at
//     the same place and that record lists the chunk, at the row's offset
//     and length, with bytes that hash to it; other chunks rows go;
//   - a frames row stays only if it matches an intact record; the others go
//     (their ids are recorded as used first: ids are never reused);
//   - every chunk a blob needs that has no row, and that some intact record
//     holds, gets one (with a frames row, new id, and packs row as needed);
//   - blobs whose chunks are still missing go, so the index has no row that
//     does not resolve (the paths using them are dropped by the caller).
//
// Pack ids up to the largest pack file's are recorded as used. Chunks no
// blob needs get no new rows: they are dead data (a collected
// path's, or a crashed writer's tail) that compaction will remove. Pack
// files are fsynced before rows naming them are committed.
//
// Memory grows with the store: the scan keeps every intact chunk's digest
// and place, and the index rows are listed whole (a few hundred bytes a
// chunk). The scan runs inside tx, so the caller must hold off writers
// (Store.Repair has the data dir to itself).
func (s *Store) RepairIndex(ctx context.Context, tx *db.Tx, progress func(done, total int64)) (*IndexRepair, error) {
	if s.remote != nil {
		// The scan reads local pack files only, and uploaded packs' files
		// may have been evicted: it would drop their frames as lost.
		return nil, ErrRemoteUnsupported
	}
	sc, err := s.scanPacks(ctx, progress)
	if err != nil {
		return nil, err
	}
	rep := &IndexRepair{Packs: sc.packs, Frames: len(sc.frames), Chunks: len(sc.chunks), Damage: sc.damage}
	if err := tx.RaisePackFloor(ctx, sc.maxFile); err != nil {
		return nil, err
	}
	frames, err := tx.AllFrames(ctx)
	if err != nil {
		return nil, err
	}
	chunks, err := tx.AllChunks(ctx)
	if err != nil {
		return nil, err
	}
	// Frames rows that match an intact record, by id.
	kept := map[int64]*scannedFrame{}
	frameID := map[frameKey]int64{}
	for _, f := range frames {
		key := frameKey{f.Pack, f.Offset}
		sf := sc.frames[key]
		_, dup := frameID[key] // a second row for one record goes
		if sf != nil && !dup && sf.f.DataOff == f.DataOff && sf.f.CLen == f.CLen && sf.f.RawLen == f.RawLen {
			kept[f.ID] = sf
			frameID[key] = f.ID
		}
	}
	have := map[digest.Digest]bool{}
	for _, c := range chunks {
		sf := kept[c.Frame]
		if sf != nil {
			if e, ok := sf.good[c.Off]; ok && e.Digest == c.Digest && int64(e.Len) == c.Len {
				have[c.Digest] = true
				continue
			}
		}
		if err := tx.DeleteChunk(ctx, c.Digest); err != nil {
			return nil, err
		}
		rep.ChunksDropped++
	}
	for _, f := range frames {
		if kept[f.ID] != nil {
			continue
		}
		if err := tx.DeleteFrame(ctx, f.ID); err != nil {
			return nil, err
		}
		rep.FramesDropped++
	}
	// What blobs need.
	type blobNeed struct {
		d      digest.Digest
		chunks []digest.Digest
	}
	var needs []blobNeed
	err = tx.EachBlobRow(ctx, func(d digest.Digest, size int64, list []byte) error {
		n := blobNeed{d: d}
		switch {
		case list == nil && size > 0:
			n.chunks = []digest.Digest{d}
		case list != nil:
			for i := 0; i+digest.Size <= len(list); i += digest.Size + 4 {
				c, _ := digest.FromBytes(list[i : i+digest.Size])
				n.chunks = append(n.chunks, c)
			}
		}
		needs = append(needs, n)
		return nil
	})
	if err != nil {
		return nil, err
	}
	synced := map[int64]bool{}
	for _, n := range needs {
		ok := true
		for _, c := range n.chunks {
			if have[c] {
				continue
			}
			site, found := sc.chunks[c]
			if !found {
				ok = false
				continue
			}
			if err := s.addChunk(ctx, tx, c, site, frameID, synced, rep); err != nil {
				return nil, err
			}
			have[c] = true
		}
		if !ok {
			if err := tx.DeleteBlob(ctx, n.d); err != nil {
				return nil, err
			}
			rep.BlobsDropped++
		}
	}
	// Every kept frame's pack needs its row (the file is there: it was
	// scanned).
	for _, sf := range kept {
		added, err := tx.EnsurePack(ctx, sf.f.Pack)
		if err != nil {
			return nil, err
		}
		if added {
			rep.PacksAdded++
		}
	}
	return rep, nil
}

// addChunk indexes chunk c where the scan found it.
func (s *Store) addChunk(ctx context.Context, tx *db.Tx, c digest.Digest, site chunkSite, frameID map[frameKey]int64, synced map[int64]bool, rep *IndexRepair) error {
	f := site.frame.f
	if !synced[f.Pack] {
		// The rows about to be committed must not outlive the bytes.
		pf, err := os.Open(s.PackPath(f.Pack))
		if err != nil {
			return fmt.Errorf("open pack %d: %w", f.Pack, err)
		}
		err = pf.Sync()
		pf.Close()
		if err != nil {
			return fmt.Errorf("sync pack %d: %w", f.Pack, err)
		}
		synced[f.Pack] = true
		added, err := tx.EnsurePack(ctx, f.Pack)
		if err != nil {
			return err
		}
		if added {
			rep.PacksAdded++
		}
	}
	key := frameKey{f.Pack, f.Offset}
	id, ok := frameID[key]
	if !ok {
		var err error
		if id, err = tx.InsertFrame(ctx, f); err != nil {
			return err
		}
		frameID[key] = id
		rep.FramesAdded++
	}
	if err := tx.InsertChunk(ctx, c, id, site.off, site.ln); err != nil {
		return err
	}
	rep.ChunksAdded++
	return nil
}

// RewriteHeader writes pack id's 16-byte header afresh and fsyncs it. The
// header holds nothing but the format's magic and version, and the caller
// knows the pack is of this version (its records carry their own checks:
// CRC, zstd checksum, chunk digests).
func (s *Store) RewriteHeader(id int64) error {
	f, err := os.OpenFile(s.PackPath(id), os.O_WRONLY, 0)
	if err != nil {
		return fmt.Errorf("open pack %d: %w", id, err)
	}
	defer f.Close()
	if _, err := f.WriteAt(pack.Header(), 0); err != nil {
		return fmt.Errorf("write pack %d header: %w", id, err)
	}
	if err := f.Sync(); err != nil {
		return fmt.Errorf("sync pack %d: %w", id, err)
	}
	return nil
}
