package fusefs

import (
	"context"
	"errors"
	"time"

	"github.com/hanwen/go-fuse/v2/fuse"

	"github.com/casnix/casnix/store"
)

// invalidateEvery is how often the mount polls Options.Deletions.
const invalidateEvery = time.Second

// watchDeletions invalidates the kernel's entries for root names that stop
// being valid: entries are cached for contentTimeout (a day), so without
// this a path deleted by a collection (in this process or another one,
// such as `casnix gc` beside `casnix serve --mount`) would still resolve.
// It polls deletions, a counter that grows with every collection that
// deleted paths, and on a change checks each name the kernel has looked up.
// last is the counter read before the mount began, so a collection that
// finishes before the first poll is not missed. It returns when the server
// stops.
func (f *fsys) watchDeletions(srv *fuse.Server, root *rootNode, deletions func() (uint64, error), last uint64) {
	done := make(chan struct{})
	go func() { srv.Wait(); close(done) }()
	t := time.NewTicker(invalidateEvery)
	defer t.Stop()
	for {
		select {
		case <-done:
			return
		case <-t.C:
		}
		n, err := deletions()
		if err != nil || n == last {
			continue
		}
		last = n
		f.invalidateDeleted(root)
	}
}

// invalidateDeleted drops the kernel's entries (and our inodes) for the
// root's children that are no longer valid paths.
func (f *fsys) invalidateDeleted(root *rootNode) int {
	var gone int
	for name, child := range root.Children() {
		_, err := f.st.Root(context.Background(), name)
		if !errors.Is(err, store.ErrNotValid) {
			continue
		}
		// NotifyDelete also tells inotify watchers; ENOENT just means the
		// kernel had already forgotten the entry.
		if errno := root.NotifyDelete(name, child); errno != 0 {
			root.NotifyEntry(name)
		}
		root.RmChild(name)
		gone++
	}
	if gone > 0 {
		f.log.Info("invalidated deleted paths in the mount", "paths", gone)
	}
	return gone
}
