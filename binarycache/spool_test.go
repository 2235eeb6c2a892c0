package binarycache

import (
	"bytes"
	"context"
	"crypto/sha256"
	"errors"
	"io"
	"os"
	"path/filepath"
	"slices"
	"strings"
	"sync"
	"testing"
	"time"

	"github.com/casnix/casnix/store"
)

// pipeSource serves one file whose bytes the test writes through a pipe,
// so it decides when the body ends.
type pipeSource struct {
	r *io.PipeReader
}

func (p pipeSource) Open(ctx context.Context, rel string) (io.ReadCloser, error) { return p.r, nil }
func (p pipeSource) Narinfos(ctx context.Context) ([]string, error)              { return nil, nil }
func (p pipeSource) String() string                                              { return "pipe" }

// readAvailable reads what r has without waiting.
func readAvailable(t *testing.T, r *SpoolReader) ([]byte, error) {
	t.Helper()
	var out []byte
	buf := make([]byte, 64<<10)
	for {
		n, err := r.TryRead(buf)
		out = append(out, buf[:n]...)
		if n == 0 || err != nil {
			return out, err
		}
	}
}

// waitWritten waits until the spool's download has written n NAR bytes.
func waitWritten(t *testing.T, sp *Spool, n int64) {
	t.Helper()
	for deadline := time.Now().Add(10 * time.Second); ; {
		sp.mu.Lock()
		got := sp.n
		sp.mu.Unlock()
		if got >= n {
			return
		}
		if time.Now().After(deadline) {
			t.Fatalf("spool wrote %d of %d bytes", got, n)
		}
		time.Sleep(time.Millisecond)
	}
}

