package binarycache

import (
	"bufio"
	"context"
	"crypto/sha256"
	"fmt"
	"io"
	"net/http"
	"os"
	"path/filepath"
	"strconv"
	"strings"
	"time"

	"github.com/klauspost/compress/zstd"
	"github.com/ulikunitz/xz"

	"github.com/casnix/casnix/store"
)

// Puller is what makes Server a pull-through cache (subst.PullThrough).
type Puller interface {
	// Pull returns the narinfo of the path whose hash part is hash as an
	// upstream has it (acceptable under the substitution signature rules),
	// and has the path's closure fetched into the store in the background.
	// No upstream has it acceptably: ErrNotFound (wrapped).
	Pull(ctx context.Context, hash string) (*Info, error)
	// OpenNAR returns a reader of the NAR of the path whose hash part is
	// hash, and whose NAR hash in Nix's base-32 is narHash, while it is
	// being fetched (joining the fetch in progress, or starting one): each
	// reader from the start, the bytes as they arrive, the end only once
	// the whole NAR checked out. nil, nil: the store holds the path now.
	// No upstream has it (or not with that NAR hash): ErrNotFound.
	// With raw a compression ("zstd", "xz"), the reader may instead give
	// the upstream's file as it arrives if it is in that compression
	// (SpoolReader.Raw), which the server then sends verbatim.
	OpenNAR(ctx context.Context, hash, narHash, raw string) (*SpoolReader, error)
}

// narURL is where the server's narinfos point for a path's NAR. The same
// URL serves the NAR streamed from a pull in progress and, afterwards,
// rendered from the store: the bytes of the two may differ (zstd framing),
// which is why the server's narinfos carry no FileHash or FileSize.
func (s *Server) narURL(name string, narHash [sha256.Size]byte) string {
	return "nar/" + store.HashPart(name) + "-" + store.NixBase32(narHash[:]) + ".nar" + extensions[s.compression()]
}

// KeepNAR is NARKeeper's: with a NAR cache (CacheDir) and zstd served, the
// upstream's zstd file of a pulled NAR, once checked, becomes the cached
// file of its URL, so the NAR is sent from it (sendfile) from then on:
// to the clients of the first fetch that ask once the download is done,
// and to every later one, without rendering or compressing it. (Whatever
// zstd stream decodes to the NAR is right for the URL: narinfos carry no
// FileHash. The upstream's frames decoded within casnix's 128 MiB window
// limit, libzstd's default, so Nix's decoders take them too.)
func (s *Server) KeepNAR(in *Info) NARCopy {
	c := s.narCache()
	ext := s.pulledExt(in)
	if c == nil || ext == "" {
		return nil
	}
	key := store.NixBase32(in.NarHash[:]) + "." + ext
	if _, err := os.Stat(filepath.Join(c.dir, key)); err == nil {
		return nil // kept already
	}
	if f := c.fill(key); f != nil {
		return f
	}
	return nil // being filled already
}

var _ NARKeeper = (*Server)(nil)

// pulledExt is the extension of the URL the server's narinfo gives for a
// NAR pulled from an upstream whose narinfo is in, when that URL sends the
// upstream's own file: zstd when the server serves zstd, and xz when the
// NAR cache keeps the file (a client may ask for the .nar.xz URL after the
// pull; without the kept file it is compressed again with xz, slowly).
// "": the server renders and compresses the NAR.
func (s *Server) pulledExt(in *Info) string {
	switch {
	case in.Compression == "zstd" && s.compression() == "zstd":
		return "nar.zst"
	case in.Compression == "xz" && s.compression() == "zstd" && s.narCache() != nil:
		// The client decodes xz itself, as it would from the upstream,
		// instead of waiting for the server to decode it (Go's xz decoder
		// is several times slower than liblzma) and compress it again.
		return "nar.xz"
	}
	return ""
}

// pulledNarinfo is the narinfo of a path being pulled, from its upstream
// narinfo: the same path-info (NarHash, NarSize, references, deriver,
// content address, signatures) as the store will hold once it is fetched,
// the server's own NAR URL, no FileHash or FileSize (as for every narinfo
// the server gives), and the server's signature. Signing before the NAR is
// here signs what the upstream's narinfo says, which was checked against a
// trusted key (or the content address), and what the stream and the store
// check every byte against. Not cached: until the path is valid, the next
// request may find another upstream's narinfo.
func (s *Server) pulledNarinfo(in *Info) ([]byte, error) {
	out := *in
	out.URL = s.narURL(in.Name, in.NarHash)
	out.Compression = s.compression()
	if s.pulledExt(in) == "nar.xz" {
		out.URL = strings.TrimSuffix(out.URL, extensions["zstd"]) + extensions["xz"]
		out.Compression = "xz"
	}
	out.FileHash, out.FileSize = nil, 0
	if s.Key != nil {
		pi := in.PathInfo()
		if out.Sigs = addSig(out.Sigs, s.Key, s.StoreDir, &pi); out.Sigs == nil {
			return nil, fmt.Errorf("sign %s", in.Name)
		}
	}
	return out.Format(s.StoreDir), nil
}

// streamPause is how long the upstream may pause before what was
// streamed so far is flushed to the client.
const streamPause = 5 * time.Millisecond

