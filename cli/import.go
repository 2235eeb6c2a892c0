package cli

import (
	"bufio"
	"crypto/sha256"
	"errors"
	"fmt"
	"os"
	"runtime/debug"
	"time"

	"github.com/nix-community/go-nix/pkg/nixhash"

	"github.com/casnix/casnix/nixstore"
	"github.com/casnix/casnix/store"
)

// ImportCmd imports paths.
type ImportCmd struct {
	FromNixStore string `name:"from-nix-store" placeholder:"ROOT" xor:"source" required:"" help:"Import from the live Nix store under ROOT (ROOT/nix/store and ROOT/nix/var/nix/db/db.sqlite; / for the system store)."`
	NAR          string `name:"nar" placeholder:"FILE" xor:"source" required:"" help:"Import one NAR file (- for stdin) as --path."`
	From         string `name:"from" placeholder:"URL" xor:"source" required:"" help:"Import from a binary cache: file:///DIR or http(s)://… (closures of the given paths, or --all)."`
	CacheImportFlags
	Path       string   `name:"path" placeholder:"STOREPATH" help:"With --nar: the store path the NAR is."`
	References []string `name:"references" sep:"none" placeholder:"PATH" help:"With --nar: a store path it refers to (repeatable; must be valid)."`
	Deriver    string   `name:"deriver" placeholder:"PATH" help:"With --nar: its deriver."`
	CA         string   `name:"ca" help:"With --nar: its content address (e.g. fixed:r:sha256:…)."`
	Sigs       []string `name:"sig" sep:"none" help:"With --nar: a signature (repeatable)."`
	NarHash    string   `name:"nar-hash" placeholder:"HASH" help:"With --nar: refuse the NAR unless its SHA-256 is this (sha256:… in any Nix encoding)."`
	Paths      []string `arg:"" optional:"" name:"paths" help:"With --from-nix-store or --from: import the closure of these paths (--from-nix-store: instead of every valid path)."`
}

// Run imports.
func (c *ImportCmd) Run(g *Globals) error {
	// An import's live heap is small and steady (frames in flight, the
	// encoders, the batch's index rows) but it allocates fast: collecting at
	// 50% growth, and harder near a soft limit of 64 MiB, keeps peak RSS
	// near the live set for little CPU. The process holds ~40 MiB outside
	// Go's heap (SQLite's allocator, the binary): with stored frames (the
	// default ingest, whose frames in flight are their raw size) an 80 MiB
	// limit let a 4 GiB NAR's import reach 105-116 MiB of RSS, 64 MiB
	// keeps it at 85-90 MiB in the same wall and CPU time (bench/core.sh's
	// big NAR). Both yield to GOGC / GOMEMLIMIT when those are set.
	if os.Getenv("GOGC") == "" {
		debug.SetGCPercent(50)
	}
	if os.Getenv("GOMEMLIMIT") == "" {
		debug.SetMemoryLimit(64 << 20)
	}
	if c.NAR != "" {
		return c.runNAR(g)
	}
	if c.From != "" {
		return c.runCache(g)
	}
	if c.Path != "" || len(c.References) > 0 || c.Deriver != "" || c.CA != "" || len(c.Sigs) > 0 || c.NarHash != "" {
		return errors.New("--path, --references, --deriver, --ca, --sig and --nar-hash go with --nar")
	}
	return c.runNixStore(g)
}

