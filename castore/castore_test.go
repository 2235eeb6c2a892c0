package castore

import (
	"bytes"
	"encoding/hex"
	"errors"
	"strings"
	"testing"

	"github.com/casnix/casnix/digest"
)

func mustHex(t testing.TB, s string) digest.Digest {
	t.Helper()
	d, err := digest.Parse(s)
	if err != nil {
		t.Fatal(err)
	}
	return d
}

// Reference values from ../shared/docs/castore.md (snix's test fixtures).
func TestReferenceDigests(t *testing.T) {
	empty := &Directory{}
	withKeep := &Directory{Files: []FileEntry{{Name: []byte(".keep"), Digest: digest.Empty}}}
	complicated := &Directory{
		Directories: []DirectoryEntry{{Name: []byte("keep"), Digest: withKeep.Digest(), Size: withKeep.Size()}},
		Files:       []FileEntry{{Name: []byte(".keep"), Digest: digest.Empty}},
		Symlinks:    []SymlinkEntry{{Name: []byte("aa"), Target: []byte("/nix/store/somewhereelse")}},
	}
	b := &Directory{Directories: []DirectoryEntry{{Name: []byte("a"), Digest: empty.Digest(), Size: empty.Size()}}}
	c := &Directory{Directories: []DirectoryEntry{
		{Name: []byte("a"), Digest: empty.Digest()},
		{Name: []byte("a'"), Digest: empty.Digest()},
	}}
	d := &Directory{Directories: []DirectoryEntry{
		{Name: []byte("a"), Digest: empty.Digest(), Size: empty.Size()},
		{Name: []byte("b"), Digest: b.Digest(), Size: b.Size()},
	}}
	bin := &Directory{Files: []FileEntry{{Name: []byte("bin"), Digest: digest.Sum([]byte("Hello World!")), Size: 12, Executable: true}}}

	tests := []struct {
		name   string
		dir    *Directory
		size   uint64
		digest string
		encHex string
	}{
		{"A empty", empty, 0, "af1349b9f5f9a1a6a0404dea36dcc9499bcb25c9adc112b7cc9a93cae41f3262", ""},
		{"WITH_KEEP", withKeep, 1, "8b5b5d642b646bb8ed504b0862c39413e87e57491497de7bd075953f7b83810e",
			"12290a052e6b6565701220af1349b9f5f9a1a6a0404dea36dcc9499bcb25c9adc112b7cc9a93cae41f3262"},
		{"COMPLICATED", complicated, 4, "3f951a15afd586fb3121ef4d13d582e811ce0e5a7f21c0497fd87490e9e2355a", ""},
		{"B", b, 1, "8701f4722d8dae7f2c40fa003331b8437a3825f9e1bfd3a77998c64cc226b9cc", ""},
		{"C", c, 2, "78eb200ae0cc95d4ea954655fbcf91e285013a261310e161927f2401d2bca803", ""},
		{"D", d, 3, "99922a5c1801805287a647af73bca0ed7352a5f7f373e54992795bcc4a235213", ""},
		{"bin", bin, 1, "512e938da94e5ff4a08dc3820596e0bb22505448e427d16faaf6770c3b72cad8",
			"122b0a0362696e12205ca7815adcb484e9a136c11efe69c1d530176d549b5d18d038eb5280b4b3470c180c2001"},
	}
	for _, tc := range tests {
		t.Run(tc.name, func(t *testing.T) {
			if err := tc.dir.Validate(); err != nil {
				t.Fatalf("Validate: %v", err)
			}
			if got := tc.dir.Size(); got != tc.size {
				t.Errorf("Size = %d, want %d", got, tc.size)
			}
			if got := tc.dir.Digest().String(); got != tc.digest {
				t.Errorf("Digest = %s, want %s", got, tc.digest)
			}
			enc := tc.dir.Encode()
			if tc.encHex != "" && hex.EncodeToString(enc) != tc.encHex {
				t.Errorf("Encode = %x, want %s", enc, tc.encHex)
			}
			dec, err := Decode(enc)
			if err != nil {
				t.Fatalf("Decode: %v", err)
			}
			if !bytes.Equal(dec.Encode(), enc) {
				t.Errorf("re-encode differs")
			}
		})
	}
}

func TestBlobReference(t *testing.T) {
	run := make([]byte, 255)
	for i := range run {
		run[i] = byte(i)
	}
	big := bytes.Repeat(run, 4096)
	if len(big) != 1044480 {
		t.Fatalf("len = %d", len(big))
	}
	if got := digest.Sum(big).String(); got != "a82c5154a7a0c262c6fdb929a317585646f8fbcf80326d0a7b8747edaf2d99d2" {
		t.Fatalf("digest = %s", got)
	}
}