// streamNAR sends the NAR rd follows as it arrives: the upstream's zstd
// file verbatim (a raw reader, for .nar.zst), compressed on the fly
// (.nar.zst) or as it is (.nar, with its length, and a single Range), each
// pause of the upstream flushing what was compressed so far so the client
// is never further behind than the upstream. The status goes out with the
// first bytes, so a fetch that fails at once is a 502; one that fails
// later cuts the response short before the NAR's end (the spool holds the
// end back until the NAR checked out), which the client sees as a
// truncated download, never as a whole NAR.
func (s *Server) streamNAR(w http.ResponseWriter, r *http.Request, rd *SpoolReader, ext string) {
	defer rd.Close()
	narSize := rd.Info().NarSize
	buf := getBuf()
	defer putBuf(buf)
	var rng *rangeWriter
	status := http.StatusOK
	if ext == "nar" {
		w.Header().Set("Content-Type", "application/x-nix-nar")
		w.Header().Set("Accept-Ranges", "bytes")
		start, n := int64(0), narSize
		if h := r.Header.Get("Range"); h != "" {
			a, b, ok := parseRange(h, narSize)
			if !ok {
				w.Header().Set("Content-Range", fmt.Sprintf("bytes */%d", narSize))
				http.Error(w, "bad range", http.StatusRequestedRangeNotSatisfiable)
				return
			}
			start, n = a, b-a+1
			status = http.StatusPartialContent
			w.Header().Set("Content-Range", fmt.Sprintf("bytes %d-%d/%d", a, b, narSize))
		}
		w.Header().Set("Content-Length", strconv.FormatInt(n, 10))
		// The skipped prefix is read and dropped: a checked reader
		// hashes the NAR from its start.
		rng = &rangeWriter{skip: start, left: n}
	} else {
		w.Header().Set("Content-Type", contentTypes[ext])
	}
	if r.Method == http.MethodHead {
		w.WriteHeader(status)
		return
	}
	if f := rd.Whole(); f != nil {
		// Downloaded and checked already (prefetched): the file as the NAR
		// cache would send it, with its length and by sendfile, instead of
		// a chunked copy through the process.
		defer f.Close()
		s.metrics.pullVerbatim.Add(1)
		http.ServeContent(w, r, "", time.Time{}, f)
		return
	}
	n, err := rd.Read(buf)
	if err != nil && err != io.EOF {
		if r.Context().Err() != nil {
			return
		}
		s.pullFailed(w, r, err, true)
		return
	}
	w.WriteHeader(status)
	bw := bufio.NewWriterSize(w, 128<<10)
	var out io.Writer = bw
	var enc *zstd.Encoder
	var xzw *xz.Writer
	if rd.Raw() {
		// The upstream's file, as it arrives: no decoding and no
		// compressing again, and the client gets what the upstream sent.
		s.metrics.pullVerbatim.Add(1)
	} else if ext == "nar.xz" {
		// Not the upstream's xz file (another upstream's NAR was pulled):
		// compressed again, slowly.
		if xzw, err = xz.NewWriter(bw); err != nil {
			s.abort(w, r, err)
			return
		}
		out = xzw
	} else if rng != nil {
		rng.w = bw
		out = rng
	} else {
		enc, _ = s.encoders.Get().(*zstd.Encoder)
		if enc == nil {
			if enc, err = zstd.NewWriter(nil, zstd.WithEncoderLevel(zstd.SpeedFastest), zstd.WithEncoderConcurrency(1),
				zstd.WithWindowSize(1<<20)); err != nil {
				s.abort(w, r, err)
				return
			}
		}
		defer s.encoders.Put(enc)
		enc.Reset(bw)
		out = enc
	}
	flush := func() error {
		if enc != nil {
			if err := enc.Flush(); err != nil {
				return err
			}
		}
		if err := bw.Flush(); err != nil {
			return err
		}
		return http.NewResponseController(w).Flush()
	}
	for {
		if n > 0 {
			if _, werr := out.Write(buf[:n]); werr == errRangeDone {
				break
			} else if werr != nil {
				s.abort(w, r, werr)
				return
			}
		}
		if err == io.EOF {
			break
		}
		if err != nil {
			s.metrics.pullStreamFailed.Add(1)
			s.abort(w, r, err)
			return
		}
		if n, err = rd.TryRead(buf); n == 0 && err == nil {
			// The upstream is behind. Bytes that keep coming go out in
			// the buffer's full writes; only a pause of the upstream
			// (streamPause) sends what is here at once, so the client is
			// never further behind than the upstream, without a write
			// and a chunk per read of the upstream's socket (which cost
			// the client more CPU than the NAR's own bytes did).
			wctx, cancel := context.WithTimeout(r.Context(), streamPause)
			err = rd.Wait(wctx)
			cancel()
			if err != nil && r.Context().Err() == nil {
				if err = flush(); err == nil {
					err = rd.Wait(r.Context())
				}
			}
			if err != nil {
				s.abort(w, r, err)
				return
			}
		}
	}
	if enc != nil {
		if err := enc.Close(); err != nil {
			s.abort(w, r, err)
			return
		}
	}
	if xzw != nil {
		if err := xzw.Close(); err != nil {
			s.abort(w, r, err)
			return
		}
	}
	if err := bw.Flush(); err != nil {
		s.abort(w, r, err)
		return
	}
	s.metrics.pullStreamed.Add(1)
}
