package nar

import (
	"bytes"
	"context"
	"crypto/sha256"
	"encoding/binary"
	"errors"
	"fmt"
	"io"
	"os"
	"path"
	"path/filepath"
	"runtime"
	"slices"
	"strings"
	"sync"
	"testing"

	gonar "github.com/nix-community/go-nix/pkg/nar"

	"github.com/casnix/casnix/castore"
	"github.com/casnix/casnix/digest"
)

// memStore is an in-memory Sink and Source for testing this package alone;
// the store package's tests run the same paths against SQLite and packs.
type memStore struct {
	blobs map[digest.Digest][]byte
	dirs  map[digest.Digest][]byte
}

func newMem() *memStore {
	return &memStore{blobs: map[digest.Digest][]byte{}, dirs: map[digest.Digest][]byte{}}
}

func (m *memStore) WriteBlob(r io.Reader, size int64) (digest.Digest, error) {
	b, err := io.ReadAll(io.LimitReader(r, size))
	if err != nil {
		return digest.Digest{}, err
	}
	if int64(len(b)) != size {
		return digest.Digest{}, io.ErrUnexpectedEOF
	}
	d := digest.Sum(b)
	m.blobs[d] = b
	return d, nil
}

func (m *memStore) PutDirectory(d *castore.Directory) (digest.Digest, error) {
	enc := d.Encode()
	dg := digest.Sum(enc)
	m.dirs[dg] = enc
	return dg, nil
}

func (m *memStore) Directory(_ context.Context, d digest.Digest) (*castore.Directory, error) {
	enc, ok := m.dirs[d]
	if !ok {
		return nil, fmt.Errorf("directory %s missing", d)
	}
	return castore.Decode(enc)
}

type memBlob struct{ *bytes.Reader }

func (b memBlob) Size() int64 { return b.Reader.Size() }

func (m *memStore) OpenBlob(_ context.Context, d digest.Digest) (Blob, error) {
	b, ok := m.blobs[d]
	if !ok {
		return nil, fmt.Errorf("blob %s missing", d)
	}
	return memBlob{bytes.NewReader(b)}, nil
}

// narBuilder writes NAR tokens by hand, so tests can make malformed ones.
type narBuilder struct{ bytes.Buffer }

func (b *narBuilder) str(s string) *narBuilder {
	var n [8]byte
	binary.LittleEndian.PutUint64(n[:], uint64(len(s)))
	b.Write(n[:])
	b.WriteString(s)
	b.Write(make([]byte, (8-len(s)%8)%8))
	return b
}

func (b *narBuilder) toks(ts ...string) *narBuilder {
	for _, t := range ts {
		b.str(t)
	}
	return b
}

func (b *narBuilder) u64(v uint64) *narBuilder {
	var n [8]byte
	binary.LittleEndian.PutUint64(n[:], v)
	b.Write(n[:])
	return b
}

func file(b *narBuilder, contents string) {
	b.toks("(", "type", "regular", "contents", contents, ")")
}

func entry(b *narBuilder, name string, node func(*narBuilder)) {
	b.toks("entry", "(", "name", name, "node")
	node(b)
	b.toks(")")
}

func dirNAR(names ...string) []byte {
	b := &narBuilder{}
	b.toks(Magic, "(", "type", "directory")
	for _, n := range names {
		entry(b, n, func(b *narBuilder) { file(b, "x") })
	}
	b.toks(")")
	return b.Bytes()
}

// sampleTree makes a tree with every node kind on disk.
func sampleTree(t testing.TB) string {
	t.Helper()
	root := filepath.Join(t.TempDir(), "tree")
	must := func(err error) {
		t.Helper()
		if err != nil {
			t.Fatal(err)
		}
	}
	must(os.MkdirAll(filepath.Join(root, "bin"), 0o755))
	must(os.MkdirAll(filepath.Join(root, "empty"), 0o755))
	must(os.MkdirAll(filepath.Join(root, "a/b/c"), 0o755))
	must(os.WriteFile(filepath.Join(root, "bin/tool"), []byte("#!/bin/sh\necho hi\n"), 0o755))
	must(os.WriteFile(filepath.Join(root, "emptyfile"), nil, 0o644))
	must(os.WriteFile(filepath.Join(root, "..data"), []byte("dot-dot prefixed name"), 0o644))
	must(os.WriteFile(filepath.Join(root, "a/b/c/deep"), bytes.Repeat([]byte("0123456789abcdef"), 70000), 0o644))
	must(os.Symlink("../bin/tool", filepath.Join(root, "a/link")))
	must(os.Symlink("/nix/store/absolute", filepath.Join(root, "abs")))
	return root
}

