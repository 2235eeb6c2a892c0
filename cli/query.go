package cli

import (
	"bufio"
	"encoding/json"
	"errors"
	"fmt"
	"io"
	"os"
	"path/filepath"
	"time"

	"github.com/casnix/casnix/castore"
	"github.com/casnix/casnix/store"
)

// InfoCmd prints store totals.
type InfoCmd struct {
	JSON bool `name:"json" help:"Print JSON."`
}

type infoJSON struct {
	DataDir          string  `json:"dataDir"`
	Paths            int64   `json:"paths"`
	NarBytes         int64   `json:"narBytes"`
	Blobs            int64   `json:"blobs"`
	BlobBytes        int64   `json:"blobBytes"`
	Chunks           int64   `json:"chunks"`
	ChunkBytes       int64   `json:"chunkBytes"`
	CompressedBytes  int64   `json:"compressedBytes"`
	Directories      int64   `json:"directories"`
	DiskBytes        int64   `json:"diskBytes"`
	DedupRatio       float64 `json:"dedupRatio"`
	CompressionRatio float64 `json:"compressionRatio"`
	TotalRatio       float64 `json:"totalRatio"`
}

// Run prints totals.
func (c *InfoCmd) Run(g *Globals) error {
	st, err := g.Open()
	if err != nil {
		return err
	}
	defer st.Close()
	s, err := st.Stats(g.Ctx)
	if err != nil {
		return err
	}
	disk, err := dirBytes(st.Dir())
	if err != nil {
		return err
	}
	ratio := func(a, b int64) float64 {
		if b == 0 {
			return 0
		}
		return float64(a) / float64(b)
	}
	out := infoJSON{
		DataDir: st.Dir(), Paths: s.Paths, NarBytes: s.NarBytes, Blobs: s.Blobs, BlobBytes: s.BlobBytes,
		Chunks: s.Chunks, ChunkBytes: s.ChunkBytes, CompressedBytes: s.CompressedSize, Directories: s.Directories,
		DiskBytes: disk, DedupRatio: ratio(s.NarBytes, s.ChunkBytes), CompressionRatio: ratio(s.ChunkBytes, s.CompressedSize),
		TotalRatio: ratio(s.NarBytes, disk),
	}
	if c.JSON {
		return json.NewEncoder(g.Stdout).Encode(out)
	}
	w := g.Stdout
	fmt.Fprintf(w, "data dir:          %s\n", out.DataDir)
	fmt.Fprintf(w, "store paths:       %d\n", out.Paths)
	fmt.Fprintf(w, "NAR bytes:         %s (logical)\n", humanBytes(out.NarBytes))
	fmt.Fprintf(w, "file contents:     %d blobs, %s\n", out.Blobs, humanBytes(out.BlobBytes))
	fmt.Fprintf(w, "chunks:            %d, %s raw, %s compressed\n", out.Chunks, humanBytes(out.ChunkBytes), humanBytes(out.CompressedBytes))
	fmt.Fprintf(w, "directories:       %d\n", out.Directories)
	fmt.Fprintf(w, "on disk:           %s\n", humanBytes(out.DiskBytes))
	fmt.Fprintf(w, "dedup ratio:       %.2fx (NAR bytes / unique chunk bytes)\n", out.DedupRatio)
	fmt.Fprintf(w, "compression ratio: %.2fx\n", out.CompressionRatio)
	fmt.Fprintf(w, "overall:           %.2fx (NAR bytes / bytes on disk)\n", out.TotalRatio)
	return nil
}

// dirBytes sums the allocated size of the files under dir (like du),
// less the HTTP NAR cache in it (httpCacheDir): copies of what is served,
// not the store, so stats and repack leave them out.
func dirBytes(dir string) (int64, error) {
	var n int64
	cache := filepath.Join(dir, httpCacheDir)
	err := filepath.WalkDir(dir, func(p string, d os.DirEntry, err error) error {
		if err != nil {
			return err
		}
		if d.IsDir() && p == cache {
			return filepath.SkipDir
		}
		if d.Type().IsRegular() {
			fi, err := d.Info()
			if err != nil {
				return err
			}
			n += allocated(fi)
		}
		return nil
	})
	return n, err
}

