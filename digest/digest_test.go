package digest

import (
	"crypto/rand"
	"fmt"
	"testing"

	zblake3 "github.com/zeebo/blake3"
	lblake3 "lukechampine.com/blake3"
)

func TestReference(t *testing.T) {
	tests := []struct {
		name string
		data []byte
		want string
	}{
		{"empty", nil, "af1349b9f5f9a1a6a0404dea36dcc9499bcb25c9adc112b7cc9a93cae41f3262"},
		{"hello", []byte("Hello World!"), "5ca7815adcb484e9a136c11efe69c1d530176d549b5d18d038eb5280b4b3470c"},
	}
	for _, tc := range tests {
		t.Run(tc.name, func(t *testing.T) {
			if got := Sum(tc.data).String(); got != tc.want {
				t.Fatalf("Sum = %s, want %s", got, tc.want)
			}
			h := New()
			h.Write(tc.data)
			if got := FromHash(h).String(); got != tc.want {
				t.Fatalf("streaming = %s, want %s", got, tc.want)
			}
		})
	}
}

func TestParseRoundTrip(t *testing.T) {
	d := Sum([]byte("x"))
	p, err := Parse(d.String())
	if err != nil || p != d {
		t.Fatalf("Parse(%s) = %v, %v", d, p, err)
	}
	if _, err := Parse("abcd"); err == nil {
		t.Fatal("short digest accepted")
	}
}

// BenchmarkBLAKE3 compares the two maintained Go BLAKE3 implementations on
// chunk-sized and file-sized inputs; casnix uses the faster one.
func BenchmarkBLAKE3(b *testing.B) {
	for _, size := range []int{4 << 10, 64 << 10, 1 << 20} {
		buf := make([]byte, size)
		rand.Read(buf)
		b.Run("zeebo/"+sizeName(size), func(b *testing.B) {
			b.SetBytes(int64(size))
			for b.Loop() {
				zblake3.Sum256(buf)
			}
		})
		b.Run("lukechampine/"+sizeName(size), func(b *testing.B) {
			b.SetBytes(int64(size))
			for b.Loop() {
				lblake3.Sum256(buf)
			}
		})
	}
}

func sizeName(n int) string {
	if n >= 1<<20 {
		return fmt.Sprintf("%dMiB", n>>20)
	}
	return fmt.Sprintf("%dKiB", n>>10)
}