func TestRoundTripTree(t *testing.T) {
	root := sampleTree(t)
	var buf bytes.Buffer
	if _, err := DumpPath(&buf, root); err != nil {
		t.Fatal(err)
	}
	orig := buf.Bytes()
	m := newMem()
	res, err := Ingest(bytes.NewReader(orig), m)
	if err != nil {
		t.Fatal(err)
	}
	if res.NarSize != int64(len(orig)) || res.NarHash != sha256.Sum256(orig) {
		t.Fatalf("size/hash mismatch: %d vs %d", res.NarSize, len(orig))
	}
	var out bytes.Buffer
	n, err := Render(context.Background(), &out, res.Root, m)
	if err != nil {
		t.Fatal(err)
	}
	if n != int64(len(orig)) || !bytes.Equal(out.Bytes(), orig) {
		t.Fatalf("rendered NAR differs (%d vs %d bytes)", n, len(orig))
	}
	// go-nix reads the same archive (the cross-check that our writer emits
	// what other implementations parse).
	checkGoNix(t, orig)
}

func TestRootKinds(t *testing.T) {
	tests := []struct {
		name string
		nar  []byte
		kind castore.Kind
	}{
		{"file", (&narBuilder{}).toks(Magic, "(", "type", "regular", "contents", "hello", ")").Bytes(), castore.KindFile},
		{"executable", (&narBuilder{}).toks(Magic, "(", "type", "regular", "executable", "", "contents", "#!", ")").Bytes(), castore.KindFile},
		{"empty file", (&narBuilder{}).toks(Magic, "(", "type", "regular", "contents", "", ")").Bytes(), castore.KindFile},
		{"symlink", (&narBuilder{}).toks(Magic, "(", "type", "symlink", "target", "/x", ")").Bytes(), castore.KindSymlink},
		{"empty dir", (&narBuilder{}).toks(Magic, "(", "type", "directory", ")").Bytes(), castore.KindDirectory},
	}
	for _, tc := range tests {
		t.Run(tc.name, func(t *testing.T) {
			m := newMem()
			res, err := Ingest(bytes.NewReader(tc.nar), m)
			if err != nil {
				t.Fatal(err)
			}
			if res.Root.Kind != tc.kind {
				t.Fatalf("kind %v", res.Root.Kind)
			}
			var out bytes.Buffer
			if _, err := Render(context.Background(), &out, res.Root, m); err != nil {
				t.Fatal(err)
			}
			if !bytes.Equal(out.Bytes(), tc.nar) {
				t.Fatal("round trip differs")
			}
		})
	}
}

func TestIngestRejects(t *testing.T) {
	good := dirNAR("a", "b")
	huge := (&narBuilder{}).toks(Magic, "(", "type", "regular", "contents").u64(1 << 62).Bytes()
	hugeTok := (&narBuilder{}).str(Magic).u64(1 << 62).Bytes()
	badPad := bytes.Clone((&narBuilder{}).toks(Magic, "(", "type", "regular", "contents", "abc", ")").Bytes())
	badPad[len(badPad)-16-1] = 1 // last padding byte of "abc", before ")"
	tests := []struct {
		name string
		nar  []byte
		want string
	}{
		{"empty input", nil, "truncated"},
		{"bad magic", (&narBuilder{}).toks("nix-archive-2", "(", "type", "directory", ")").Bytes(), `expected "nix-archive-1"`},
		{"truncated", good[:len(good)-9], "truncated"},
		{"truncated contents", (&narBuilder{}).toks(Magic, "(", "type", "regular", "contents").u64(100).Bytes(), "truncated"},
		{"2^62 length field", huge, "truncated"},
		{"2^62 token length", hugeTok, "exceeds"},
		{"unsorted", dirNAR("b", "a"), "does not sort after"},
		{"duplicate", dirNAR("a", "a"), "does not sort after"},
		{"name ..", dirNAR(".."), `name ".."`},
		{"name .", dirNAR("."), `name "."`},
		{"empty name", dirNAR(""), "empty name"},
		{"name with slash", dirNAR("a/b"), "contains '/'"},
		{"name with NUL", dirNAR("a\x00"), "NUL"},
		{"long name", dirNAR(strings.Repeat("n", 256)), "exceeds 255"},
		{"unknown type", (&narBuilder{}).toks(Magic, "(", "type", "fifo", ")").Bytes(), "unknown node type"},
		{"empty symlink", (&narBuilder{}).toks(Magic, "(", "type", "symlink", "target", "", ")").Bytes(), "empty symlink target"},
		{"bad padding", badPad, "non-zero padding"},
		{"missing close", (&narBuilder{}).toks(Magic, "(", "type", "regular", "contents", "x", "junk").Bytes(), `expected ")"`},
	}
	for _, tc := range tests {
		t.Run(tc.name, func(t *testing.T) {
			_, err := Ingest(bytes.NewReader(tc.nar), newMem())
			if err == nil {
				t.Fatal("accepted")
			}
			if !errors.Is(err, ErrInvalid) || !strings.Contains(err.Error(), tc.want) {
				t.Fatalf("error %q, want ErrInvalid containing %q", err, tc.want)
			}
		})
	}
}

