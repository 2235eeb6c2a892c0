package nixtest

import (
	"bytes"
	"crypto/sha1"
	"crypto/sha256"
	"encoding/binary"
	"encoding/hex"
	"strings"
	"testing"
)

func TestNixBase32(t *testing.T) {
	// Values printed by `nix hash file --base32` (Nix 2.8).
	tests := []struct {
		raw  []byte
		want string
	}{
		{sha256Of(""), "0mdqa9w1p6cmli6976v4wi0sw9r4p5prkj7lzfd1877wk11c9c73"},
		{sha256Of("hello"), "094qif9n4cq4fdg459qzbhg1c6wywawwaaivx0k0x8xhbyx4vwic"},
		{sha1Of(""), "143xibwh31h9bvxzalr0sjvbbvpa6ffs"},
		{sha1Of("hello"), "9m1skbnr5i43n3yypvda5s65vhfwdx5a"},
		{[]byte{0x1f}, "0z"},
	}
	for _, tt := range tests {
		if got := NixBase32Encode(tt.raw); got != tt.want {
			t.Errorf("NixBase32Encode(%x) = %q, want %q", tt.raw, got, tt.want)
		}
		back, err := NixBase32Decode(tt.want)
		if err != nil || !bytes.Equal(back, tt.raw) {
			t.Errorf("NixBase32Decode(%q) = %x, %v; want %x", tt.want, back, err, tt.raw)
		}
	}
	for _, bad := range []string{"e", "0mdqa9w1p6cmli6976v4wi0sw9r4p5prkj7lzfd1877wk11c9c7u", "zz"} {
		if _, err := NixBase32Decode(bad); err == nil {
			t.Errorf("NixBase32Decode(%q) succeeded", bad)
		}
	}
}

func TestNormalizeSHA256(t *testing.T) {
	want := "sha256:094qif9n4cq4fdg459qzbhg1c6wywawwaaivx0k0x8xhbyx4vwic"
	for _, in := range []string{
		want,
		"sha256-LPJNul+wow4m6DsqxbninhsWHlwfp0JecwQzYpOLmCQ=",
		"sha256:" + hex.EncodeToString(sha256Of("hello")),
		hex.EncodeToString(sha256Of("hello")),
		"094qif9n4cq4fdg459qzbhg1c6wywawwaaivx0k0x8xhbyx4vwic",
	} {
		got, err := NormalizeSHA256(in)
		if err != nil || got != want {
			t.Errorf("NormalizeSHA256(%q) = %q, %v; want %q", in, got, err, want)
		}
	}
	for _, bad := range []string{"", "sha1:143xibwh31h9bvxzalr0sjvbbvpa6ffs", "sha256:abc", "sha256-AAAA"} {
		if _, err := NormalizeSHA256(bad); err == nil {
			t.Errorf("NormalizeSHA256(%q) succeeded", bad)
		}
	}
}

func TestParsePathInfoJSON(t *testing.T) {
	// As Nix 2.8 prints it, with an invalid path.
	in := `[{"path":"/nix/store/2qgfy89v28340cr9d9z471zfi5iczv5l-hello","narHash":"sha256-EFUdrtf6Rn0LWIJufrmg8q99aT3jGfLvd1//zaJEufY=","narSize":120,"references":["/nix/store/b","/nix/store/a"],"deriver":"/nix/store/4l9f4nj9kcc5vs3rd6n6dpavm0faid7m-hello.drv","registrationTime":1795669584,"ultimate":true},{"path":"/nix/store/2qgfy89v28340cr9d9z471zfi5iczv5l-hellx","valid":false}]`
	infos, err := ParsePathInfoJSON([]byte(in))
	if err != nil {
		t.Fatal(err)
	}
	if len(infos) != 1 {
		t.Fatalf("got %d entries, want 1: %+v", len(infos), infos)
	}
	pi := infos["/nix/store/2qgfy89v28340cr9d9z471zfi5iczv5l-hello"]
	if pi.NarSize != 120 || !pi.Ultimate || pi.References[0] != "/nix/store/a" || !strings.HasPrefix(pi.NarHash, "sha256:") || len(pi.NarHash) != 59 {
		t.Errorf("parsed %+v", pi)
	}
	// The object form of newer Nix.
	obj := `{"/nix/store/2qgfy89v28340cr9d9z471zfi5iczv5l-hello":{"narHash":"sha256-EFUdrtf6Rn0LWIJufrmg8q99aT3jGfLvd1//zaJEufY=","narSize":120,"references":[]}}`
	infos, err = ParsePathInfoJSON([]byte(obj))
	if err != nil || len(infos) != 1 || infos["/nix/store/2qgfy89v28340cr9d9z471zfi5iczv5l-hello"].NarSize != 120 {
		t.Errorf("object form: %+v, %v", infos, err)
	}
}

// narBuilder writes NAR tokens, for testing WalkNAR without Nix.
type narBuilder struct{ bytes.Buffer }

func (b *narBuilder) str(ss ...string) *narBuilder {
	for _, s := range ss {
		var n [8]byte
		binary.LittleEndian.PutUint64(n[:], uint64(len(s)))
		b.Write(n[:])
		b.WriteString(s)
		b.Write(make([]byte, (8-len(s)%8)%8))
	}
	return b
}

func TestWalkNAR(t *testing.T) {
	var b narBuilder
	b.str("nix-archive-1", "(", "type", "directory",
		"entry", "(", "name", "a", "node", "(", "type", "regular", "executable", "", "contents", "#!x", ")", ")",
		"entry", "(", "name", "b", "node", "(", "type", "directory", ")", ")",
		"entry", "(", "name", "c", "node", "(", "type", "regular", "contents", "", ")", ")",
		"entry", "(", "name", "d", "node", "(", "type", "symlink", "target", "a", ")", ")",
		")")
	var stats NARStats
	var paths []string
	err := WalkNAR(bytes.NewReader(b.Bytes()), func(e NAREntry) error {
		stats.Add(e)
		paths = append(paths, e.Path)
		return nil
	})
	if err != nil {
		t.Fatal(err)
	}
	want := NARStats{Regular: 2, Executables: 1, Symlinks: 1, Directories: 2, EmptyFiles: 1, EmptyDirs: 1, FileBytes: 3, MaxFile: 3}
	if stats != want {
		t.Errorf("stats %v, want %v", stats, want)
	}
	if got := strings.Join(paths, ","); got != "/a,/b,/c,/d," {
		t.Errorf("paths %s", got)
	}

	var unsorted narBuilder
	unsorted.str("nix-archive-1", "(", "type", "directory",
		"entry", "(", "name", "b", "node", "(", "type", "directory", ")", ")",
		"entry", "(", "name", "a", "node", "(", "type", "directory", ")", ")",
		")")
	if err := WalkNAR(bytes.NewReader(unsorted.Bytes()), func(NAREntry) error { return nil }); err == nil {
		t.Error("unsorted NAR accepted")
	}
	truncated := b.Bytes()[:b.Len()-8]
	if err := WalkNAR(bytes.NewReader(truncated), func(NAREntry) error { return nil }); err == nil {
		t.Error("truncated NAR accepted")
	}
	trailing := append(append([]byte{}, b.Bytes()...), 0)
	if err := WalkNAR(bytes.NewReader(trailing), func(NAREntry) error { return nil }); err == nil {
		t.Error("NAR with trailing data accepted")
	}
}

func sha256Of(s string) []byte { h := sha256.Sum256([]byte(s)); return h[:] }
func sha1Of(s string) []byte   { h := sha1.Sum([]byte(s)); return h[:] }
