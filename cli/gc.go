package cli

import (
	"bufio"
	"encoding/json"
	"errors"
	"fmt"
	"os"
	"strconv"
	"strings"
	"time"

	"github.com/casnix/casnix/store"
)

// GCCmd collects garbage.
type GCCmd struct {
	DryRun         bool          `name:"dry-run" help:"Print the dead paths and what deleting them would free; change nothing."`
	PrintLive      bool          `name:"print-live" help:"Print the live paths; change nothing."`
	MaxFreed       string        `name:"max-freed" placeholder:"N" help:"Stop deleting once about N bytes of stored data are freed (suffix K, M, G, T: powers of 1024)."`
	Keep           []string      `name:"keep" sep:"none" placeholder:"FILE|PATH" help:"Keep this store path and its closure for this run (repeatable); a FILE lists store paths, one a line."`
	Delete         []string      `name:"delete" sep:"none" placeholder:"PATH" help:"Delete only these store paths (repeatable), refusing if one is alive."`
	IgnoreLiveness bool          `name:"ignore-liveness" help:"With --delete: delete paths even if roots reach them (never paths other kept paths refer to)."`
	MinDead        float64       `name:"min-dead" default:"0.25" help:"Rewrite a pack once this share of its bytes is dead (1 = never)."`
	NoRuntimeRoots bool          `name:"no-runtime-roots" help:"Do not keep the store paths running processes use (executables, working directories, open and mapped files, environments under /proc)."`
	RuntimeDir     []string      `name:"runtime-dir" sep:"none" placeholder:"DIR" help:"Another directory where processes see store paths, for runtime roots (repeatable; the store dir and casnix FUSE mount points are always looked at)."`
	Force          bool          `name:"force" help:"Collect even when no root reaches a valid path (which deletes every path)."`
	JSON           bool          `name:"json" help:"Print the result as JSON."`
	DeadPackMargin time.Duration `name:"dead-pack-margin" default:"1h" help:"With packs in a bucket: delete the objects of packs compactions dropped once the oldest database state a restore from the bucket can give was made this long after the drop (as serve does)."`
	DeadNoReplica  bool          `name:"dead-packs-without-replica" help:"With packs in a bucket that holds no replica of the database (no serve ever ran on this data dir): delete dropped packs' objects once --dead-pack-margin has passed since the drop. Without it they stay, as nothing tells whether an older copy of the database elsewhere names them."`
	UpperDB        []string      `name:"upper-db" sep:"none" placeholder:"FILE" type:"existingfile" help:"The Nix database (db.sqlite, read-only) of a Local Overlay Store's upper layer that uses this store as its lower store: keep every path it registers or refers to (repeatable)."`
}

type gcJSON struct {
	Action         string   `json:"action"`
	Paths          []string `json:"paths"`
	BytesFreed     int64    `json:"bytesFreed"`
	ExclusiveBytes int64    `json:"exclusiveBytes"`
	PacksRemoved   int      `json:"packsRemoved"`
	PacksWritten   int      `json:"packsWritten"`
	DeadLeft       int64    `json:"deadLeft"`
	Roots          int      `json:"roots"`
	// Objects of dead packs deleted from the bucket, and those still kept.
	BucketDeleted int     `json:"packsDeletedFromBucket"`
	BucketWaiting int     `json:"deadPacksWaiting"`
	Seconds       float64 `json:"seconds"`
	LockSeconds   float64 `json:"lockSeconds"`
}