func TestDepthLimit(t *testing.T) {
	b := &narBuilder{}
	b.str(Magic)
	for i := 0; i <= MaxDepth+1; i++ {
		b.toks("(", "type", "directory", "entry", "(", "name", "d", "node")
	}
	_, err := Ingest(bytes.NewReader(b.Bytes()), newMem())
	if err == nil || !strings.Contains(err.Error(), "nested deeper") {
		t.Fatalf("err = %v", err)
	}
}

type header struct {
	path, target string
	typ          gonar.NodeType
	size         int64
	exec         bool
}

// goNixHeaders lists an archive with go-nix's reader.
func goNixHeaders(b []byte) ([]header, error) {
	r, err := gonar.NewReader(bytes.NewReader(b))
	if err != nil {
		return nil, err
	}
	defer r.Close()
	var out []header
	for {
		h, err := r.Next()
		if errors.Is(err, io.EOF) {
			return out, nil
		}
		if err != nil {
			return nil, err
		}
		out = append(out, header{h.Path, h.LinkTarget, h.Type, h.Size, h.Executable})
	}
}

// treeHeaders lists an ingested tree the way go-nix lists a NAR.
func treeHeaders(m *memStore, n castore.Node, path string, out *[]header) error {
	switch n.Kind {
	case castore.KindFile:
		*out = append(*out, header{path: path, typ: gonar.TypeRegular, size: int64(n.Size), exec: n.Executable})
	case castore.KindSymlink:
		*out = append(*out, header{path: path, typ: gonar.TypeSymlink, target: string(n.Target)})
	case castore.KindDirectory:
		*out = append(*out, header{path: path, typ: gonar.TypeDirectory})
		d, err := m.Directory(context.Background(), n.Digest)
		if err != nil {
			return err
		}
		for _, e := range d.Entries() {
			if err := treeHeaders(m, e.Node, strings.TrimSuffix(path, "/")+"/"+string(e.Name), out); err != nil {
				return err
			}
		}
	}
	return nil
}

func checkGoNix(t testing.TB, b []byte) {
	t.Helper()
	want, err := goNixHeaders(b)
	if err != nil {
		t.Fatalf("go-nix rejects an archive we accept: %v", err)
	}
	m := newMem()
	res, err := Ingest(bytes.NewReader(b), m)
	if err != nil {
		t.Fatal(err)
	}
	var got []header
	if err := treeHeaders(m, res.Root, "/", &got); err != nil {
		t.Fatal(err)
	}
	if fmt.Sprint(got) != fmt.Sprint(want) && !tokenNamed(got) {
		t.Fatalf("listing differs from go-nix:\n got %v\nwant %v", got, want)
	}
}

// tokenNamed reports whether an entry is named like a NAR token. Nix's
// parseDump reads an entry's name as plain data (any name but "", ".", ".."
// and ones with '/' or NUL), so a file may be called ")"; go-nix's reader
// loses the entries after one (fuzzing found it), so it is no oracle there.
// TestTokenNames checks casnix on such names without it.
func tokenNamed(hs []header) bool {
	for _, h := range hs {
		switch path.Base(h.path) {
		case "(", ")", "entry", "name", "node", "type", "contents", "target", "executable":
			return true
		}
	}
	return false
}

