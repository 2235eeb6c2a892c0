// Command protobench drives a nix-daemon protocol server (casnix serve or a
// real nix-daemon) through proto.Client, so that bench/daemon.sh can measure
// both the same way.
//
//	protobench qpi   -socket S -paths FILE [-clients N] [-duration D]
//	protobench nar   -socket S -path P [-check]
//	protobench infos -socket S -paths FILE
//	protobench nars  -socket S -paths FILE [-check]
//
// qpi opens N connections (handshake and SetOptions are not timed), then
// each connection sends QueryPathInfo requests one at a time, looping over
// the paths in FILE (one full store path per line, each connection starting
// at a different offset), until the duration is over. It prints one line:
// "clients=N requests=R seconds=S rps=X". Every answer must say the path is
// valid.
//
// nar streams one path's NAR with NarFromPath into io.Discard and prints
// "bytes=B seconds=S mbps=X" (MB = 10^6 bytes). With -check the NAR is also
// hashed (which slows the client down, so do not time it) and compared with
// the daemon's QueryPathInfo NAR hash and size.
//
// nars streams the NAR of every path in FILE, in the file's order, one
// after another on one connection (as `nix copy --from ssh-ng://` fetches a
// closure), into io.Discard, and prints "paths=N bytes=B seconds=S
// mbps=X pps=Y". With -check every NAR is hashed and compared with
// QueryPathInfo (not for timing).
//
// infos prints one tab-separated line per path with what QueryPathInfo
// returned (no registration time), sorted by path, for comparing two daemons.
package main

import (
	"bufio"
	"crypto/sha256"
	"encoding/hex"
	"errors"
	"flag"
	"fmt"
	"io"
	"os"
	"slices"
	"strings"
	"sync"
	"sync/atomic"
	"time"

	"github.com/casnix/casnix/proto"
)

func main() {
	if len(os.Args) < 2 {
		usage()
	}
	var err error
	switch os.Args[1] {
	case "qpi":
		err = qpi(os.Args[2:])
	case "nar":
		err = nar(os.Args[2:])
	case "infos":
		err = infos(os.Args[2:])
	case "nars":
		err = nars(os.Args[2:])
	default:
		usage()
	}
	if err != nil {
		fmt.Fprintf(os.Stderr, "protobench %s: %v\n", os.Args[1], err)
		os.Exit(1)
	}
}

func usage() {
	fmt.Fprintln(os.Stderr, "usage: protobench qpi|nar|nars|infos -socket PATH [flags] (see -h of each)")
	os.Exit(2)
}

func readPaths(file string) ([]string, error) {
	f, err := os.Open(file)
	if err != nil {
		return nil, err
	}
	defer f.Close()
	var paths []string
	sc := bufio.NewScanner(f)
	for sc.Scan() {
		if p := strings.TrimSpace(sc.Text()); p != "" {
			paths = append(paths, p)
		}
	}
	if err := sc.Err(); err != nil {
		return nil, err
	}
	if len(paths) == 0 {
		return nil, fmt.Errorf("%s: no paths", file)
	}
	return paths, nil
}

func qpi(args []string) error {
	fs := flag.NewFlagSet("qpi", flag.ExitOnError)
	socket := fs.String("socket", "", "daemon socket")
	pathsFile := fs.String("paths", "", "file of full store paths, one per line")
	clients := fs.Int("clients", 1, "concurrent connections")
	duration := fs.Duration("duration", 10*time.Second, "how long to send requests")
	fs.Parse(args)
	if *socket == "" || *pathsFile == "" || *clients < 1 {
		return errors.New("need -socket, -paths and -clients >= 1")
	}
	paths, err := readPaths(*pathsFile)
	if err != nil {
		return err
	}
	conns := make([]*proto.Client, *clients)
	for i := range conns {
		if conns[i], err = proto.Dial(*socket); err != nil {
			return err
		}
		defer conns[i].Close()
	}
	var (
		stop   atomic.Bool
		counts = make([]int64, len(conns))
		errs   = make([]error, len(conns))
		start  sync.WaitGroup
		done   sync.WaitGroup
	)
	start.Add(1)
	for i, cl := range conns {
		done.Add(1)
		go func() {
			defer done.Done()
			j := i * len(paths) / len(conns)
			start.Wait()
			for !stop.Load() {
				pi, err := cl.QueryPathInfo(paths[j])
				if err == nil && pi == nil {
					err = fmt.Errorf("%s: daemon says it is not valid", paths[j])
				}
				if err != nil {
					errs[i] = err
					stop.Store(true)
					return
				}
				counts[i]++
				if j++; j == len(paths) {
					j = 0
				}
			}
		}()
	}
	t0 := time.Now()
	timer := time.AfterFunc(*duration, func() { stop.Store(true) })
	start.Done()
	done.Wait()
	elapsed := time.Since(t0).Seconds()
	timer.Stop()
	if err := errors.Join(errs...); err != nil {
		return err
	}
	var total int64
	for _, n := range counts {
		total += n
	}
	fmt.Printf("clients=%d requests=%d seconds=%.3f rps=%.1f\n", len(conns), total, elapsed, float64(total)/elapsed)
	return nil
}