func TestValidateRejects(t *testing.T) {
	d0 := digest.Empty
	tests := []struct {
		name string
		dir  Directory
		want string
	}{
		{"empty name", Directory{Files: []FileEntry{{Name: []byte(""), Digest: d0}}}, "empty name"},
		{"dot", Directory{Files: []FileEntry{{Name: []byte("."), Digest: d0}}}, `name "."`},
		{"dotdot", Directory{Directories: []DirectoryEntry{{Name: []byte(".."), Digest: d0}}}, `name ".."`},
		{"slash", Directory{Symlinks: []SymlinkEntry{{Name: []byte("a/b"), Target: []byte("x")}}}, "contains '/'"},
		{"nul", Directory{Files: []FileEntry{{Name: []byte("a\x00"), Digest: d0}}}, "NUL"},
		{"long", Directory{Files: []FileEntry{{Name: bytes.Repeat([]byte("a"), 256), Digest: d0}}}, "exceeds 255"},
		{"unsorted", Directory{Files: []FileEntry{{Name: []byte("b"), Digest: d0}, {Name: []byte("a"), Digest: d0}}}, "not sorted"},
		{"duplicate in list", Directory{Files: []FileEntry{{Name: []byte("a"), Digest: d0}, {Name: []byte("a"), Digest: d0}}}, "not sorted or duplicate"},
		{"duplicate across lists", Directory{
			Directories: []DirectoryEntry{{Name: []byte("a"), Digest: d0}},
			Symlinks:    []SymlinkEntry{{Name: []byte("a"), Target: []byte("t")}},
		}, "used twice"},
		{"empty target", Directory{Symlinks: []SymlinkEntry{{Name: []byte("l")}}}, "empty symlink target"},
		{"nul target", Directory{Symlinks: []SymlinkEntry{{Name: []byte("l"), Target: []byte("a\x00b")}}}, "NUL"},
		{"size overflow", Directory{Directories: []DirectoryEntry{
			{Name: []byte("a"), Digest: d0, Size: 1 << 63},
			{Name: []byte("b"), Digest: d0, Size: 1 << 63},
		}}, "overflows"},
	}
	for _, tc := range tests {
		t.Run(tc.name, func(t *testing.T) {
			err := tc.dir.Validate()
			if err == nil || !errors.Is(err, ErrInvalid) || !strings.Contains(err.Error(), tc.want) {
				t.Fatalf("Validate = %v, want error containing %q", err, tc.want)
			}
			// The same bytes must be refused by Decode too.
			if _, err := Decode(tc.dir.Encode()); err == nil {
				t.Fatalf("Decode accepted invalid directory")
			}
		})
	}
}

func TestDecodeRejectsMalformed(t *testing.T) {
	good := (&Directory{Files: []FileEntry{{Name: []byte("f"), Digest: digest.Empty, Size: 3}}}).Encode()
	tests := []struct {
		name string
		b    []byte
	}{
		{"truncated", good[:len(good)-1]},
		{"unknown field", append(append([]byte{}, good...), 0x22, 0x00)},
		{"varint top level", []byte{0x08, 0x01}},
		{"short digest", []byte{0x12, 0x05, 0x0a, 0x01, 'f', 0x12, 0x00}},
		{"missing digest", []byte{0x12, 0x03, 0x0a, 0x01, 'f'}},
		{"fields out of order", []byte{0x1a, 0x05, 0x0a, 0x01, 'l', 0x12, 0x00, 0x12, 0x03, 0x0a, 0x01, 'f'}},
		{"huge length", []byte{0x12, 0xff, 0xff, 0xff, 0xff, 0xff, 0xff, 0xff, 0xff, 0x7f}},
		{"executable 2", append([]byte{0x12, 0x27, 0x0a, 0x01, 'f', 0x12, 0x20}, append(digest.Empty[:], 0x20, 0x02)...)},
	}
	for _, tc := range tests {
		t.Run(tc.name, func(t *testing.T) {
			if _, err := Decode(tc.b); err == nil {
				t.Fatalf("Decode(%x) accepted", tc.b)
			}
		})
	}
}

func TestAddAndLookup(t *testing.T) {
	var d Directory
	must := func(err error) {
		t.Helper()
		if err != nil {
			t.Fatal(err)
		}
	}
	must(d.Add([]byte("a"), Node{Kind: KindSymlink, Target: []byte("x")}))
	must(d.Add([]byte("b"), Node{Kind: KindDirectory, Digest: digest.Empty}))
	must(d.Add([]byte("c"), Node{Kind: KindFile, Digest: digest.Empty, Executable: true}))
	if err := d.Add([]byte("c"), Node{Kind: KindFile, Digest: digest.Empty}); err == nil {
		t.Fatal("duplicate accepted")
	}
	if err := d.Add([]byte("0"), Node{Kind: KindFile, Digest: digest.Empty}); err == nil {
		t.Fatal("unsorted accepted")
	}
	if err := d.Add([]byte(".."), Node{Kind: KindFile}); err == nil {
		t.Fatal(".. accepted")
	}
	n, ok := d.Lookup([]byte("c"))
	if !ok || n.Kind != KindFile || !n.Executable {
		t.Fatalf("Lookup c = %+v %v", n, ok)
	}
	if _, ok := d.Lookup([]byte("zz")); ok {
		t.Fatal("found missing")
	}
	var names []string
	for _, e := range d.Entries() {
		names = append(names, string(e.Name))
	}
	if strings.Join(names, ",") != "a,b,c" {
		t.Fatalf("Entries = %v", names)
	}
}

func FuzzDecode(f *testing.F) {
	f.Add([]byte{})
	f.Add((&Directory{Files: []FileEntry{{Name: []byte(".keep"), Digest: digest.Empty}}}).Encode())
	f.Add((&Directory{
		Directories: []DirectoryEntry{{Name: []byte("d"), Digest: digest.Empty, Size: 2}},
		Files:       []FileEntry{{Name: []byte("f"), Digest: digest.Empty, Size: 9, Executable: true}},
		Symlinks:    []SymlinkEntry{{Name: []byte("s"), Target: []byte("/nix/store/x")}},
	}).Encode())
	f.Fuzz(func(t *testing.T, b []byte) {
		d, err := Decode(b)
		if err != nil {
			return
		}
		// Anything accepted is canonical: it re-encodes to the same bytes.
		if enc := d.Encode(); !bytes.Equal(enc, b) {
			t.Fatalf("accepted non-canonical encoding %x (canonical %x)", b, enc)
		}
	})
}