// FuzzIngest feeds arbitrary bytes to Ingest. Whatever it accepts must
// re-render to exactly the input, hash to what Ingest reported, and list the
// same entries as go-nix's reader.
func FuzzIngest(f *testing.F) {
	f.Add(dirNAR("a", "b"))
	f.Add(dirNAR(".."))
	f.Add((&narBuilder{}).toks(Magic, "(", "type", "regular", "executable", "", "contents", "#!/bin/sh", ")").Bytes())
	f.Add((&narBuilder{}).toks(Magic, "(", "type", "symlink", "target", "/nix/store/x", ")").Bytes())
	nested := &narBuilder{}
	nested.toks(Magic, "(", "type", "directory")
	entry(nested, "d", func(b *narBuilder) {
		b.toks("(", "type", "directory")
		entry(b, "f", func(b *narBuilder) { file(b, "contents") })
		b.toks(")")
	})
	entry(nested, "l", func(b *narBuilder) { b.toks("(", "type", "symlink", "target", "d/f", ")") })
	nested.toks(")")
	f.Add(nested.Bytes())
	f.Fuzz(func(t *testing.T, b []byte) {
		m := newMem()
		res, err := Ingest(bytes.NewReader(b), m)
		if err != nil {
			return
		}
		in := b[:res.NarSize]
		if res.NarHash != sha256.Sum256(in) {
			t.Fatal("hash does not cover exactly the archive")
		}
		var out bytes.Buffer
		if _, err := Render(context.Background(), &out, res.Root, m); err != nil {
			t.Fatal(err)
		}
		if !bytes.Equal(out.Bytes(), in) {
			t.Fatalf("accepted archive does not re-render identically")
		}
		checkGoNix(t, in)
	})
}

// TestFile checks File against the NAR a directory-less dump of the same
// file makes, for sizes on and off the 8-byte padding.
func TestFile(t *testing.T) {
	for _, contents := range []string{"", "x", "12345678", "hello, world\n"} {
		for _, exe := range []bool{false, true} {
			dir := t.TempDir()
			p := filepath.Join(dir, "f")
			mode := os.FileMode(0o644)
			if exe {
				mode = 0o755
			}
			if err := os.WriteFile(p, []byte(contents), mode); err != nil {
				t.Fatal(err)
			}
			var want bytes.Buffer
			if _, err := DumpPath(&want, p); err != nil {
				t.Fatal(err)
			}
			got, err := io.ReadAll(File(strings.NewReader(contents+"trailing"), int64(len(contents)), exe))
			if err != nil || !bytes.Equal(got, want.Bytes()) {
				t.Errorf("%q exe=%v: File differs from DumpPath (%v)", contents, exe, err)
			}
		}
	}
}

// failingSink reads some of a file's contents, then fails as a store
// whose disk, database or context failed would.
type failingSink struct {
	memStore
	read int64
	err  error
}

func (f *failingSink) WriteBlob(r io.Reader, size int64) (digest.Digest, error) {
	if _, err := io.CopyN(io.Discard, r, min(size, f.read)); err != nil {
		return digest.Digest{}, err
	}
	return digest.Digest{}, f.err
}

// errReader yields its data, then err.
type errReader struct {
	data []byte
	err  error
}

func (e *errReader) Read(p []byte) (int, error) {
	if len(e.data) == 0 {
		return 0, e.err
	}
	n := copy(p, e.data)
	e.data = e.data[n:]
	return n, nil
}

