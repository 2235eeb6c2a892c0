package binarycache

import (
	"bufio"
	"context"
	"errors"
	"fmt"
	"io"
	"log/slog"
	"net/http"
	"os"
	"runtime"
	rtmetrics "runtime/metrics"
	"slices"
	"strconv"
	"strings"
	"sync"
	"sync/atomic"
	"time"

	"github.com/klauspost/compress/zstd"
	"github.com/ulikunitz/xz"

	"github.com/casnix/casnix/db"
	"github.com/casnix/casnix/loglimit"
	"github.com/casnix/casnix/store"
)

// Server serves the store as an HTTP binary cache: /nix-cache-info,
// /<hash>.narinfo, and NARs rendered from the castore on the fly at
// /nar/<hash>-<narhash>.nar.zst (or .nar, which answers Range requests).
// The NAR's file hash and size are not known before it is compressed, so
// the narinfo omits them, which Nix accepts.
type Server struct {
	Store    *store.Store
	StoreDir string
	Key      *store.SecretKey // signs narinfos on the fly when set
	Priority int
	// Compression is what narinfos point at: zstd (default) or none.
	Compression string
	Logger      *slog.Logger

	// CacheDir, when set, keeps compressed NARs once rendered (at most
	// CacheBytes), so later downloads are sent from a file.
	CacheDir   string
	CacheBytes int64

	// Metrics, when set, writes further metrics (Prometheus text) at the
	// end of /metrics: the daemon's substituters and evictions.
	Metrics func(io.Writer)

	// Pull, when set, makes the server a pull-through cache: a narinfo
	// request for a path the store lacks is answered from an upstream's
	// narinfo while Pull fetches the path into the store, and its NAR is
	// streamed from that fetch until the store holds it.
	Pull Puller

	encoders  sync.Pool
	cacheOnce sync.Once
	cache     *narCache
	narinfos  sync.Map // basename → []byte, signed narinfo (paths never change once valid)
	cached    atomic.Int64
	metrics   metrics
	// active: requests in progress; lastActive: when the last ended (Busy).
	active, lastActive atomic.Int64
}

// maxCachedNarinfos bounds the narinfo cache.
const maxCachedNarinfos = 100_000

type metrics struct {
	mu       sync.Mutex
	requests map[[2]string]int64 // route, status → count
	bytes    atomic.Int64
	errors   atomic.Int64
	verbatim atomic.Int64 // stored zstd frames sent as they are

	// Pull-through narinfo requests (with Pull set): present already,
	// fetched, not found upstream, failed.
	pullHits, pullFetched, pullMissing, pullFailed atomic.Int64
	// Pull-through NAR requests answered from a fetch in progress, and
	// those whose fetch failed (a 502, or a response cut short).
	pullStreamed, pullStreamFailed atomic.Int64
	pullVerbatim                   atomic.Int64 // streamed as the upstream's file

	// statsMu guards the store totals, apart from mu: the scan takes as
	// long as SQLite needs under load, and every request counts itself
	// under mu; under one lock a slow scan stalled every request.
	statsMu  sync.Mutex
	statsAt  time.Time
	paths    int64
	narBytes int64
}

// storeTotals returns the store's path count and NAR bytes, scanning
// SQLite at most every 10 s.
func (m *metrics) storeTotals(ctx context.Context, st interface {
	Stats(context.Context) (db.Stats, error)
}) (paths, narBytes int64) {
	m.statsMu.Lock()
	defer m.statsMu.Unlock()
	if time.Since(m.statsAt) > 10*time.Second {
		if s, err := st.Stats(ctx); err == nil {
			m.paths, m.narBytes, m.statsAt = s.Paths, s.NarBytes, time.Now()
		}
	}
	return m.paths, m.narBytes
}

func (m *metrics) count(route string, status int) {
	m.mu.Lock()
	defer m.mu.Unlock()
	if m.requests == nil {
		m.requests = map[[2]string]int64{}
	}
	m.requests[[2]string{route, strconv.Itoa(status)}]++
}

// statusWriter records the status and bytes of a response.
type statusWriter struct {
	http.ResponseWriter
	status int
	n      int64
}

func (w *statusWriter) WriteHeader(code int) {
	if w.status == 0 {
		w.status = code
	}
	w.ResponseWriter.WriteHeader(code)
}

