package blobs

import (
	"bytes"
	"errors"
	"io"
	"math/rand"
	"testing"

	"github.com/restic/chunker"

	"github.com/casnix/casnix/digest"
)

func chunkAll(t testing.TB, data []byte) [][]byte {
	t.Helper()
	c := NewChunker(bytes.NewReader(data))
	var out [][]byte
	for {
		b, err := c.Next()
		if errors.Is(err, io.EOF) {
			return out
		}
		if err != nil {
			t.Fatal(err)
		}
		out = append(out, bytes.Clone(b))
	}
}

func randBytes(seed int64, n int) []byte {
	b := make([]byte, n)
	rand.New(rand.NewSource(seed)).Read(b)
	return b
}

func TestChunkerBounds(t *testing.T) {
	tests := []struct {
		name string
		data []byte
	}{
		{"empty", nil},
		{"tiny", []byte("hello")},
		{"min", randBytes(1, MinChunk)},
		{"random 8MiB", randBytes(2, 8<<20)},
		{"zeros 2MiB", make([]byte, 2<<20)},
	}
	for _, tc := range tests {
		t.Run(tc.name, func(t *testing.T) {
			chunks := chunkAll(t, tc.data)
			if got := bytes.Join(chunks, nil); !bytes.Equal(got, tc.data) {
				t.Fatal("chunks do not reassemble the input")
			}
			for i, c := range chunks {
				if len(c) > MaxChunk || (len(c) < MinChunk && i != len(chunks)-1) {
					t.Fatalf("chunk %d has %d bytes", i, len(c))
				}
			}
		})
	}
}

func TestChunkerAverage(t *testing.T) {
	chunks := chunkAll(t, randBytes(3, 32<<20))
	avg := (32 << 20) / len(chunks)
	if avg < 32<<10 || avg > 96<<10 {
		t.Fatalf("average chunk %d bytes over %d chunks", avg, len(chunks))
	}
	t.Logf("average chunk %d bytes", avg)
}

// TestChunkerShift: inserting bytes near the start changes only the chunks
// around the edit; that is the point of content-defined chunking.
func TestChunkerShift(t *testing.T) {
	base := randBytes(4, 16<<20)
	edited := append(append(append([]byte{}, base[:1000]...), []byte("inserted!")...), base[1000:]...)
	a := map[digest.Digest]bool{}
	for _, c := range chunkAll(t, base) {
		a[digest.Sum(c)] = true
	}
	cs := chunkAll(t, edited)
	shared := 0
	for _, c := range cs {
		if a[digest.Sum(c)] {
			shared++
		}
	}
	if shared < len(cs)-3 {
		t.Fatalf("only %d of %d chunks survive a 9-byte insert", shared, len(cs))
	}
}

// BenchmarkChunker compares this FastCDC chunker with restic's Rabin
// chunker (the maintained library alternative) on the same data.
func BenchmarkChunker(b *testing.B) {
	data := randBytes(5, 64<<20)
	b.Run("fastcdc", func(b *testing.B) {
		b.SetBytes(int64(len(data)))
		c := NewChunker(nil)
		for b.Loop() {
			c.Reset(bytes.NewReader(data))
			for {
				if _, err := c.Next(); err != nil {
					break
				}
			}
		}
	})
	b.Run("restic-rabin", func(b *testing.B) {
		b.SetBytes(int64(len(data)))
		buf := make([]byte, chunker.MaxSize)
		c := chunker.New(nil, chunker.Pol(0x3DA3358B4DC173))
		for b.Loop() {
			c.Reset(bytes.NewReader(data), chunker.Pol(0x3DA3358B4DC173))
			for {
				if _, err := c.Next(buf); err != nil {
					break
				}
			}
		}
	})
}
