package cli

import (
	"context"
	"errors"
	"fmt"
	"io"
	"net"
	"net/http"
	"path/filepath"
	"runtime"
	"time"

	"github.com/klauspost/compress/zstd"

	"github.com/casnix/casnix/binarycache"
	"github.com/casnix/casnix/store"
	"github.com/casnix/casnix/subst"
)

// CacheImportFlags are ImportCmd's flags for --from (a binary cache).
type CacheImportFlags struct {
	All               bool     `name:"all" help:"With --from file://…: import every path the cache holds."`
	TrustedPublicKeys []string `name:"trusted-public-keys" sep:"none" placeholder:"KEYS" help:"With --from: the keys (Nix format name:base64; repeatable, or space-separated) whose signature makes an input-addressed path acceptable; without one, only content-addressed paths are imported unless --no-check-sigs."`
	NoCheckSigs       bool     `name:"no-check-sigs" help:"With --from: import paths without checking their signatures (a cache you trust as a whole, over a channel you trust)."`
	KeepGoing         bool     `name:"keep-going" short:"k" help:"With --from: import what can be imported; report failed paths (and those that refer to them) and exit non-zero."`
	Jobs              int      `name:"jobs" short:"j" default:"4" help:"With --from: NARs downloaded and imported at once."`
	Retries           int      `name:"retries" default:"3" help:"With --from: extra attempts after a network or server error."`
}

func (c *ImportCmd) runCache(g *Globals) error {
	src, err := binarycache.OpenSource(c.From)
	if err != nil {
		return err
	}
	var names, hashes []string
	switch {
	case c.All && len(c.Paths) > 0:
		return errors.New("--all or store paths, not both")
	case c.All:
		if hashes, err = src.Narinfos(g.Ctx); err != nil {
			return err
		}
	case len(c.Paths) == 0:
		return errors.New("--from needs store paths to import, or --all")
	default:
		for _, p := range c.Paths {
			n, err := store.ParseName(g.StoreDir, p)
			if err != nil {
				return err
			}
			names = append(names, n)
		}
	}
	var keys store.PublicKeys
	if len(c.TrustedPublicKeys) > 0 {
		if keys, err = store.ParsePublicKeys(c.TrustedPublicKeys); err != nil {
			return err
		}
		if len(keys) == 0 {
			return errors.New("--trusted-public-keys holds no key")
		}
	}
	st, err := g.Open()
	if err != nil {
		return err
	}
	defer st.Close()
	pr := newProgress(g.Stderr)
	im := &binarycache.Importer{
		Store: st, Src: src, StoreDir: st.StoreDir, Keys: keys, NoCheckSigs: c.NoCheckSigs,
		Jobs: max(c.Jobs, 1), Retries: max(c.Retries, 0), KeepGoing: c.KeepGoing,
		Progress: func(done, total int, bytes int64) {
			pr.update("importing %s %d/%d paths, %s NAR", bar(int64(done), int64(total), 30), done, total, humanBytes(bytes))
		},
	}
	start := time.Now()
	sum, err := im.Import(g.Ctx, names, hashes)
	pr.done()
	el := time.Since(start)
	if sum != nil {
		fmt.Fprintf(g.Stderr, "imported %d paths (%s NAR) from %s in %.1fs (%.0f MB/s); %d already present, %d failed\n",
			sum.Imported, humanBytes(sum.NarBytes), src, el.Seconds(), float64(sum.NarBytes)/1e6/max(el.Seconds(), 1e-9),
			sum.Present, sum.Failed)
		if c.KeepGoing {
			for _, f := range sum.Failures {
				fmt.Fprintf(g.Stderr, "error: %v\n", f)
			}
		}
	}
	untrusted := errors.As(err, new(*binarycache.UntrustedError))
	if sum != nil {
		for _, f := range sum.Failures {
			untrusted = untrusted || errors.As(f, new(*binarycache.UntrustedError))
		}
	}
	if untrusted {
		const hint = "pass --trusted-public-keys with the cache's public key (NAME:BASE64), or --no-check-sigs to import unsigned paths unchecked"
		if err != nil {
			return fmt.Errorf("%w; %s", err, hint)
		}
		fmt.Fprintf(g.Stderr, "hint: %s\n", hint)
	}
	if err != nil {
		return err
	}
	if sum.Failed > 0 {
		return fmt.Errorf("%d paths failed to import", sum.Failed)
	}
	return nil
}

