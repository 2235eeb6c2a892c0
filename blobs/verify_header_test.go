package blobs

import (
	"context"
	"os"
	"path/filepath"
	"testing"

	"github.com/casnix/casnix/blobs/pack"
	"github.com/casnix/casnix/db"
)

// TestVerifyHeadersFramelessShortPack: a power cut after newPack committed a pack id and
// created its file but before the header was durable leaves a pack file shorter than its
// header. While no frame names the pack that is harmless (the next writer to take the pack
// rewrites its header), so VerifyHeaders must not call the store damaged; a short pack
// that frames do name is still damage. Found by the torture suite (tests/torture_e2e_test.go)
// with a cut inside a gc's compaction.
func TestVerifyHeadersFramelessShortPack(t *testing.T) {
	ctx := context.Background()
	for _, tc := range []struct {
		name       string
		content    []byte
		withFrames bool
		damaged    bool
	}{
		{"empty, no frames", nil, false, false},
		{"half a header, no frames", pack.Header()[:7], false, false},
		{"empty, frames name it", nil, true, true},
	} {
		t.Run(tc.name, func(t *testing.T) {
			s, d := openBlobs(t, Options{})
			var id int64
			if tc.withFrames {
				writeBlobs(t, s, d, randBytes(1, 100<<10))
				ids, err := d.Packs(ctx)
				if err != nil || len(ids) != 1 {
					t.Fatalf("packs %v (%v), want one", ids, err)
				}
				id = ids[0]
			} else if err := d.Write(ctx, func(tx *db.Tx) error {
				var err error
				id, err = tx.InsertPack(ctx)
				return err
			}); err != nil {
				t.Fatal(err)
			}
			path := s.PackPath(id)
			if err := os.MkdirAll(filepath.Dir(path), 0o755); err != nil {
				t.Fatal(err)
			}
			if err := os.WriteFile(path, tc.content, 0o644); err != nil {
				t.Fatal(err)
			}
			dam, err := s.VerifyHeaders(ctx)
			if err != nil {
				t.Fatal(err)
			}
			if got := len(dam) > 0; got != tc.damaged {
				t.Fatalf("VerifyHeaders = %v, want damaged %v", dam, tc.damaged)
			}
		})
	}
}