// PathInfoCmd prints path-info.
type PathInfoCmd struct {
	JSON      bool     `name:"json" help:"Print JSON shaped like 'nix path-info --json' (Nix 2.8: a list of objects)."`
	Recursive bool     `name:"recursive" short:"r" help:"Include the closure."`
	All       bool     `name:"all" help:"Every valid path."`
	Paths     []string `arg:"" optional:"" name:"paths" help:"Store paths."`
}

type pathInfoJSON struct {
	Path             string   `json:"path"`
	NarHash          string   `json:"narHash"`
	NarSize          int64    `json:"narSize"`
	References       []string `json:"references"`
	Deriver          string   `json:"deriver,omitempty"`
	RegistrationTime int64    `json:"registrationTime"`
	Ultimate         bool     `json:"ultimate,omitempty"`
	Signatures       []string `json:"signatures,omitempty"`
	CA               string   `json:"ca,omitempty"`
}

// invalidJSON is how nix path-info --json lists a path that is not valid.
type invalidJSON struct {
	Path  string `json:"path"`
	Valid bool   `json:"valid"`
}

// Run prints path-info.
func (c *PathInfoCmd) Run(g *Globals) error {
	st, err := g.OpenRead()
	if err != nil {
		return err
	}
	defer st.Close()
	var names []string
	for _, p := range c.Paths {
		n, err := store.ParseName(st.StoreDir, p)
		if err != nil {
			return err
		}
		names = append(names, n)
	}
	if c.All {
		all, err := st.All(g.Ctx)
		if err != nil {
			return err
		}
		names = append(names, all...)
	} else if len(names) == 0 {
		return errors.New("path-info: give store paths or --all")
	}
	if c.Recursive {
		if names, err = st.Closure(g.Ctx, names); err != nil {
			return err
		}
	}
	var out []any
	w := bufio.NewWriter(g.Stdout)
	defer w.Flush()
	for _, n := range names {
		pi, err := st.Info(g.Ctx, n)
		if c.JSON && errors.Is(err, store.ErrNotValid) {
			// As nix path-info --json does: the path is listed as invalid.
			out = append(out, invalidJSON{Path: st.Full(n), Valid: false})
			continue
		}
		if err != nil {
			return err
		}
		refs := make([]string, 0, len(pi.References))
		for _, r := range pi.References {
			refs = append(refs, st.Full(r))
		}
		j := pathInfoJSON{
			Path: st.Full(pi.Name), NarHash: "sha256:" + store.NixBase32(pi.NarHash[:]), NarSize: pi.NarSize,
			References: refs, Deriver: st.Full(pi.Deriver), RegistrationTime: pi.Registered.Unix(),
			Ultimate: pi.Ultimate, Signatures: pi.Sigs, CA: pi.CA,
		}
		if c.JSON {
			out = append(out, j)
			continue
		}
		fmt.Fprintf(w, "%s\t%d\t%s\n", j.Path, j.NarSize, j.NarHash)
	}
	if c.JSON {
		if out == nil {
			out = []any{}
		}
		return json.NewEncoder(w).Encode(out)
	}
	return nil
}

// LsCmd lists a directory.
type LsCmd struct {
	Path string `arg:"" help:"Store path, optionally with a path inside it."`
}

// Run lists.
func (c *LsCmd) Run(g *Globals) error {
	st, n, err := lookupSub(g, c.Path)
	if err != nil {
		return err
	}
	defer st.Close()
	w := bufio.NewWriter(g.Stdout)
	defer w.Flush()
	if n.Kind != castore.KindDirectory {
		printEntry(w, filepath.Base(c.Path), n)
		return nil
	}
	dir, err := st.Directory(g.Ctx, n.Digest)
	if err != nil {
		return err
	}
	for _, e := range dir.Entries() {
		printEntry(w, string(e.Name), e.Node)
	}
	return nil
}

