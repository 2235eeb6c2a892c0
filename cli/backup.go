package cli

import (
	"fmt"
	"io"
	"os"
	"sync/atomic"
	"syscall"
	"time"

	"github.com/casnix/casnix/objstore"
	"github.com/casnix/casnix/store"
)

// BackupCmd copies a consistent snapshot of the data dir.
type BackupCmd struct {
	Dest       string `arg:"" name:"DEST" help:"Directory to write the backup to (absent or empty; it becomes a casnix data dir), or s3://BUCKET/PREFIX?endpoint=URL&region=R to add a backup point to a bucket (credentials from the usual AWS variables)."`
	Quick      bool   `name:"quick" env:"CASNIX_BACKUP_QUICK" help:"Check the copy's frames and chunk hashes only, not every NAR (directory backups)."`
	Keep       int    `name:"keep" placeholder:"N" help:"s3:// only: after the backup keep the newest N points and remove the older ones and every pack object no kept point needs."`
	List       bool   `name:"list" help:"s3:// only: list the bucket's backup points instead of backing up."`
	VerifyOnly bool   `name:"verify-only" help:"s3:// only: check a point (--point, else the newest) in the bucket instead of backing up."`
	Point      string `name:"point" placeholder:"ID" help:"s3:// only: the point --verify-only checks."`
}

// Run backs up.
func (c *BackupCmd) Run(g *Globals) error {
	if objstore.IsURL(c.Dest) {
		return c.runBucket(g)
	}
	if c.Keep != 0 || c.List || c.VerifyOnly || c.Point != "" {
		return fmt.Errorf("--keep, --list, --verify-only and --point are for s3:// backups")
	}
	st, err := g.Open()
	if err != nil {
		return err
	}
	defer st.Close()
	rep, err := st.Backup(g.Ctx, c.Dest, store.CopyOptions{Quick: c.Quick})
	if err != nil {
		return err
	}
	printCopy(g.Stdout, "backed up", st.Dir(), c.Dest, rep)
	return nil
}

// RestoreCmd restores a backup into the data dir.
type RestoreCmd struct {
	Src   string `arg:"" name:"SRC" help:"Backup (or stopped data dir) to restore from, or an s3:// URL casnix backup wrote to."`
	Point string `name:"point" placeholder:"ID" help:"s3:// only: the backup point to restore (casnix backup --list shows them; default: the newest complete one)."`
	At    string `name:"at" placeholder:"TIME" help:"s3:// only: restore the newest point taken at or before TIME (RFC 3339, e.g. 2026-01-02T15:04:05Z)."`
	Force bool   `name:"force" help:"Replace the data dir's contents if it is not empty (refused while any casnix process has it open)."`
	Quick bool   `name:"quick" env:"CASNIX_RESTORE_QUICK" help:"Check the restored frames and chunk hashes only, not every NAR."`
	// KillAt makes restore SIGKILL itself after its Nth step: the crash
	// tests use it to stop it at chosen points of every phase.
	KillAt int `name:"test-kill-at" hidden:"" env:"CASNIX_TEST_RESTORE_KILL_AT" help:"Testing only: SIGKILL this process after step N."`
}

// Run restores.
func (c *RestoreCmd) Run(g *Globals) error {
	dst := g.DataDir
	if dst == "" {
		dst = DefaultDataDir()
	}
	opts := store.CopyOptions{Quick: c.Quick, Force: c.Force, Step: countSteps(g, "restore", c.KillAt)}
	if objstore.IsURL(c.Src) {
		return c.runBucket(g, dst, opts)
	}
	if c.Point != "" || c.At != "" {
		return fmt.Errorf("--point and --at are for s3:// restores")
	}
	rep, err := store.Restore(g.Ctx, c.Src, dst, opts)
	if err != nil {
		return err
	}
	printCopy(g.Stdout, "restored", c.Src, dst, rep)
	return nil
}

// countSteps returns the Step hook of a command the crash tests stop at
// chosen points (restore, repack): it logs each step, numbered, at debug
// level as "WHAT step", and SIGKILLs the process after step killAt (0:
// never).
func countSteps(g *Globals, what string, killAt int) func(string) {
	var steps atomic.Int64
	return func(name string) {
		n := steps.Add(1)
		g.Logger.Debug(what+" step", "n", n, "step", name)
		if killAt > 0 && n == int64(killAt) {
			syscall.Kill(os.Getpid(), syscall.SIGKILL)
			select {} // the signal is on its way
		}
	}
}

func printCopy(w io.Writer, what, from, to string, rep *store.CopyReport) {
	secs := max(rep.Copy.Seconds(), 1e-9)
	fmt.Fprintf(w, "%s %s to %s: %d paths, %s (database %s, %d pack files %s) in %.2fs, %.1f MB/s; verified in %.2fs\n",
		what, from, to, rep.Paths, humanBytes(rep.Bytes()), humanBytes(rep.DBBytes), rep.Packs, humanBytes(rep.PackBytes),
		secs, float64(rep.Bytes())/1e6/secs, rep.Verify.Round(time.Millisecond).Seconds())
}
