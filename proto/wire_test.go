package proto

import (
	"bufio"
	"bytes"
	"encoding/hex"
	"testing"
)

// TestWireStorePaths: the writers that build no strings put on the wire
// exactly what writing the built strings would.
func TestWireStorePaths(t *testing.T) {
	const dir = "/nix/store"
	for _, tc := range []struct {
		name  string
		names []string
		hash  []byte
	}{
		{"none", nil, nil},
		{"empty name is the empty string", []string{""}, []byte{}},
		{"padding of every length", []string{"a", "ab", "abc", "abcd", "abcde", "abcdef", "abcdefg", "abcdefgh"}, []byte{1, 2, 3}},
		{"store paths", []string{"0123456789abcdfghijklmnpqrsvwxyz-hello-2.12.1", "0123456789abcdfghijklmnpqrsvwxyz-x.drv"}, bytes.Repeat([]byte{0xab}, 32)},
		{"long hash", []string{"x"}, bytes.Repeat([]byte{7}, 100)},
	} {
		t.Run(tc.name, func(t *testing.T) {
			var got, want bytes.Buffer
			gw := wireWriter{w: bufio.NewWriter(&got)}
			ww := wireWriter{w: bufio.NewWriter(&want)}
			gw.storePaths(dir, tc.names)
			full := make([]string, len(tc.names))
			for i, n := range tc.names {
				gw.storePath(dir, n)
				if n != "" {
					full[i] = dir + "/" + n
				}
			}
			ww.strings(full)
			for _, f := range full {
				ww.str(f)
			}
			gw.hexStr(tc.hash)
			ww.str(hex.EncodeToString(tc.hash))
			if err := gw.flush(); err != nil {
				t.Fatal(err)
			}
			if err := ww.flush(); err != nil {
				t.Fatal(err)
			}
			if !bytes.Equal(got.Bytes(), want.Bytes()) {
				t.Fatalf("wire bytes differ:\n got %x\nwant %x", got.Bytes(), want.Bytes())
			}
		})
	}
}