// ReadFrom keeps net/http's sendfile path for files.
func (w *statusWriter) ReadFrom(r io.Reader) (int64, error) {
	if w.status == 0 {
		w.status = http.StatusOK
	}
	n, err := io.Copy(w.ResponseWriter, r)
	w.n += n
	return n, err
}

// Unwrap lets http.ResponseController reach the connection (to flush).
func (w *statusWriter) Unwrap() http.ResponseWriter { return w.ResponseWriter }

func (w *statusWriter) Write(p []byte) (int, error) {
	if w.status == 0 {
		w.status = http.StatusOK
	}
	n, err := w.ResponseWriter.Write(p)
	w.n += int64(n)
	return n, err
}

// ServeHTTP routes a request.
// Busy reports whether clients are being served (a request in progress,
// or one ended within busyLinger): the pull-through holds its ingest back
// meanwhile (subst.PullThrough.HoldIngest).
func (s *Server) Busy() bool {
	return s.active.Load() > 0 || time.Now().UnixNano()-s.lastActive.Load() < int64(busyLinger)
}

// busyLinger bridges the gaps between a client's requests.
const busyLinger = 300 * time.Millisecond

func (s *Server) ServeHTTP(rw http.ResponseWriter, r *http.Request) {
	if r.URL.Path != "/metrics" {
		s.active.Add(1)
		defer func() {
			s.lastActive.Store(time.Now().UnixNano())
			s.active.Add(-1)
		}()
	}
	w := &statusWriter{ResponseWriter: rw}
	route := "other"
	defer func() {
		if w.status == 0 {
			w.status = http.StatusOK
		}
		s.metrics.count(route, w.status)
		s.metrics.bytes.Add(w.n)
		if w.status >= 500 {
			s.metrics.errors.Add(1)
		}
	}()
	if r.Method != http.MethodGet && r.Method != http.MethodHead {
		w.Header().Set("Allow", "GET, HEAD")
		http.Error(w, "method not allowed", http.StatusMethodNotAllowed)
		return
	}
	p := r.URL.Path
	switch {
	case p == "/nix-cache-info":
		route = "nix-cache-info"
		w.Header().Set("Content-Type", "text/x-nix-cache-info")
		body := CacheInfo(s.StoreDir, s.Priority)
		w.Header().Set("Content-Length", strconv.Itoa(len(body)))
		if r.Method == http.MethodGet {
			io.WriteString(w, body)
		}
	case p == "/metrics":
		route = "metrics"
		s.serveMetrics(r.Context(), w)
	case strings.HasSuffix(p, ".narinfo") && strings.Count(p, "/") == 1:
		route = "narinfo"
		s.serveNarinfo(w, r, strings.TrimSuffix(p[1:], ".narinfo"))
	case strings.HasPrefix(p, "/nar/"):
		route = "nar"
		s.serveNAR(w, r, p[len("/nar/"):])
	case strings.HasPrefix(p, "/realisations/") && strings.HasSuffix(p, ".doi"):
		route = "realisation"
		s.serveRealisation(w, r, strings.TrimSuffix(p[len("/realisations/"):], ".doi"))
	default:
		http.NotFound(w, r)
	}
}

func (s *Server) fail(w http.ResponseWriter, what string, err error) {
	if s.Logger != nil {
		s.Logger.Error("http", "request", what, "err", err)
	}
	http.Error(w, "internal error", http.StatusInternalServerError)
}

// lookup finds a valid path by hash part ("" if none).
func (s *Server) lookup(ctx context.Context, hash string) (*store.PathInfo, error) {
	if len(hash) != 32 {
		return nil, nil
	}
	name, err := s.Store.PathByHashPart(ctx, hash)
	if err != nil || name == "" {
		return nil, err
	}
	pi, err := s.Store.Info(ctx, name)
	if errors.Is(err, store.ErrNotValid) {
		return nil, nil // deleted meanwhile
	}
	return pi, err
}

func (s *Server) compression() string {
	if s.Compression == "" {
		return "zstd"
	}
	return s.Compression
}

