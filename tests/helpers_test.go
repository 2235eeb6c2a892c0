package tests

import (
	"io"
	"testing"

	"github.com/casnix/casnix/tests/nixtest"
)

// narStats counts the nodes of the NAR of PATH in store s.
func narStats(t testing.TB, s *nixtest.Store, path string) nixtest.NARStats {
	t.Helper()
	var stats nixtest.NARStats
	walkCmd(t, s.DumpCmd(path), func(e nixtest.NAREntry) error {
		stats.Add(e)
		return nil
	})
	return stats
}

// narRoot returns the root node of the NAR of PATH in store s.
func narRoot(t testing.TB, s *nixtest.Store, path string) nixtest.NAREntry {
	t.Helper()
	var root nixtest.NAREntry
	walkCmd(t, s.DumpCmd(path), func(e nixtest.NAREntry) error {
		if e.Path == "" {
			root = e
			root.Contents = nil
		}
		return nil
	})
	return root
}

// walkCmd runs c, which writes a NAR to stdout, and parses it with nixtest.WalkNAR as it
// streams; c.Stdout, when set, gets a copy of the NAR.
func walkCmd(t testing.TB, c *nixtest.Cmd, fn func(nixtest.NAREntry) error) {
	t.Helper()
	pr, pw := io.Pipe()
	cc := *c
	c = &cc
	if c.Stdout != nil {
		c.Stdout = io.MultiWriter(c.Stdout, pw)
	} else {
		c.Stdout = pw
	}
	done := make(chan error, 1)
	go func() {
		err := nixtest.WalkNAR(pr, fn)
		io.Copy(io.Discard, pr) // let the command finish even when the NAR is bad
		done <- err
	}()
	r := c.Try()
	pw.Close()
	werr := <-done
	if !r.OK() {
		t.Fatalf("command failed:\n%s", r)
	}
	if werr != nil {
		t.Fatalf("%s: %v", c.CommandLine(), werr)
	}
}
