// Command cachebench measures HTTP binary cache serving for bench/cache.sh:
// a static file server as the anchor, and a client that downloads NARs the
// way Nix substitutes them.
//
//	cachebench serve -dir DIR -addr ADDR
//	cachebench proxy -to URL -addr ADDR
//	cachebench get   -base URL -hashes FILE [-clients N]
//
// serve serves DIR (a `nix copy --to file://` cache) with net/http's file
// server, which sends files with sendfile.
//
// proxy is a plain streaming reverse proxy in front of URL (net/http/httputil:
// each request forwarded, each body copied through as it arrives; no disk, no
// cache, no checks): for bench/subst.sh, what only relaying between a
// client and its upstream costs.
//
// get reads narinfo hash parts from FILE (one per line); N workers take them
// in turn, fetch the narinfo, fetch the file its URL names, decompress it
// (zstd, or none) and hash the NAR with SHA-256, checking it against NarHash,
// as Nix does when it substitutes. It prints
// "clients=N paths=P nar_bytes=B seconds=S mbps=X" (MB = 10^6 bytes of NAR).
package main

import (
	"bufio"
	"crypto/sha256"
	"errors"
	"flag"
	"fmt"
	"io"
	"net/http"
	"net/http/httputil"
	"net/url"
	"os"
	"strings"
	"sync"
	"sync/atomic"
	"time"

	"github.com/klauspost/compress/zstd"

	"github.com/casnix/casnix/binarycache"
	"github.com/casnix/casnix/store"
)

func main() {
	if len(os.Args) < 2 {
		fmt.Fprintln(os.Stderr, "usage: cachebench serve|proxy|get …")
		os.Exit(2)
	}
	var err error
	switch os.Args[1] {
	case "serve":
		fs := flag.NewFlagSet("serve", flag.ExitOnError)
		dir := fs.String("dir", "", "cache directory")
		addr := fs.String("addr", "127.0.0.1:0", "listen address")
		fs.Parse(os.Args[2:])
		err = http.ListenAndServe(*addr, http.FileServer(http.Dir(*dir)))
	case "proxy":
		fs := flag.NewFlagSet("proxy", flag.ExitOnError)
		to := fs.String("to", "", "upstream URL")
		addr := fs.String("addr", "127.0.0.1:0", "listen address")
		fs.Parse(os.Args[2:])
		var u *url.URL
		if u, err = url.Parse(*to); err == nil {
			p := httputil.NewSingleHostReverseProxy(u)
			tr := http.DefaultTransport.(*http.Transport).Clone()
			// As many idle upstream connections as a client keeps open (Nix's
			// http-connections is 25): none is closed and opened again.
			tr.MaxIdleConnsPerHost = 64
			p.Transport = tr
			err = http.ListenAndServe(*addr, p)
		}
	case "get":
		fs := flag.NewFlagSet("get", flag.ExitOnError)
		base := fs.String("base", "", "cache URL")
		hashes := fs.String("hashes", "", "file of narinfo hash parts")
		clients := fs.Int("clients", 1, "concurrent downloads")
		fs.Parse(os.Args[2:])
		err = get(*base, *hashes, *clients)
	default:
		err = fmt.Errorf("unknown command %q", os.Args[1])
	}
	if err != nil {
		fmt.Fprintln(os.Stderr, "cachebench:", err)
		os.Exit(1)
	}
}

func get(base, hashFile string, clients int) error {
	data, err := os.ReadFile(hashFile)
	if err != nil {
		return err
	}
	hashes := strings.Fields(string(data))
	tr := http.DefaultTransport.(*http.Transport).Clone()
	tr.MaxIdleConnsPerHost = clients
	tr.DisableCompression = true
	client := &http.Client{Transport: tr}
	var (
		next     atomic.Int64
		narBytes atomic.Int64
		firstErr error
		mu       sync.Mutex
		wg       sync.WaitGroup
	)
	start := time.Now()
	for range clients {
		wg.Go(func() {
			dec, _ := zstd.NewReader(nil, zstd.WithDecoderConcurrency(1))
			defer dec.Close()
			for {
				i := int(next.Add(1)) - 1
				if i >= len(hashes) {
					return
				}
				n, err := fetch(client, dec, base, hashes[i])
				if err != nil {
					mu.Lock()
					if firstErr == nil {
						firstErr = fmt.Errorf("%s: %w", hashes[i], err)
					}
					mu.Unlock()
					return
				}
				narBytes.Add(n)
			}
		})
	}
	wg.Wait()
	if firstErr != nil {
		return firstErr
	}
	el := time.Since(start).Seconds()
	fmt.Printf("clients=%d paths=%d nar_bytes=%d seconds=%.3f mbps=%.1f\n", clients, len(hashes), narBytes.Load(), el,
		float64(narBytes.Load())/1e6/el)
	return nil
}

func fetch(client *http.Client, dec *zstd.Decoder, base, hash string) (int64, error) {
	body, err := open(client, base+"/"+hash+".narinfo")
	if err != nil {
		return 0, err
	}
	in, err := binarycache.ParseNarinfo(body, "/nix/store")
	body.Close()
	if err != nil {
		return 0, err
	}
	if body, err = open(client, base+"/"+in.URL); err != nil {
		return 0, err
	}
	defer body.Close()
	var r io.Reader = bufio.NewReaderSize(body, 256<<10)
	switch in.Compression {
	case "zstd":
		if err := dec.Reset(r); err != nil {
			return 0, err
		}
		r = dec
	case "none":
	default:
		return 0, fmt.Errorf("compression %s not supported here", in.Compression)
	}
	h := sha256.New()
	n, err := io.Copy(h, r)
	if err != nil {
		return n, err
	}
	if n != in.NarSize || string(h.Sum(nil)) != string(in.NarHash[:]) {
		return n, fmt.Errorf("NAR mismatch: %d bytes sha256:%s, narinfo says %d bytes", n, store.NixBase32(h.Sum(nil)), in.NarSize)
	}
	return n, nil
}

func open(client *http.Client, url string) (io.ReadCloser, error) {
	resp, err := client.Get(url)
	if err != nil {
		return nil, err
	}
	if resp.StatusCode != http.StatusOK {
		resp.Body.Close()
		return nil, errors.New(url + ": " + resp.Status)
	}
	return resp.Body, nil
}
