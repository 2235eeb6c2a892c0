package binarycache

import (
	"bytes"
	"encoding/binary"
	"errors"
	"hash/crc32"
	"io"
	"math/rand/v2"
	"os/exec"
	"testing"

	"github.com/ulikunitz/xz"
)

func xzOf(t *testing.T, data []byte, cfg xz.WriterConfig) []byte {
	t.Helper()
	var b bytes.Buffer
	w, err := cfg.NewWriter(&b)
	if err != nil {
		t.Fatal(err)
	}
	if _, err := w.Write(data); err != nil {
		t.Fatal(err)
	}
	if err := w.Close(); err != nil {
		t.Fatal(err)
	}
	return b.Bytes()
}

// textish is compressible data with some structure.
func textish(n int) []byte {
	r := rand.New(rand.NewPCG(1, 2))
	words := []string{"nix", "store", "casnix", "chunk", "frame", "pack", "\n", " "}
	var b bytes.Buffer
	for b.Len() < n {
		b.WriteString(words[r.IntN(len(words))])
		if r.IntN(50) == 0 {
			b.WriteByte(byte(r.Uint32()))
		}
	}
	return b.Bytes()[:n]
}

// TestXzGuardPassesValid: well-formed xz files (one or many blocks, every
// check type, several streams with stream padding, xz(1)'s own output)
// pass through the guard byte for byte and decode the same.
func TestXzGuardPassesValid(t *testing.T) {
	data := textish(3 << 20)
	files := map[string][]byte{
		"one block":      xzOf(t, data, xz.WriterConfig{}),
		"many blocks":    xzOf(t, data, xz.WriterConfig{BlockSize: 100 << 10, CheckSum: xz.CRC32}),
		"sha256":         xzOf(t, data[:1000], xz.WriterConfig{CheckSum: xz.SHA256}),
		"no check":       xzOf(t, data[:1000], xz.WriterConfig{NoCheckSum: true}),
		"empty":          xzOf(t, nil, xz.WriterConfig{}),
		"64 MiB dict ok": xzOf(t, data[:5000], xz.WriterConfig{DictCap: 64 << 20}),
	}
	want := map[string][]byte{"sha256": data[:1000], "no check": data[:1000], "empty": nil, "64 MiB dict ok": data[:5000]}
	two := append(append(bytes.Clone(files["sha256"]), 0, 0, 0, 0, 0, 0, 0, 0), files["no check"]...)
	files["two streams, padding"] = two
	want["two streams, padding"] = append(bytes.Clone(data[:1000]), data[:1000]...)
	if _, err := exec.LookPath("xz"); err == nil {
		for _, args := range [][]string{{"-6"}, {"-9e"}, {"-T2", "--block-size=1MiB"}, {"--check=none", "-1"}} {
			cmd := exec.Command("xz", append(args, "-c")...)
			cmd.Stdin = bytes.NewReader(data)
			out, err := cmd.Output()
			if err != nil {
				t.Fatalf("xz %v: %v", args, err)
			}
			files["xz "+args[0]] = out
		}
	} else {
		t.Log("no xz(1): only ulikunitz/xz's output is checked")
	}
	for name, f := range files {
		t.Run(name, func(t *testing.T) {
			got, err := io.ReadAll(newXzGuard(bytes.NewReader(f)))
			if err != nil || !bytes.Equal(got, f) {
				t.Fatalf("guard passed %d of %d bytes: %v", len(got), len(f), err)
			}
			r, closeDec, err := decompress(bytes.NewReader(f), "xz")
			if err != nil {
				t.Fatal(err)
			}
			defer closeDec()
			plain, err := io.ReadAll(r)
			w, ok := want[name]
			if !ok {
				w = data
			}
			if err != nil || !bytes.Equal(plain, w) {
				t.Fatalf("decoded %d bytes, want %d: %v", len(plain), len(w), err)
			}
		})
	}
	// Cut short anywhere: an error, never a clean end.
	f := files["many blocks"]
	for _, n := range []int{5, 12, 13, 40, len(f) / 2, len(f) - 13, len(f) - 1} {
		if _, err := io.ReadAll(newXzGuard(bytes.NewReader(f[:n]))); err == nil {
			t.Errorf("truncated to %d of %d bytes: no error", n, len(f))
		}
	}
}

// hugeDictXz is a valid xz file whose block header asks for a 1 GiB
// dictionary (the header's CRC32 fixed up), which ulikunitz/xz would
// allocate in full.
func hugeDictXz(t *testing.T, data []byte) []byte {
	t.Helper()
	f := bytes.Clone(xzOf(t, data, xz.WriterConfig{}))
	h := f[12:] // the first block header
	size := (int(h[0]) + 1) * 4
	// flags, then (no sizes in ulikunitz's headers) filter id 0x21, props size 1, dict byte.
	if h[1]&0xC0 != 0 || h[2] != 0x21 || h[3] != 1 {
		t.Fatalf("unexpected block header % x", h[:size])
	}
	h[4] = 36 // 2 << (36/2 + 11) = 1 GiB
	binary.LittleEndian.PutUint32(h[size-4:], crc32.ChecksumIEEE(h[:size-4]))
	if _, err := xz.NewReader(bytes.NewReader(f)); err != nil {
		t.Fatalf("patched file no longer parses: %v", err)
	}
	return f
}

// TestXzGuardRefusesHugeDict: the guard stops at a block header asking for
// a dictionary over maxXzDict, before the decoder sees it.
func TestXzGuardRefusesHugeDict(t *testing.T) {
	f := hugeDictXz(t, textish(1000))
	got, err := io.ReadAll(newXzGuard(bytes.NewReader(f)))
	if !errors.Is(err, ErrXzDict) || len(got) != 12 {
		t.Fatalf("passed %d bytes, %v; want the 12-byte stream header, then %v", len(got), err, ErrXzDict)
	}
}
