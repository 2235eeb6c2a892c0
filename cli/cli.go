// Package cli holds casnix's commands: one struct per command with a Run
// method, parsed by kong in main.go. Commands talk to the terminal; the
// packages below them never print.
package cli

import (
	"context"
	"fmt"
	"io"
	"log/slog"
	"os"
	"path/filepath"
	"time"

	"github.com/klauspost/compress/zstd"
	"golang.org/x/term"

	"github.com/casnix/casnix/blobs"
	"github.com/casnix/casnix/store"
)

// Version is set at build time with -ldflags "-X github.com/casnix/casnix/cli.Version=…".
var Version = "dev"

// Globals are the flags every command shares.
type Globals struct {
	DataDir    string `name:"data-dir" short:"d" env:"CASNIX_DIR" placeholder:"DIR" help:"Data directory (default: /var/lib/casnix as root, else $XDG_DATA_HOME/casnix)."`
	StoreDir   string `name:"store-dir" env:"CASNIX_STORE_DIR" default:"/nix/store" help:"Nix store directory the stored paths belong to."`
	Ingest     string `name:"ingest" env:"CASNIX_INGEST" default:"auto" enum:"auto,store,zstd" help:"How new data is written: store (uncompressed while the disk has 4 GiB and 10% free, so a write costs a copy, not a compression; serve's background repack or casnix repack compresses it later), zstd (at --zstd-level), auto (store, unless --zstd-level is given, packs go to a bucket (--packs) or serve has a --max-size budget: then zstd). Default: ${default}."`
	ZstdLevel  int    `name:"zstd-level" env:"CASNIX_ZSTD_LEVEL" placeholder:"N" help:"zstd level for new data written compressed (see --ingest): 1 fastest (default), 3 default, 7 better, 11 best. casnix repack rewrites it into the space-optimal form later."`
	FrameSize  int    `name:"frame-size" env:"CASNIX_FRAME_SIZE" default:"4194304" help:"Bytes of new chunks compressed together in one zstd frame (256 KiB to 16 MiB): larger compresses better, smaller reads small files faster."`
	CPUProfile string `name:"cpu-profile" hidden:"" type:"path" help:"Write a Go CPU profile to this file."`
	LogLevel   string `name:"log-level" env:"CASNIX_LOG_LEVEL" default:"info" enum:"debug,info,warn,error" help:"Log level (${enum})."`
	Packs      string `name:"packs" env:"CASNIX_PACKS" placeholder:"URL" help:"Keep packs in object storage: s3://BUCKET/PREFIX?endpoint=URL&region=R (credentials from the AWS environment). Packs are written locally, then sealed and uploaded by serve (within --upload-within); reads of uploaded packs whose local file was evicted go to the bucket through a local cache. The data dir records the URL at first use: later commands need no flag, and a different URL is refused."`
	CacheSize  string `name:"cache-size" env:"CASNIX_CACHE_SIZE" default:"10GiB" placeholder:"BYTES" help:"With --packs: local disk for uploaded packs (their local files, then cached ranges read from the bucket); least recently used first out. Packs not uploaded yet are never evicted."`
	LogFormat  string `name:"log-format" env:"CASNIX_LOG_FORMAT" default:"text" enum:"text,json" help:"Log format on stderr (${enum}); text under journald (JOURNAL_STREAM set) leaves out the time, which the journal adds."`

	Ctx context.Context `kong:"-"`
	// Abort is done at a second SIGINT/SIGTERM: stop at once, without
	// the graceful drain the first one starts. Nil: never.
	Abort  <-chan struct{} `kong:"-"`
	Stdout io.Writer       `kong:"-"`
	Stderr io.Writer       `kong:"-"`
	Logger *slog.Logger    `kong:"-"`
	// FrameCache bounds the decoded-frame cache of the store Open opens
	// (0: the blobs default); serve derives it from --memory-limit.
	FrameCache int64 `kong:"-"`
	// Upload runs the pack uploader in the store Open opens (serve), with
	// frames waiting at most UploadWithin.
	Upload       bool          `kong:"-"`
	UploadWithin time.Duration `kong:"-"`
	// SealOnCommit: each write seals its packs (serve --durability bucket).
	SealOnCommit bool `kong:"-"`
	// Budgeted says pack bytes on disk are budgeted (serve --max-size):
	// --ingest auto then compresses.
	Budgeted bool `kong:"-"`
}

// DefaultDataDir is the data directory used when none is given.
func DefaultDataDir() string {
	if os.Geteuid() == 0 {
		return "/var/lib/casnix"
	}
	if x := os.Getenv("XDG_DATA_HOME"); x != "" {
		return filepath.Join(x, "casnix")
	}
	if h, err := os.UserHomeDir(); err == nil {
		return filepath.Join(h, ".local", "share", "casnix")
	}
	return "casnix-data"
}

// DefaultZstdLevel is the compression level of new data written
// compressed (--ingest zstd): the fastest, so ingest keeps up with the disk
// and the client; the space-optimal form is `casnix repack`'s (bench/RESULTS.md,
// "Core store").
const DefaultZstdLevel = 1