// ExportCmd writes closures into a binary cache directory.
type ExportCmd struct {
	To          string   `name:"to" required:"" placeholder:"file:///DIR" help:"The binary cache directory (created if missing)."`
	All         bool     `name:"all" help:"Export every valid path."`
	Compression string   `name:"compression" default:"zstd" enum:"zstd,xz,none" help:"NAR compression (${enum})."`
	Level       int      `name:"level" default:"3" help:"zstd level (1 fastest, 3 default, 7 better, 11 best) of what is compressed; stored frames holding exactly a run of a file are copied as stored (level 1 from imports, 11 after repack)."`
	SignKey     string   `name:"sign-key" type:"path" placeholder:"FILE" help:"Sign every exported path with this Nix secret key file."`
	Jobs        int      `name:"jobs" short:"j" help:"Paths exported at once (default: the number of CPUs)."`
	Paths       []string `arg:"" optional:"" name:"paths" help:"Store paths whose closures to export."`
}

// Run exports.
func (c *ExportCmd) Run(g *Globals) error {
	dir, err := fileCacheDir(c.To)
	if err != nil {
		return err
	}
	if c.All == (len(c.Paths) > 0) {
		return errors.New("give store paths to export, or --all")
	}
	var key *store.SecretKey
	if c.SignKey != "" {
		if key, err = store.LoadSecretKeyFile(c.SignKey); err != nil {
			return err
		}
	}
	st, err := g.Open()
	if err != nil {
		return err
	}
	defer st.Close()
	var names []string
	if c.All {
		if names, err = st.All(g.Ctx); err != nil {
			return err
		}
	}
	for _, p := range c.Paths {
		n, err := store.ParseName(g.StoreDir, p)
		if err != nil {
			return err
		}
		names = append(names, n)
	}
	pr := newProgress(g.Stderr)
	ex := &binarycache.Exporter{
		Store: st, Dir: dir, StoreDir: st.StoreDir, Compression: c.Compression,
		Level: zstd.EncoderLevelFromZstd(c.Level), Key: key, Jobs: c.Jobs,
		Progress: func(done, total int, bytes int64) {
			pr.update("exporting %s %d/%d paths, %s NAR", bar(int64(done), int64(total), 30), done, total, humanBytes(bytes))
		},
	}
	if ex.Jobs <= 0 {
		ex.Jobs = runtime.GOMAXPROCS(0)
	}
	start := time.Now()
	sum, err := ex.Export(g.Ctx, names)
	pr.done()
	el := time.Since(start)
	if sum != nil {
		fmt.Fprintf(g.Stderr, "exported %d paths (%s NAR, %s compressed) to %s in %.1fs (%.0f MB/s); %d already there\n",
			sum.Exported, humanBytes(sum.NarBytes), humanBytes(sum.FileBytes), dir, el.Seconds(),
			float64(sum.NarBytes)/1e6/max(el.Seconds(), 1e-9), sum.Present)
		if sum.Realisations > 0 {
			fmt.Fprintf(g.Stderr, "wrote %d realisations\n", sum.Realisations)
		}
	}
	return err
}

// fileCacheDir takes the directory out of a file:// URL (or a plain path).
func fileCacheDir(u string) (string, error) {
	src, err := binarycache.OpenSource(u)
	if err != nil {
		return "", err
	}
	s := src.String()
	dir, ok := cutPrefix(s, "file://")
	if !ok {
		return "", fmt.Errorf("--to %s: export writes a local directory (file:///DIR)", u)
	}
	return dir, nil
}

func cutPrefix(s, p string) (string, bool) {
	if len(s) >= len(p) && s[:len(p)] == p {
		return s[len(p):], true
	}
	return s, false
}

