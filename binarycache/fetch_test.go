package binarycache

import (
	"bytes"
	"context"
	"crypto/sha256"
	"encoding/binary"
	"errors"
	"io"
	"os"
	"path/filepath"
	"strings"
	"sync/atomic"
	"testing"

	"github.com/klauspost/compress/zstd"

	"github.com/casnix/casnix/nar"
	"github.com/casnix/casnix/store"
)

// addCA imports a flat file whose store path its content address makes.
func addCA(t *testing.T, st *store.Store, contents string) string {
	t.Helper()
	narBytes, err := io.ReadAll(nar.File(strings.NewReader(contents), int64(len(contents)), false))
	if err != nil {
		t.Fatal(err)
	}
	sum := sha256.Sum256(narBytes)
	ca := store.CA{Method: store.CANAR, Algo: "sha256", Hash: sum[:]}
	name, err := ca.Path("/nix/store", "ca-file", nil, false)
	if err != nil {
		t.Fatal(err)
	}
	b := st.NewBatch(context.Background())
	if _, err := b.Add(bytes.NewReader(narBytes), store.PathInfo{Name: name, CA: ca.String()}); err != nil {
		t.Fatal(err)
	}
	if _, err := b.Commit(); err != nil {
		t.Fatal(err)
	}
	return name
}

// TestImportChecksSigsByDefault: without trusted keys an unsigned
// input-addressed path is refused, naming the path; a content-addressed one
// whose address makes its store path is taken; NoCheckSigs takes both.
func TestImportChecksSigsByDefault(t *testing.T) {
	ctx := context.Background()
	src := openStore(t)
	addTree(t, src, pathA)
	caName := addCA(t, src, "hello, content addressing\n")
	dir := t.TempDir()
	ex := &Exporter{Store: src, Dir: dir, StoreDir: "/nix/store", Compression: "zstd", Jobs: 1}
	if _, err := ex.Export(ctx, []string{pathA, caName}); err != nil {
		t.Fatal(err)
	}
	cache, err := OpenSource("file://" + dir)
	if err != nil {
		t.Fatal(err)
	}
	_, otherKeys := keyPair(t)
	cases := []struct {
		name        string
		keys        store.PublicKeys
		noCheckSigs bool
		wantValid   []string
		wantRefused bool
	}{
		{name: "no keys", wantValid: []string{caName}, wantRefused: true},
		{name: "other key", keys: otherKeys, wantValid: []string{caName}, wantRefused: true},
		{name: "no-check-sigs", noCheckSigs: true, wantValid: []string{pathA, caName}},
	}
	for _, tc := range cases {
		t.Run(tc.name, func(t *testing.T) {
			dst := openStore(t)
			im := &Importer{Store: dst, Src: cache, StoreDir: "/nix/store", Keys: tc.keys, NoCheckSigs: tc.noCheckSigs,
				Jobs: 1, KeepGoing: true}
			res, err := im.Import(ctx, []string{pathA, caName}, nil)
			var ue *UntrustedError
			refused := false
			for _, f := range res.Failures {
				if errors.As(f, &ue) {
					refused = true
					if !strings.Contains(f.Error(), "/nix/store/"+pathA) {
						t.Errorf("refusal does not name the path: %v", f)
					}
				}
			}
			if refused != tc.wantRefused || err != nil {
				t.Errorf("refused = %v (err %v, failures %v), want %v", refused, err, res.Failures, tc.wantRefused)
			}
			for _, n := range []string{pathA, caName} {
				ok, err := dst.IsValid(ctx, n)
				if err != nil {
					t.Fatal(err)
				}
				if want := slicesContains(tc.wantValid, n); ok != want {
					t.Errorf("%s valid = %v, want %v", n, ok, want)
				}
			}
		})
	}
}

func slicesContains(s []string, x string) bool {
	for _, v := range s {
		if v == x {
			return true
		}
	}
	return false
}

// countingSource counts the bytes read from a cache's nar/ files.
type countingSource struct {
	Source
	n atomic.Int64
}

type countingReader struct {
	io.ReadCloser
	n *atomic.Int64
}

func (r countingReader) Read(p []byte) (int, error) {
	n, err := r.ReadCloser.Read(p)
	r.n.Add(int64(n))
	return n, err
}

func (s *countingSource) Open(ctx context.Context, rel string) (io.ReadCloser, error) {
	rc, err := s.Source.Open(ctx, rel)
	if err != nil || !strings.HasPrefix(rel, "nar/") {
		return rc, err
	}
	return countingReader{rc, &s.n}, nil
}

// fileNAR is the NAR of one regular file of size bytes of data.
func fileNAR(t *testing.T, data io.Reader, size int64) io.Reader {
	t.Helper()
	return nar.File(data, size, false)
}

func zstdOf(t *testing.T, r io.Reader) []byte {
	t.Helper()
	var b bytes.Buffer
	enc, err := zstd.NewWriter(&b, zstd.WithEncoderLevel(zstd.SpeedFastest))
	if err != nil {
		t.Fatal(err)
	}
	if _, err := io.Copy(enc, r); err != nil {
		t.Fatal(err)
	}
	if err := enc.Close(); err != nil {
		t.Fatal(err)
	}
	return b.Bytes()
}

// zeros reads as n zero bytes.
type zeros struct{ n int64 }

