package proto

import (
	"cmp"
	"errors"
	"fmt"
	"slices"
	"strings"

	"github.com/casnix/casnix/store"
)

// GC and roots. A connection's temp roots live in a store.TempRoots (a
// locked file under the data dir) from its first AddTempRoot or added path
// until it closes, so a collection in this process or in `casnix gc`
// keeps them.

// addTemp makes name a temp root of this connection, as nix-daemon does for
// a path a client asked to keep or is adding (before adding it, so no
// collection can run between the commit and the root).
func (c *conn) addTemp(name string) error { return c.addTempWithin(nil, name) }

// addTempWithin is addTemp for a path added inside batch b, whose GC lock
// lets the root in without waiting for a pending collection (see
// store.TempRoots.AddWithin).
func (c *conn) addTempWithin(b *store.Batch, name string) error {
	c.mu.Lock()
	if c.roots == nil {
		r, err := c.s.Store.NewTempRoots()
		if err != nil {
			c.mu.Unlock()
			return c.storeErr(err)
		}
		c.roots = r
	}
	roots := c.roots
	c.mu.Unlock()
	if err := roots.AddWithin(c.ctx, b, name); err != nil {
		return c.storeErr(fmt.Errorf("temp root %s: %w", c.full(name), err))
	}
	return nil
}

// closeRoots drops the connection's temp roots when it ends.
func (c *conn) closeRoots() {
	c.mu.Lock()
	defer c.mu.Unlock()
	if c.roots != nil {
		if err := c.roots.Close(); err != nil {
			c.log.Warn("dropping temp roots", "err", err)
		}
		c.roots = nil
	}
}

func (c *conn) addTempRoot() error {
	name, err := c.readPath()
	if err != nil {
		return err
	}
	if err := c.addTemp(name); err != nil {
		return err
	}
	c.last()
	c.w.u64(1)
	return nil
}

func (c *conn) addIndirectRoot() error {
	link, err := c.r.str(maxPath)
	if err != nil {
		return err
	}
	if err := c.s.Store.AddIndirectRoot(link); err != nil {
		return errorf("cannot add indirect root '%s': %v", link, err)
	}
	c.last()
	c.w.u64(1)
	return nil
}

func (c *conn) addPermRoot() error {
	name, perr := c.readPath()
	if perr != nil && !isOpError(perr) {
		return perr
	}
	link, err := c.r.str(maxPath)
	if err != nil {
		return err
	}
	if !c.trusted {
		return errorf("you are not privileged to create perm roots\n\nhint: you can just do this client-side without special privileges, and probably want to do that instead.")
	}
	if perr != nil {
		return perr
	}
	got, err := c.s.Store.AddPermRoot(c.ctx, name, link)
	if err != nil {
		if errors.Is(err, store.ErrNotValid) {
			return errorf("%v", err)
		}
		return errorf("cannot create gc root '%s': %v", link, err)
	}
	c.last()
	c.w.str(got)
	return nil
}

func (c *conn) findRoots() error {
	defer c.watchHangup()()
	roots, err := c.s.Store.Roots(c.ctx)
	if err != nil {
		return c.storeErr(err)
	}
	// Runtime roots too, as nix-daemon's findRoots; only valid paths, as
	// it checks them.
	for where, names := range c.s.Store.RuntimeRoots(nil) {
		for _, n := range names {
			if ok, err := c.s.Store.IsValid(c.ctx, n); err == nil && ok {
				roots[where] = append(roots[where], n)
			}
		}
	}
	c.last()
	type pair struct{ link, path string }
	var out []pair
	for link, names := range roots {
		if !c.trusted {
			// As nix-daemon: untrusted clients learn which paths are
			// roots, not where the roots are.
			link = "{censored}"
		}
		for _, n := range names {
			out = append(out, pair{link, n})
		}
	}
	slices.SortFunc(out, func(a, b pair) int {
		return cmp.Or(strings.Compare(a.path, b.path), strings.Compare(a.link, b.link))
	})
	c.w.u64(uint64(len(out)))
	for _, p := range out {
		c.w.str(p.link)
		c.writePath(p.path)
	}
	return nil
}

func (c *conn) collectGarbage() error {
	action, err := c.r.u64()
	if err != nil {
		return err
	}
	names, perr := c.readPaths()
	if perr != nil && !isOpError(perr) {
		return perr
	}
	ignoreLiveness, err := c.r.boolean()
	if err != nil {
		return err
	}
	maxFreed, err := c.r.u64()
	if err != nil {
		return err
	}
	for i := 0; i < 3; i++ { // obsolete
		if _, err := c.r.u64(); err != nil {
			return err
		}
	}
	if perr != nil {
		return perr
	}
	// As nix-daemon, paths running processes use are roots.
	o := store.GCOptions{Action: store.GCAction(action), Paths: names, MaxFreed: int64(min(maxFreed, 1<<62)), RuntimeRoots: true}
	switch {
	case action > uint64(store.GCDeleteSpecific):
		return errorf("invalid garbage collector action %d", action)
	case ignoreLiveness:
		return errorf("you are not allowed to ignore liveness")
	case o.Action == store.GCDeleteDead && len(names) > 0:
		return errorf("Garbage collecting specific paths requested but it is not supported by the negotiated protocol")
	case (o.Action == store.GCDeleteDead || o.Action == store.GCDeleteSpecific) && !c.trusted:
		return errorf("you are not privileged to delete paths: only --trusted-users may collect garbage")
	}
	defer c.watchHangup()()
	res, err := c.s.Store.GC(c.ctx, o)
	if err != nil {
		if errors.Is(err, store.ErrAlive) {
			return errorf("%v", err)
		}
		return c.storeErr(err)
	}
	c.last()
	c.writePaths(res.Paths)
	c.w.u64(uint64(max(res.BytesFreed, 0)))
	c.w.u64(0) // obsolete
	return nil
}
