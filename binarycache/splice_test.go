package binarycache

import (
	"bytes"
	"context"
	"crypto/sha256"
	"errors"
	"io"
	"math/rand/v2"
	"net/http"
	"net/http/httptest"
	"os"
	"path/filepath"
	"regexp"
	"strconv"
	"strings"
	"testing"

	"github.com/klauspost/compress/zstd"

	"github.com/casnix/casnix/blobs"
	"github.com/casnix/casnix/blobs/pack"
	"github.com/casnix/casnix/nar"
	"github.com/casnix/casnix/store"
	"github.com/casnix/casnix/tests/fliptest"
)

// textLike returns n bytes of seeded random-ish but compressible data
// (16 letters and newlines: about half compresses away), so frames are
// real zstd blocks, not raw ones.
func textLike(seed uint64, n int) []byte {
	r := rand.New(rand.NewPCG(seed, seed))
	b := make([]byte, n)
	for i := range b {
		if v := r.IntN(64); v < 16 {
			b[i] = byte('a' + v)
		} else if v == 63 {
			b[i] = '\n'
		} else {
			b[i] = byte('a' + v%8)
		}
	}
	return b
}

// addFiles imports a tree of files (name → contents; a "/" makes a
// subdirectory) as store path name.
func addFiles(t *testing.T, st *store.Store, name string, files map[string][]byte) {
	t.Helper()
	root := filepath.Join(t.TempDir(), "t")
	for p, data := range files {
		f := filepath.Join(root, p)
		if err := os.MkdirAll(filepath.Dir(f), 0o755); err != nil {
			t.Fatal(err)
		}
		if err := os.WriteFile(f, data, 0o644); err != nil {
			t.Fatal(err)
		}
	}
	var buf bytes.Buffer
	if _, err := nar.DumpPath(&buf, root); err != nil {
		t.Fatal(err)
	}
	b := st.NewBatch(context.Background())
	if _, err := b.Add(&buf, store.PathInfo{Name: name}); err != nil {
		t.Fatal(err)
	}
	if _, err := b.Commit(); err != nil {
		t.Fatal(err)
	}
}

func smallFiles(seed uint64, n, size int) map[string][]byte {
	m := map[string][]byte{}
	for i := range n {
		m["small/f"+strconv.Itoa(i)] = textLike(seed+uint64(i), size)
	}
	return m
}

func with(m map[string][]byte, name string, data []byte) map[string][]byte {
	out := map[string][]byte{name: data}
	for k, v := range m {
		out[k] = v
	}
	return out
}

// splicedNAR writes name's NAR through writeNARZstd, checks that the
// stream decodes (klauspost's decoder) to exactly what NarRender gives,
// and returns the number of stored frames sent verbatim.
func splicedNAR(t *testing.T, st *store.Store, name string) int {
	t.Helper()
	enc, err := zstd.NewWriter(nil, zstd.WithEncoderLevel(zstd.SpeedFastest), zstd.WithEncoderConcurrency(1))
	if err != nil {
		t.Fatal(err)
	}
	var z bytes.Buffer
	tap := sha256.New()
	n, err := writeNARZstd(context.Background(), st, name, enc, &z, tap)
	if err != nil {
		t.Fatalf("%s: %v", name, err)
	}
	dec, err := zstd.NewReader(nil)
	if err != nil {
		t.Fatal(err)
	}
	defer dec.Close()
	got, err := dec.DecodeAll(z.Bytes(), nil)
	if err != nil {
		t.Fatalf("%s: the stream does not decode: %v", name, err)
	}
	want := narOf(t, st, name)
	if !bytes.Equal(got, want) {
		t.Fatalf("%s: decodes to %d bytes, the NAR has %d (or differs)", name, len(got), len(want))
	}
	if !bytes.Equal(tap.Sum(nil), sha256Of(want)) {
		t.Errorf("%s: the tap got other bytes than the NAR", name)
	}
	return n
}

func sha256Of(b []byte) []byte {
	h := sha256.Sum256(b)
	return h[:]
}

