package binarycache

import (
	"context"
	"io"

	"github.com/klauspost/compress/zstd"

	"github.com/casnix/casnix/store"
)

// zstdSplicer is the zstd stream of a NAR that sends what is stored: a
// stored zstd frame whose whole content is the next bytes of the NAR (a run
// of a file's contents, store.NarRender hands those over through
// WriteFrame) is written as it is in its pack, and everything else (the NAR
// framing, small files, frames shared with other contents) is compressed by
// enc, each run between two stored frames as a frame of its own. A zstd
// stream may be a series of frames, and the decoders Nix (libzstd's
// streaming decoder, directly or through libarchive) and casnix
// (klauspost's) use continue across frame boundaries; stored frames are
// complete standard frames with a content checksum and a window of at most
// 64 MiB (blobs.FrameWriter), under libzstd's default 128 MiB limit and
// the limit casnix's own import sets.
//
// Why a stored frame is safe to send: blobs.BlobReader.WriteFramesTo
// decodes it and checks every chunk against its BLAKE3 (as every read
// does), NarRender checks the NAR's size (and hashes the decoded bytes
// into its NAR hash check unless the path's row is sealed: store.NarRender)
// and holds back the NAR's end until that passes, and the stored bytes sent must
// have the CRC-32C of the bytes that were decoded, or the render fails
// before they go out. So a verbatim frame costs a decode, as before, but
// no compression, and what goes out decodes to checked bytes.
type zstdSplicer struct {
	enc *zstd.Encoder
	out io.Writer
	// tap, if set, gets the NAR's bytes (the decoded content of stored
	// frames too).
	tap io.Writer
	// open is set while enc has a frame in progress.
	open bool
	// verbatim counts the stored frames written as they are.
	verbatim int
}

func (z *zstdSplicer) Write(p []byte) (int, error) {
	if len(p) == 0 {
		return 0, nil
	}
	if z.tap != nil {
		if _, err := z.tap.Write(p); err != nil {
			return 0, err
		}
	}
	if !z.open {
		z.enc.Reset(z.out)
		z.open = true
	}
	return z.enc.Write(p)
}

// WriteFrame ends the frame enc is writing, if any, and writes stored, a
// complete zstd frame whose content is raw.
func (z *zstdSplicer) WriteFrame(raw, stored []byte) (int, error) {
	if err := z.end(); err != nil {
		return 0, err
	}
	if _, err := z.out.Write(stored); err != nil {
		return 0, err
	}
	if z.tap != nil {
		if _, err := z.tap.Write(raw); err != nil {
			return 0, err
		}
	}
	z.verbatim++
	return len(raw), nil
}

func (z *zstdSplicer) end() error {
	if !z.open {
		return nil
	}
	z.open = false
	return z.enc.Close()
}

// Close ends the last frame.
func (z *zstdSplicer) Close() error { return z.end() }

// writeNARZstd writes the NAR of store path name to out as a zstd stream,
// stored frames verbatim (zstdSplicer), and returns how many were.
func writeNARZstd(ctx context.Context, st *store.Store, name string, enc *zstd.Encoder, out, tap io.Writer) (int, error) {
	z := &zstdSplicer{enc: enc, out: out, tap: tap}
	if _, err := st.NarRender(ctx, name, z); err != nil {
		z.open = false // the frame is cut short anyway; enc is Reset before its next use
		return z.verbatim, err
	}
	return z.verbatim, z.Close()
}