func (c *ImportCmd) runNixStore(g *Globals) error {
	src, err := nixstore.Open(g.Ctx, c.FromNixStore)
	if err != nil {
		return err
	}
	defer src.Close()
	var list []*nixstore.Path
	if len(c.Paths) == 0 {
		list, err = src.All()
	} else {
		names := make([]string, 0, len(c.Paths))
		for _, p := range c.Paths {
			n, err := store.ParseName(nixstore.StoreDir, p)
			if err != nil {
				return err
			}
			names = append(names, n)
		}
		list, err = src.Closure(names)
	}
	if err != nil {
		return err
	}
	st, err := g.Open()
	if err != nil {
		return err
	}
	defer st.Close()
	var total int64
	for _, p := range list {
		total += p.NarSize
	}
	start := time.Now()
	pr := newProgress(g.Stderr)
	sum, err := nixstore.Import(g.Ctx, st, src, list, func(done, n int, bytes int64) {
		pr.update("importing %s %d/%d paths, %s of %s NAR", bar(int64(done), int64(n), 30), done, n, humanBytes(bytes), humanBytes(total))
	})
	pr.done()
	el := time.Since(start)
	if sum != nil {
		rate := float64(sum.NarBytes) / 1e6 / max(el.Seconds(), 1e-9)
		fmt.Fprintf(g.Stderr, "imported %d paths (%s NAR, %s new chunk data, %s deduplicated) in %.1fs (%.0f MB/s); %d already present, %d failed\n",
			sum.Imported, humanBytes(sum.NarBytes), humanBytes(sum.NewChunkBytes), humanBytes(sum.DupChunkBytes),
			el.Seconds(), rate, sum.Present, sum.Failed)
		for _, f := range sum.Failures {
			fmt.Fprintf(g.Stderr, "error: %v\n", f)
		}
		if sum.NewChunkBytes > 0 && g.storeNew() && st.Packs() == "" {
			fmt.Fprintf(g.Stderr, "new data is stored uncompressed while the disk has room (--ingest): casnix repack compresses it (serve's background repack does too)\n")
		}
	}
	if err != nil {
		return err
	}
	if sum.Failed > 0 {
		return fmt.Errorf("%d paths failed to import", sum.Failed)
	}
	return nil
}

func parseNarHash(s string) ([32]byte, error) {
	var out [32]byte
	algo := nixhash.SHA256
	h, err := nixhash.ParseAny(s, &algo)
	if err != nil {
		return out, fmt.Errorf("--nar-hash %q: %w", s, err)
	}
	if len(h.Digest()) != sha256.Size {
		return out, fmt.Errorf("--nar-hash %q: not a sha256", s)
	}
	copy(out[:], h.Digest())
	return out, nil
}

func (c *ImportCmd) runNAR(g *Globals) error {
	if c.Path == "" {
		return errors.New("--nar needs --path STOREPATH")
	}
	if len(c.Paths) > 0 {
		return errors.New("positional paths go with --from-nix-store")
	}
	info := store.PathInfo{CA: c.CA, Sigs: c.Sigs}
	var err error
	if info.Name, err = store.ParseName(g.StoreDir, c.Path); err != nil {
		return err
	}
	if c.Deriver != "" {
		if info.Deriver, err = store.ParseName(g.StoreDir, c.Deriver); err != nil {
			return err
		}
	}
	for _, r := range c.References {
		n, err := store.ParseName(g.StoreDir, r)
		if err != nil {
			return err
		}
		info.References = append(info.References, n)
	}
	if c.NarHash != "" {
		if info.NarHash, err = parseNarHash(c.NarHash); err != nil {
			return err
		}
	}
	var f *os.File = os.Stdin
	if c.NAR != "-" {
		if f, err = os.Open(c.NAR); err != nil {
			return err
		}
		defer f.Close()
	}
	// Ingest reads exactly the archive from a bufio.Reader, so what is left
	// in it afterwards is trailing data.
	in := bufio.NewReaderSize(f, 256<<10)
	st, err := g.Open()
	if err != nil {
		return err
	}
	defer st.Close()
	if ok, err := st.IsValid(g.Ctx, info.Name); err != nil {
		return err
	} else if ok {
		fmt.Fprintf(g.Stderr, "%s is already valid\n", st.Full(info.Name))
		return nil
	}
	start := time.Now()
	b := st.NewBatch(g.Ctx)
	pi, err := b.Add(in, info)
	if err != nil {
		b.Abort()
		return err
	}
	// Anything after the archive means the file is not one NAR.
	if _, err := in.ReadByte(); err == nil {
		b.Abort()
		return fmt.Errorf("import %s: %s has data after the end of the NAR", st.Full(info.Name), c.NAR)
	}
	if _, err := b.Commit(); err != nil {
		return err
	}
	el := time.Since(start)
	fmt.Fprintf(g.Stderr, "imported %s (%s NAR, sha256:%s) in %.1fs (%.0f MB/s)\n", st.Full(pi.Name),
		humanBytes(pi.NarSize), store.NixBase32(pi.NarHash[:]), el.Seconds(), float64(pi.NarSize)/1e6/max(el.Seconds(), 1e-9))
	return nil
}