// HTTPFlags are ServeCmd's flags for the HTTP binary cache.
type HTTPFlags struct {
	HTTP            string        `name:"http" env:"CASNIX_HTTP" placeholder:"ADDR" help:"Also serve the store as an HTTP binary cache on ADDR (host:port), with /metrics."`
	HTTPOnly        bool          `name:"http-only" help:"With --http: serve no daemon socket."`
	SignKey         string        `name:"sign-key" type:"path" placeholder:"FILE" help:"With --http: sign narinfos with this Nix secret key file."`
	HTTPCompression string        `name:"http-compression" default:"zstd" enum:"zstd,none" help:"With --http: NAR compression narinfos point at (${enum}); none suits fast local networks."`
	Priority        int           `name:"priority" default:"40" help:"With --http: the Priority in nix-cache-info (lower is preferred)."`
	HTTPCache       string        `name:"http-cache" type:"path" placeholder:"DIR" help:"With --http: keep compressed NARs once served, and pull-through's upstream zstd NARs once checked, in DIR (default: DATA_DIR/http-cache), so later downloads are sent from a file (no render, no compression)."`
	HTTPCacheSize   int64         `name:"http-cache-size" default:"10737418240" placeholder:"BYTES" help:"With --http: evict least recently used cached NARs beyond this many bytes; 0 keeps none."`
	HTTPMaxConns    int           `name:"http-max-connections" env:"CASNIX_HTTP_MAX_CONNECTIONS" default:"128" placeholder:"N" help:"With --http: serve at most N connections at once (each may render and compress a NAR); more wait until one closes. 0: no cap."`
	HTTPMaxPerIP    int           `name:"http-max-connections-per-client" env:"CASNIX_HTTP_MAX_CONNECTIONS_PER_CLIENT" default:"0" placeholder:"N" help:"With --http: serve at most N connections of one client IP address at once, so one client cannot take every --http-max-connections slot; more are answered 503 (Nix retries) and closed. 0: no cap (behind a proxy or NAT many clients share an address)."`
	HTTPPull        bool          `name:"http-pull-through" default:"true" negatable:"" help:"With --http and --substituters: a narinfo request for a path the store lacks is answered from an upstream narinfo (under the substitution signature rules) while the path and its closure are fetched into the store, and its NAR is streamed to clients as it arrives (a pull-through cache)."`
	HTTPStall       time.Duration `name:"http-stall-timeout" env:"CASNIX_HTTP_STALL_TIMEOUT" default:"1m" help:"With --http: close a connection whose response makes no progress (a client not reading) for this long; a slow but steady download is not cut off."`
}

// httpCacheDir is where serve --http keeps NARs (the NAR cache) in the data
// dir unless --http-cache says otherwise.
const httpCacheDir = "http-cache"

// startHTTP starts the HTTP binary cache; the returned function stops it.
func (c *ServeCmd) startHTTP(g *Globals, st *store.Store, metrics func(io.Writer), pull binarycache.Puller) (func(), error) {
	var key *store.SecretKey
	if c.SignKey != "" {
		var err error
		if key, err = store.LoadSecretKeyFile(c.SignKey); err != nil {
			return nil, err
		}
	}
	ln, err := net.Listen("tcp", c.HTTP)
	if err != nil {
		return nil, fmt.Errorf("--http: %w", err)
	}
	// The NAR cache is on by default: a served NAR is sent from a file the
	// next time (sendfile) instead of rendered and compressed again, and a
	// pulled one from the upstream's own file from its first fetch on.
	cacheDir := c.HTTPCache
	if cacheDir == "" && c.HTTPCacheSize > 0 {
		cacheDir = filepath.Join(st.Dir(), httpCacheDir)
	}
	if c.HTTPCacheSize <= 0 {
		cacheDir = ""
	}
	// The listener's refusals (--http-max-connections-per-client), set
	// before the server starts.
	var refused interface{ Refused() int64 }
	allMetrics := func(w io.Writer) {
		if metrics != nil {
			metrics(w)
		}
		if refused != nil {
			fmt.Fprintf(w, "# HELP casnix_http_refused_connections_total Connections refused for being over --http-max-connections-per-client.\n"+
				"# TYPE casnix_http_refused_connections_total counter\ncasnix_http_refused_connections_total %d\n", refused.Refused())
		}
	}
	h := &binarycache.Server{Store: st, StoreDir: st.StoreDir, Key: key, Priority: c.Priority,
		Compression: c.HTTPCompression, Logger: g.Logger, CacheDir: cacheDir, CacheBytes: c.HTTPCacheSize, Metrics: allMetrics, Pull: pull}
	if p, ok := pull.(*subst.PullThrough); ok {
		if cacheDir != "" {
			p.Keep(h)
		}
		p.HoldIngest(h.Busy)
	}
	lim := binarycache.DefaultHTTPLimits
	lim.MaxConns, lim.MaxConnsPerClient, lim.WriteStall = c.HTTPMaxConns, c.HTTPMaxPerIP, c.HTTPStall
	srv := binarycache.NewHTTPServer(h, lim)
	ln = binarycache.LimitListener(ln, lim.MaxConns, lim.MaxConnsPerClient)
	refused, _ = ln.(interface{ Refused() int64 })
	g.Logger.Info("serving HTTP binary cache", "addr", ln.Addr().String(), "max_connections", lim.MaxConns,
		"max_connections_per_client", lim.MaxConnsPerClient)
	go func() {
		if err := srv.Serve(ln); err != nil && !errors.Is(err, http.ErrServerClosed) {
			g.Logger.Error("http", "err", err)
		}
	}()
	return func() {
		ctx, cancel := context.WithTimeout(context.Background(), c.ShutdownTimeout)
		defer cancel()
		srv.Shutdown(ctx)
	}, nil
}