// TestSpool: readers of a spool get the NAR as it is written short of its
// last SpoolHoldBack bytes, which come only once the download ended and
// checked out against the narinfo (NarHash, NarSize, FileHash, FileSize,
// nothing after the NAR); otherwise every reader, and IngestFrom, gets the
// error and the store is left without the path. A reader joining after
// the end reads the whole NAR; the spool file is closed once the download
// and every reader let go.
func TestSpool(t *testing.T) {
	src := openStore(t)
	addTree(t, src, pathA)
	good := narOf(t, src, pathA)
	pi, err := src.Info(context.Background(), pathA)
	if err != nil {
		t.Fatal(err)
	}
	fileHash := sha256.Sum256(good)
	info := func() *Info {
		return &Info{Name: pathA, URL: "nar/x.nar", Compression: "none", NarHash: pi.NarHash, NarSize: pi.NarSize,
			FileHash: fileHash[:], FileSize: pi.NarSize}
	}
	for _, tc := range []struct {
		name    string
		file    []byte         // the upstream file (a NAR: compression none)
		in      func(in *Info) // changes the narinfo
		wantErr error          // nil: the NAR checks out
	}{
		{name: "good", file: good},
		{name: "good without FileHash", file: good, in: func(in *Info) { in.FileHash, in.FileSize = nil, 0 }},
		{name: "flipped byte", file: flipped(good, len(good)/2), wantErr: store.ErrHashMismatch},
		{name: "flipped last byte", file: flipped(good, len(good)-1), wantErr: store.ErrHashMismatch},
		{name: "cut off", file: good[:len(good)-10], wantErr: io.ErrUnexpectedEOF},
		{name: "too long", file: append(bytes.Clone(good), 0), wantErr: ErrTooLong},
		{name: "wrong FileHash", file: good, in: func(in *Info) { in.FileHash = make([]byte, 32) }},
		{name: "FileSize too big", file: good, in: func(in *Info) { in.FileSize++ }},
	} {
		t.Run(tc.name, func(t *testing.T) {
			in := info()
			if tc.in != nil {
				tc.in(in)
			}
			ok := tc.wantErr == nil && (tc.in == nil || in.FileHash == nil)
			dir := filepath.Join(t.TempDir(), "tmp")
			sp, err := NewSpool(dir, in)
			if err != nil {
				t.Fatal(err)
			}
			if ents, _ := os.ReadDir(dir); len(ents) != 0 {
				t.Fatalf("spool file left in %s: %v", dir, ents)
			}
			pr, pw := io.Pipe()
			fetched := make(chan error, 1)
			go func() { fetched <- sp.Fetch(context.Background(), pipeSource{pr}) }()
			r := sp.NewReader(context.Background())
			defer r.Close()
			dst := openStore(t)
			ingested := make(chan error, 1)
			ir := sp.NewReader(context.Background())
			go func() { err := IngestFrom(context.Background(), dst, ir, in); ir.Close(); ingested <- err }()

			// All of the file is there, its end not yet: the NAR's end
			// is held back.
			pw.Write(tc.file)
			if len(tc.file) >= len(good) {
				waitWritten(t, sp, int64(len(good)))
			} else {
				waitWritten(t, sp, int64(len(tc.file)))
			}
			got, err := readAvailable(t, r)
			if tc.name == "too long" {
				// The byte too many fails it at once.
				if !errors.Is(err, ErrTooLong) && len(got) > len(good)-SpoolHoldBack {
					t.Fatalf("read %d bytes, %v", len(got), err)
				}
			} else if err != nil || len(got) != min(len(tc.file), len(good)-SpoolHoldBack) || !bytes.Equal(got, tc.file[:len(got)]) {
				t.Fatalf("before the end: read %d bytes, %v; want %d", len(got), err, min(len(tc.file), len(good)-SpoolHoldBack))
			}
			pw.Close()
			ferr := <-fetched
			rest, err := io.ReadAll(r)
			got = append(got, rest...)
			if ok {
				if ferr != nil || err != nil || !bytes.Equal(got, good) {
					t.Fatalf("read %d bytes, %v (fetch: %v)", len(got), err, ferr)
				}
				if err := <-ingested; err != nil {
					t.Fatal(err)
				}
				if !bytes.Equal(narOf(t, dst, pathA), good) {
					t.Fatal("ingested NAR differs")
				}
				// A reader joining now reads it all.
				late := sp.NewReader(context.Background())
				all, err := io.ReadAll(late)
				late.Close()
				if err != nil || !bytes.Equal(all, good) {
					t.Fatalf("late reader: %d bytes, %v", len(all), err)
				}
			} else {
				if ferr == nil || err == nil || len(got) >= len(good) {
					t.Fatalf("bad NAR: read %d of %d bytes, %v (fetch: %v)", len(got), len(good), err, ferr)
				}
				if tc.wantErr != nil && !errors.Is(ferr, tc.wantErr) {
					t.Fatalf("fetch: %v, want %v", ferr, tc.wantErr)
				}
				if err := <-ingested; err == nil {
					t.Fatal("bad NAR ingested")
				}
				if ok, _ := dst.IsValid(context.Background(), pathA); ok {
					t.Fatal("bad NAR valid")
				}
				if st, err := dst.Stats(context.Background()); err != nil || st.Paths != 0 {
					t.Fatalf("stats %+v, %v", st, err)
				}
			}
			r.Close()
			sp.mu.Lock()
			refs := sp.refs
			sp.mu.Unlock()
			if refs != 0 {
				t.Fatalf("%d references left: the spool file stays open", refs)
			}
			if sp.NewReader(context.Background()) != nil {
				t.Fatal("a closed spool opened a reader")
			}
		})
	}
}

func flipped(b []byte, at int) []byte {
	b = bytes.Clone(b)
	b[at] ^= 1
	return b
}