// Narinfo is the narinfo the server gives for pi.
func (s *Server) Narinfo(pi *store.PathInfo) ([]byte, error) {
	if v, ok := s.narinfos.Load(pi.Name); ok {
		return v.([]byte), nil
	}
	in := InfoFrom(pi)
	in.Compression = s.compression()
	in.URL = s.narURL(pi.Name, pi.NarHash)
	if s.Key != nil {
		if in.Sigs = addSig(in.Sigs, s.Key, s.StoreDir, pi); in.Sigs == nil {
			return nil, fmt.Errorf("sign %s", pi.Name)
		}
	}
	data := in.Format(s.StoreDir)
	// Signing costs more than a lookup: keep what was signed, up to a bound.
	if s.cached.Add(1) <= maxCachedNarinfos {
		s.narinfos.Store(pi.Name, data)
	}
	return data, nil
}

func (s *Server) serveNarinfo(w http.ResponseWriter, r *http.Request, hash string) {
	pi, err := s.lookup(r.Context(), hash)
	if err != nil {
		s.fail(w, r.URL.Path, err)
		return
	}
	var data []byte
	switch {
	case pi != nil:
		if s.Pull != nil && validHashPart(hash) {
			s.metrics.pullHits.Add(1)
		}
		data, err = s.Narinfo(pi)
	case s.Pull != nil && validHashPart(hash):
		var in *Info
		if in, err = s.Pull.Pull(r.Context(), hash); err != nil {
			s.pullFailed(w, r, err, false)
			return
		}
		s.metrics.pullFetched.Add(1)
		data, err = s.pulledNarinfo(in)
	default:
		http.NotFound(w, r)
		return
	}
	if err != nil {
		s.fail(w, r.URL.Path, err)
		return
	}
	w.Header().Set("Content-Type", "text/x-nix-narinfo")
	w.Header().Set("Content-Length", strconv.Itoa(len(data)))
	if r.Method == http.MethodGet {
		w.Write(data)
	}
}

var pullWarnings loglimit.Limiter

// pullFailed answers a pull-through request that failed: 404 if no
// upstream has the path (acceptably), else 502, so clients retry or try
// their next cache.
func (s *Server) pullFailed(w http.ResponseWriter, r *http.Request, err error, nar bool) {
	if errors.Is(err, ErrNotFound) {
		if !nar {
			s.metrics.pullMissing.Add(1)
		}
		http.NotFound(w, r)
		return
	}
	if r.Context().Err() != nil {
		return // the client went away
	}
	if nar {
		s.metrics.pullStreamFailed.Add(1)
	} else {
		s.metrics.pullFailed.Add(1)
	}
	if s.Logger != nil {
		// Clients retry at will: one line per interval, not per request.
		pullWarnings.Warn(s.Logger, "pull-through fetch failed", "request", r.URL.Path, "err", err)
	}
	http.Error(w, "upstream fetch failed", http.StatusBadGateway)
}

// validHashPart reports whether hash could be a store path's hash part
// (32 characters of Nix's base-32), so that no other request reaches an
// upstream.
func validHashPart(hash string) bool {
	if len(hash) != 32 {
		return false
	}
	for _, c := range []byte(hash) {
		if !strings.ContainsRune("0123456789abcdfghijklmnpqrsvwxyz", rune(c)) {
			return false
		}
	}
	return true
}