// storeNew resolves --ingest: whether new data is written uncompressed.
// auto stores it, as the cheapest write there is, except where bytes
// written count more than the CPU: a --zstd-level asked for, a --max-size
// budget (uncompressed data would fill it three times as fast until the
// repack), packs in a bucket (blobs.Options.Store: uploaded by the byte;
// decided by blobs, which knows of a bucket the data dir recorded).
// bench/RESULTS.md ("Write", "Substitution") has what storing saves.
func (g *Globals) storeNew() bool {
	switch g.Ingest {
	case "store":
		return true
	case "zstd":
		return false
	}
	return g.ZstdLevel == 0 && !g.Budgeted && g.Packs == ""
}

// Open opens the store for a command; callers defer Close.
func (g *Globals) Open() (*store.Store, error) { return g.open(false) }

// OpenRead opens the store for a one-shot command that only reads (dump,
// cat, ls, path-info): store.Options.ReadOnly, so start-up neither syncs,
// migrates nor opens a writer (bench/startup.sh measures it).
func (g *Globals) OpenRead() (*store.Store, error) { return g.open(true) }

// dataDir is --data-dir or the default.
func (g *Globals) dataDir() string {
	if g.DataDir == "" {
		return DefaultDataDir()
	}
	return g.DataDir
}

func (g *Globals) open(readOnly bool) (*store.Store, error) {
	dir := g.dataDir()
	level := g.ZstdLevel
	if level == 0 {
		level = DefaultZstdLevel
	}
	var cacheSize int64 // 0: the blobs default (Globals made without kong's defaults)
	if g.CacheSize != "" {
		n, err := parseSize(g.CacheSize)
		if err != nil {
			return nil, fmt.Errorf("--cache-size: %w", err)
		}
		cacheSize = n
	}
	st, err := store.Open(g.Ctx, dir, store.Options{
		StoreDir: g.StoreDir, Logger: g.Logger, ReadOnly: readOnly, Packs: g.Packs,
		Blobs: blobs.Options{Level: zstd.EncoderLevelFromZstd(level), Store: g.storeNew(), FrameSize: g.FrameSize, CacheBytes: g.FrameCache,
			RemoteCacheBytes: cacheSize, Upload: g.Upload, UploadWithin: g.UploadWithin, SealOnCommit: g.SealOnCommit},
	})
	if err != nil {
		return nil, fmt.Errorf("open data dir %s: %w", dir, err)
	}
	return st, nil
}

// isTTY reports whether w is a terminal (progress bars go only there).
func isTTY(w io.Writer) bool {
	f, ok := w.(*os.File)
	return ok && term.IsTerminal(int(f.Fd()))
}

// CLI is the whole command line.
type CLI struct {
	Globals

	Serve    ServeCmd    `cmd:"" help:"Serve the store to Nix over the nix-daemon protocol."`
	Mount    MountCmd    `cmd:"" help:"Mount the store read-only with FUSE (the lowerdir of Nix's Local Overlay Store)."`
	Import   ImportCmd   `cmd:"" help:"Import store paths from a live Nix store or a NAR file."`
	Export   ExportCmd   `cmd:"" help:"Write closures into a binary cache directory that Nix can substitute from."`
	Info     InfoCmd     `cmd:"" help:"Show store totals: paths, logical NAR bytes, stored bytes, dedup ratio."`
	PathInfo PathInfoCmd `cmd:"" name:"path-info" help:"Show path-info of store paths."`
	Ls       LsCmd       `cmd:"" help:"List a directory inside a store path."`
	Cat      CatCmd      `cmd:"" help:"Print a file inside a store path."`
	Dump     DumpCmd     `cmd:"" help:"Write the NAR of a store path to stdout."`
	Verify   VerifyCmd   `cmd:"" help:"Re-hash every chunk and re-render every NAR; exit non-zero naming damaged paths."`
	Repair   RepairCmd   `cmd:"" help:"Rebuild the chunk index from the packs, mend damaged database indexes and drop the paths whose data is gone (what verify reports), printing them to import again."`
	GC       GCCmd       `cmd:"" name:"gc" help:"Delete paths no root reaches (gcroots/, temp roots, --keep) and give their space back."`
	Repack   RepackCmd   `cmd:"" help:"Rewrite what imports and uploads stored fast into the space-optimal form (high zstd level, large frames, a package's versions together), then remove the old packs."`
	Version  VersionCmd  `cmd:"" help:"Print the version."`
	Backup   BackupCmd   `cmd:"" help:"Copy a consistent, verified snapshot of the data dir (safe while serve and imports run)."`
	Restore  RestoreCmd  `cmd:"" help:"Restore a backup into the data dir and verify it."`
	Doctor   DoctorCmd   `cmd:"" help:"Check that casnix can run here: data dir, schema, free space, FUSE, overlayfs, socket; exit non-zero on any problem."`
	Ping     PingCmd     `cmd:"" help:"Connect to the daemon socket and do the protocol handshake and one query (container health check)."`
	Replica  ReplicaCmd  `cmd:"" help:"Read replicas of a primary whose packs and database are in a bucket."`
}

// VersionCmd prints the version.
type VersionCmd struct{}

// Run prints the version.
func (VersionCmd) Run(g *Globals) error {
	fmt.Fprintf(g.Stdout, "casnix %s\n", Version)
	return nil
}
