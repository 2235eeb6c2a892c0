package cli

import (
	"encoding/json"
	"fmt"
	"time"

	"github.com/casnix/casnix/store"
)

// RepairCmd makes the store consistent with what its packs hold, dropping
// the paths whose data is gone.
type RepairCmd struct {
	DryRun bool `name:"dry-run" help:"Repair a copy of the database and print what would change; change nothing."`
	JSON   bool `name:"json" help:"Print the result as JSON."`
}

type repairDropJSON struct {
	Path   string `json:"path"`
	Reason string `json:"reason"`
}

type repairJSON struct {
	DryRun           bool             `json:"dryRun"`
	Database         []string         `json:"database"`
	Reindexed        bool             `json:"reindexed"`
	Rebuilt          bool             `json:"rebuilt"`
	PackDamage       []string         `json:"packDamage"`
	HeadersRewritten []int64          `json:"headersRewritten"`
	PacksScanned     int              `json:"packsScanned"`
	PacksAdded       int              `json:"packsAdded"`
	FramesAdded      int              `json:"framesAdded"`
	FramesDropped    int              `json:"framesDropped"`
	ChunksAdded      int              `json:"chunksAdded"`
	ChunksDropped    int              `json:"chunksDropped"`
	BlobsDropped     int              `json:"blobsDropped"`
	RowsDropped      int64            `json:"rowsDropped"`
	Dropped          []repairDropJSON `json:"dropped"`
	// Reimport is the store paths to import or copy again: the dropped
	// ones.
	Reimport []string `json:"reimport"`
	// Remaining is damage repair could not mend (empty on success).
	Remaining []string `json:"remaining"`
	Seconds   float64  `json:"seconds"`
}

// Run repairs.
func (c *RepairCmd) Run(g *Globals) error {
	st, err := g.Open()
	if err != nil {
		return err
	}
	defer st.Close()
	start := time.Now()
	pr := newProgress(g.Stderr)
	rep, err := st.Repair(g.Ctx, store.RepairOptions{DryRun: c.DryRun, Progress: func(stage string, done, total int64) {
		pr.update("repair: %s %s %d/%d", stage, bar(done, total, 30), done, total)
	}})
	pr.done()
	if err != nil {
		return err
	}
	out := repairJSON{
		DryRun: rep.DryRun, Database: rep.DB, Reindexed: rep.Reindexed, Rebuilt: rep.Rebuilt, PackDamage: rep.Index.Damage,
		PacksScanned: rep.Index.Packs, PacksAdded: rep.Index.PacksAdded,
		FramesAdded: rep.Index.FramesAdded, FramesDropped: rep.Index.FramesDropped,
		ChunksAdded: rep.Index.ChunksAdded, ChunksDropped: rep.Index.ChunksDropped,
		BlobsDropped: rep.Index.BlobsDropped, RowsDropped: rep.RowsDropped,
		Dropped: []repairDropJSON{}, Reimport: []string{}, Remaining: append([]string{}, rep.Remaining...), Seconds: time.Since(start).Seconds(),
	}
	for _, p := range rep.Packs {
		out.HeadersRewritten = append(out.HeadersRewritten, p.Pack)
	}
	for _, d := range rep.Dropped {
		out.Dropped = append(out.Dropped, repairDropJSON{st.Full(d.Name), d.Err.Error()})
		out.Reimport = append(out.Reimport, st.Full(d.Name))
	}
	if c.JSON {
		if out.Database == nil {
			out.Database = []string{}
		}
		if out.PackDamage == nil {
			out.PackDamage = []string{}
		}
		if out.HeadersRewritten == nil {
			out.HeadersRewritten = []int64{}
		}
		enc := json.NewEncoder(g.Stdout)
		enc.SetIndent("", "  ")
		if err := enc.Encode(out); err != nil {
			return err
		}
		return remainingErr(rep)
	}
	would := ""
	if rep.DryRun {
		would = "would be "
	}
	for _, d := range rep.DB {
		fmt.Fprintf(g.Stderr, "damaged database: %s\n", d)
	}
	if rep.Reindexed {
		fmt.Fprintf(g.Stderr, "database indexes %srebuilt (REINDEX)\n", would)
	}
	if rep.Rebuilt {
		fmt.Fprintln(g.Stderr, "database replaced by a copy of all its rows (VACUUM INTO)")
	}
	for _, d := range rep.Index.Damage {
		fmt.Fprintf(g.Stderr, "unreadable: %s\n", d)
	}
	for _, p := range rep.Packs {
		fmt.Fprintf(g.Stderr, "%v: header %swritten afresh\n", p, would)
	}
	ix := rep.Index
	fmt.Fprintf(g.Stderr, "chunk index from %d packs: %d frames and %d chunks %sindexed again (%d pack rows), %d frames, %d chunks, %d blobs and %d rows of missing paths %sdropped\n",
		ix.Packs, ix.FramesAdded, ix.ChunksAdded, would, ix.PacksAdded, ix.FramesDropped, ix.ChunksDropped, ix.BlobsDropped, rep.RowsDropped, would)
	for _, d := range rep.Dropped {
		fmt.Fprintf(g.Stderr, "%sdropped %s: %v\n", would, st.Full(d.Name), d.Err)
	}
	for _, r := range rep.Remaining {
		fmt.Fprintf(g.Stderr, "still damaged: %s\n", r)
	}
	if len(rep.Dropped) == 0 {
		fmt.Fprintf(g.Stderr, "no store path %sdropped (%.1fs)\n", would, out.Seconds)
		return remainingErr(rep)
	}
	fmt.Fprintf(g.Stderr, "%d store paths %sdropped (%.1fs); import or copy them again:\n", len(rep.Dropped), would, out.Seconds)
	for _, p := range out.Reimport {
		fmt.Fprintln(g.Stdout, p)
	}
	return remainingErr(rep)
}

// remainingErr makes the exit status say whether repair left damage.
func remainingErr(rep *store.RepairReport) error {
	if len(rep.Remaining) > 0 {
		return fmt.Errorf("repair left %d problems in the database", len(rep.Remaining))
	}
	return nil
}