// TestIngestSinkErrors checks that only input that is malformed or ends
// early is reported as an invalid NAR: a sink or transport failing in the
// middle of a file is not the NAR's fault.
func TestIngestSinkErrors(t *testing.T) {
	// Megabytes, so that the NAR hash's goroutine (hashbehind) is running
	// when the ingest fails: it must be gone when Ingest returns.
	contents := strings.Repeat("x", 3<<20)
	whole := (&narBuilder{}).toks(Magic, "(", "type", "regular", "contents", contents, ")").Bytes()
	errDisk := errors.New("disk full")
	tests := []struct {
		name    string
		in      io.Reader
		sink    Sink
		invalid bool
		want    error
	}{
		{"sink cancelled mid-file", bytes.NewReader(whole), &failingSink{read: 5000, err: context.Canceled}, false, context.Canceled},
		{"sink fails after whole file", bytes.NewReader(whole), &failingSink{read: 1 << 20, err: errDisk}, false, errDisk},
		{"sink fails before reading", bytes.NewReader(whole), &failingSink{err: errDisk}, false, errDisk},
		{"transport error mid-file", &errReader{data: whole[:5000], err: errDisk}, newMem(), false, errDisk},
		{"input ends mid-file", bytes.NewReader(whole[:5000]), newMem(), true, io.ErrUnexpectedEOF},
		{"input ends mid-file, failing sink", bytes.NewReader(whole[:5000]), &failingSink{read: 1 << 20, err: errDisk}, true, io.ErrUnexpectedEOF},
		{"input ends megabytes into the file", bytes.NewReader(whole[:2<<20]), newMem(), true, io.ErrUnexpectedEOF},
	}
	for _, tc := range tests {
		t.Run(tc.name, func(t *testing.T) {
			before := runtime.NumGoroutine()
			_, err := Ingest(tc.in, tc.sink)
			if n := runtime.NumGoroutine(); n > before {
				t.Errorf("%d goroutines after the failed ingest, %d before", n, before)
			}
			if err == nil {
				t.Fatal("no error")
			}
			if errors.Is(err, ErrInvalid) != tc.invalid {
				t.Errorf("errors.Is(%q, ErrInvalid) = %v, want %v", err, !tc.invalid, tc.invalid)
			}
			if !errors.Is(err, tc.want) {
				t.Errorf("error %q does not wrap %v", err, tc.want)
			}
		})
	}
}

// TestTokenNames: entries named like NAR tokens are ordinary names to Nix
// (archive.cc reads a name as data), so casnix must keep every one of them
// and render the archive back byte for byte.
func TestTokenNames(t *testing.T) {
	names := []string{"(", ")", "0", "contents", "entry", "executable", "name", "node", "target", "type"}
	b := dirNAR(names...)
	m := newMem()
	res, err := Ingest(bytes.NewReader(b), m)
	if err != nil {
		t.Fatal(err)
	}
	var out bytes.Buffer
	if _, err := Render(context.Background(), &out, res.Root, m); err != nil {
		t.Fatal(err)
	}
	if !bytes.Equal(out.Bytes(), b) {
		t.Error("archive with token-like names does not re-render identically")
	}
	var got []header
	if err := treeHeaders(m, res.Root, "/", &got); err != nil {
		t.Fatal(err)
	}
	var paths []string
	for _, h := range got[1:] {
		paths = append(paths, path.Base(h.path))
	}
	if !slices.Equal(paths, names) {
		t.Errorf("entries %q, want %q", paths, names)
	}
}

// ingestTree dumps the tree at root and ingests its NAR into a new
// memStore: the NAR, the store and the ingest's result.
func ingestTree(t *testing.T, root string) (*bytes.Buffer, *memStore, *Result) {
	t.Helper()
	var buf bytes.Buffer
	if _, err := DumpPath(&buf, root); err != nil {
		t.Fatal(err)
	}
	m := newMem()
	res, err := Ingest(bytes.NewReader(buf.Bytes()), m)
	if err != nil {
		t.Fatal(err)
	}
	return &buf, m, res
}

// batchMem is a memStore that opens blobs in batches, counting its calls.
type batchMem struct {
	*memStore
	single  int   // OpenBlob calls
	batches []int // sizes of OpenBlobs calls
}

func (m *batchMem) OpenBlob(ctx context.Context, d digest.Digest) (Blob, error) {
	m.single++
	return m.memStore.OpenBlob(ctx, d)
}

func (m *batchMem) OpenBlobs(ctx context.Context, ds []digest.Digest) ([]Blob, []error, error) {
	m.batches = append(m.batches, len(ds))
	bs, errs := make([]Blob, len(ds)), make([]error, len(ds))
	for i, d := range ds {
		bs[i], errs[i] = m.memStore.OpenBlob(ctx, d)
	}
	return bs, errs, nil
}