// TestSpoolCheckedReader: a checked reader (what HTTP clients get) hashes
// what it reads back from the spool file, so a file damaged after the
// download checked out fails it before the NAR's end, whatever the
// buffer sizes; an intact file reads whole. A Range-like reader reading in
// small pieces gets the end too.
func TestSpoolCheckedReader(t *testing.T) {
	src := openStore(t)
	addTree(t, src, pathA)
	good := narOf(t, src, pathA)
	pi, err := src.Info(context.Background(), pathA)
	if err != nil {
		t.Fatal(err)
	}
	in := &Info{Name: pathA, URL: "nar/x.nar", Compression: "none", NarHash: pi.NarHash, NarSize: pi.NarSize}
	for _, tc := range []struct {
		name    string
		damage  int // offset of a byte flipped in the file after the download; -1: none
		bufSize int
	}{
		{"intact", -1, 64 << 10},
		{"intact, 5-byte reads", -1, 5},
		{"damaged in the middle", len(good) / 2, 64 << 10},
		{"damaged in the held back end", len(good) - 3, 64 << 10},
		{"damaged in the end, 5-byte reads", len(good) - 3, 5},
	} {
		t.Run(tc.name, func(t *testing.T) {
			sp, err := NewSpool(filepath.Join(t.TempDir(), "tmp"), in)
			if err != nil {
				t.Fatal(err)
			}
			sp.Retain() // as the spool table does, so the file outlives the download
			defer sp.Release()
			pr, pw := io.Pipe()
			go func() { pw.Write(good); pw.Close() }()
			if err := sp.Fetch(context.Background(), pipeSource{pr}); err != nil {
				t.Fatal(err)
			}
			r := sp.NewCheckedReader(context.Background())
			if r == nil {
				t.Fatal("no reader")
			}
			defer r.Close()
			if tc.damage >= 0 {
				b := []byte{good[tc.damage] ^ 1}
				if _, err := sp.f.WriteAt(b, int64(tc.damage)); err != nil {
					t.Fatal(err)
				}
			}
			var got []byte
			buf := make([]byte, tc.bufSize)
			for {
				n, err := r.Read(buf)
				got = append(got, buf[:n]...)
				if err == io.EOF {
					break
				}
				if err != nil {
					if tc.damage < 0 || !errors.Is(err, store.ErrHashMismatch) {
						t.Fatalf("after %d bytes: %v", len(got), err)
					}
					if len(got) >= len(good) {
						t.Fatalf("damaged spool: read all %d bytes before the error", len(got))
					}
					return
				}
			}
			if tc.damage >= 0 || !bytes.Equal(got, good) {
				t.Fatalf("read %d bytes to the end (damage at %d), want %d intact bytes or an error", len(got), tc.damage, len(good))
			}
		})
	}
}