// printEntry prints one line in the style of 'nix store ls -l', name and
// target quoted (Quote): they come from store contents.
func printEntry(w io.Writer, name string, n castore.Node) {
	name = Quote(name)
	switch n.Kind {
	case castore.KindDirectory:
		fmt.Fprintf(w, "dr-xr-xr-x %20d %s\n", 0, name)
	case castore.KindFile:
		mode := "-r--r--r--"
		if n.Executable {
			mode = "-r-xr-xr-x"
		}
		fmt.Fprintf(w, "%s %20d %s\n", mode, n.Size, name)
	case castore.KindSymlink:
		fmt.Fprintf(w, "lrwxrwxrwx %20d %s -> %s\n", 0, name, Quote(string(n.Target)))
	}
}

// lookupSub opens the store and resolves a store path with an optional
// path inside it; the caller closes the store.
func lookupSub(g *Globals, p string) (*store.Store, castore.Node, error) {
	base, sub, err := store.Split(g.StoreDir, p)
	if err != nil {
		return nil, castore.Node{}, err
	}
	st, err := g.OpenRead()
	if err != nil {
		return nil, castore.Node{}, err
	}
	n, err := st.Lookup(g.Ctx, base, sub)
	if err != nil {
		st.Close()
		return nil, castore.Node{}, err
	}
	return st, n, nil
}

// CatCmd prints a file.
type CatCmd struct {
	Path string `arg:"" help:"Store path of a file, or a store path with a file inside it."`
}

// Run prints the file.
func (c *CatCmd) Run(g *Globals) error {
	st, n, err := lookupSub(g, c.Path)
	if err != nil {
		return err
	}
	defer st.Close()
	if n.Kind != castore.KindFile {
		return fmt.Errorf("%s is a %v, not a regular file", c.Path, n.Kind)
	}
	if n.Size == 0 {
		return nil
	}
	r, err := st.OpenBlob(g.Ctx, n.Digest)
	if err != nil {
		return err
	}
	_, err = r.WriteTo(g.Stdout)
	return err
}

// DumpCmd writes a NAR.
type DumpCmd struct {
	Path string `arg:"" help:"Store path."`
}

// Run writes the NAR.
func (c *DumpCmd) Run(g *Globals) error {
	st, err := g.OpenRead()
	if err != nil {
		return err
	}
	defer st.Close()
	n, err := store.ParseName(st.StoreDir, c.Path)
	if err != nil {
		return err
	}
	_, err = st.NarRender(g.Ctx, n, g.Stdout)
	return err
}

// VerifyCmd checks everything.
type VerifyCmd struct{}

// Run verifies.
func (c *VerifyCmd) Run(g *Globals) error {
	st, err := g.Open()
	if err != nil {
		return err
	}
	defer st.Close()
	start := time.Now()
	pr := newProgress(g.Stderr)
	rep, err := st.Verify(g.Ctx, func(stage string, done, total int64) {
		pr.update("verifying %s %s %d/%d", stage, bar(done, total, 30), done, total)
	})
	pr.done()
	if err != nil {
		return err
	}
	for _, d := range rep.DB {
		fmt.Fprintf(g.Stdout, "damaged database: %s\n", d)
	}
	for _, d := range rep.Packs {
		fmt.Fprintf(g.Stdout, "damaged pack: %v\n", d)
	}
	for _, d := range rep.Chunks {
		fmt.Fprintf(g.Stdout, "damaged chunk: %s\n", Quote(fmt.Sprint(d)))
	}
	for _, d := range rep.Damaged {
		fmt.Fprintf(g.Stdout, "damaged path: %s: %s\n", st.Full(d.Name), Quote(d.Err.Error()))
	}
	fmt.Fprintf(g.Stderr, "verified the database, %d frames and %d paths in %.1fs: %d database problems, %d damaged pack headers, %d damaged chunks, %d damaged paths\n",
		rep.Frames, rep.Paths, time.Since(start).Seconds(), len(rep.DB), len(rep.Packs), len(rep.Chunks), len(rep.Damaged))
	if rep.Sealed > 0 {
		fmt.Fprintf(g.Stderr, "sealed %d path rows from before root_sum (their NARs are served without hashing them again)\n", rep.Sealed)
	}
	if !rep.OK() {
		return errors.New("store is damaged")
	}
	return nil
}
