package tests

import (
	"net/http"
	"net/http/httptest"
	"os"
	"path/filepath"
	"regexp"
	"strconv"
	"strings"
	"sync/atomic"
	"testing"

	"github.com/casnix/casnix/tests/nixtest"
)

// TestCacheImportBadInput: a cache with one bad path in a chain (chain4 → chain3 → chain2
// → chain1, chain2 broken) fails the import with a clear error and leaves chain2 and what
// refers to it invalid; --keep-going imports chain1 still.
func TestCacheImportBadInput(t *testing.T) {
	f := nixtest.PopulateFixture(t)
	key, pub := cacheKey(t, f.Store, "casnix-bad-1")
	chain := []string{f.Path(t, "chain1"), f.Path(t, "chain2"), f.Path(t, "chain3"), f.Path(t, "chain4")}
	f.Sign(t, key, chain...)
	base := filepath.Join(t.TempDir(), "base")
	f.Nix(t, "copy", "--to", "file://"+base+"?compression=zstd", chain[3])
	hash2 := strings.TrimPrefix(chain[1], nixtest.StoreDir+"/")[:32]
	hash1 := strings.TrimPrefix(chain[0], nixtest.StoreDir+"/")[:32]
	narinfo := func(dir, hash string) string {
		b, err := os.ReadFile(filepath.Join(dir, hash+".narinfo"))
		if err != nil {
			t.Fatal(err)
		}
		return string(b)
	}
	field := func(ni, key string) string {
		m := regexp.MustCompile("(?m)^" + key + ": (.*)$").FindStringSubmatch(ni)
		if m == nil {
			t.Fatalf("no %s in narinfo:\n%s", key, ni)
		}
		return m[1]
	}
	nar2 := "/" + field(narinfo(base, hash2), "URL")
	// edit rewrites chain2's narinfo.
	edit := func(fn func(ni string) string) func(string) {
		return func(dir string) {
			p := filepath.Join(dir, hash2+".narinfo")
			if err := os.WriteFile(p, []byte(fn(narinfo(dir, hash2))), 0o644); err != nil {
				t.Fatal(err)
			}
		}
	}
	replaceField := func(key, val string) func(string) {
		return edit(func(ni string) string {
			return regexp.MustCompile("(?m)^"+key+": .*$").ReplaceAllLiteralString(ni, key+": "+val)
		})
	}
	cases := []struct {
		name    string
		mutate  func(dir string)
		handler func(dir string, next http.Handler) http.Handler
		want    string // in the error
		noKeys  bool   // import with --no-check-sigs instead of --trusted-public-keys
		extra   bool   // with --keep-going, name chain1 too: the bad narinfo hides its references
	}{
		{name: "nar hash mismatch", mutate: replaceField("NarHash", "sha256:"+strings.Repeat("0", 51)+"1"), want: "NAR hash mismatch", noKeys: true},
		{name: "bad signature", mutate: func(dir string) {
			replaceField("Sig", field(narinfo(dir, hash1), "Sig"))(dir)
		}, want: "no valid signature by a trusted key"},
		{name: "unsigned", mutate: edit(func(ni string) string {
			return regexp.MustCompile("(?m)^Sig: .*\n").ReplaceAllString(ni, "")
		}), want: "not signed"},
		{name: "outside store dir", mutate: replaceField("StorePath", "/gnu/store/"+filepath.Base(chain[1])), want: "outside the store directory /nix/store", extra: true},
		{name: "truncated download", handler: func(dir string, next http.Handler) http.Handler {
			return http.HandlerFunc(func(w http.ResponseWriter, r *http.Request) {
				if r.URL.Path != nar2 {
					next.ServeHTTP(w, r)
					return
				}
				b, err := os.ReadFile(filepath.Join(dir, nar2))
				if err != nil {
					t.Error(err)
				}
				w.Header().Set("Content-Length", strconv.Itoa(len(b)))
				w.Write(b[:len(b)/2])
			})
		}, want: "unexpected EOF"},
		{name: "http 500", handler: func(dir string, next http.Handler) http.Handler {
			return http.HandlerFunc(func(w http.ResponseWriter, r *http.Request) {
				if r.URL.Path == nar2 {
					http.Error(w, "boom", http.StatusInternalServerError)
					return
				}
				next.ServeHTTP(w, r)
			})
		}, want: "500 Internal Server Error"},
	}
	run := func(t *testing.T, url string, keepGoing, noKeys, extra bool, want string) {
		c := nixtest.NewCasnix(t)
		args := []string{"import", "--from", url, "--retries", "1"}
		if noKeys {
			args = append(args, "--no-check-sigs")
		} else {
			args = append(args, "--trusted-public-keys", pub)
		}
		args = append(args, chain[3])
		if keepGoing && extra {
			args = append(args, chain[0])
		}
		if keepGoing {
			args = append(args, "--keep-going")
		}
		r := c.Try(args...)
		if r.OK() {
			t.Fatalf("import succeeded:\n%s", r)
		}
		if !strings.Contains(string(r.Stderr), want) || !strings.Contains(string(r.Stderr), filepath.Base(chain[1])) {
			t.Errorf("error does not say %q about %s:\n%s", want, chain[1], r.Stderr)
		}
		valid := c.ValidPaths(t, chain)
		for _, p := range chain[1:] {
			if _, ok := valid[p]; ok {
				t.Errorf("%s is valid after the failed import", p)
			}
		}
		if _, ok := valid[chain[0]]; keepGoing && !ok {
			t.Errorf("--keep-going: %s (fine in the cache) was not imported", chain[0])
		}
		if keepGoing && !strings.Contains(string(r.Stderr), "a reference failed") {
			t.Errorf("--keep-going: referrers of the bad path not reported:\n%s", r.Stderr)
		}
		c.Run(t, "verify")
	}
	for _, tc := range cases {
		t.Run(tc.name, func(t *testing.T) {
			dir := filepath.Join(t.TempDir(), "cache")
			nixtest.Run(t, "cp", "-a", base, dir)
			if tc.mutate != nil {
				tc.mutate(dir)
			}
			url := "file://" + dir
			if tc.handler != nil {
				hs := httptest.NewServer(tc.handler(dir, http.FileServer(http.Dir(dir))))
				t.Cleanup(hs.Close)
				url = hs.URL
			}
			t.Run("fail", func(t *testing.T) { run(t, url, false, tc.noKeys, tc.extra, tc.want) })
			t.Run("keep-going", func(t *testing.T) { run(t, url, true, tc.noKeys, tc.extra, tc.want) })
		})
	}

	// A server error on the first try only: the retry imports everything.
	var fails atomic.Int32
	hs := httptest.NewServer(http.HandlerFunc(func(w http.ResponseWriter, r *http.Request) {
		if r.URL.Path == nar2 && fails.Add(1) == 1 {
			http.Error(w, "try again", http.StatusServiceUnavailable)
			return
		}
		http.FileServer(http.Dir(base)).ServeHTTP(w, r)
	}))
	defer hs.Close()
	c := nixtest.NewCasnix(t)
	c.Run(t, "import", "--from", hs.URL, "--trusted-public-keys", pub, chain[3])
	if got := c.ValidPaths(t, chain); len(got) != len(chain) || fails.Load() != 2 {
		t.Errorf("after a retried 503: %d of %d paths valid, %d requests of chain2's NAR", len(got), len(chain), fails.Load())
	}
}
