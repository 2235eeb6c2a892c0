package tests

import (
	"crypto/ed25519"
	"encoding/base64"
	"encoding/json"
	"io"
	"net"
	"net/http"
	"net/http/httptest"
	"os"
	"path/filepath"
	"regexp"
	"slices"
	"strconv"
	"strings"
	"sync"
	"sync/atomic"
	"testing"
	"time"

	"github.com/casnix/casnix/tests/nixtest"
)

// lieNarinfo rewrites the narinfo of path in the cache dir: change edits its fields
// (References as space-separated basenames, as the file has them), and the result is
// signed anew with the secret key in keyFile (Nix's format), so the lie carries a valid
// signature by a trusted key and only the bytes can give it away.
func lieNarinfo(t *testing.T, dir, path, keyFile string, change func(fields map[string]string)) {
	t.Helper()
	file := filepath.Join(dir, strings.TrimPrefix(path, nixtest.StoreDir+"/")[:32]+".narinfo")
	data, err := os.ReadFile(file)
	if err != nil {
		t.Fatal(err)
	}
	var keys []string
	fields := map[string]string{}
	for line := range strings.SplitSeq(strings.TrimSpace(string(data)), "\n") {
		k, v, _ := strings.Cut(line, ": ")
		if k == "Sig" {
			continue
		}
		keys = append(keys, k)
		fields[k] = v
	}
	change(fields)
	secret, err := os.ReadFile(keyFile)
	if err != nil {
		t.Fatal(err)
	}
	name, b64, _ := strings.Cut(strings.TrimSpace(string(secret)), ":")
	priv, err := base64.StdEncoding.DecodeString(b64)
	if err != nil || len(priv) != ed25519.PrivateKeySize {
		t.Fatalf("secret key %s: %v", keyFile, err)
	}
	var refs []string
	for _, r := range strings.Fields(fields["References"]) {
		refs = append(refs, nixtest.StoreDir+"/"+r)
	}
	slices.Sort(refs)
	fingerprint := "1;" + fields["StorePath"] + ";" + fields["NarHash"] + ";" + fields["NarSize"] + ";" + strings.Join(refs, ",")
	var b strings.Builder
	for _, k := range keys {
		b.WriteString(k + ": " + fields[k] + "\n")
	}
	b.WriteString("Sig: " + name + ":" + base64.StdEncoding.EncodeToString(ed25519.Sign(ed25519.PrivateKey(priv), []byte(fingerprint))) + "\n")
	if err := os.WriteFile(file, []byte(b.String()), 0o644); err != nil {
		t.Fatal(err)
	}
}

// cutCache serves a cache directory with every NAR cut off half way: the connection is
// closed after half the Content-Length it announced, on every attempt.
func cutCache(dir string) http.Handler {
	files := http.FileServer(http.Dir(dir))
	return http.HandlerFunc(func(w http.ResponseWriter, r *http.Request) {
		if !strings.HasPrefix(r.URL.Path, "/nar/") {
			files.ServeHTTP(w, r)
			return
		}
		data, err := os.ReadFile(filepath.Join(dir, filepath.FromSlash(r.URL.Path)))
		if err != nil {
			http.NotFound(w, r)
			return
		}
		w.Header().Set("Content-Length", strconv.Itoa(len(data)))
		w.Write(data[:len(data)/2])
		w.(http.Flusher).Flush()
		if conn, _, err := w.(http.Hijacker).Hijack(); err == nil {
			conn.Close()
		}
	})
}

// hungNARCache serves a cache directory's nix-cache-info and narinfos, and answers no NAR
// request: it holds each until the client goes away. started is closed at the first.
type hungNARCache struct {
	files    http.Handler
	started  chan struct{}
	once     sync.Once
	attempts atomic.Int32
}

func (h *hungNARCache) ServeHTTP(w http.ResponseWriter, r *http.Request) {
	if !strings.HasPrefix(r.URL.Path, "/nar/") {
		h.files.ServeHTTP(w, r)
		return
	}
	h.attempts.Add(1)
	h.once.Do(func() { close(h.started) })
	<-r.Context().Done()
}

// silentUpstream accepts TCP connections and never answers anything; accepted is closed
// at the first connection.
type silentUpstream struct {
	ln       net.Listener
	accepted chan struct{}
	once     sync.Once
	conns    atomic.Int32
}

func newSilentUpstream(t *testing.T) *silentUpstream {
	ln, err := net.Listen("tcp", "127.0.0.1:0")
	if err != nil {
		t.Fatal(err)
	}
	s := &silentUpstream{ln: ln, accepted: make(chan struct{})}
	var held []net.Conn
	var mu sync.Mutex
	go func() {
		for {
			conn, err := ln.Accept()
			if err != nil {
				return
			}
			s.conns.Add(1)
			mu.Lock()
			held = append(held, conn)
			mu.Unlock()
			s.once.Do(func() { close(s.accepted) })
			go io.Copy(io.Discard, conn) // read the request, say nothing
		}
	}()
	t.Cleanup(func() {
		ln.Close()
		mu.Lock()
		defer mu.Unlock()
		for _, c := range held {
			c.Close()
		}
	})
	return s
}