// Run collects.
func (c *GCCmd) Run(g *Globals) error {
	o := store.GCOptions{Action: store.GCDeleteDead, IgnoreLiveness: c.IgnoreLiveness, MinDead: c.MinDead, RefuseNoRoots: !c.Force,
		RuntimeRoots: !c.NoRuntimeRoots, RuntimeDirs: c.RuntimeDir, UpperDBs: c.UpperDB}
	switch {
	case c.DryRun && c.PrintLive:
		return errors.New("--dry-run and --print-live exclude each other")
	case c.DryRun:
		o.Action = store.GCReturnDead
	case c.PrintLive:
		o.Action = store.GCReturnLive
	}
	if c.IgnoreLiveness && len(c.Delete) == 0 {
		return errors.New("--ignore-liveness goes with --delete")
	}
	if c.MinDead <= 0 {
		return errors.New("--min-dead must be above 0")
	}
	if c.MaxFreed != "" {
		n, err := parseSize(c.MaxFreed)
		if err != nil {
			return fmt.Errorf("--max-freed: %w", err)
		}
		o.MaxFreed = n
	}
	st, err := g.Open()
	if err != nil {
		return err
	}
	defer st.Close()
	if o.Keep, err = keepList(st, c.Keep); err != nil {
		return err
	}
	if len(c.Delete) > 0 {
		if c.DryRun || c.PrintLive {
			return errors.New("--delete excludes --dry-run and --print-live")
		}
		o.Action = store.GCDeleteSpecific
		for _, p := range c.Delete {
			base, err := baseName(st, p)
			if err != nil {
				return fmt.Errorf("--delete: %w", err)
			}
			o.Paths = append(o.Paths, base)
		}
	}
	start := time.Now()
	res, err := st.GC(g.Ctx, o)
	if errors.Is(err, store.ErrNoRoots) {
		return fmt.Errorf("%w (roots are symlinks in %s; a store filled by import has none); use --dry-run to see what would go, --force to delete it all", err, st.GCRoots())
	}
	if err != nil {
		return err
	}
	var dead *store.DeadPackResult
	if o.Action != store.GCReturnDead && o.Action != store.GCReturnLive && st.Packs() != "" && st.ReplicaOf() == "" {
		// A failure loses nothing (the rows stay for the next gc or serve round): the
		// collection itself succeeded.
		dead, err = st.DeleteDeadPacks(g.Ctx, store.DeadPackOptions{Margin: c.DeadPackMargin, WithoutReplica: c.DeadNoReplica})
		if err != nil {
			g.Logger.Warn("deleting dead packs from the bucket failed; the next gc or serve retries", "err", err)
			dead = nil
		}
	}
	el := time.Since(start)
	if c.JSON {
		out := gcJSON{Action: o.Action.String(), Paths: make([]string, 0, len(res.Paths)), BytesFreed: res.BytesFreed,
			ExclusiveBytes: res.ExclusiveBytes, PacksRemoved: res.Compact.PacksRemoved, PacksWritten: res.Compact.PacksWritten,
			DeadLeft: res.Compact.DeadLeft, Roots: res.Roots,
			Seconds: el.Seconds(), LockSeconds: res.LockTime.Seconds()}
		for _, p := range res.Paths {
			out.Paths = append(out.Paths, st.Full(p))
		}
		if dead != nil {
			out.BucketDeleted, out.BucketWaiting = dead.Deleted, dead.Waiting
		}
		enc := json.NewEncoder(g.Stdout)
		enc.SetIndent("", "  ")
		return enc.Encode(out)
	}
	w := bufio.NewWriter(g.Stdout)
	for _, p := range res.Paths {
		fmt.Fprintln(w, st.Full(p))
	}
	if err := w.Flush(); err != nil {
		return err
	}
	if o.Action != store.GCDeleteSpecific {
		fmt.Fprintf(g.Stderr, "%d roots\n", res.Roots)
	}
	switch o.Action {
	case store.GCReturnLive:
		fmt.Fprintf(g.Stderr, "%d live paths\n", len(res.Paths))
	case store.GCReturnDead:
		fmt.Fprintf(g.Stderr, "%d dead paths; deleting them would free about %s of stored data\n",
			len(res.Paths), humanBytes(res.ExclusiveBytes))
	default:
		fmt.Fprintf(g.Stderr, "deleted %d paths (%s of stored data) in %.1fs (imports held off %.1fs); %s freed on disk, %d packs removed, %d written; %s dead left in packs under --min-dead\n",
			len(res.Paths), humanBytes(res.ExclusiveBytes), el.Seconds(), res.LockTime.Seconds(),
			humanBytes(res.BytesFreed), res.Compact.PacksRemoved, res.Compact.PacksWritten, humanBytes(res.Compact.DeadLeft))
	}
	if dead != nil && dead.Deleted+dead.Waiting > 0 {
		fmt.Fprintf(g.Stderr, "bucket: %d dropped packs' objects deleted, %d kept", dead.Deleted, dead.Waiting)
		switch {
		case !dead.Oldest.IsZero():
			fmt.Fprintf(g.Stderr, " (the oldest restorable database state is from %s; margin %s)\n", dead.Oldest.UTC().Format(time.RFC3339), c.DeadPackMargin)
		case dead.Replica:
			fmt.Fprintf(g.Stderr, " (the bucket's database replica has no restorable state yet)\n")
		case c.DeadNoReplica:
			fmt.Fprintf(g.Stderr, " (no database replica in the bucket; margin %s)\n", c.DeadPackMargin)
		default:
			fmt.Fprintf(g.Stderr, " (no database replica in the bucket: --dead-packs-without-replica deletes them)\n")
		}
	}
	return nil
}

// parseSize reads a byte count with an optional K/M/G/T suffix.
func parseSize(s string) (int64, error) {
	mult := int64(1)
	t := strings.TrimSuffix(strings.ToUpper(strings.TrimSpace(s)), "B")
	t = strings.TrimSuffix(t, "I")
	if n := len(t); n > 0 {
		if i := strings.IndexByte("KMGT", t[n-1]); i >= 0 {
			mult = int64(1) << (10 * (i + 1))
			t = t[:n-1]
		}
	}
	n, err := strconv.ParseInt(t, 10, 64)
	if err != nil || n < 0 || n > (1<<62)/mult {
		return 0, fmt.Errorf("%q is not a byte count", s)
	}
	return n * mult, nil
}

// baseName turns a store path (full, or a basename) into its basename.
func baseName(st *store.Store, p string) (string, error) {
	base := strings.TrimPrefix(p, st.StoreDir+"/")
	if i := strings.IndexByte(base, '/'); i >= 0 && strings.HasPrefix(p, st.StoreDir+"/") {
		base = base[:i]
	}
	if err := store.ValidateName(base); err != nil {
		return "", fmt.Errorf("%q is not a store path in %s: %w", p, st.StoreDir, err)
	}
	return base, nil
}

// keepList expands --keep arguments: store paths, or files listing them.
func keepList(st *store.Store, args []string) ([]string, error) {
	var out []string
	for _, a := range args {
		if !strings.HasPrefix(a, st.StoreDir+"/") {
			if fi, err := os.Stat(a); err == nil && fi.Mode().IsRegular() {
				data, err := os.ReadFile(a)
				if err != nil {
					return nil, fmt.Errorf("--keep: %w", err)
				}
				for ln, line := range strings.Split(string(data), "\n") {
					line = strings.TrimSpace(line)
					if line == "" || strings.HasPrefix(line, "#") {
						continue
					}
					base, err := baseName(st, line)
					if err != nil {
						return nil, fmt.Errorf("--keep %s:%d: %w", a, ln+1, err)
					}
					out = append(out, base)
				}
				continue
			}
		}
		base, err := baseName(st, a)
		if err != nil {
			return nil, fmt.Errorf("--keep: %w", err)
		}
		out = append(out, base)
	}
	return out, nil
}
