package binarycache

import (
	"bytes"
	"errors"
	"reflect"
	"strings"
	"testing"

	"github.com/nix-community/go-nix/pkg/narinfo"
)

const goodNarinfo = `StorePath: /nix/store/r2k7c37lbak6l7a4n3a4vra91dhddqcl-d
URL: nar/0kg674v3nq52cdpqldcyy6ia5n12gax3lgk3qbrf6i143fycnlxn.nar.xz
Compression: xz
FileHash: sha256:0kg674v3nq52cdpqldcyy6ia5n12gax3lgk3qbrf6i143fycnlxn
FileSize: 192
NarHash: sha256:0vmdcj0qdv418mvcsm4qal1yljads92rws41zfbblnblx2a84wgw
NarSize: 648
References: 32k8qgilpbm7j9irq6lgchi0bsmyx65r-chain-1 r2k7c37lbak6l7a4n3a4vra91dhddqcl-d
Deriver: d0hj8x28smps8366cwq4amjjxljxx4r6-chain-1.drv
Sig: k1:Kd1BivKDfWi3IXIp6zKzbwo85QOjxEIniK8EUvEgkskP/3mTy1rbNwZEl/iXUorHdGVagrM0JfHQ+FLStT2xAA==
CA: fixed:r:sha256:0vmdcj0qdv418mvcsm4qal1yljads92rws41zfbblnblx2a84wgw
`

func TestParseNarinfo(t *testing.T) {
	in, err := ParseNarinfo(strings.NewReader(goodNarinfo), "/nix/store")
	if err != nil {
		t.Fatal(err)
	}
	if in.Name != "r2k7c37lbak6l7a4n3a4vra91dhddqcl-d" || in.NarSize != 648 || in.FileSize != 192 || len(in.References) != 2 ||
		in.Compression != "xz" || len(in.Sigs) != 1 || in.Deriver != "d0hj8x28smps8366cwq4amjjxljxx4r6-chain-1.drv" {
		t.Errorf("parsed %+v", in)
	}
	// Format then parse gives the same.
	again, err := ParseNarinfo(bytes.NewReader(in.Format("/nix/store")), "/nix/store")
	if err != nil {
		t.Fatal(err)
	}
	if string(again.Format("/nix/store")) != string(in.Format("/nix/store")) || string(in.Format("/nix/store")) != goodNarinfo {
		t.Errorf("round trip:\n%s\nvs\n%s", in.Format("/nix/store"), goodNarinfo)
	}

	bad := []struct{ name, from, to, want string }{
		{"foreign store dir", "StorePath: /nix/store/", "StorePath: /gnu/store/", "outside the store directory"},
		{"path inside", "-d\nURL", "-d/bin\nURL", "StorePath"},
		{"absolute URL", "URL: nar/", "URL: /nar/", "plain relative path"},
		{"escaping URL", "URL: nar/", "URL: ../nar/", "plain relative path"},
		{"scheme URL", "URL: nar/", "URL: http://x/nar/", "plain relative path"},
		{"compression", "Compression: xz", "Compression: lz4", "unsupported compression"},
		{"md5 nar hash", "NarHash: sha256:0vmdcj0qdv418mvcsm4qal1yljads92rws41zfbblnblx2a84wgw", "NarHash: md5:00000000000000000000000000", "NarHash"},
		{"no nar hash", "NarHash: sha256:0vmdcj0qdv418mvcsm4qal1yljads92rws41zfbblnblx2a84wgw\n", "", "no NarHash"},
		{"zero size", "NarSize: 648", "NarSize: 0", "NarSize"},
		{"bad reference", "References: 32k8", "References: ../", "reference"},
		{"bad deriver", "Deriver: d0hj", "Deriver: /d0hj", "deriver"},
		{"unknown key", "CA:", "Foo:", "unknown key"},
		{"uncompressed size", "Compression: xz", "Compression: none", "FileSize"},
		// maxFileSize(648) = 1049386: no compression of 648 bytes makes more.
		{"file beyond any compression", "FileSize: 192", "FileSize: 1049387", "more than any compression"},
		{"huge file", "FileSize: 192", "FileSize: 1125899906842624", "FileSize"},
	}
	for _, tc := range bad {
		t.Run(tc.name, func(t *testing.T) {
			text := strings.Replace(goodNarinfo, tc.from, tc.to, 1)
			if text == goodNarinfo {
				t.Fatalf("%q not in the narinfo", tc.from)
			}
			_, err := ParseNarinfo(strings.NewReader(text), "/nix/store")
			if !errors.Is(err, ErrBadNarinfo) || !strings.Contains(err.Error(), tc.want) {
				t.Errorf("got %v, want ErrBadNarinfo mentioning %q", err, tc.want)
			}
		})
	}
	if in, err := ParseNarinfo(strings.NewReader(strings.Replace(goodNarinfo, "FileSize: 192", "FileSize: 1049386", 1)), "/nix/store"); err != nil || in.FileSize != 1049386 {
		t.Errorf("FileSize at the bound: %v", err)
	}
	if _, err := ParseNarinfo(strings.NewReader(strings.Repeat("References: \n", maxNarinfo/12)), "/nix/store"); err == nil {
		t.Error("oversized narinfo accepted")
	}
}

