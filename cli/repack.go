package cli

import (
	"encoding/json"
	"fmt"
	"os"
	"runtime/debug"
	"time"

	"github.com/klauspost/compress/zstd"

	"github.com/casnix/casnix/blobs"
	"github.com/casnix/casnix/sched"
	"github.com/casnix/casnix/store"
)

// RepackCmd rewrites what ingest stored fast into the space-optimal form.
type RepackCmd struct {
	Level       int     `name:"level" default:"11" placeholder:"N" help:"zstd level of the rewritten frames (1 fastest, 3 default, 7 better, 11 best)."`
	FrameSize   int     `name:"frame-bytes" default:"16777216" placeholder:"BYTES" help:"Raw bytes per rewritten frame (256 KiB to 64 MiB): larger compresses better, smaller reads small files faster."`
	MinDead     float64 `name:"min-dead" default:"0.25" help:"Afterwards, rewrite a pack once this share of its bytes is dead (as gc does)."`
	MemoryLimit string  `name:"memory-limit" env:"CASNIX_MEMORY_LIMIT" default:"256MiB" placeholder:"BYTES" help:"Soft limit on the Go memory (GOMEMLIMIT overrides it); the encoders of the best levels need about 50 MiB each."`
	Idle        bool    `name:"idle" help:"Run as background work: one compressor, at idle CPU priority (only cycles nobody else wants), old frames decoded outside the shared cache; for cron on a busy machine."`
	JSON        bool    `name:"json" help:"Print the result as JSON."`
	// KillAt and RoundBytes are for the crash test (tests/repack_crash_test.go):
	// it stops a repack of a small store at chosen points of every phase.
	KillAt     int   `name:"test-kill-at" hidden:"" env:"CASNIX_TEST_REPACK_KILL_AT" help:"Testing only: SIGKILL this process after step N."`
	RoundBytes int64 `name:"test-round-bytes" hidden:"" help:"Testing only: raw bytes moved per commit."`
}

// repackFrameCache is the decoded-frame cache of a repack.
const repackFrameCache = 32 << 20

type repackJSON struct {
	Paths         int     `json:"paths"`
	ChunksMoved   int     `json:"chunksMoved"`
	BytesMoved    int64   `json:"bytesMoved"`
	FramesWritten int     `json:"framesWritten"`
	Rounds        int     `json:"rounds"`
	PacksRemoved  int     `json:"packsRemoved"`
	PacksWritten  int     `json:"packsWritten"`
	BytesBefore   int64   `json:"bytesBefore"`
	BytesAfter    int64   `json:"bytesAfter"`
	Seconds       float64 `json:"seconds"`
}

// Run repacks.
func (c *RepackCmd) Run(g *Globals) error {
	if c.MinDead <= 0 {
		return fmt.Errorf("--min-dead must be above 0")
	}
	limit, err := parseSize(c.MemoryLimit)
	if err != nil {
		return fmt.Errorf("--memory-limit: %w", err)
	}
	if os.Getenv("GOMEMLIMIT") == "" {
		debug.SetMemoryLimit(limit)
	}
	// The old frames are read in the order they were written: a few of
	// them cached are enough.
	g.FrameCache = repackFrameCache
	st, err := g.Open()
	if err != nil {
		return err
	}
	defer st.Close()
	before, err := dirBytes(st.Dir())
	if err != nil {
		return err
	}
	o := store.RepackOptions{MinDead: c.MinDead, Step: countSteps(g, "repack", c.KillAt),
		Blobs: blobs.RepackOptions{Level: zstd.EncoderLevelFromZstd(c.Level), FrameSize: c.FrameSize, RoundBytes: c.RoundBytes}}
	if c.Idle {
		sched.Idle()
		o.Blobs.Idle, o.Blobs.Workers, o.Blobs.Priority = true, 1, func() { sched.Idle() }
	}
	start := time.Now()
	res, err := st.Repack(g.Ctx, o)
	if err != nil {
		return err
	}
	el := time.Since(start)
	after, err := dirBytes(st.Dir())
	if err != nil {
		return err
	}
	if c.JSON {
		enc := json.NewEncoder(g.Stdout)
		enc.SetIndent("", "  ")
		return enc.Encode(repackJSON{Paths: res.Paths, ChunksMoved: res.Repack.ChunksMoved, BytesMoved: res.Repack.BytesMoved,
			FramesWritten: res.Repack.FramesWritten, Rounds: res.Repack.Rounds,
			PacksRemoved: res.Compact.PacksRemoved, PacksWritten: res.Compact.PacksWritten,
			BytesBefore: before, BytesAfter: after, Seconds: el.Seconds()})
	}
	fmt.Fprintf(g.Stderr, "repacked %d chunks (%s raw) of %d paths into %d frames in %.1fs; packs %s -> %s on disk (%d removed)\n",
		res.Repack.ChunksMoved, humanBytes(res.Repack.BytesMoved), res.Paths, res.Repack.FramesWritten, el.Seconds(),
		humanBytes(before), humanBytes(after), res.Compact.PacksRemoved)
	return nil
}
