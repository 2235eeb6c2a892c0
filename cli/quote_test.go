package cli

import (
	"bytes"
	"testing"

	"github.com/casnix/casnix/castore"
)

// TestPrintEntryQuotes: ls prints names and symlink targets from store
// contents with control characters and invalid UTF-8 escaped, so a path
// cannot drive the terminal or fake lines of output.
func TestPrintEntryQuotes(t *testing.T) {
	cases := []struct {
		name string
		node castore.Node
		want string
	}{
		{"plain name", castore.Node{Kind: castore.KindFile, Size: 3}, "-r--r--r--                    3 plain name\n"},
		{"héllo", castore.Node{Kind: castore.KindDirectory}, "dr-xr-xr-x                    0 héllo\n"},
		{"a\nb", castore.Node{Kind: castore.KindFile, Size: 1}, "-r--r--r--                    1 a\\nb\n"},
		{"\x1b[2Jclear", castore.Node{Kind: castore.KindFile}, "-r--r--r--                    0 \\x1b[2Jclear\n"},
		{"bad\xff\xfeutf8", castore.Node{Kind: castore.KindFile}, "-r--r--r--                    0 bad\\xff\\xfeutf8\n"},
		{"c1\u009bx", castore.Node{Kind: castore.KindFile}, "-r--r--r--                    0 c1\\u009bx\n"},
		{`back\slash`, castore.Node{Kind: castore.KindFile}, "-r--r--r--                    0 back\\\\slash\n"},
		{"link", castore.Node{Kind: castore.KindSymlink, Target: []byte("/x\r\n-r--r--r-- 1 fake")},
			"lrwxrwxrwx                    0 link -> /x\\r\\n-r--r--r-- 1 fake\n"},
		{"tab\tdel\x7f", castore.Node{Kind: castore.KindFile}, "-r--r--r--                    0 tab\\tdel\\x7f\n"},
	}
	for _, tc := range cases {
		var b bytes.Buffer
		printEntry(&b, tc.name, tc.node)
		if b.String() != tc.want {
			t.Errorf("printEntry(%q):\n got %q\nwant %q", tc.name, b.String(), tc.want)
		}
	}
}