// TestRenderBatches: with a BatchSource, Render opens the tree's files
// BlobBatch at a time, renders the same NAR as one file at a time, and
// names the file whose blob is missing.
func TestRenderBatches(t *testing.T) {
	root := filepath.Join(t.TempDir(), "tree")
	write := func(name, data string) {
		t.Helper()
		p := filepath.Join(root, name)
		if err := os.MkdirAll(filepath.Dir(p), 0o755); err != nil {
			t.Fatal(err)
		}
		if err := os.WriteFile(p, []byte(data), 0o644); err != nil {
			t.Fatal(err)
		}
	}
	// Entries sort by name: a run of 40 files, a directory, an empty file,
	// a symlink and 30 files.
	for i := range 40 {
		write(fmt.Sprintf("a%03d", i), fmt.Sprint("file a", i))
	}
	write("b/inner1", "inner one")
	write("b/inner2", "inner two")
	write("c-empty", "")
	if err := os.Symlink("a000", filepath.Join(root, "c-link")); err != nil {
		t.Fatal(err)
	}
	for i := range 30 {
		write(fmt.Sprintf("d%03d", i), fmt.Sprint("file d", i))
	}
	buf, m, res := ingestTree(t, root)
	bm := &batchMem{memStore: m}
	var out bytes.Buffer
	if _, err := Render(context.Background(), &out, res.Root, bm); err != nil {
		t.Fatal(err)
	}
	if !bytes.Equal(out.Bytes(), buf.Bytes()) {
		t.Fatal("batched render differs from the dumped NAR")
	}
	// 72 files with contents (c-empty has none), 32 per lookup whichever
	// directory they are in.
	if want := []int{32, 32, 8}; !slices.Equal(bm.batches, want) || bm.single != 0 {
		t.Errorf("batches %v and %d single opens, want %v and none", bm.batches, bm.single, want)
	}

	// A blob missing from the middle of a batch: the error names its file.
	delete(m.blobs, digest.Sum([]byte("file d7")))
	out.Reset()
	_, err := Render(context.Background(), &out, res.Root, &batchMem{memStore: m})
	if err == nil || !strings.Contains(err.Error(), "/d007") {
		t.Fatalf("missing blob: %v", err)
	}

	// A directory missing: loaded ahead of the render, its error still
	// names it.
	for d, enc := range m.dirs {
		dir, err := castore.Decode(enc)
		if err != nil {
			t.Fatal(err)
		}
		if ents := dir.Entries(); len(ents) == 2 && string(ents[0].Name) == "inner1" {
			delete(m.dirs, d)
		}
	}
	out.Reset()
	_, err = Render(context.Background(), &out, res.Root, &batchMem{memStore: m})
	if err == nil || !strings.Contains(err.Error(), "/b: directory") {
		t.Fatalf("missing directory: %v", err)
	}
}

// aheadMem is a batchMem whose blobs record, in one log, the Prefetch
// calls Render makes and the moment each blob starts being read. (Both
// happen on the rendering goroutine; blobs are opened on the walk's.)
type aheadMem struct {
	*memStore
	names   map[digest.Digest]string
	log     []aheadEvent
	mu      sync.Mutex
	opened  int // blobs opened and not yet read
	maxOpen int
}

type aheadEvent struct {
	name string
	n    int64 // Prefetch(n); -1: the read starts
}

type aheadBlob struct {
	*bytes.Reader
	m    *aheadMem
	name string
	read bool
}

func (b *aheadBlob) Size() int64 { return b.Reader.Size() }

func (b *aheadBlob) Prefetch(n int64) { b.m.log = append(b.m.log, aheadEvent{b.name, n}) }

func (b *aheadBlob) start() {
	if !b.read {
		b.read = true
		b.m.mu.Lock()
		b.m.opened--
		b.m.mu.Unlock()
		b.m.log = append(b.m.log, aheadEvent{b.name, -1})
	}
}

func (b *aheadBlob) Read(p []byte) (int, error) { b.start(); return b.Reader.Read(p) }

func (b *aheadBlob) WriteTo(w io.Writer) (int64, error) { b.start(); return b.Reader.WriteTo(w) }

func (m *aheadMem) OpenBlob(ctx context.Context, d digest.Digest) (Blob, error) {
	return nil, errors.New("OpenBlob called on a BatchSource")
}

func (m *aheadMem) OpenBlobs(ctx context.Context, ds []digest.Digest) ([]Blob, []error, error) {
	bs, errs := make([]Blob, len(ds)), make([]error, len(ds))
	m.mu.Lock()
	defer m.mu.Unlock()
	for i, d := range ds {
		m.opened++
		m.maxOpen = max(m.maxOpen, m.opened)
		bs[i] = &aheadBlob{Reader: bytes.NewReader(m.blobs[d]), m: m, name: m.names[d]}
	}
	return bs, errs, nil
}