// TestSpoolRawReader: a raw reader gets the downloaded (zstd) file as it
// arrives, short of its last RawHoldBack bytes, which come once the body
// ended cleanly at the narinfo's FileSize or, without a FileSize, once the
// whole NAR checked out. A file that is cut off or too long never reaches
// its end: the reader gets the error. A file of the right length that is
// not the one named (its FileHash) or holds another NAR (its NarHash)
// reaches the raw reader whole, whose client checks the NAR's hash as it
// would from the upstream, and is not stored: the NAR readers (the
// ingest), which follow the same download, check both.
func TestSpoolRawReader(t *testing.T) {
	data := make([]byte, 1<<20)
	for i := range data {
		data[i] = byte(i*7919 + i>>8*31) // ~incompressible in 1 MiB windows: the file is > RawHoldBack
	}
	rnd := sha256.Sum256(data)
	for i := 0; i < len(data); i += 32 {
		rnd = sha256.Sum256(rnd[:])
		copy(data[i:], rnd[:])
	}
	good, err := io.ReadAll(fileNAR(t, bytes.NewReader(data), int64(len(data))))
	if err != nil {
		t.Fatal(err)
	}
	file := zstdOf(t, bytes.NewReader(good))
	if len(file) <= 2*RawHoldBack {
		t.Fatalf("file of %d bytes: too small for the test", len(file))
	}
	narHash := sha256.Sum256(good)
	fileHash := sha256.Sum256(file)
	damaged := bytes.Clone(file)
	damaged[len(damaged)/2] ^= 1
	info := func() *Info {
		return &Info{Name: pathA, URL: "nar/x.nar.zst", Compression: "zstd", NarHash: narHash, NarSize: int64(len(good)),
			FileHash: fileHash[:], FileSize: int64(len(file))}
	}
	for _, tc := range []struct {
		name    string
		file    []byte
		in      func(in *Info)
		rawOK   bool  // the raw reader reads the whole file
		wantErr error // of the fetch (or, fileOK, of the ingest); nil: it checks out
		fileOK  bool  // the fetch checks out (the file is the one named), the ingest fails
	}{
		{name: "good", file: file, rawOK: true},
		{name: "good without FileHash", file: file, in: func(in *Info) { in.FileHash, in.FileSize = nil, 0 }, rawOK: true},
		{name: "good without FileHash, with FileSize", file: file, in: func(in *Info) { in.FileHash = nil }, rawOK: true},
		// The file is not hashed as it arrives (the NAR's check hashes it):
		// of the right length, it is released; the ingest refuses it.
		{name: "wrong FileHash", file: file, in: func(in *Info) { in.FileHash = make([]byte, 32) }, rawOK: true, wantErr: errAny, fileOK: true},
		{name: "damaged, of the right length", file: damaged, rawOK: true, wantErr: errAny, fileOK: true},
		{name: "FileSize too big", file: file, in: func(in *Info) { in.FileSize++ }, wantErr: errAny},
		{name: "too long", file: append(bytes.Clone(file), 0), wantErr: ErrTooLong},
		{name: "cut off", file: file[:len(file)-RawHoldBack/2], wantErr: io.ErrUnexpectedEOF},
		{name: "cut off without FileHash", file: file[:len(file)-RawHoldBack/2], in: func(in *Info) { in.FileHash, in.FileSize = nil, 0 }, wantErr: io.ErrUnexpectedEOF},
		// The file is the one named, the NAR in it not the one signed: the
		// file is released (the client's own NarHash check refuses it), the
		// fetch fails, nothing is ingested.
		// (The spool is lazy: its download checks the file; the NAR's
		// check, started by the ingest's NAR reader, fails that reader.)
		{name: "NarHash lie", file: file, in: func(in *Info) { in.NarHash[0] ^= 1 }, rawOK: true, wantErr: store.ErrHashMismatch, fileOK: true},
		{name: "NarHash lie without FileHash", file: file, in: func(in *Info) { in.NarHash[0] ^= 1; in.FileHash, in.FileSize = nil, 0 }, wantErr: store.ErrHashMismatch},
	} {
		t.Run(tc.name, func(t *testing.T) {
			in := info()
			if tc.in != nil {
				tc.in(in)
			}
			sp, err := NewSpool(filepath.Join(t.TempDir(), "tmp"), in)
			if err != nil {
				t.Fatal(err)
			}
			if err := sp.EnableRaw(); err != nil {
				t.Fatal(err)
			}
			pr, pw := io.Pipe()
			fetched := make(chan error, 1)
			go func() { fetched <- sp.Fetch(context.Background(), pipeSource{pr}) }()
			r := sp.NewRawReader(context.Background())
			if r == nil || !r.Raw() {
				t.Fatal("no raw reader")
			}
			defer r.Close()
			dst := openStore(t)
			ir := sp.NewReader(context.Background())
			ingested := make(chan error, 1)
			go func() { err := IngestFrom(context.Background(), dst, ir, in); ir.Close(); ingested <- err }()

			// The whole file is written, the body not ended: its end is held back.
			pw.Write(tc.file)
			want := int64(min(len(tc.file), len(file)) - RawHoldBack)
			for deadline := time.Now().Add(10 * time.Second); ; {
				sp.mu.Lock()
				n, end := sp.rawN, sp.rawEnd
				sp.mu.Unlock()
				if n >= int64(min(len(tc.file), len(file))) || end || time.Now().After(deadline) {
					break
				}
				time.Sleep(time.Millisecond)
			}
			got, err := readAvailable(t, r)
			if tc.name != "too long" && (err != nil || int64(len(got)) != want || !bytes.Equal(got, tc.file[:len(got)])) {
				t.Fatalf("before the end: read %d bytes, %v; want %d", len(got), err, want)
			}
			if tc.wantErr == io.ErrUnexpectedEOF {
				pw.CloseWithError(io.ErrUnexpectedEOF)
			} else {
				pw.Close()
			}
			rest, rerr := io.ReadAll(r)
			got = append(got, rest...)
			ferr := <-fetched
			if tc.rawOK {
				if rerr != nil && !errors.Is(rerr, tc.wantErr) || !bytes.Equal(got[:min(len(got), len(tc.file))], tc.file[:min(len(got), len(tc.file))]) || len(got) != len(tc.file) && rerr == nil {
					t.Fatalf("raw reader: %d of %d bytes, %v", len(got), len(tc.file), rerr)
				}
				if (tc.wantErr == nil || tc.fileOK) && (rerr != nil || len(got) != len(tc.file)) {
					t.Fatalf("raw reader: %d of %d bytes, %v", len(got), len(tc.file), rerr)
				}
			} else if rerr == nil || len(got) >= len(tc.file) && len(got) >= len(file) {
				t.Fatalf("raw reader of a bad file: %d bytes, %v", len(got), rerr)
			}
			switch {
			case (tc.wantErr == nil || tc.fileOK) && ferr != nil:
				t.Fatalf("fetch: %v", ferr)
			case tc.wantErr != nil && !tc.fileOK && ferr == nil:
				t.Fatal("bad file fetched")
			case tc.wantErr != nil && !tc.fileOK && tc.wantErr != errAny && !errors.Is(ferr, tc.wantErr):
				t.Fatalf("fetch: %v, want %v", ferr, tc.wantErr)
			}
			ierr := <-ingested
			if ok, _ := dst.IsValid(context.Background(), pathA); ok != (tc.wantErr == nil) || (ierr == nil) != (tc.wantErr == nil) {
				t.Fatalf("ingest: %v, valid %v", ierr, ok)
			}
			if tc.fileOK && (ierr == nil || tc.wantErr != errAny && !errors.Is(ierr, tc.wantErr)) {
				t.Fatalf("ingest: %v, want %v", ierr, tc.wantErr)
			}
			r.Close()
			// The NAR check (lazy spools) lets go once it stopped.
			for deadline := time.Now().Add(10 * time.Second); ; time.Sleep(time.Millisecond) {
				sp.mu.Lock()
				refs := sp.refs
				sp.mu.Unlock()
				if refs == 0 {
					break
				}
				if time.Now().After(deadline) {
					t.Fatalf("%d references left: the spool files stay open", refs)
				}
			}
		})
	}
}