// TestSpliceStoredFrames: the zstd stream that sends stored frames as they
// are decodes to the rendered NAR, and uses stored frames exactly where a
// frame's whole content is the next bytes of the NAR.
func TestSpliceStoredFrames(t *testing.T) {
	const MiB = 1 << 20
	big := textLike(1, 20*MiB)
	cases := []struct {
		name   string
		paths  []map[string][]byte // imported in order; the last is checked
		repack bool
		// minimum and maximum verbatim frames in the last path's NAR
		min, max int
	}{
		// Ingest frames hold at most 4 MiB: a 20 MiB file alone fills at
		// least 5, every one inside the file.
		{name: "one large file", paths: []map[string][]byte{{"big": big}}, min: 5, max: 100},
		// Each small file is one chunk and frames pack many of them: no
		// frame is a file's contents.
		{name: "many small files", paths: []map[string][]byte{smallFiles(100, 300, 5000)}, min: 0, max: 0},
		// The frames strictly inside the large file go verbatim; the one
		// holding the small files and its start does not.
		{name: "mix", paths: []map[string][]byte{with(smallFiles(200, 50, 3000), "m-big", textLike(2, 10*MiB))}, min: 1, max: 100},
		// The large file's chunks were stored by the first path, alone in
		// their frames: the second path's NAR sends those frames.
		{name: "dedup across paths", paths: []map[string][]byte{{"big": big}, with(smallFiles(300, 20, 2000), "copy", big)}, min: 5, max: 100},
		// Repacked frames hold up to 16 MiB and span files and paths:
		// the large file's middle frames still go whole.
		{name: "repacked large file", paths: []map[string][]byte{smallFiles(400, 10, 2000), {"big": textLike(3, 34*MiB)}}, repack: true, min: 1, max: 100},
		{name: "repacked small files", paths: []map[string][]byte{smallFiles(500, 300, 5000)}, repack: true, min: 0, max: 0},
	}
	for _, c := range cases {
		t.Run(c.name, func(t *testing.T) {
			st := openStore(t)
			names := make([]string, len(c.paths))
			for i, files := range c.paths {
				names[i] = strings.Repeat(strconv.Itoa(i), 32) + "-p"
				addFiles(t, st, names[i], files)
			}
			if c.repack {
				// A faster level than repack's best: the frames' layout
				// (16 MiB, spanning paths) is what matters here.
				o := store.RepackOptions{Blobs: blobs.RepackOptions{Level: zstd.SpeedBetterCompression}}
				if _, err := st.Repack(context.Background(), o); err != nil {
					t.Fatal(err)
				}
			}
			for i, n := range names {
				got := splicedNAR(t, st, n)
				t.Logf("%s: %d stored frames sent verbatim", n, got)
				if i == len(names)-1 && (got < c.min || got > c.max) {
					t.Errorf("%d stored frames sent verbatim, want %d to %d", got, c.min, c.max)
				}
			}
		})
	}
}

// storeWithPacks opens a store in a known directory, so a test can get at
// its pack files.
func storeWithPacks(t *testing.T) (*store.Store, string) {
	t.Helper()
	dir := t.TempDir()
	st, err := store.Open(context.Background(), dir, store.Options{StoreDir: "/nix/store"})
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { st.Close() })
	return st, dir
}

// flipFrameByte flips a byte in the middle of the zstd data of the first
// frame record of every pack under dir (a single-file path's frames are
// all verbatim candidates).
func flipFrameByte(t *testing.T, dir string) {
	t.Helper()
	packs, _ := filepath.Glob(filepath.Join(dir, "packs", "*", "*.pack"))
	if len(packs) == 0 {
		t.Fatal("no pack files")
	}
	for _, p := range packs {
		f, err := os.Open(p)
		if err != nil {
			t.Fatal(err)
		}
		if _, err := f.Seek(pack.HeaderSize, io.SeekStart); err != nil {
			t.Fatal(err)
		}
		rec, err := pack.ReadRecord(f)
		if err != nil {
			t.Fatal(err)
		}
		f.Close()
		if err := fliptest.XorByte(p, pack.HeaderSize+rec.HdrLen+rec.CLen/2, 0x10); err != nil {
			t.Fatal(err)
		}
	}
}

