package blobs

import (
	"bytes"
	"context"
	"io"
	"math/rand"
	"path/filepath"
	"testing"

	"github.com/casnix/casnix/db"
	"github.com/casnix/casnix/digest"
)

func randomDigests(rng *rand.Rand, n int) []digest.Digest {
	out := make([]digest.Digest, n)
	for i := range out {
		rng.Read(out[i][:])
	}
	return out
}

func TestBloom(t *testing.T) {
	rng := rand.New(rand.NewSource(1))
	for _, tc := range []struct {
		name   string
		chunks int64 // what it is sized for
		add    int   // what is added
		bits   uint64
		maxFP  float64 // tolerated share of false "maybe"
	}{
		{"empty store", 0, 1000, knownBitsMin, 0.001},
		{"sized for the store", 1 << 20, 1 << 20, 1 << 25, 0.02},
		{"at capacity", 1 << 20, 1 << 21, 1 << 25, 0.02},
		{"bounded past 13M chunks", 100 << 20, 200_000, knownBitsMax, 0.001},
	} {
		t.Run(tc.name, func(t *testing.T) {
			b := newBloom(tc.chunks)
			if got := b.mask + 1; got != tc.bits {
				t.Fatalf("%d bits, want %d", got, tc.bits)
			}
			in := randomDigests(rng, tc.add)
			for _, d := range in {
				b.add(d)
			}
			for _, d := range in {
				if !b.mayHave(d) {
					t.Fatalf("added digest %s: mayHave false", d)
				}
			}
			fp := 0
			const probes = 200_000
			for _, d := range randomDigests(rng, probes) {
				if b.mayHave(d) {
					fp++
				}
			}
			if rate := float64(fp) / probes; rate > tc.maxFP {
				t.Fatalf("false maybe rate %.4f, want <= %.4f", rate, tc.maxFP)
			}
		})
	}
}

func randomBlob(rng *rand.Rand, n int) []byte {
	b := make([]byte, n)
	rng.Read(b)
	return b
}

// TestWriterAsksOnlyForKnownChunks: once the filter is built, a chunk the
// store has never held is not looked up, and dedup is exactly what the
// database alone gave: a stored chunk is found, a new one written.
func TestWriterAsksOnlyForKnownChunks(t *testing.T) {
	s, d := openBlobs(t, Options{})
	rng := rand.New(rand.NewSource(2))
	old := randomBlob(rng, 3<<20)

	first, _ := writeBlobsWith(t, s, d, old) // starts the filter's build
	s.known.wg.Wait()
	if s.known.f.Load() == nil {
		t.Fatal("no filter after the build")
	}
	if first.NewChunks == 0 {
		t.Fatal("first writer stored no chunks")
	}

	lookups, skipped := s.known.lookups.Load(), s.known.skipped.Load()
	fresh := randomBlob(rng, 2<<20)
	w, _ := writeBlobsWith(t, s, d, fresh, old)
	if w.DupChunks != first.NewChunks {
		t.Errorf("rewriting a stored blob: %d duplicate chunks, want %d", w.DupChunks, first.NewChunks)
	}
	if w.NewChunks == 0 {
		t.Fatal("new blob: no new chunks")
	}
	gotSkipped := s.known.skipped.Load() - skipped
	gotLookups := s.known.lookups.Load() - lookups
	// Every new chunk skipped the database but for the filter's rare
	// false "maybe"; every stored one was asked.
	if gotSkipped < w.NewChunks-1 || gotLookups > w.DupChunks+1 {
		t.Errorf("%d lookups, %d skipped; want about %d and %d", gotLookups, gotSkipped, w.DupChunks, w.NewChunks)
	}

	// The blobs read back.
	for _, b := range [][]byte{old, fresh} {
		r, err := s.Open(context.Background(), digest.Sum(b))
		if err != nil {
			t.Fatal(err)
		}
		got, err := io.ReadAll(r)
		if err != nil || !bytes.Equal(got, b) {
			t.Fatalf("blob read back differs (%v)", err)
		}
	}
}

// TestWriterSeesAnotherProcessesChunks: chunks another process committed
// after the filter was built are deduplicated against (the next Writer's
// refresh reads them), not stored twice.
func TestWriterSeesAnotherProcessesChunks(t *testing.T) {
	s, d := openBlobs(t, Options{})
	rng := rand.New(rand.NewSource(3))
	writeBlobsWith(t, s, d, randomBlob(rng, 1<<20))
	s.known.wg.Wait()

	// A second process: its own database handle and blob store on the same
	// files.
	d2, err := db.Open(context.Background(), d.File())
	if err != nil {
		t.Fatal(err)
	}
	s2, err := Open(filepath.Join(filepath.Dir(d.File()), "packs"), d2, Options{})
	if err != nil {
		t.Fatal(err)
	}
	defer func() { s2.Close(); d2.Close() }()
	theirs := randomBlob(rng, 2<<20)
	w2, _ := writeBlobsWith(t, s2, d2, theirs)

	w, _ := writeBlobsWith(t, s, d, theirs)
	if w.NewChunks != 0 || w.DupChunks != w2.NewChunks {
		t.Errorf("chunks the other process stored: %d new, %d duplicate; want 0 and %d", w.NewChunks, w.DupChunks, w2.NewChunks)
	}
}
