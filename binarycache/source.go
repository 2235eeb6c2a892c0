package binarycache

import (
	"bufio"
	"compress/bzip2"
	"context"
	"errors"
	"fmt"
	"io"
	"net"
	"net/http"
	"net/url"
	"os"
	"path/filepath"
	"strconv"
	"strings"
	"time"

	"github.com/klauspost/compress/zstd"
	"github.com/ulikunitz/xz"
)

// ErrNotFound means the cache does not have the file.
var ErrNotFound = errors.New("not in the binary cache")

// StatusError is an HTTP answer that is neither the file nor "not found":
// the server is up and answered, so (unlike a connection that fails or
// never answers) it is worth asking again soon when the code says so.
type StatusError struct {
	URL, Status string
	Code        int
}

func (e *StatusError) Error() string { return fmt.Sprintf("GET %s: %s", e.URL, e.Status) }

// TransientError marks a failure worth retrying: a dropped connection, a
// server error, a truncated body.
type TransientError struct{ Err error }

func (e *TransientError) Error() string { return e.Err.Error() }
func (e *TransientError) Unwrap() error { return e.Err }

// Source is a binary cache to read from.
type Source interface {
	// Open opens a file of the cache by its path relative to the root.
	Open(ctx context.Context, rel string) (io.ReadCloser, error)
	// Narinfos lists the hash parts of every narinfo, when the cache can
	// be listed.
	Narinfos(ctx context.Context) ([]string, error)
	String() string
}

// OpenSource opens a cache URL: file:///dir, http://… or https://….
func OpenSource(raw string) (Source, error) {
	u, err := url.Parse(raw)
	if err != nil {
		return nil, fmt.Errorf("cache URL %q: %w", raw, err)
	}
	switch u.Scheme {
	case "file":
		if u.Host != "" && u.Host != "localhost" {
			return nil, fmt.Errorf("cache URL %q: file URLs name a local directory (file:///dir)", raw)
		}
		if u.Path == "" {
			return nil, fmt.Errorf("cache URL %q: no directory", raw)
		}
		return fileSource{dir: u.Path}, nil
	case "http", "https":
		u.RawQuery, u.Fragment = "", ""
		return &httpSource{base: strings.TrimSuffix(u.String(), "/"), client: newHTTPClient()}, nil
	}
	return nil, fmt.Errorf("cache URL %q: scheme must be file, http or https", raw)
}

type fileSource struct{ dir string }

func (s fileSource) String() string { return "file://" + s.dir }

func (s fileSource) Open(_ context.Context, rel string) (io.ReadCloser, error) {
	f, err := os.Open(filepath.Join(s.dir, filepath.FromSlash(rel)))
	if errors.Is(err, os.ErrNotExist) {
		return nil, fmt.Errorf("%s/%s: %w", s, rel, ErrNotFound)
	}
	if err != nil {
		return nil, err
	}
	return f, nil
}

func (s fileSource) Narinfos(context.Context) ([]string, error) {
	ents, err := os.ReadDir(s.dir)
	if err != nil {
		return nil, fmt.Errorf("list %s: %w", s, err)
	}
	var out []string
	for _, e := range ents {
		if h, ok := strings.CutSuffix(e.Name(), ".narinfo"); ok && e.Type().IsRegular() {
			out = append(out, h)
		}
	}
	return out, nil
}

func newHTTPClient() *http.Client {
	tr := http.DefaultTransport.(*http.Transport).Clone()
	tr.MaxIdleConnsPerHost = 32
	tr.ResponseHeaderTimeout = time.Minute
	tr.DialContext = (&net.Dialer{Timeout: 30 * time.Second, KeepAlive: 30 * time.Second}).DialContext
	// Compressed NARs must arrive as the cache stores them, to check FileHash.
	tr.DisableCompression = true
	return &http.Client{Transport: tr}
}

type httpSource struct {
	base   string
	client *http.Client
}

func (s *httpSource) String() string { return s.base }

func (s *httpSource) Open(ctx context.Context, rel string) (io.ReadCloser, error) {
	u := s.base + "/" + rel
	req, err := http.NewRequestWithContext(ctx, http.MethodGet, u, nil)
	if err != nil {
		return nil, err
	}
	resp, err := s.client.Do(req)
	if err != nil {
		if ctx.Err() != nil {
			return nil, err
		}
		return nil, &TransientError{fmt.Errorf("GET %s: %w", u, err)}
	}
	switch {
	case resp.StatusCode == http.StatusOK:
		return transientBody{resp.Body, u}, nil
	case resp.StatusCode == http.StatusNotFound || resp.StatusCode == http.StatusForbidden || resp.StatusCode == http.StatusGone:
		resp.Body.Close()
		return nil, fmt.Errorf("GET %s: %w (%s)", u, ErrNotFound, resp.Status)
	default:
		resp.Body.Close()
		err := &StatusError{URL: u, Status: resp.Status, Code: resp.StatusCode}
		if resp.StatusCode >= 500 || resp.StatusCode == http.StatusTooManyRequests || resp.StatusCode == http.StatusRequestTimeout {
			return nil, &TransientError{err}
		}
		return nil, err
	}
}

