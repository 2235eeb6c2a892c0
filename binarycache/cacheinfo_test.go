package binarycache

import (
	"context"
	"os"
	"path/filepath"
	"testing"
)

func TestReadCacheInfo(t *testing.T) {
	for _, tc := range []struct {
		text string
		want CacheInfoFile
	}{
		{"StoreDir: /nix/store\nWantMassQuery: 1\nPriority: 40\n", CacheInfoFile{"/nix/store", 40, true}},
		{"StoreDir: /s\nPriority: x\n", CacheInfoFile{StoreDir: "/s"}},
		{"", CacheInfoFile{}},
	} {
		dir := t.TempDir()
		os.WriteFile(filepath.Join(dir, "nix-cache-info"), []byte(tc.text), 0o644)
		got, err := ReadCacheInfo(context.Background(), fileSource{dir})
		if err != nil || *got != tc.want {
			t.Errorf("%q: %+v %v", tc.text, got, err)
		}
	}
}

// FuzzReadCacheInfo: any nix-cache-info parses without panicking.
func FuzzReadCacheInfo(f *testing.F) {
	f.Add([]byte("StoreDir: /nix/store\nWantMassQuery: 1\nPriority: 40\n"))
	f.Add([]byte("Priority:-9999999999999999999999\n:\n"))
	f.Fuzz(func(t *testing.T, data []byte) {
		dir := t.TempDir()
		os.WriteFile(filepath.Join(dir, "nix-cache-info"), data, 0o644)
		if _, err := ReadCacheInfo(context.Background(), fileSource{dir}); err != nil {
			t.Fatal(err)
		}
	})
}
