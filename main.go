// Command casnix is a content-addressed Nix store in one binary: it keeps
// store paths as deduplicated, compressed chunks with their path-info in
// SQLite, and serves them to Nix.
//
// This file is wiring only: flags, signals, exit codes. Commands live in
// package cli.
package main

import (
	"context"
	"errors"
	"fmt"
	"log/slog"
	"os"
	"os/signal"
	"runtime/pprof"
	"syscall"

	"github.com/alecthomas/kong"

	"github.com/casnix/casnix/cli"
)

func main() {
	os.Exit(run(os.Args[1:]))
}

func run(args []string) int {
	var c cli.CLI
	parser, err := kong.New(&c,
		kong.Name("casnix"),
		kong.Description("A content-addressed Nix store: deduplicated, compressed store paths served to Nix."),
		kong.UsageOnError(),
		kong.Vars{"version": cli.Version},
	)
	if err != nil {
		fmt.Fprintln(os.Stderr, "casnix:", err)
		return 2
	}
	kctx, err := parser.Parse(args)
	if err != nil {
		parser.Errorf("%s", err)
		return 2
	}
	var level slog.Level
	_ = level.UnmarshalText([]byte(c.LogLevel))
	c.Stdout = os.Stdout
	c.Stderr = os.Stderr
	c.Logger = slog.New(logHandler(c.LogFormat, level))
	// The first SIGINT/SIGTERM cancels Ctx (serve drains gracefully), a
	// second one closes Abort (serve stops at once).
	sigs := make(chan os.Signal, 2)
	signal.Notify(sigs, syscall.SIGINT, syscall.SIGTERM)
	defer signal.Stop(sigs)
	ctx, cancel := context.WithCancel(context.Background())
	defer cancel()
	abort := make(chan struct{})
	go func() {
		<-sigs
		cancel()
		sig := <-sigs
		c.Logger.Warn("second signal: stopping at once, closing open connections", "signal", sig.String())
		close(abort)
	}()
	c.Ctx = ctx
	c.Abort = abort
	if c.CPUProfile != "" {
		f, err := os.Create(c.CPUProfile)
		if err != nil {
			fmt.Fprintln(os.Stderr, "error:", err)
			return 1
		}
		defer f.Close()
		if err := pprof.StartCPUProfile(f); err != nil {
			fmt.Fprintln(os.Stderr, "error:", err)
			return 1
		}
		defer pprof.StopCPUProfile()
	}
	if err := kctx.Run(&c.Globals); err != nil {
		if errors.Is(err, context.Canceled) {
			fmt.Fprintln(os.Stderr, "casnix: interrupted")
			return 130
		}
		fmt.Fprintln(os.Stderr, "error:", err)
		return 1
	}
	return 0
}

// logHandler makes the stderr log handler. Under systemd (JOURNAL_STREAM
// set) the text form leaves out the time: the journal stamps every line.
func logHandler(format string, level slog.Level) slog.Handler {
	opts := &slog.HandlerOptions{Level: level}
	if format == "json" {
		return slog.NewJSONHandler(os.Stderr, opts)
	}
	if os.Getenv("JOURNAL_STREAM") != "" {
		opts.ReplaceAttr = func(groups []string, a slog.Attr) slog.Attr {
			if len(groups) == 0 && a.Key == slog.TimeKey {
				return slog.Attr{}
			}
			return a
		}
	}
	return slog.NewTextHandler(os.Stderr, opts)
}
