package binarycache

import (
	"bytes"
	"context"
	"errors"
	"fmt"
	"io"
	"strings"
	"testing"
)

// cutSource serves the files of a Source, NARs cut off after cut bytes
// with a transient error, as an HTTP body whose connection dropped.
type cutSource struct {
	Source
	cut int
}

type cutReader struct {
	r   io.Reader
	err error
}

func (c *cutReader) Read(p []byte) (int, error) {
	n, err := c.r.Read(p)
	if err == io.EOF {
		err = c.err
	}
	return n, err
}

func (s *cutSource) Open(ctx context.Context, rel string) (io.ReadCloser, error) {
	rc, err := s.Source.Open(ctx, rel)
	if err != nil || !strings.HasPrefix(rel, "nar/") {
		return rc, err
	}
	defer rc.Close()
	data, err := io.ReadAll(rc)
	if err != nil {
		return nil, err
	}
	return io.NopCloser(&cutReader{r: bytes.NewReader(data[:min(s.cut, len(data))]),
		err: &TransientError{fmt.Errorf("GET %s: %w", rel, io.ErrUnexpectedEOF)}}), nil
}

// TestFetchCutIsTransient: a download cut off anywhere, of a NAR in any
// compression, fails FetchNAR with a TransientError (so it is retried),
// whatever the decompressor or the NAR parser made of the short stream
// (a decoder may report it as its own unexpected end, dropping the
// transport's error), and leaves nothing valid.
func TestFetchCutIsTransient(t *testing.T) {
	ctx := context.Background()
	src := openStore(t)
	addTree(t, src, pathA)
	for _, comp := range []string{"zstd", "xz", "none"} {
		t.Run(comp, func(t *testing.T) {
			dir := t.TempDir()
			ex := &Exporter{Store: src, Dir: dir, StoreDir: "/nix/store", Compression: comp, Jobs: 1}
			if _, err := ex.Export(ctx, []string{pathA}); err != nil {
				t.Fatal(err)
			}
			files, err := OpenSource("file://" + dir)
			if err != nil {
				t.Fatal(err)
			}
			rc, err := files.Open(ctx, store32(pathA)+".narinfo")
			if err != nil {
				t.Fatal(err)
			}
			in, err := ParseNarinfo(rc, "/nix/store")
			rc.Close()
			if err != nil {
				t.Fatal(err)
			}
			size := int(in.FileSize)
			for _, cut := range []int{0, 1, 13, size / 10, size / 4, size / 2, size * 3 / 4, size - 100, size - 1} {
				dst := openStore(t)
				err := FetchNAR(ctx, dst, &cutSource{Source: files, cut: cut}, in)
				var te *TransientError
				if !errors.As(err, &te) {
					t.Errorf("cut at %d of %d: %v, not transient", cut, size, err)
				}
				if ok, _ := dst.IsValid(ctx, pathA); ok {
					t.Errorf("cut at %d of %d: path valid", cut, size)
				}
			}
		})
	}
}

// store32 is the hash part of a store path basename.
func store32(name string) string { return name[:32] }
