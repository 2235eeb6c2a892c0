package store

import (
	"crypto/sha256"
	"strings"
	"testing"
)

// The vectors were made with Nix 2.8: nix store add-file / add-path,
// nix-store --add-fixed [--recursive] and builtins.toFile.
func TestCAPath(t *testing.T) {
	hello := sha256.Sum256([]byte("hello"))
	const t1 = "vqpn17r03lqabwk0wksgpbgy620zwfd4-t"
	see := sha256.Sum256([]byte("see /nix/store/" + t1))
	cases := []struct {
		ca, name string
		refs     []string
		want     string
	}{
		{"fixed:sha256:00xyyr3fi8l6hb839bv3f7yb86yjv7xi1cgh1xnhipym4asvb4aq", "f", nil, "1p9q0bz6f22dyxh4lw8xs08p4201vyq4-f"},
		{"fixed:sha256:00xyyr3fi8l6hb839bv3f7yb86yjv7xi1cgh1xnhipym4asvb4aq", "sha1file", nil, "cn92sy8q9liw9wrv1wixy491jl3dx20f-sha1file"},
		{"fixed:r:sha256:05mnqf7wpq75lyhg1zf8y5vkkj28wjppyjmbxcfczqprn1102niz", "d", nil, "i13kz2gysik8acx94qnn0iz68iavj7d7-d"},
		{"fixed:sha1:iwjz551fyw0cxcjgf4l6c879zabd6wpm", "f", nil, "pbqmppvgnnyqxagz7bnmwfdfvr3h43f2-f"},
		{"fixed:r:sha512:2rbmj1wj40ppjawc1bbl5dwz9i2vh7yhhga7za54vg469p4aysl70shf936p5y20s4yn90ppgphi7m3v2mp0pj8mwfq5l3l1s5w7ffv", "d", nil, "qjgn7wwxaa2ihrfqbhhkx7ncifq9hp3k-d"},
		{"text:sha256:" + NixBase32(hello[:]), "t", nil, t1},
		{"text:sha256:" + NixBase32(see[:]), "t2", []string{t1}, "aa9v1s45k4l7wrfxas55l7fp8wq4ing9-t2"},
	}
	for _, c := range cases {
		ca, err := ParseCA(c.ca)
		if err != nil {
			t.Errorf("%s: %v", c.ca, err)
			continue
		}
		if ca.String() != c.ca {
			t.Errorf("%s: String() = %s", c.ca, ca.String())
		}
		got, err := ca.Path("/nix/store", c.name, c.refs, false)
		if err != nil || got != c.want {
			t.Errorf("%s %s: Path = %q, %v; want %q", c.ca, c.name, got, err, c.want)
		}
	}
	for _, bad := range []string{"", "fixed:sha256", "fixed:sha256:abc", "fixed:git:sha1:iwjz551fyw0cxcjgf4l6c879zabd6wpm",
		"text:sha1:iwjz551fyw0cxcjgf4l6c879zabd6wpm", "fixed:blake3:00", "fixed:sha256:" + strings.Repeat("0", 44), "other:sha256:00xyyr3fi8l6hb839bv3f7yb86yjv7xi1cgh1xnhipym4asvb4aq"} {
		if _, err := ParseCA(bad); err == nil {
			t.Errorf("ParseCA(%q) accepted", bad)
		}
	}
	flat, _ := ParseCA("fixed:sha1:iwjz551fyw0cxcjgf4l6c879zabd6wpm")
	if _, err := flat.Path("/nix/store", "f", []string{t1}, false); err == nil {
		t.Error("flat path with references accepted")
	}
}

func FuzzParseCA(f *testing.F) {
	for _, s := range []string{"fixed:sha256:00xyyr3fi8l6hb839bv3f7yb86yjv7xi1cgh1xnhipym4asvb4aq", "text:sha256:abc", "fixed:r:sha1:iwjz551fyw0cxcjgf4l6c879zabd6wpm", "r:md5:0123456789abcdef0123456789abcdef"} {
		f.Add(s)
	}
	f.Fuzz(func(t *testing.T, s string) {
		ca, err := ParseCA(s)
		if err != nil {
			return
		}
		again, err := ParseCA(ca.String())
		if err != nil || again.String() != ca.String() {
			t.Fatalf("%q: round trip %q: %v", s, ca.String(), err)
		}
		_, _ = ca.Path("/nix/store", "x", nil, false)
	})
}
