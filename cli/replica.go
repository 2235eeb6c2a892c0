package cli

import (
	"context"
	"errors"
	"fmt"
	"log/slog"
	"os"
	"os/exec"
	"path/filepath"
	"syscall"
	"time"

	"github.com/casnix/casnix/objstore"
	"github.com/casnix/casnix/replicate"
	"github.com/casnix/casnix/store"
)

// ReplicaCmd groups the commands of a read replica's data dir.
type ReplicaCmd struct {
	Follow ReplicaFollowCmd `cmd:"" help:"Keep this data dir a current read replica of the primary whose bucket URL is given: restore its database, then apply its changes as they reach the bucket (serve --replica-of runs this itself)."`
}

// ReplicaFollowCmd runs a replica's follower.
type ReplicaFollowCmd struct {
	URL      string        `arg:"" name:"URL" help:"The primary's bucket: s3://BUCKET/PREFIX?endpoint=…&region=… (its --packs URL)."`
	Interval time.Duration `name:"interval" env:"CASNIX_FOLLOW_INTERVAL" default:"1s" help:"How often the bucket is asked for the primary's new transactions (one LIST request each time)."`
}

// Run follows until interrupted.
func (c *ReplicaFollowCmd) Run(g *Globals) error {
	dir := g.dataDir()
	loc, err := objstore.ParseURL(c.URL)
	if err != nil {
		return err
	}
	if err := store.MakeReplica(dir, c.URL); err != nil {
		return err
	}
	g.Logger.Info("following", "primary", loc.String(), "data-dir", dir, "interval", c.Interval)
	return replicate.Follow(g.Ctx, loc, filepath.Join(dir, store.DBFile), c.Interval, g.Logger)
}

// startFollower runs `casnix replica follow` for dir in a process of its own (the
// follower writes the database under SQLite's POSIX locks, which this process would not
// see as another's) and waits until the database is there. The follower is restarted if
// it exits; the returned func stops it.
func startFollower(g *Globals, dir, url string, interval time.Duration) (func(), error) {
	if err := store.MakeReplica(dir, url); err != nil {
		return nil, err
	}
	exe, err := os.Executable()
	if err != nil {
		return nil, err
	}
	ctx, cancel := context.WithCancel(context.Background())
	done := make(chan struct{})
	start := func() (*exec.Cmd, error) {
		cmd := exec.Command(exe, "--data-dir", dir, "--log-level", g.LogLevel, "--log-format", g.LogFormat,
			"replica", "follow", "--interval", interval.String(), url)
		cmd.Stdout, cmd.Stderr = g.Stderr, g.Stderr
		cmd.SysProcAttr = &syscall.SysProcAttr{Pdeathsig: syscall.SIGTERM}
		return cmd, cmd.Start()
	}
	cmd, err := start()
	if err != nil {
		cancel()
		return nil, fmt.Errorf("start the replica's follower: %w", err)
	}
	exited := make(chan error, 1)
	go func() { exited <- cmd.Wait() }()
	go superviseFollower(ctx, g.Logger, cmd, exited, start, done)
	db := filepath.Join(dir, store.DBFile)
	for deadline := time.Now().Add(10 * time.Minute); ; {
		if id, _ := replicate.AppliedTXID(db); id > 0 {
			break
		}
		if time.Now().After(deadline) {
			cancel()
			<-done
			return nil, fmt.Errorf("replica of %s: no database restored within 10 minutes", url)
		}
		select {
		case <-g.Ctx.Done():
			cancel()
			<-done
			return nil, g.Ctx.Err()
		case <-time.After(100 * time.Millisecond):
		}
	}
	return func() { cancel(); <-done }, nil
}

// superviseFollower restarts the follower when it exits (after a pause), and stops it
// with SIGTERM when ctx ends.
func superviseFollower(ctx context.Context, log *slog.Logger, cmd *exec.Cmd, exited chan error, start func() (*exec.Cmd, error), done chan struct{}) {
	defer close(done)
	for {
		select {
		case <-ctx.Done():
			_ = cmd.Process.Signal(syscall.SIGTERM)
			select {
			case <-exited:
			case <-time.After(10 * time.Second):
				_ = cmd.Process.Kill()
				<-exited
			}
			return
		case err := <-exited:
			log.Error("the replica's follower exited; restarting it", "err", err)
			select {
			case <-ctx.Done():
				return
			case <-time.After(2 * time.Second):
			}
			c, err := start()
			if err != nil {
				log.Error("restart the replica's follower", "err", err)
				exited <- err
				continue
			}
			cmd = c
			go func() { exited <- c.Wait() }()
		}
	}
}

// startPrimary takes the bucket's writer lease for st (whose packs are in a bucket)
// and replicates its database there; the returned func stops both. A lease another
// primary holds is an error naming it.
func startPrimary(g *Globals, st *store.Store, every time.Duration) (func(), *replicate.Primary, error) {
	loc, err := objstore.ParseURL(st.Packs())
	if err != nil {
		return nil, nil, err
	}
	id, err := st.Identity(g.Ctx)
	if err != nil {
		return nil, nil, err
	}
	lease, err := replicate.AcquireLease(g.Ctx, loc, id, 30*time.Second)
	if err != nil {
		return nil, nil, err
	}
	p, err := replicate.StartPrimary(g.Ctx, filepath.Join(st.Dir(), store.DBFile), loc, replicate.Options{SyncInterval: every})
	if err != nil {
		_ = lease.Release(context.Background())
		return nil, nil, err
	}
	go func() {
		<-lease.Lost()
		// Another process took the bucket over: this one must not write there again.
		g.Logger.Error("writer lease lost: stopping", "err", lease.Err())
		if p, err := os.FindProcess(os.Getpid()); err == nil {
			_ = p.Signal(syscall.SIGTERM)
		}
	}()
	return func() {
		ctx, cancel := context.WithTimeout(context.Background(), time.Minute)
		defer cancel()
		if err := p.Close(ctx); err != nil {
			g.Logger.Error("database replication", "err", err)
		}
		if err := lease.Release(ctx); err != nil && !errors.Is(err, objstore.ErrNotFound) {
			g.Logger.Warn("release the writer lease", "err", err)
		}
	}, p, nil
}