// TestRenderReadAhead: Render has the files after the one it writes
// decoding, across batches and directories, within ReadAheadBytes of the
// start of the file it writes, with at most three batches open (one the
// walk has ready, two the render has taken), and still renders the same
// NAR.
func TestRenderReadAhead(t *testing.T) {
	// Files of 1 MiB: the window ends at 16 of them. Files of 100 bytes:
	// it ends BlobBatch files on, just before a directory.
	for _, fileSize := range []int{1 << 20, 100} {
		t.Run(fmt.Sprint(fileSize), func(t *testing.T) { testRenderReadAhead(t, fileSize) })
	}
}

func testRenderReadAhead(t *testing.T, fileSize int) {
	root := filepath.Join(t.TempDir(), "tree")
	sizes := map[string]int64{}
	write := func(name string, size int) {
		t.Helper()
		p := filepath.Join(root, name)
		if err := os.MkdirAll(filepath.Dir(p), 0o755); err != nil {
			t.Fatal(err)
		}
		data := make([]byte, size)
		copy(data, name) // distinct contents, so no two files share a blob
		if err := os.WriteFile(p, data, 0o644); err != nil {
			t.Fatal(err)
		}
		sizes[name] = int64(size)
	}
	// A batch of files, a directory (the first node past the first
	// batch), then 5 files.
	for i := range BlobBatch {
		write(fmt.Sprintf("a%03d", i), fileSize)
	}
	write("b/x", fileSize)
	write("b/y", 100)
	for i := range 5 {
		write(fmt.Sprintf("c%03d", i), fileSize/2)
	}
	buf, m, res := ingestTree(t, root)
	am := &aheadMem{memStore: m, names: map[digest.Digest]string{}}
	order := []string{} // files in NAR order
	for name := range sizes {
		order = append(order, name)
	}
	slices.Sort(order)
	for _, name := range order {
		data, err := os.ReadFile(filepath.Join(root, name))
		if err != nil {
			t.Fatal(err)
		}
		am.names[digest.Sum(data)] = name
	}
	var out bytes.Buffer
	if _, err := Render(context.Background(), &out, res.Root, am); err != nil {
		t.Fatal(err)
	}
	if !bytes.Equal(out.Bytes(), buf.Bytes()) {
		t.Fatal("render with read-ahead differs from the dumped NAR")
	}
	if am.maxOpen > 3*BlobBatch {
		t.Errorf("%d blobs open at once, want at most %d", am.maxOpen, 3*BlobBatch)
	}
	// start[name] is where a file's contents start among all the files'
	// contents, in NAR order.
	start := map[string]int64{}
	var off int64
	for _, name := range order {
		start[name] = off
		off += sizes[name]
	}
	// Prefetches logged before file k's read are k's window.
	next := slices.Clone(order) // files still to be read, in order
	prefetched := map[string]bool{}
	for _, ev := range am.log {
		if ev.n < 0 {
			if ev.name != next[0] {
				t.Fatalf("read %s, want %s", ev.name, next[0])
			}
			next = next[1:]
			continue
		}
		k := next[0]
		prefetched[ev.name] = true
		if ev.name <= k {
			t.Errorf("%s prefetched while %s renders: not ahead", ev.name, k)
		}
		if end := start[ev.name] + ev.n - start[k]; end > ReadAheadBytes {
			t.Errorf("Prefetch(%d) of %s while %s renders reaches %d bytes past its start, budget %d",
				ev.n, ev.name, k, end, ReadAheadBytes)
		}
	}
	// Every file but the first was decoding before it was reached, across
	// the batch boundary at b/x and into and out of b/ too.
	for _, name := range order {
		first := name == "a000"
		if prefetched[name] == first {
			t.Errorf("%s prefetched: %v, want %v", name, prefetched[name], !first)
		}
	}
}