func (s *silentUpstream) URL() string { return "http://" + s.ln.Addr().String() }

// badCase is one path an upstream lies about or fails to deliver, and what the client
// must be told about it.
type badCase struct {
	name string
	path string
	why  *regexp.Regexp // the reason casnix gives, beside the path's name
	hang bool           // its upstream hangs (only run with the last client)
}

// TestServeSubstitutersBadInput: upstreams that lie or fail, all binary caches written
// and signed by real Nix 2.8 (zstd and xz), behind `casnix serve --substituters` over an
// empty store. Narinfos re-signed with the trusted key claim a wrong NarHash, a NarSize
// too big and one too small, and a reference no upstream has; another upstream cuts
// every NAR off half way, on every attempt. With each real client (Nix 2.8, 2.26, 2.34),
// `nix-store -r` of each such path fails with an error naming the path and why, the path
// is not valid (nix path-info through the daemon, casnix path-info after), and a good
// path from a good upstream is fetched. With Nix 2.34 also: an upstream that answers its
// narinfo but never a byte of the NAR (given up after --substituter-timeout and its
// retries), and one that accepts connections and never answers at all (skipped after
// its nix-cache-info timeout, the error naming it); all bad paths are asked for at
// once, and a client fetching a good closure while both hung upstreams are still being
// waited for succeeds before either hung client is answered. After serve stops,
// `casnix verify` passes, casnix holds exactly the good closure, and its totals (paths,
// directories, blobs, chunks) are those of a store that only ever fetched that closure:
// nothing of the failed fetches stayed behind.
func TestServeSubstitutersBadInput(t *testing.T) {
	start := time.Now()
	f := nixtest.PopulateFixture(t)
	key, pub := cacheKey(t, f.Store, "upstream-1")
	tmp := t.TempDir()
	goodDir, liarDir, cutDir, hungDir := filepath.Join(tmp, "good"), filepath.Join(tmp, "liar"), filepath.Join(tmp, "cut"), filepath.Join(tmp, "hung")
	good := f.Path(t, "diamond-top")
	hashLie, sizeLie, shortLie, refsLie := f.Path(t, "big-file"), f.Path(t, "exe"), f.Path(t, "file"), f.Path(t, "empty-dir")
	cut, hungNAR, silent := f.Path(t, "random"), f.Path(t, "dangling"), f.Path(t, "empty-file")
	copyTo := func(dir, compression string, paths ...string) {
		f.Nix(t, append([]string{"copy", "--to", "file://" + dir + "?compression=" + compression + "&secret-key=" + key}, paths...)...)
	}
	copyTo(goodDir, "xz", good)
	copyTo(liarDir, "zstd", hashLie, sizeLie, shortLie, refsLie)
	copyTo(cutDir, "zstd", cut)
	copyTo(hungDir, "xz", hungNAR)
	missing := nixtest.StoreDir + "/00000000000000000000000000000000-missing-dependency"
	lieNarinfo(t, liarDir, hashLie, key, func(fl map[string]string) {
		h := []byte(fl["NarHash"])
		h[len(h)-5] = map[bool]byte{true: '1', false: '0'}[h[len(h)-5] == '0']
		fl["NarHash"] = string(h)
	})
	lieNarinfo(t, liarDir, sizeLie, key, func(fl map[string]string) {
		n, _ := strconv.Atoi(fl["NarSize"])
		fl["NarSize"] = strconv.Itoa(n + 8)
	})
	lieNarinfo(t, liarDir, shortLie, key, func(fl map[string]string) {
		n, _ := strconv.Atoi(fl["NarSize"])
		fl["NarSize"] = strconv.Itoa(n - 8)
	})
	lieNarinfo(t, liarDir, refsLie, key, func(fl map[string]string) {
		fl["References"] = strings.TrimSpace(fl["References"] + " " + strings.TrimPrefix(missing, nixtest.StoreDir+"/"))
	})
	goodClosure := f.Closure(t, good)
	cases := []badCase{
		{"NarHash", hashLie, regexp.MustCompile(`NAR hash mismatch: got sha256:\w+, expected sha256:\w+`), false},
		{"NarSize too big", sizeLie, regexp.MustCompile(`NAR size mismatch: got \d+ bytes, expected \d+`), false},
		{"NarSize too small", shortLie, regexp.MustCompile(`NAR longer than its narinfo says \(NarSize \d+\)`), false},
		{"References", refsLie, regexp.MustCompile(`a reference failed.*` + regexp.QuoteMeta(strings.TrimPrefix(missing, nixtest.StoreDir+"/")) + `: no substituter has it`), false},
		{"cut off", cut, regexp.MustCompile(`truncated .*\(the download broke off: GET \S+: unexpected EOF\)`), false},
		{"no NAR", hungNAR, regexp.MustCompile(`\.nar\.xz: no answer in 8s`), true},
		{"silent", silent, regexp.MustCompile(`no substituter has it \(skipped as down: http://127\.0\.0\.1:\d+/nix-cache-info: no answer within 8s\)`), true},
	}
	t.Logf("fixture and caches ready in %s", time.Since(start).Round(time.Millisecond))

	// The reference totals: a store that fetched the good closure and nothing else.
	ref := nixtest.NewCasnix(t)
	ref.Run(t, "import", "--from", "file://"+goodDir, "--trusted-public-keys", pub, good)
	wantInfo := casnixInfo(t, ref)

	for i, suite := range nixtest.ClientSuites {
		withHung := i == len(nixtest.ClientSuites)-1
		t.Run(suite, func(t *testing.T) {
			t0 := time.Now()
			goodSrv := httptest.NewServer(http.FileServer(http.Dir(goodDir)))
			defer goodSrv.Close()
			liarSrv := httptest.NewServer(http.FileServer(http.Dir(liarDir)))
			defer liarSrv.Close()
			cutSrv := httptest.NewServer(cutCache(cutDir))
			defer cutSrv.Close()
			args := []string{"--trusted-public-keys", pub, "--substituter-timeout", "8s",
				"--substituters", goodSrv.URL + "?priority=10", "--substituters", liarSrv.URL + "?priority=20",
				"--substituters", cutSrv.URL + "?priority=30"}
			hung := &hungNARCache{files: http.FileServer(http.Dir(hungDir)), started: make(chan struct{})}
			var quiet *silentUpstream
			if withHung {
				hungSrv := httptest.NewServer(hung)
				defer hungSrv.Close()
				quiet = newSilentUpstream(t)
				args = append(args, "--substituters", hungSrv.URL+"?priority=40", "--substituters", quiet.URL()+"?priority=50")
			}
			var ups []string // the client's substituters setting: every upstream
			for i, a := range args {
				if i > 0 && args[i-1] == "--substituters" {
					ups = append(ups, a)
				}
			}
			cas := nixtest.NewCasnix(t)
			sockDir := t.TempDir()
			d := cas.Serve(t, filepath.Join(sockDir, "casnix.sock"), args...)
			c := nixtest.RequireNixClient(t, suite).Bind(sockDir).UseSubstituters(ups...)
			t.Logf("Nix %s", c.Version(t))

			// Every bad path at once, each by a client of its own.
			results := make([]*nixtest.Result, len(cases))
			done := make([]chan struct{}, len(cases))
			var wg sync.WaitGroup
			for j, bc := range cases {
				done[j] = make(chan struct{})
				if bc.hang && !withHung {
					close(done[j])
					continue
				}
				wg.Go(func() {
					defer close(done[j])
					results[j] = c.Try("nix-store", "--store", d.URL(), "-r", bc.path)
				})
			}
			// A good closure, fetched while the hung upstreams are being waited for (or
			// beside the others), must not wait for them.
			if withHung {
				// Both hung upstreams hold a request of their client's (or that client
				// gave up first, which the checks below report).
				for _, ev := range []struct {
					what string
					ch   chan struct{}
					done chan struct{}
				}{{"the NAR request", hung.started, done[caseIndex(cases, hungNAR)]}, {"a connection", quiet.accepted, done[caseIndex(cases, silent)]}} {
					select {
					case <-ev.ch:
					case <-ev.done:
					case <-time.After(2 * time.Minute):
						t.Fatalf("no hung upstream got %s in 2 minutes", ev.what)
					}
				}
			}
			r := c.Try("nix-store", "--store", d.URL(), "-r", good)
			if !r.OK() || strings.TrimSpace(string(r.Stdout)) != good {
				t.Errorf("nix-store -r of a good path beside the bad ones:\n%s", r)
			}
			// (The validity check of the bad paths below, on a path that is valid.)
			if r := c.Try("nix", "path-info", "--store", d.URL(), "--offline", good); !r.OK() {
				t.Errorf("nix path-info of the good path:\n%s", r)
			}
			t.Logf("good closure fetched in %s", r.Duration.Round(time.Millisecond))
			for j, bc := range cases {
				if !bc.hang || !withHung {
					continue
				}
				select {
				case <-done[j]:
					t.Errorf("%s: the client of %s was answered before the good client (%s): the good client waited for a hung upstream", bc.name, bc.path, r.Duration)
				default:
				}
			}
			wg.Wait()

			for j, bc := range cases {
				r := results[j]
				if r == nil {
					continue
				}
				msg := nixtest.StripNixNoise(r.Stderr)
				line := errorLine(msg, bc.path, bc.why)
				if r.OK() || r.Err != nil || line == "" {
					t.Errorf("%s: nix-store -r %s must fail with an error naming the path and %q:\n%s", bc.name, bc.path, bc.why, r)
					continue
				}
				t.Logf("%s (%s): %s", bc.name, r.Duration.Round(time.Millisecond), line)
				if r := c.Try("nix", "path-info", "--store", d.URL(), "--offline", bc.path); r.OK() {
					t.Errorf("%s: %s is valid after its failed substitution:\n%s", bc.name, bc.path, r)
				}
			}
			if withHung {
				// Tried, retried, given up: 1 + 3 retries of the NAR.
				if n := hung.attempts.Load(); n != 4 {
					t.Errorf("the hung NAR was asked %d times, want 4", n)
				}
			}

			if d.Exited() {
				t.Fatalf("casnix serve exited:\n%s", d.Output())
			}
			if err := d.Stop(30 * time.Second); err != nil {
				t.Errorf("casnix serve: %v\n%s", err, d.Output())
			}
			checkServeLog(t, d)
			valid := cas.ValidPaths(t, f.AllPaths(t))
			var names []string
			for p := range valid {
				names = append(names, p)
			}
			slices.Sort(names)
			if !slices.Equal(names, goodClosure) {
				t.Errorf("casnix holds %v, want only the good closure %v", names, goodClosure)
			}
			if r := cas.Try("verify"); !r.OK() {
				t.Errorf("casnix verify:\n%s", r)
			}
			got := casnixInfo(t, cas)
			if got.storeTotals != wantInfo.storeTotals {
				t.Errorf("casnix totals %+v, want those of a store that only fetched the good closure: %+v", got.storeTotals, wantInfo.storeTotals)
			}
			// The failed fetches' bytes are dead bytes in the packs, for compaction.
			t.Logf("data dir: %d bytes on disk; a store that fetched only the good closure: %d", got.DiskBytes, wantInfo.DiskBytes)
			if left := leftovers(t, cas.DataDir); len(left) > 0 {
				t.Errorf("left in the data dir after serve stopped: %v", left)
			}
			t.Logf("%s done in %s", suite, time.Since(t0).Round(time.Millisecond))
		})
	}
}