func (s *Server) serveNAR(w http.ResponseWriter, r *http.Request, file string) {
	base, ext, _ := strings.Cut(file, ".")
	hash, narHash, ok := strings.Cut(base, "-")
	// .nar.xz: the URL of a NAR pulled from an xz upstream (pulledNarinfo).
	if !ok || (ext != "nar" && ext != "nar.zst" && ext != "nar.xz") {
		http.NotFound(w, r)
		return
	}
	w.Header().Set("Cache-Control", "public, max-age=31536000, immutable")
	cache := s.narCache()
	key := narHash + "." + ext
	if cache != nil && ext != "nar" && len(narHash) == 52 {
		// A cached file is named by its NAR hash, so it is right for the
		// URL without asking the database (Nix got the URL from a narinfo,
		// which did check validity).
		if f := cache.open(key); f != nil {
			defer f.Close()
			if fi, err := f.Stat(); err == nil {
				w.Header().Set("Content-Type", contentTypes[ext])
				http.ServeContent(w, r, "", fi.ModTime(), f)
				return
			}
		}
	}
	pi, err := s.lookup(r.Context(), hash)
	if err != nil {
		s.fail(w, r.URL.Path, err)
		return
	}
	if pi == nil && s.Pull != nil && validHashPart(hash) && len(narHash) == 52 {
		rd, err := s.Pull.OpenNAR(r.Context(), hash, narHash, rawCompressions[ext])
		if err != nil {
			s.pullFailed(w, r, err, true)
			return
		}
		if rd != nil {
			s.streamNAR(w, r, rd, ext)
			return
		}
		// The store holds it now.
		if pi, err = s.lookup(r.Context(), hash); err != nil {
			s.fail(w, r.URL.Path, err)
			return
		}
	}
	if pi == nil || store.NixBase32(pi.NarHash[:]) != narHash {
		http.NotFound(w, r)
		return
	}
	if ext == "nar" {
		s.serveRawNAR(w, r, pi)
		return
	}
	w.Header().Set("Content-Type", contentTypes[ext])
	if r.Method == http.MethodHead {
		return
	}
	var write func(out io.Writer) error
	if ext == "nar.xz" {
		// The URL the server's narinfo gave while the path was pulled from
		// an xz upstream, which a client's narinfo cache may still hold:
		// the upstream's file kept in the NAR cache answers it (sendfile,
		// above); without it (evicted, or no NAR cache) the NAR is rendered
		// and compressed with xz, slowly, and kept.
		write = func(out io.Writer) error {
			comp, err := xz.NewWriter(out)
			if err != nil {
				return err
			}
			return renderTo(r.Context(), s.Store, pi.Name, comp, io.Discard)
		}
	} else {
		enc, _ := s.encoders.Get().(*zstd.Encoder)
		if enc == nil {
			// The fastest level: serving is bound by compression, and the
			// client's network is usually faster than a core at higher levels.
			enc, err = zstd.NewWriter(nil, zstd.WithEncoderLevel(zstd.SpeedFastest), zstd.WithEncoderConcurrency(1),
				zstd.WithWindowSize(1<<20))
			if err != nil {
				s.fail(w, r.URL.Path, err)
				return
			}
		}
		defer s.encoders.Put(enc)
		// Once the first bytes are out an error can only cut the response
		// short; the client notices by the missing zstd frame end (and the
		// NAR hash).
		write = func(out io.Writer) error {
			n, err := writeNARZstd(r.Context(), s.Store, pi.Name, enc, out, nil)
			s.metrics.verbatim.Add(int64(n))
			return err
		}
	}
	s.renderNAR(w, r, cache, key, write)
}

// contentTypes are the Content-Types of compressed NAR URLs.
var contentTypes = map[string]string{"nar.zst": "application/zstd", "nar.xz": "application/x-xz"}

// rawCompressions are the compressions in which an upstream's file may be
// passed on verbatim for a NAR URL.
var rawCompressions = map[string]string{"nar.zst": "zstd", "nar.xz": "xz"}

// renderNAR sends what write writes (a stored path's NAR, compressed) and,
// with a NAR cache and no Range, keeps it as the cached file for key once
// the whole response went out.
func (s *Server) renderNAR(w http.ResponseWriter, r *http.Request, cache *narCache, key string, write func(out io.Writer) error) {
	var fill *cacheFill
	if cache != nil && r.Header.Get("Range") == "" {
		fill = cache.fill(key)
	}
	bw := bufio.NewWriterSize(w, 128<<10)
	var out io.Writer = bw
	committed := false
	if fill != nil {
		// Whatever ends this response early (an error, a panic, the client
		// leaving) drops the file; only a complete NAR is kept.
		defer func() {
			if !committed {
				fill.Abort()
			}
		}()
		out = io.MultiWriter(bw, fill)
	}
	if err := write(out); err != nil {
		s.abort(w, r, err)
		return
	}
	if err := bw.Flush(); err != nil {
		s.abort(w, r, err)
		return
	}
	if fill != nil && r.Context().Err() == nil {
		committed = true
		fill.Commit()
	}
}

func (s *Server) narCache() *narCache {
	s.cacheOnce.Do(func() {
		if s.CacheDir == "" {
			return
		}
		c, err := newNarCache(s.CacheDir, max(s.CacheBytes, 1<<20))
		if err != nil {
			if s.Logger != nil {
				s.Logger.Error("NAR cache disabled", "dir", s.CacheDir, "err", err)
			}
			return
		}
		s.cache = c
	})
	return s.cache
}

// abort ends a response that failed after its header was sent.
func (s *Server) abort(w http.ResponseWriter, r *http.Request, err error) {
	if r.Context().Err() != nil {
		return // the client went away
	}
	s.metrics.errors.Add(1)
	if s.Logger != nil {
		s.Logger.Error("http", "request", r.URL.Path, "err", err)
	}
	panic(http.ErrAbortHandler)
}