func (z *zeros) Read(p []byte) (int, error) {
	if z.n <= 0 {
		return 0, io.EOF
	}
	k := min(int64(len(p)), z.n)
	clear(p[:k])
	z.n -= k
	return int(k), nil
}

// skippableFrames is n bytes of zstd skippable frames, which decoders
// pass over without producing anything.
func skippableFrames(n int) []byte {
	var b []byte
	for len(b) < n {
		frame := make([]byte, 8+64<<10)
		binary.LittleEndian.PutUint32(frame, 0x184D2A50)
		binary.LittleEndian.PutUint32(frame[4:], 64<<10)
		b = append(b, frame...)
	}
	return b
}

// hugeWindowFrame is a zstd frame of data in one raw block whose header
// asks for a 256 MiB window: valid, and accepted by the decoder's default
// 512 MiB limit.
func hugeWindowFrame(data []byte) []byte {
	b := []byte{0x28, 0xB5, 0x2F, 0xFD, 0x00, 18 << 3} // magic, no FCS/checksum/dict, window 2^(10+18)
	hdr := uint32(len(data))<<3 | 1                    // raw block, last
	b = append(b, byte(hdr), byte(hdr>>8), byte(hdr>>16))
	return append(b, data...)
}

// TestImportHostileCache: cache entries whose NAR or file go on past what
// their narinfo says, or whose zstd frame asks for a huge window, fail the
// path without reading (or decompressing) more than the narinfo announced.
func TestImportHostileCache(t *testing.T) {
	ctx := context.Background()
	const name = "33333333333333333333333333333333-hostile"
	small, err := io.ReadAll(fileNAR(t, strings.NewReader("small\n"), 6))
	if err != nil {
		t.Fatal(err)
	}
	smallZ := zstdOf(t, bytes.NewReader(small))
	big, err := io.ReadAll(fileNAR(t, &zeros{4 << 20}, 4<<20))
	if err != nil {
		t.Fatal(err)
	}
	const bombSize = 256 << 20
	bomb := zstdOf(t, fileNAR(t, &zeros{bombSize}, bombSize))
	cases := []struct {
		name        string
		compression string
		file        []byte
		narSize     int64 // claimed
		narHash     []byte
		fileSize    int64 // claimed; 0 for none
		maxRead     int64 // bytes of the file the import may read
		want        error
	}{
		{name: "NAR longer than NarSize", compression: "none", file: big, narSize: 1 << 20, maxRead: 1<<20 + 1, want: ErrTooLong},
		{name: "zstd bomb", compression: "zstd", file: bomb, narSize: 1 << 20, want: ErrTooLong},
		{name: "huge zstd window", compression: "zstd", file: hugeWindowFrame(small), narSize: int64(len(small)),
			narHash: small, want: zstd.ErrWindowSizeExceeded},
		{name: "huge xz dictionary", compression: "xz", file: hugeDictXz(t, small), narSize: int64(len(small)),
			narHash: small, want: ErrXzDict},
		{name: "file longer than FileSize", compression: "zstd", file: append(bytes.Clone(smallZ), skippableFrames(4<<20)...),
			narSize: int64(len(small)), narHash: small, fileSize: int64(len(smallZ)), maxRead: int64(len(smallZ)) + 1, want: ErrTooLong},
		{name: "endless skippable frames", compression: "zstd", file: append(bytes.Clone(smallZ), skippableFrames(4<<20)...),
			narSize: int64(len(small)), narHash: small, maxRead: maxFileSize(int64(len(small))) + 1, want: ErrTooLong},
	}
	for _, tc := range cases {
		t.Run(tc.name, func(t *testing.T) {
			dir := t.TempDir()
			in := &Info{Name: name, URL: "nar/x.nar" + extensions[tc.compression], Compression: tc.compression,
				NarSize: tc.narSize, FileSize: tc.fileSize}
			if tc.narHash != nil {
				in.NarHash = sha256.Sum256(tc.narHash)
			}
			if tc.fileSize != 0 {
				in.FileHash = make([]byte, 32)
			}
			os.MkdirAll(filepath.Join(dir, "nar"), 0o755)
			os.WriteFile(filepath.Join(dir, "nix-cache-info"), []byte("StoreDir: /nix/store\n"), 0o644)
			os.WriteFile(filepath.Join(dir, store.HashPart(name)+".narinfo"), in.Format("/nix/store"), 0o644)
			os.WriteFile(filepath.Join(dir, in.URL), tc.file, 0o644)
			fs, err := OpenSource("file://" + dir)
			if err != nil {
				t.Fatal(err)
			}
			src := &countingSource{Source: fs}
			dst := openStore(t)
			im := &Importer{Store: dst, Src: src, StoreDir: "/nix/store", NoCheckSigs: true, Jobs: 1}
			_, err = im.Import(ctx, []string{name}, nil)
			if !errors.Is(err, tc.want) {
				t.Fatalf("import: %v, want %v", err, tc.want)
			}
			if tc.maxRead != 0 && src.n.Load() > tc.maxRead {
				t.Errorf("read %d bytes of a %d-byte file, want at most %d", src.n.Load(), len(tc.file), tc.maxRead)
			}
			if ok, _ := dst.IsValid(ctx, name); ok {
				t.Errorf("%s valid after a failed import", name)
			}
		})
	}
}