// storeTotals are the counts of `casnix info --json` that name what the database holds.
type storeTotals struct {
	Paths       int64 `json:"paths"`
	NarBytes    int64 `json:"narBytes"`
	Blobs       int64 `json:"blobs"`
	BlobBytes   int64 `json:"blobBytes"`
	Chunks      int64 `json:"chunks"`
	ChunkBytes  int64 `json:"chunkBytes"`
	Directories int64 `json:"directories"`
}

// casnixTotals are storeTotals and the bytes the data dir takes.
type casnixTotals struct {
	storeTotals
	DiskBytes int64 `json:"diskBytes"`
}

func casnixInfo(t *testing.T, c *nixtest.Casnix) casnixTotals {
	t.Helper()
	var s casnixTotals
	if err := json.Unmarshal(c.Run(t, "info", "--json").Stdout, &s); err != nil {
		t.Fatal(err)
	}
	return s
}

// leftovers lists what a stopped casnix left in its data dir that only a running one
// should hold: temp roots, temporary files, restore or dry-run stages.
func leftovers(t *testing.T, dir string) []string {
	t.Helper()
	var out []string
	err := filepath.WalkDir(dir, func(p string, e os.DirEntry, err error) error {
		if err != nil {
			return err
		}
		rel, _ := filepath.Rel(dir, p)
		switch {
		case e.IsDir():
		case strings.HasPrefix(rel, "temproots"+string(filepath.Separator)), strings.HasSuffix(rel, ".tmp"),
			strings.HasPrefix(filepath.Base(rel), ".restore-"), strings.Contains(rel, "dry-run"):
			out = append(out, rel)
		}
		return nil
	})
	if err != nil {
		t.Fatal(err)
	}
	return out
}

// caseIndex is the index of the case of path.
func caseIndex(cases []badCase, path string) int {
	return slices.IndexFunc(cases, func(c badCase) bool { return c.path == path })
}

// errorLine returns the line of msg that names path and that re matches.
func errorLine(msg, path string, re *regexp.Regexp) string {
	for line := range strings.SplitSeq(msg, "\n") {
		if strings.HasPrefix(line, "error: ") && strings.Contains(line, path) && re.MatchString(line) {
			return strings.TrimSpace(line)
		}
	}
	return ""
}
