package blobs

import (
	"context"
	"os"
	"testing"

	"github.com/casnix/casnix/db"
)

// TestCompactPackRowWithoutDir: a power cut after newPack committed a pack id but before
// the pack's new packs/NN/ directory was durable leaves a row with neither file nor
// directory. Compact drops such a frameless pack; it must do so without an error (it
// synced the missing directory of the "removed" file and failed, so `casnix gc` exited 1
// after the cut). Found by the torture suite (tests/torture_e2e_test.go).
func TestCompactPackRowWithoutDir(t *testing.T) {
	ctx := context.Background()
	s, d := openBlobs(t, Options{})
	var id int64
	if err := d.Write(ctx, func(tx *db.Tx) error {
		var err error
		id, err = tx.InsertPack(ctx)
		return err
	}); err != nil {
		t.Fatal(err)
	}
	if _, err := os.Stat(s.PackPath(id)); !os.IsNotExist(err) {
		t.Fatalf("pack %d file: %v, want none", id, err)
	}
	if _, err := s.Compact(ctx, 0.01); err != nil {
		t.Fatalf("compact with a pack row without its file or directory: %v", err)
	}
	ids, err := d.Packs(ctx)
	if err != nil {
		t.Fatal(err)
	}
	if len(ids) != 0 {
		t.Fatalf("packs %v left, want the frameless one dropped", ids)
	}
}
