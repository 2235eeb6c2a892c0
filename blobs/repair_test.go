package blobs

import (
	"bytes"
	"context"
	"crypto/rand"
	"os"
	"path/filepath"
	"testing"

	"github.com/casnix/casnix/blobs/pack"
	"github.com/casnix/casnix/digest"
)

// TestScanPackSkipsDamage builds a pack of four records by hand and damages
// one record at a time: a record whose header fails its CRC is skipped and
// the scan goes on at the next record; a frame that does not decode loses
// only its own chunks; a torn last record ends the pack. Every other
// chunk is found where it is.
func TestScanPackSkipsDamage(t *testing.T) {
	for _, tc := range []struct {
		name   string
		damage func(b []byte, at []int64) []byte
		lost   int // index of the record whose chunks are lost (-1 none)
	}{
		{"intact", func(b []byte, at []int64) []byte { return b }, -1},
		{"record header CRC", func(b []byte, at []int64) []byte { b[at[1]+20] ^= 1; return b }, 1},
		{"frame magic", func(b []byte, at []int64) []byte { b[at[2]] ^= 1; return b }, 2},
		{"frame data", func(b []byte, at []int64) []byte { b[at[1+1]-3] ^= 0x80; return b }, 1},
		{"torn tail", func(b []byte, at []int64) []byte { return b[:len(b)-5] }, 3},
	} {
		t.Run(tc.name, func(t *testing.T) {
			s, _ := openBlobs(t, Options{})
			var file []byte
			file = append(file, pack.Header()...)
			var at []int64
			var chunks [][]digest.Digest
			for r := 0; r < 4; r++ {
				at = append(at, int64(len(file)))
				var raw []byte
				var entries []pack.Entry
				var ds []digest.Digest
				for c := 0; c < 3; c++ {
					b := make([]byte, 1000+r*10+c)
					rand.Read(b)
					raw = append(raw, b...)
					entries = append(entries, pack.Entry{Digest: digest.Sum(b), Len: uint32(len(b))})
					ds = append(ds, digest.Sum(b))
				}
				comp := s.enc.EncodeAll(raw, nil)
				file = append(file, pack.RecordHeader(entries, len(comp))...)
				file = append(file, comp...)
				chunks = append(chunks, ds)
			}
			at = append(at, int64(len(file)))
			file = tc.damage(bytes.Clone(file), at)
			path := s.PackPath(7)
			if err := os.MkdirAll(filepath.Dir(path), 0o755); err != nil {
				t.Fatal(err)
			}
			if err := os.WriteFile(path, file, 0o644); err != nil {
				t.Fatal(err)
			}
			sc, err := s.scanPacks(context.Background(), nil)
			if err != nil {
				t.Fatal(err)
			}
			if (tc.lost >= 0) != (len(sc.damage) > 0) {
				t.Fatalf("damage reported: %q", sc.damage)
			}
			for r, ds := range chunks {
				for _, d := range ds {
					site, ok := sc.chunks[d]
					if ok == (r == tc.lost) {
						t.Fatalf("record %d chunk %s found %v (damage %q)", r, d, ok, sc.damage)
					}
					if ok && (site.frame.f.Pack != 7 || site.frame.f.Offset != at[r]) {
						t.Fatalf("record %d chunk found at pack %d offset %d, want %d", r, site.frame.f.Pack, site.frame.f.Offset, at[r])
					}
				}
			}
		})
	}
}