func nar(args []string) error {
	fs := flag.NewFlagSet("nar", flag.ExitOnError)
	socket := fs.String("socket", "", "daemon socket")
	path := fs.String("path", "", "full store path")
	check := fs.Bool("check", false, "hash the NAR and compare it with QueryPathInfo (not for timing)")
	fs.Parse(args)
	if *socket == "" || *path == "" {
		return errors.New("need -socket and -path")
	}
	cl, err := proto.Dial(*socket)
	if err != nil {
		return err
	}
	defer cl.Close()
	var w io.Writer = io.Discard
	h := sha256.New()
	if *check {
		w = h
	}
	t0 := time.Now()
	n, err := cl.NarFromPath(*path, w)
	elapsed := time.Since(t0).Seconds()
	if err != nil {
		return err
	}
	if *check {
		pi, err := cl.QueryPathInfo(*path)
		if err != nil {
			return err
		}
		if pi == nil {
			return fmt.Errorf("%s: not valid", *path)
		}
		got := hex.EncodeToString(h.Sum(nil))
		want := strings.TrimPrefix(pi.NarHash, "sha256:")
		if got != want || uint64(n) != pi.NarSize {
			return fmt.Errorf("%s: NAR sha256 %s, %d bytes; daemon says %s, %d bytes", *path, got, n, pi.NarHash, pi.NarSize)
		}
	}
	fmt.Printf("bytes=%d seconds=%.3f mbps=%.1f\n", n, elapsed, float64(n)/elapsed/1e6)
	return nil
}

func infos(args []string) error {
	fs := flag.NewFlagSet("infos", flag.ExitOnError)
	socket := fs.String("socket", "", "daemon socket")
	pathsFile := fs.String("paths", "", "file of full store paths, one per line")
	fs.Parse(args)
	if *socket == "" || *pathsFile == "" {
		return errors.New("need -socket and -paths")
	}
	paths, err := readPaths(*pathsFile)
	if err != nil {
		return err
	}
	slices.Sort(paths)
	cl, err := proto.Dial(*socket)
	if err != nil {
		return err
	}
	defer cl.Close()
	out := bufio.NewWriter(os.Stdout)
	for _, p := range paths {
		pi, err := cl.QueryPathInfo(p)
		if err != nil {
			return err
		}
		if pi == nil {
			fmt.Fprintf(out, "%s\tINVALID\n", p)
			continue
		}
		refs := slices.Sorted(slices.Values(pi.References))
		sigs := slices.Sorted(slices.Values(pi.Sigs))
		fmt.Fprintf(out, "%s\tnarHash=%s\tnarSize=%d\trefs=%s\tderiver=%s\tca=%s\tultimate=%t\tsigs=%s\n",
			p, pi.NarHash, pi.NarSize, strings.Join(refs, ","), pi.Deriver, pi.CA, pi.Ultimate, strings.Join(sigs, ","))
	}
	return out.Flush()
}

func nars(args []string) error {
	fs := flag.NewFlagSet("nars", flag.ExitOnError)
	socket := fs.String("socket", "", "daemon socket")
	pathsFile := fs.String("paths", "", "file of full store paths, one per line, in the order to fetch them")
	check := fs.Bool("check", false, "hash every NAR and compare it with QueryPathInfo (not for timing)")
	timesFile := fs.String("times", "", "write each path's NAR size and seconds to this file (where the time goes)")
	fs.Parse(args)
	if *socket == "" || *pathsFile == "" {
		return errors.New("need -socket and -paths")
	}
	paths, err := readPaths(*pathsFile)
	if err != nil {
		return err
	}
	var times *bufio.Writer
	if *timesFile != "" {
		f, err := os.Create(*timesFile)
		if err != nil {
			return err
		}
		defer f.Close()
		times = bufio.NewWriter(f)
		defer times.Flush()
	}
	cl, err := proto.Dial(*socket)
	if err != nil {
		return err
	}
	defer cl.Close()
	var total int64
	t0 := time.Now()
	for _, p := range paths {
		if !*check {
			t1 := time.Now()
			n, err := cl.NarFromPath(p, io.Discard)
			if err != nil {
				return fmt.Errorf("%s: %w", p, err)
			}
			total += n
			if times != nil {
				fmt.Fprintf(times, "%s %d %.6f\n", p, n, time.Since(t1).Seconds())
			}
			continue
		}
		h := sha256.New()
		n, err := cl.NarFromPath(p, h)
		if err != nil {
			return fmt.Errorf("%s: %w", p, err)
		}
		total += n
		pi, err := cl.QueryPathInfo(p)
		if err != nil {
			return err
		}
		if pi == nil {
			return fmt.Errorf("%s: not valid", p)
		}
		got := hex.EncodeToString(h.Sum(nil))
		if want := strings.TrimPrefix(pi.NarHash, "sha256:"); got != want || uint64(n) != pi.NarSize {
			return fmt.Errorf("%s: NAR sha256 %s, %d bytes; daemon says %s, %d bytes", p, got, n, pi.NarHash, pi.NarSize)
		}
	}
	elapsed := time.Since(t0).Seconds()
	fmt.Printf("paths=%d bytes=%d seconds=%.3f mbps=%.1f pps=%.1f\n", len(paths), total, elapsed,
		float64(total)/elapsed/1e6, float64(len(paths))/elapsed)
	return nil
}