// rangeWriter passes on bytes [skip, skip+n) of what is written to it.
type rangeWriter struct {
	w          io.Writer
	skip, left int64
}

var errRangeDone = errors.New("range done")

func (rw *rangeWriter) Write(p []byte) (int, error) {
	total := len(p)
	if rw.skip > 0 {
		k := min(rw.skip, int64(len(p)))
		rw.skip -= k
		p = p[k:]
	}
	if len(p) > 0 {
		if int64(len(p)) > rw.left {
			p = p[:rw.left]
		}
		n, err := rw.w.Write(p)
		rw.left -= int64(n)
		if err != nil {
			return 0, err
		}
	}
	if rw.left == 0 {
		return 0, errRangeDone
	}
	return total, nil
}

// serveRawNAR serves the uncompressed NAR, whose size is known, with
// single Range requests (the skipped prefix is rendered and dropped).
func (s *Server) serveRawNAR(w http.ResponseWriter, r *http.Request, pi *store.PathInfo) {
	w.Header().Set("Content-Type", "application/x-nix-nar")
	w.Header().Set("Accept-Ranges", "bytes")
	start, n := int64(0), pi.NarSize
	status := http.StatusOK
	if h := r.Header.Get("Range"); h != "" {
		a, b, ok := parseRange(h, pi.NarSize)
		if !ok {
			w.Header().Set("Content-Range", fmt.Sprintf("bytes */%d", pi.NarSize))
			http.Error(w, "bad range", http.StatusRequestedRangeNotSatisfiable)
			return
		}
		start, n = a, b-a+1
		status = http.StatusPartialContent
		w.Header().Set("Content-Range", fmt.Sprintf("bytes %d-%d/%d", a, b, pi.NarSize))
	}
	w.Header().Set("Content-Length", strconv.FormatInt(n, 10))
	w.WriteHeader(status)
	if r.Method == http.MethodHead {
		return
	}
	bw := bufio.NewWriterSize(w, 128<<10)
	_, err := s.Store.NarRender(r.Context(), pi.Name, &rangeWriter{w: bw, skip: start, left: n})
	if err != nil && !errors.Is(err, errRangeDone) {
		s.abort(w, r, err)
		return
	}
	if err := bw.Flush(); err != nil {
		s.abort(w, r, err)
	}
}

// parseRange parses one "bytes=a-b", "bytes=a-" or "bytes=-n" range.
func parseRange(h string, size int64) (int64, int64, bool) {
	spec, ok := strings.CutPrefix(h, "bytes=")
	if !ok || strings.Contains(spec, ",") {
		return 0, 0, false
	}
	as, bs, ok := strings.Cut(strings.TrimSpace(spec), "-")
	if !ok {
		return 0, 0, false
	}
	if as == "" {
		n, err := strconv.ParseInt(bs, 10, 64)
		if err != nil || n <= 0 {
			return 0, 0, false
		}
		return max(size-n, 0), size - 1, true
	}
	a, err := strconv.ParseInt(as, 10, 64)
	if err != nil || a < 0 || a >= size {
		return 0, 0, false
	}
	b := size - 1
	if bs != "" {
		if b, err = strconv.ParseInt(bs, 10, 64); err != nil || b < a {
			return 0, 0, false
		}
		b = min(b, size-1)
	}
	return a, b, true
}