// TestRenderReadAheadPastDirectories: read-ahead walks through more
// directories without files than it may hold ahead (maxAhead) to reach the
// next file, and the render still gives the same NAR.
func TestRenderReadAheadPastDirectories(t *testing.T) {
	root := filepath.Join(t.TempDir(), "tree")
	if err := os.MkdirAll(root, 0o755); err != nil {
		t.Fatal(err)
	}
	// A batch of files, so that the read-ahead of the first one reaches
	// past the batch into the directories.
	names := []string{"z"}
	for i := range BlobBatch {
		names = append(names, fmt.Sprintf("a%02d", i))
	}
	for _, name := range names {
		if err := os.WriteFile(filepath.Join(root, name), []byte("file "+name), 0o644); err != nil {
			t.Fatal(err)
		}
	}
	for i := range maxAhead + 10 {
		dir := filepath.Join(root, fmt.Sprintf("d%03d", i))
		if err := os.Mkdir(dir, 0o755); err != nil {
			t.Fatal(err)
		}
		if err := os.Symlink("../z", filepath.Join(dir, "l")); err != nil {
			t.Fatal(err)
		}
	}
	buf, m, res := ingestTree(t, root)
	am := &aheadMem{memStore: m, names: map[digest.Digest]string{}}
	var out bytes.Buffer
	if _, err := Render(context.Background(), &out, res.Root, am); err != nil {
		t.Fatal(err)
	}
	if !bytes.Equal(out.Bytes(), buf.Bytes()) {
		t.Fatal("render differs from the dumped NAR")
	}
}

// stallMem is a batchMem whose OpenBlobs answers the first call, fails
// with failErr from the second on if set, or else blocks until the walk's
// context ends; it counts the calls still running.
type stallMem struct {
	*memStore
	failErr error
	mu      sync.Mutex
	calls   int
	running int
}

func (m *stallMem) OpenBlobs(ctx context.Context, ds []digest.Digest) ([]Blob, []error, error) {
	m.mu.Lock()
	m.calls++
	n := m.calls
	m.running++
	m.mu.Unlock()
	defer func() { m.mu.Lock(); m.running--; m.mu.Unlock() }()
	if n > 1 {
		if m.failErr != nil {
			return nil, nil, m.failErr
		}
		<-ctx.Done()
		return nil, nil, ctx.Err()
	}
	bs, errs := make([]Blob, len(ds)), make([]error, len(ds))
	for i, d := range ds {
		bs[i], errs[i] = m.memStore.OpenBlob(ctx, d)
	}
	return bs, errs, nil
}

type failingWriter struct{ left int }

func (w *failingWriter) Write(p []byte) (int, error) {
	if len(p) > w.left {
		n := w.left
		w.left = 0
		return n, errors.New("client hung up")
	}
	w.left -= len(p)
	return len(p), nil
}

// TestRenderStopsItsWalk: the walk runs on its own goroutine, and a render
// that ends early (its writer fails while the walk waits on a lookup) ends
// the walk and waits for it: no lookup outlives Render. A failed lookup is
// reported for the files it was to open, when the render reaches them.
func TestRenderStopsItsWalk(t *testing.T) {
	root := filepath.Join(t.TempDir(), "tree")
	if err := os.MkdirAll(root, 0o755); err != nil {
		t.Fatal(err)
	}
	for i := range 3 * BlobBatch {
		data := bytes.Repeat([]byte{byte(i)}, 64<<10) // 4 MiB of NAR in all
		if err := os.WriteFile(filepath.Join(root, fmt.Sprintf("f%03d", i)), data, 0o644); err != nil {
			t.Fatal(err)
		}
	}
	_, m, res := ingestTree(t, root)

	sm := &stallMem{memStore: m}
	_, err := Render(context.Background(), &failingWriter{left: 1 << 20}, res.Root, sm)
	if err == nil || !strings.Contains(err.Error(), "client hung up") {
		t.Fatalf("render to a failing writer: %v", err)
	}
	sm.mu.Lock()
	if sm.running != 0 || sm.calls < 2 {
		t.Errorf("after Render returned: %d lookups running of %d, want 0 of at least 2", sm.running, sm.calls)
	}
	sm.mu.Unlock()

	sm = &stallMem{memStore: m, failErr: errors.New("index unreadable")}
	_, err = Render(context.Background(), io.Discard, res.Root, sm)
	if err == nil || !strings.Contains(err.Error(), fmt.Sprintf("/f%03d: blob", BlobBatch)) ||
		!strings.Contains(err.Error(), "index unreadable") {
		t.Fatalf("failed lookup: %v, want it reported at the batch's first file f%03d", err, BlobBatch)
	}
}