// errAny: the test wants some error, whichever.
var errAny = errors.New("any error")

// fakeCopy records what became of a NARCopy.
type fakeCopy struct {
	mu       sync.Mutex
	n        int
	commits  int
	aborts   int
	finished chan struct{}
}

func (c *fakeCopy) Write(p []byte) (int, error) {
	c.mu.Lock()
	c.n += len(p)
	c.mu.Unlock()
	return len(p), nil
}
func (c *fakeCopy) Commit() { c.mu.Lock(); c.commits++; c.mu.Unlock(); close(c.finished) }
func (c *fakeCopy) Abort()  { c.mu.Lock(); c.aborts++; c.mu.Unlock(); close(c.finished) }

// TestSpoolLazy: a spool keeping its file with a FileSize is lazy: its
// download checks the file's length only, an ingest from a raw reader (IngestFile)
// decodes and checks the NAR itself and nothing else decodes it (no NAR
// check starts), and the file's copy is kept only once that ingest checked
// the NAR (NARChecked); a NAR that does not match NarHash is not stored and
// its copy is dropped when the spool is let go.
func TestSpoolLazy(t *testing.T) {
	src := openStore(t)
	addTree(t, src, pathA)
	good := narOf(t, src, pathA)
	file := zstdOf(t, bytes.NewReader(good))
	fileHash := sha256.Sum256(file)
	for _, lie := range []bool{false, true} {
		in := &Info{Name: pathA, URL: "nar/x.nar.zst", Compression: "zstd", NarHash: sha256.Sum256(good), NarSize: int64(len(good)),
			FileHash: fileHash[:], FileSize: int64(len(file))}
		if lie {
			in.NarHash[0] ^= 1
		}
		sp, err := NewSpool(filepath.Join(t.TempDir(), "tmp"), in)
		if err != nil {
			t.Fatal(err)
		}
		if err := sp.EnableRaw(); err != nil {
			t.Fatal(err)
		}
		c := &fakeCopy{finished: make(chan struct{})}
		sp.Keep(c)
		if !sp.Lazy() {
			t.Fatal("a spool keeping its file, with a FileSize, is not lazy")
		}
		rd := sp.NewRawReader(context.Background())
		pr, pw := io.Pipe()
		go func() { pw.Write(file); pw.Close() }()
		if err := sp.Fetch(context.Background(), pipeSource{pr}); err != nil {
			t.Fatalf("lie %v: fetch: %v", lie, err)
		}
		dst := openStore(t)
		ierr := IngestFile(context.Background(), dst, rd, in)
		if ierr == nil {
			sp.NARChecked()
		}
		rd.Close()
		<-c.finished
		sp.mu.Lock()
		started, refs := sp.checkStarted, sp.refs
		sp.mu.Unlock()
		valid, _ := dst.IsValid(context.Background(), pathA)
		switch {
		case started:
			t.Errorf("lie %v: a NAR check started beside the ingest", lie)
		case refs != 0:
			t.Errorf("lie %v: %d references left", lie, refs)
		case !lie && (ierr != nil || !valid || c.commits != 1 || c.aborts != 0 || c.n != len(file)):
			t.Errorf("good NAR: ingest %v, valid %v, copy %d bytes, %d commits, %d aborts", ierr, valid, c.n, c.commits, c.aborts)
		case lie && (!errors.Is(ierr, store.ErrHashMismatch) || valid || c.commits != 0 || c.aborts != 1):
			t.Errorf("NarHash lie: ingest %v, valid %v, %d commits, %d aborts", ierr, valid, c.commits, c.aborts)
		}
	}
}

