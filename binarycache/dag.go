package binarycache

import (
	"context"
	"fmt"
	"sync"
)

// ErrDependency marks a path skipped because one it refers to failed.
var ErrDependency = fmt.Errorf("a reference failed")

// RunDAG calls fn for every node, at most jobs at a time, each only after
// fn returned for all its deps (deps outside nodes are ignored). With
// keepGoing a failure fails only the nodes that depend on it; without, the
// first failure cancels the rest and is returned. The map holds every
// node's error (nil for success).
func RunDAG(ctx context.Context, nodes []string, deps func(string) []string, jobs int, keepGoing bool,
	fn func(context.Context, string) error) (map[string]error, error) {
	ctx, cancel := context.WithCancel(ctx)
	defer cancel()
	in := make(map[string]bool, len(nodes))
	for _, n := range nodes {
		in[n] = true
	}
	waiting := make(map[string]int, len(nodes))
	rdeps := map[string][]string{}
	var ready []string
	for _, n := range nodes {
		for _, d := range deps(n) {
			if d != n && in[d] {
				waiting[n]++
				rdeps[d] = append(rdeps[d], n)
			}
		}
		if waiting[n] == 0 {
			ready = append(ready, n)
		}
	}
	var (
		mu       sync.Mutex
		cond     = sync.NewCond(&mu)
		results  = make(map[string]error, len(nodes))
		depErr   = map[string]error{}
		finished int
		running  int
		stuck    bool
		first    error
	)
	if jobs < 1 {
		jobs = 1
	}
	var wg sync.WaitGroup
	for range jobs {
		wg.Go(func() {
			mu.Lock()
			defer mu.Unlock()
			for {
				for len(ready) == 0 && finished < len(nodes) && !stuck {
					if running == 0 {
						// Nothing runs and nothing is ready: the rest wait on a cycle.
						stuck = true
						cond.Broadcast()
						break
					}
					cond.Wait()
				}
				if finished == len(nodes) || stuck {
					return
				}
				n := ready[0]
				ready = ready[1:]
				err := depErr[n]
				if err == nil && first != nil {
					err = fmt.Errorf("not attempted: %w", context.Canceled)
				}
				if err == nil {
					running++
					mu.Unlock()
					err = fn(ctx, n)
					mu.Lock()
					running--
					if err != nil && first == nil && !keepGoing {
						first = err
						cancel()
					}
				}
				results[n] = err
				finished++
				for _, r := range rdeps[n] {
					if err != nil && depErr[r] == nil {
						depErr[r] = fmt.Errorf("%w: %s", ErrDependency, n)
					}
					if waiting[r]--; waiting[r] == 0 {
						ready = append(ready, r)
					}
				}
				cond.Broadcast()
			}
		})
	}
	wg.Wait()
	if finished != len(nodes) {
		// A cycle among nodes (a cache lying about references).
		return results, fmt.Errorf("reference cycle among %d paths", len(nodes)-finished)
	}
	return results, first
}