// FuzzNarinfo: parsing never panics, and what it accepts formats to text that parses to
// the same.
func FuzzNarinfo(f *testing.F) {
	f.Add(goodNarinfo)
	f.Add(strings.Replace(goodNarinfo, "Compression: xz\n", "", 1))
	f.Add("StorePath: /nix/store/r2k7c37lbak6l7a4n3a4vra91dhddqcl-d\nURL: nar/x.nar\nCompression: none\nNarHash: sha256:0vmdcj0qdv418mvcsm4qal1yljads92rws41zfbblnblx2a84wgw\nNarSize: 1\nReferences: \n")
	f.Add("StorePath: /gnu/store/x\n")
	f.Add("")
	f.Add("URL: a: b\n")
	f.Fuzz(func(t *testing.T, s string) {
		in, err := ParseNarinfo(strings.NewReader(s), "/nix/store")
		if err != nil {
			return
		}
		text := in.Format("/nix/store")
		again, err := ParseNarinfo(bytes.NewReader(text), "/nix/store")
		if err != nil {
			t.Fatalf("formatted narinfo does not parse: %v\n%s", err, text)
		}
		if !bytes.Equal(again.Format("/nix/store"), text) {
			t.Fatalf("format is not stable:\n%s\nvs\n%s", text, again.Format("/nix/store"))
		}
	})
}

func TestParseRange(t *testing.T) {
	for _, tc := range []struct {
		h    string
		a, b int64
		ok   bool
	}{
		{"bytes=0-9", 0, 9, true},
		{"bytes=10-", 10, 99, true},
		{"bytes=-5", 95, 99, true},
		{"bytes=90-200", 90, 99, true},
		{"bytes=100-", 0, 0, false},
		{"bytes=5-1", 0, 0, false},
		{"bytes=0-1,3-4", 0, 0, false},
		{"items=0-1", 0, 0, false},
		{"bytes=-0", 0, 0, false},
	} {
		a, b, ok := parseRange(tc.h, 100)
		if ok != tc.ok || (ok && (a != tc.a || b != tc.b)) {
			t.Errorf("%s: got %d-%d %v, want %d-%d %v", tc.h, a, b, ok, tc.a, tc.b, tc.ok)
		}
	}
}

func TestCAVerified(t *testing.T) {
	// A path `nix-store --add` made (Nix 2.8): its name follows from its NAR hash.
	in, err := ParseNarinfo(strings.NewReader(goodNarinfo), "/nix/store")
	if err != nil {
		t.Fatal(err)
	}
	in.References = nil
	if !CAVerified("/nix/store", in) {
		t.Error("a genuine fixed:r:sha256 path was not verified")
	}
	// A flat content address (nix-store --add-fixed sha256, made by Nix 2.8) proves its
	// name too; its contents are checked at ingest.
	flat := *in
	flat.Name, flat.CA = "1p9q0bz6f22dyxh4lw8xs08p4201vyq4-f", "fixed:sha256:00xyyr3fi8l6hb839bv3f7yb86yjv7xi1cgh1xnhipym4asvb4aq"
	if !CAVerified("/nix/store", &flat) {
		t.Error("a genuine flat fixed:sha256 path was not verified")
	}
	for name, change := range map[string]func(*Info){
		"other name":      func(in *Info) { in.Name = "r2k7c37lbak6l7a4n3a4vra91dhddqcl-e" },
		"added reference": func(in *Info) { in.References = []string{"32k8qgilpbm7j9irq6lgchi0bsmyx65r-chain-1"} },
		"other NAR hash":  func(in *Info) { in.NarHash[0] ^= 1 },
		"flat, same hash": func(in *Info) { in.CA = strings.Replace(in.CA, "fixed:r:", "fixed:", 1) },
		"unparseable CA":  func(in *Info) { in.CA = "fixed:r:sha256:xyz" },
		"no CA":           func(in *Info) { in.CA = "" },
	} {
		c := *in
		change(&c)
		if CAVerified("/nix/store", &c) {
			t.Errorf("%s: verified", name)
		}
	}
}

// FuzzNarinfoText: parseNarinfoText accepts what go-nix's narinfo.Parse
// accepts, and parses it to the same fields.
func FuzzNarinfoText(f *testing.F) {
	f.Add(goodNarinfo)
	f.Add(strings.ReplaceAll(goodNarinfo, "\n", "\r\n"))
	f.Add(strings.TrimSuffix(goodNarinfo, "\n") + "\r")
	f.Add("StorePath: a\n\n\nURL: b")
	f.Add("URL: a: b\n")
	f.Add("URL:: a\n")
	f.Add("Sig: k:AAAA\n")
	f.Add("Deriver: unknown-deriver\nReferences: \nReferences: a b\n")
	f.Add("Unknown: x\n")
	f.Add("NarSize: -1\n")
	f.Fuzz(func(t *testing.T, s string) {
		if len(s) > 64<<10 {
			return // go-nix's scanner refuses lines over 1 MiB; ours reads at most that
		}
		want, werr := narinfo.Parse(strings.NewReader(s))
		got, gerr := parseNarinfoText([]byte(s))
		if (werr == nil) != (gerr == nil) {
			t.Fatalf("go-nix: %v, ours: %v", werr, gerr)
		}
		if werr == nil && !reflect.DeepEqual(got, want) {
			t.Fatalf("go-nix: %+v\nours: %+v", want, got)
		}
	})
}