func (s *Server) serveMetrics(ctx context.Context, w http.ResponseWriter) {
	m := &s.metrics
	paths, narBytes := m.storeTotals(ctx, s.Store)
	m.mu.Lock()
	keys := make([][2]string, 0, len(m.requests))
	for k := range m.requests {
		keys = append(keys, k)
	}
	slices.SortFunc(keys, func(a, b [2]string) int { return strings.Compare(a[0]+" "+a[1], b[0]+" "+b[1]) })
	var b strings.Builder
	b.WriteString("# HELP casnix_http_requests_total HTTP requests by route and status.\n# TYPE casnix_http_requests_total counter\n")
	for _, k := range keys {
		fmt.Fprintf(&b, "casnix_http_requests_total{route=%q,status=%q} %d\n", k[0], k[1], m.requests[k])
	}
	m.mu.Unlock()
	fmt.Fprintf(&b, "# HELP casnix_http_sent_bytes_total Response body bytes sent.\n# TYPE casnix_http_sent_bytes_total counter\ncasnix_http_sent_bytes_total %d\n", m.bytes.Load())
	fmt.Fprintf(&b, "# HELP casnix_http_errors_total Requests that failed on the server side.\n# TYPE casnix_http_errors_total counter\ncasnix_http_errors_total %d\n", m.errors.Load())
	fmt.Fprintf(&b, "# HELP casnix_http_verbatim_frames_total Stored zstd frames sent as stored instead of recompressed.\n# TYPE casnix_http_verbatim_frames_total counter\ncasnix_http_verbatim_frames_total %d\n", m.verbatim.Load())
	if s.Pull != nil {
		b.WriteString("# HELP casnix_http_pull_through_total Narinfo requests of the pull-through cache by result: hit (present), fetched (absent when asked, answered from an upstream narinfo while the path is fetched), missing (no acceptable upstream copy, 404), failed (502).\n# TYPE casnix_http_pull_through_total counter\n")
		for _, r := range []struct {
			result string
			n      *atomic.Int64
		}{{"hit", &m.pullHits}, {"fetched", &m.pullFetched}, {"missing", &m.pullMissing}, {"failed", &m.pullFailed}} {
			fmt.Fprintf(&b, "casnix_http_pull_through_total{result=%q} %d\n", r.result, r.n.Load())
		}
		b.WriteString("# HELP casnix_http_pull_through_nars_total NAR requests of the pull-through cache answered while the path was fetched, by result: streamed (sent whole as it arrived), failed (the fetch failed: a 502, or a response cut short).\n# TYPE casnix_http_pull_through_nars_total counter\n")
		fmt.Fprintf(&b, "casnix_http_pull_through_nars_total{result=\"streamed\"} %d\n", m.pullStreamed.Load())
		fmt.Fprintf(&b, "casnix_http_pull_through_nars_total{result=\"failed\"} %d\n", m.pullStreamFailed.Load())
		fmt.Fprintf(&b, "# HELP casnix_http_pull_through_nars_verbatim_total NAR requests of the pull-through cache answered while the path was fetched with the upstream's zstd file as it arrived (no decoding, no compressing again).\n# TYPE casnix_http_pull_through_nars_verbatim_total counter\ncasnix_http_pull_through_nars_verbatim_total %d\n", m.pullVerbatim.Load())
	}
	fmt.Fprintf(&b, "# HELP casnix_store_paths Valid store paths.\n# TYPE casnix_store_paths gauge\ncasnix_store_paths %d\n", paths)
	fmt.Fprintf(&b, "# HELP casnix_store_nar_bytes Logical NAR bytes of the valid paths.\n# TYPE casnix_store_nar_bytes gauge\ncasnix_store_nar_bytes %d\n", narBytes)
	// Process gauges, so a soak or an operator can see leaks from outside:
	// goroutines and open descriptors must come back to a baseline when the
	// load stops.
	fmt.Fprintf(&b, "# HELP go_goroutines Goroutines in the casnix process.\n# TYPE go_goroutines gauge\ngo_goroutines %d\n", runtime.NumGoroutine())
	if fds, err := os.ReadDir("/proc/self/fd"); err == nil {
		fmt.Fprintf(&b, "# HELP process_open_fds Open file descriptors.\n# TYPE process_open_fds gauge\nprocess_open_fds %d\n", len(fds)-1) // less ReadDir's own
	}
	// The heap the last collection found live: RSS also counts the
	// collector's headroom (up to GOMEMLIMIT) and, under -race, shadow
	// memory, so this is the gauge a leak of Go objects shows in first.
	live := []rtmetrics.Sample{{Name: "/gc/heap/live:bytes"}}
	if rtmetrics.Read(live); live[0].Value.Kind() == rtmetrics.KindUint64 {
		fmt.Fprintf(&b, "# HELP go_gc_heap_live_bytes Heap bytes marked live by the last garbage collection.\n# TYPE go_gc_heap_live_bytes gauge\ngo_gc_heap_live_bytes %d\n", live[0].Value.Uint64())
	}
	if s.Metrics != nil {
		s.Metrics(&b)
	}
	w.Header().Set("Content-Type", "text/plain; version=0.0.4")
	io.WriteString(w, b.String())
}