// TestSpliceFlippedFrame: a flipped byte in a frame that would go out
// verbatim fails the NAR, whether the frame is decoded after the flip
// (the decode or the chunk hashes catch it) or was decoded and checked
// before it and is still in the frame cache (the stored bytes must have the
// CRC-32C of the bytes decoded). What was written before the error decodes
// to a prefix of the NAR: no wrong byte went out.
func TestSpliceFlippedFrame(t *testing.T) {
	for _, warm := range []bool{false, true} {
		t.Run("warm="+strconv.FormatBool(warm), func(t *testing.T) {
			st, dir := storeWithPacks(t)
			name := strings.Repeat("7", 32) + "-flip"
			addFiles(t, st, name, map[string][]byte{"big": textLike(9, 10<<20)})
			want := narOf(t, st, name)
			if warm && splicedNAR(t, st, name) == 0 {
				t.Fatal("no frame sent verbatim before the flip")
			}
			flipFrameByte(t, dir)
			if !warm {
				// A fresh frame cache: the frames decode after the flip.
				st.Close()
				var err error
				if st, err = store.Open(context.Background(), dir, store.Options{StoreDir: "/nix/store"}); err != nil {
					t.Fatal(err)
				}
				defer st.Close()
			}
			enc, _ := zstd.NewWriter(nil, zstd.WithEncoderLevel(zstd.SpeedFastest))
			var z bytes.Buffer
			_, err := writeNARZstd(context.Background(), st, name, enc, &z, nil)
			if !errors.Is(err, blobs.ErrCorrupt) {
				t.Fatalf("render with a flipped frame byte: %v, want ErrCorrupt", err)
			}
			dec, _ := zstd.NewReader(bytes.NewReader(z.Bytes()))
			defer dec.Close()
			got, _ := io.ReadAll(dec)
			if !bytes.HasPrefix(want, got) {
				t.Errorf("the %d bytes sent before the error decode to other bytes than the NAR's", len(got))
			}
		})
	}
}

// TestServeStoredFrames: over HTTP, a NAR with a large file is sent with
// stored frames (counted in /metrics), decodes to the NAR from the warm
// cache too, and the narinfo claims no FileHash/FileSize (the stream is not
// known before it is sent).
func TestServeStoredFrames(t *testing.T) {
	st := openStore(t)
	name := strings.Repeat("8", 32) + "-big"
	addFiles(t, st, name, with(smallFiles(600, 5, 1000), "big", textLike(4, 12<<20)))
	srv := &Server{Store: st, StoreDir: "/nix/store", CacheDir: filepath.Join(t.TempDir(), "c"), CacheBytes: 1 << 30}
	hs := httptest.NewServer(srv)
	defer hs.Close()
	get := func(path string) []byte {
		t.Helper()
		resp, err := http.Get(hs.URL + path)
		if err != nil {
			t.Fatal(err)
		}
		defer resp.Body.Close()
		b, err := io.ReadAll(resp.Body)
		if err != nil || resp.StatusCode != 200 {
			t.Fatalf("GET %s: %s %v", path, resp.Status, err)
		}
		return b
	}
	in, err := ParseNarinfo(bytes.NewReader(get("/"+store.HashPart(name)+".narinfo")), "/nix/store")
	if err != nil {
		t.Fatal(err)
	}
	if in.FileHash != nil || in.FileSize != 0 {
		t.Errorf("narinfo claims FileHash %x, FileSize %d", in.FileHash, in.FileSize)
	}
	want := narOf(t, st, name)
	var first []byte
	for i := range 2 { // rendered, then from the cache
		z := get("/" + in.URL)
		r, _, err := decompress(bytes.NewReader(z), "zstd")
		if err != nil {
			t.Fatal(err)
		}
		if got, err := io.ReadAll(r); err != nil || !bytes.Equal(got, want) {
			t.Fatalf("NAR via %s (%d): %d bytes, %v", in.URL, i, len(got), err)
		}
		if i == 0 {
			first = z
		} else if !bytes.Equal(z, first) {
			t.Errorf("the cached NAR file differs from the stream first sent")
		}
	}
	m := regexp.MustCompile(`(?m)^casnix_http_verbatim_frames_total (\d+)$`).FindStringSubmatch(string(get("/metrics")))
	if m == nil {
		t.Fatal("no casnix_http_verbatim_frames_total in /metrics")
	}
	if n, _ := strconv.Atoi(m[1]); n < 2 {
		t.Errorf("%d stored frames sent verbatim, want at least 2", n)
	}
}