func (s *httpSource) Narinfos(context.Context) ([]string, error) {
	return nil, fmt.Errorf("%s: an HTTP binary cache cannot be listed; name the store paths to import", s.base)
}

// transientBody marks read errors of a response body (a reset, a
// truncated body) as worth retrying.
type transientBody struct {
	io.ReadCloser
	url string
}

func (b transientBody) Read(p []byte) (int, error) {
	n, err := b.ReadCloser.Read(p)
	if err != nil && err != io.EOF {
		err = &TransientError{fmt.Errorf("GET %s: %w", b.url, err)}
	}
	return n, err
}

// maxZstdWindow is the largest zstd window (history a decoder keeps) a
// cache file may ask for: libzstd's own default decoding limit
// (ZSTD_WINDOWLOG_LIMIT_DEFAULT, 2^27), which the Nix that wrote the cache
// decodes with too. A frame asking for more is refused before anything is
// allocated for it, rather than costing up to its 3.75 TB maximum.
const maxZstdWindow = 1 << 27

// decompress returns a reader of the NAR inside a cache file. What it
// yields is not bounded here: the caller caps it at the NAR's size.
func decompress(r io.Reader, compression string) (io.Reader, func(), error) {
	switch compression {
	case "none":
		return r, func() {}, nil
	case "zstd":
		d, err := zstd.NewReader(r, zstd.WithDecoderConcurrency(1), zstd.WithDecoderLowmem(true),
			zstd.WithDecoderMaxWindow(maxZstdWindow), zstd.WithDecoderMaxMemory(maxZstdWindow))
		if err != nil {
			return nil, nil, fmt.Errorf("zstd: %w", err)
		}
		return d, d.Close, nil
	case "xz":
		d, err := xz.NewReader(bufio.NewReaderSize(newXzGuard(r), 64<<10))
		if err != nil {
			return nil, nil, fmt.Errorf("xz: %w", err)
		}
		return d, func() {}, nil
	case "bzip2":
		return bzip2.NewReader(bufio.NewReaderSize(r, 64<<10)), func() {}, nil
	}
	return nil, nil, fmt.Errorf("unsupported compression %q", compression)
}

// CacheInfoFile is what a cache's nix-cache-info says.
type CacheInfoFile struct {
	StoreDir      string // "" when not given
	Priority      int    // 0 when not given
	WantMassQuery bool
}

// ReadCacheInfo reads and parses a cache's nix-cache-info.
func ReadCacheInfo(ctx context.Context, src Source) (*CacheInfoFile, error) {
	rc, err := src.Open(ctx, "nix-cache-info")
	if errors.Is(err, ErrNotFound) {
		return nil, fmt.Errorf("%s is not a binary cache: %w", src, err)
	}
	if err != nil {
		return nil, fmt.Errorf("%s/nix-cache-info: %w", src, err)
	}
	defer rc.Close()
	data, err := io.ReadAll(io.LimitReader(rc, 64<<10))
	if err != nil {
		return nil, fmt.Errorf("%s/nix-cache-info: %w", src, err)
	}
	ci := &CacheInfoFile{}
	for line := range strings.SplitSeq(string(data), "\n") {
		k, v, ok := strings.Cut(line, ":")
		if !ok {
			continue
		}
		v = strings.TrimSpace(v)
		switch k {
		case "StoreDir":
			ci.StoreDir = v
		case "Priority":
			// Nix ignores what does not parse; so does casnix.
			if p, err := strconv.Atoi(v); err == nil {
				ci.Priority = p
			}
		case "WantMassQuery":
			ci.WantMassQuery = v == "1"
		}
	}
	return ci, nil
}

// readCacheInfo reads nix-cache-info and checks its StoreDir.
func readCacheInfo(ctx context.Context, src Source, storeDir string) error {
	ci, err := ReadCacheInfo(ctx, src)
	if err != nil {
		return err
	}
	if ci.StoreDir != "" && ci.StoreDir != storeDir {
		return fmt.Errorf("%s holds paths of the store directory %s, not %s", src, ci.StoreDir, storeDir)
	}
	return nil
}