// TestSpoolKeepsOwnFile: a spool keeping its file in the NAR cache writes
// the download once, into the cache's file (adoptKeep): a good file is
// kept whole under its key once its NAR checked out, readers of the file
// still read it all after that; a file cut off or failing its NAR check
// leaves neither a cached file nor a temporary one.
func TestSpoolKeepsOwnFile(t *testing.T) {
	src := openStore(t)
	addTree(t, src, pathA)
	good := narOf(t, src, pathA)
	file := zstdOf(t, bytes.NewReader(good))
	fileHash := sha256.Sum256(file)
	for _, tc := range []struct {
		name      string
		send      []byte
		lie       bool
		keep      bool
		keepFirst bool // Keep before EnableRaw (as the pull-through), else after
	}{
		{"good", file, false, true, true},
		{"good, kept after EnableRaw", file, false, true, false},
		{"cut off", file[:len(file)/2], false, false, true},
		{"NarHash lie", file, true, false, false},
	} {
		t.Run(tc.name, func(t *testing.T) {
			in := &Info{Name: pathA, URL: "nar/x.nar.zst", Compression: "zstd", NarHash: sha256.Sum256(good), NarSize: int64(len(good)),
				FileHash: fileHash[:], FileSize: int64(len(file))}
			if tc.lie {
				in.NarHash[0] ^= 1
			}
			dir := t.TempDir()
			c, err := newNarCache(filepath.Join(dir, "cache"), 1<<30)
			if err != nil {
				t.Fatal(err)
			}
			sp, err := NewSpool(filepath.Join(dir, "tmp"), in)
			if err != nil {
				t.Fatal(err)
			}
			fill := c.fill("k")
			if tc.keepFirst {
				sp.Keep(fill)
			}
			if err := sp.EnableRaw(); err != nil {
				t.Fatal(err)
			}
			if !tc.keepFirst {
				sp.Keep(fill)
			}
			rd := sp.NewRawReader(context.Background())
			pr, pw := io.Pipe()
			go func() { pw.Write(tc.send); pw.Close() }()
			ferr := sp.Fetch(context.Background(), pipeSource{pr})
			if !sp.keepIsRaw {
				t.Fatal("the cache's file was not adopted")
			}
			// Whole: the checked file, sent whole, only when it checked out.
			wr := sp.NewRawReader(context.Background())
			if f := wr.Whole(); (f != nil) != (ferr == nil) {
				t.Errorf("Whole after fetch error %v: %v", ferr, f)
			} else if f != nil {
				got, err := io.ReadAll(f)
				f.Close()
				if err != nil || !bytes.Equal(got, file) {
					t.Errorf("Whole: %d bytes, %v; want %d", len(got), err, len(file))
				}
			}
			wr.Close()
			if ferr == nil {
				if ierr := IngestFile(context.Background(), openStore(t), rd, in); ierr == nil {
					sp.NARChecked()
				}
				// After the commit (a rename and a close of the cache's
				// descriptor) the spool's own still reads the file.
				again := sp.NewRawReader(context.Background())
				got, err := io.ReadAll(again)
				again.Close()
				if err != nil || !bytes.Equal(got, file) {
					t.Errorf("raw reader after the commit: %d bytes, %v; want %d", len(got), err, len(file))
				}
			}
			rd.Close()
			// The last reference's abort runs on a goroutine of its own.
			deadline := time.Now().Add(5 * time.Second)
			var names []string
			for {
				ents, _ := os.ReadDir(c.dir)
				names = names[:0]
				for _, e := range ents {
					names = append(names, e.Name())
				}
				if !slices.ContainsFunc(names, func(n string) bool { return strings.HasPrefix(n, ".tmp-") }) || time.Now().After(deadline) {
					break
				}
				time.Sleep(10 * time.Millisecond)
			}
			kept, _ := os.ReadFile(filepath.Join(c.dir, "k"))
			switch {
			case tc.keep && (!bytes.Equal(kept, file) || len(names) != 1 || c.size.Load() != int64(len(file))):
				t.Errorf("kept %d bytes (want %d), cache dir %v, size %d", len(kept), len(file), names, c.size.Load())
			case !tc.keep && len(names) != 0:
				t.Errorf("cache dir holds %v", names)
			}
		})
	}
}