// TestExportStoredFrames: export --compression zstd sends stored frames
// too, and the narinfo's FileHash and FileSize are those of the file
// written, which imports back.
func TestExportStoredFrames(t *testing.T) {
	ctx := context.Background()
	src := openStore(t)
	name := strings.Repeat("9", 32) + "-big"
	addFiles(t, src, name, map[string][]byte{"big": textLike(5, 12<<20), "small": []byte("x")})
	dir := t.TempDir()
	ex := &Exporter{Store: src, Dir: dir, StoreDir: "/nix/store", Compression: "zstd", Jobs: 1}
	if res, err := ex.Export(ctx, []string{name}); err != nil || res.Exported != 1 {
		t.Fatalf("export: %+v %v", res, err)
	}
	in := readNarinfo(t, dir, name)
	file, err := os.ReadFile(filepath.Join(dir, in.URL))
	if err != nil {
		t.Fatal(err)
	}
	if int64(len(file)) != in.FileSize || !bytes.Equal(sha256Of(file), in.FileHash) {
		t.Errorf("narinfo FileSize %d / FileHash %x, file has %d bytes / %x", in.FileSize, in.FileHash, len(file), sha256Of(file))
	}
	// At level 3 the 12 MiB file would compress into one frame without
	// stored frames; with them the file holds several.
	if n := countFrames(t, file); n < 3 {
		t.Errorf("exported file holds %d zstd frames, want stored ones (3 or more)", n)
	}
	srcURL, _ := OpenSource("file://" + dir)
	dst := openStore(t)
	im := &Importer{Store: dst, Src: srcURL, StoreDir: "/nix/store", NoCheckSigs: true, Jobs: 1}
	if got, err := im.Import(ctx, nil, []string{store.HashPart(name)}); err != nil || got.Imported != 1 {
		t.Fatalf("import: %+v %v", got, err)
	}
	if !bytes.Equal(narOf(t, src, name), narOf(t, dst, name)) {
		t.Error("NAR differs after the round trip")
	}
}

// countFrames counts the zstd frames in b by decoding one at a time.
func countFrames(t *testing.T, b []byte) int {
	t.Helper()
	n := 0
	for len(b) > 0 {
		var h zstd.Header
		if err := h.Decode(b); err != nil {
			t.Fatalf("frame %d: %v", n, err)
		}
		size := frameSize(t, b)
		b = b[size:]
		n++
	}
	return n
}

// frameSize is the length of the zstd frame at the start of b: the header,
// its blocks (3-byte headers), and the 4-byte checksum if flagged.
func frameSize(t *testing.T, b []byte) int {
	t.Helper()
	var h zstd.Header
	if err := h.Decode(b); err != nil {
		t.Fatal(err)
	}
	off := h.HeaderSize
	for {
		if off+3 > len(b) {
			t.Fatal("truncated block header")
		}
		bh := uint32(b[off]) | uint32(b[off+1])<<8 | uint32(b[off+2])<<16
		last, typ, size := bh&1 == 1, (bh>>1)&3, int(bh>>3)
		off += 3
		if typ == 1 { // RLE: one byte
			size = 1
		}
		off += size
		if last {
			break
		}
	}
	if h.HasCheckSum {
		off += 4
	}
	return off
}
