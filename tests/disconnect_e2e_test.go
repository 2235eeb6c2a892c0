package tests

import (
	"bufio"
	"bytes"
	"crypto/sha256"
	"encoding/base64"
	"encoding/binary"
	"encoding/hex"
	"errors"
	"fmt"
	"io"
	mrand "math/rand/v2"
	"net"
	"net/http"
	"os"
	"path/filepath"
	"slices"
	"strconv"
	"strings"
	"sync"
	"testing"
	"time"

	"golang.org/x/sys/unix"

	"github.com/casnix/casnix/proto"
	"github.com/casnix/casnix/store"
	"github.com/casnix/casnix/tests/nixtest"
)

// Parameters of TestClientDisconnects.
const (
	// disconnectDefault is the number of trials without CASNIX_DISCONNECTS: every op
	// cut in every region about 20 times, in about 30 s on a 2-core machine; enough for
	// the packs left behind by compactions to show (they took the daemon past the
	// descriptor slack after about 500 trials).
	disconnectDefault = 1000
	disconnectStore   = "/nix/store"
	// disconnectDefaultParallel is how many trials run at once by default: the
	// daemon sees disconnects while other connections are mid-op.
	disconnectDefaultParallel = 4
	// disconnectFrame is the framed-upload chunk size the recorded requests use (Nix's
	// FramedSink sends 32 KiB frames; smaller ones put more frame headers in each upload
	// for the cuts to land in).
	disconnectFrame = 8 << 10
	// disconnectSettle bounds how long the daemon may take to end a connection the
	// client has closed (temp roots dropped, goroutines gone).
	disconnectSettle = 10 * time.Second
	// Slack over the baseline after each batch and after all trials. Goroutines: none;
	// the /metrics request itself is in both counts, and the test holds the same
	// connections at both points. Descriptors other than the daemon's data files
	// (sockets, pipes, spool and temp-roots files: what a connection holds): none.
	// Descriptors in all: 16, all of them data files, whose number follows the
	// concurrency, not the number of trials: the SQLite reader pool opens a connection
	// (the database and its -wal) per concurrent reader it has not had yet, up to one
	// per trial of a batch and the checker (par+1 = 5, of which the warm-up opened at
	// least one: 8); and each of the par writers of a batch holds a pack (a write and a
	// read handle: 8), which the warm-up may not all have opened. Measured: +7 after
	// 1000 trials, +10 after 6000 (2 SQLite connections, 4 packs: the pack ids stay at
	// the number of concurrent writers).
	disconnectGoroutineSlack = 0
	disconnectFDSlack        = 16
	// disconnectMemoryLimit is the daemon's --memory-limit: small, so its caches (the
	// decoded-frame cache gets 40%) fill early in the trials and RSS levels off, and
	// growth after that is a leak.
	disconnectMemoryLimit = "48MiB"
	// disconnectRSSGrowth bounds RSS growth over the second half of the trials: the
	// first half warms the caches (frame cache, SQLite page cache, Go heap), the second
	// must not keep growing.
	disconnectRSSGrowth = 16 << 20
)

// Op codes rawclient_test.go does not name.
const (
	dcOpAddToStore    = 7
	dcOpAddSignatures = 37
	dcOpAddBuildLog   = 45
)

// Regions of a recorded request a cut can land in.
const (
	regionHandshake = "handshake" // magic, version, features, affinity, SetOptions
	regionHeader    = "header"    // the op code and its arguments before any bulk data
	regionData      = "data"      // the NAR, text or framed stream (frame headers included)
	regionReply     = "reply"     // the whole request sent; closed before or while reading the reply
)

var disconnectRegions = []string{regionHandshake, regionHeader, regionData, regionReply}

// Ways to end a trial's connection.
const (
	closeHard = "close"      // read what the daemon sent so far, then close: it sees EOF
	closeHalf = "half-close" // CloseWrite, read until the daemon closes (it must), close
	closeRST  = "reset"      // close with the daemon's bytes unread: it sees ECONNRESET
)

var disconnectCloses = []string{closeHard, closeHalf, closeRST}

// dcRequest is the complete client byte stream of one successful request (handshake, op,
// data) and where its regions start, with the check of the state it changes.
type dcRequest struct {
	stream    []byte
	headerAt  int   // the op code's offset (end of the handshake)
	dataAt    int   // the bulk data's offset (== dataEnd when the op has none)
	dataEnd   int   // end of the bulk data
	frameHdrs []int // offsets of the frame headers (pull answers' lengths) inside the data
	// check looks at what the request changes: absent or complete, never half. It
	// returns whether the change is there.
	check func(cl *proto.Client) (bool, error)
}

// dcOp is a write op under test and how to make a fresh request for it (each trial needs
// its own: a path added by one trial would make the next a no-op).
type dcOp struct {
	name string
	gen  func(e *dcEnv, i int) *dcRequest
}

// dcEnv is what requests refer to.
type dcEnv struct {
	t       *testing.T
	cas     *nixtest.Casnix
	base    string         // a valid path requests refer to
	tmp     string         // where the roots' links go
	rng     *mrand.Rand    // cuts, sizes
	bytes   *mrand.ChaCha8 // names and contents: a seed replays a run's requests
	socket  string
	realise *rawConn // queries realisations
}

// dcWriter builds a request byte stream.
type dcWriter struct{ bytes.Buffer }

func (w *dcWriter) u64(v uint64) {
	var b [8]byte
	binary.LittleEndian.PutUint64(b[:], v)
	w.Write(b[:])
}

func (w *dcWriter) str(s string) {
	w.u64(uint64(len(s)))
	w.WriteString(s)
	w.Write(make([]byte, (8-len(s)%8)%8))
}

func (w *dcWriter) strs(ss []string) {
	w.u64(uint64(len(ss)))
	for _, s := range ss {
		w.str(s)
	}
}

// framed writes data as a framed stream of disconnectFrame chunks and returns the offsets
// of its frame headers (the terminating zero frame included).
func (w *dcWriter) framed(data []byte) []int {
	var hdrs []int
	for len(data) > 0 {
		n := min(len(data), disconnectFrame)
		hdrs = append(hdrs, w.Len())
		w.u64(uint64(n))
		w.Write(data[:n])
		data = data[n:]
	}
	hdrs = append(hdrs, w.Len())
	w.u64(0)
	return hdrs
}

// handshake writes a client's handshake at protocol 1.minor and a SetOptions.
func (w *dcWriter) handshake(minor uint64) {
	w.u64(rawMagic1)
	w.u64(1<<8 | minor)
	if minor >= 38 {
		w.strs(nil) // features
	}
	if minor >= 14 {
		w.u64(0) // cpu affinity
	}
	if minor >= 11 {
		w.u64(0) // reserve space
	}
	w.u64(rawOpSetOptions)
	for range 12 {
		w.u64(0)
	}
	if minor >= 12 {
		w.u64(0) // no overrides
	}
}

// randomName is a fresh store path basename (input-addressed: any hash will do).
func (e *dcEnv) randomName(name string) string {
	var h [20]byte
	e.bytes.Read(h[:])
	return nixtest.NixBase32Encode(h[:]) + "-" + name
}

// randomNAR is the NAR of one regular file of random contents (16-80 KiB, so several
// frames), and the contents.
func (e *dcEnv) randomNAR() (nar []byte, contents []byte) {
	contents = make([]byte, 16<<10+e.rng.IntN(64<<10))
	e.bytes.Read(contents)
	var b bytes.Buffer
	io.Copy(&b, narOfFile(contents))
	return b.Bytes(), contents
}

func narOfFile(contents []byte) io.Reader {
	// The NAR of a regular file, as nar.File renders it.
	var b dcWriter
	b.str("nix-archive-1")
	for _, tok := range []string{"(", "type", "regular", "contents"} {
		b.str(tok)
	}
	b.str(string(contents))
	b.str(")")
	return &b
}

func sha256Hex(b []byte) string {
	h := sha256.Sum256(b)
	return hex.EncodeToString(h[:])
}

// writePathInfo writes a path's unkeyed ValidPathInfo as AddToStoreNar and
// AddMultipleToStore send it.
func (w *dcWriter) writePathInfo(path string, nar []byte, refs []string) {
	w.str(path)
	w.str("") // deriver
	w.str(sha256Hex(nar))
	w.strs(refs)
	w.u64(uint64(time.Now().Unix()))
	w.u64(uint64(len(nar)))
	w.u64(0)    // ultimate
	w.strs(nil) // sigs
	w.str("")   // ca
}

// checkPath checks that path is either not valid or valid with everything it takes: its
// NAR hashes to its narHash and has its narSize, its references are valid. It returns
// whether it is valid.
func checkPath(cl *proto.Client, path string) (bool, error) {
	pi, err := cl.QueryPathInfo(path)
	if err != nil {
		return false, fmt.Errorf("QueryPathInfo %s: %w", path, err)
	}
	if pi == nil {
		return false, nil
	}
	h := sha256.New()
	n, err := cl.NarFromPath(path, h)
	if err != nil {
		return true, fmt.Errorf("half-added %s: valid, but NarFromPath: %w", path, err)
	}
	want, err := nixtest.ParseSHA256(pi.NarHash)
	if err != nil {
		if raw, herr := hex.DecodeString(pi.NarHash); herr == nil {
			want, err = raw, nil
		}
	}
	if err != nil {
		return true, fmt.Errorf("%s: narHash %q: %w", path, pi.NarHash, err)
	}
	if !bytes.Equal(h.Sum(nil), want) || uint64(n) != pi.NarSize {
		return true, fmt.Errorf("half-added %s: valid, but its NAR (%d bytes, sha256 %x) is not its narHash %s / narSize %d", path, n, h.Sum(nil), pi.NarHash, pi.NarSize)
	}
	for _, r := range pi.References {
		if r == path {
			continue
		}
		ok, err := cl.IsValidPath(r)
		if err != nil {
			return true, fmt.Errorf("IsValidPath %s: %w", r, err)
		}
		if !ok {
			return true, fmt.Errorf("half-added %s: valid, but its reference %s is not", path, r)
		}
	}
	return true, nil
}

// checkPathSet checks each path with checkPath. It reports whether all are there.
func checkPathSet(cl *proto.Client, paths []string) (bool, error) {
	var valid []bool
	for _, p := range paths {
		ok, err := checkPath(cl, p)
		if err != nil {
			return ok, err
		}
		valid = append(valid, ok)
	}
	return !slices.Contains(valid, false), nil
}

// disconnectOps are the ops that change state, each with a fresh successful request.
var disconnectOps = []dcOp{
	{"AddToStoreNar", func(e *dcEnv, i int) *dcRequest {
		var w dcWriter
		w.handshake(38)
		r := &dcRequest{headerAt: w.Len()}
		path := disconnectStore + "/" + e.randomName(fmt.Sprintf("dc-nar-%d", i))
		nar, _ := e.randomNAR()
		w.u64(rawOpAddToStoreNar)
		w.writePathInfo(path, nar, []string{e.base})
		w.u64(0) // repair
		w.u64(1) // dontCheckSigs
		r.dataAt = w.Len()
		r.frameHdrs = w.framed(nar)
		r.dataEnd = w.Len()
		r.stream = w.Bytes()
		r.check = func(cl *proto.Client) (bool, error) { return checkPath(cl, path) }
		return r
	}},
	{"AddToStoreNar/1.21", func(e *dcEnv, i int) *dcRequest {
		// Before protocol 1.23 the daemon pulls the NAR with STDERR_READ requests,
		// each answered by a string of at most the size asked for. Answers of one byte
		// each fit whatever it asks (the test sends them without reading the
		// requests), so the NAR is a small one.
		var w dcWriter
		w.handshake(21)
		r := &dcRequest{headerAt: w.Len()}
		path := disconnectStore + "/" + e.randomName(fmt.Sprintf("dc-pull-%d", i))
		contents := make([]byte, 256+e.rng.IntN(2<<10))
		e.bytes.Read(contents)
		var nb bytes.Buffer
		io.Copy(&nb, narOfFile(contents))
		nar := nb.Bytes()
		w.u64(rawOpAddToStoreNar)
		w.writePathInfo(path, nar, []string{e.base})
		w.u64(0) // repair
		w.u64(1) // dontCheckSigs
		r.dataAt = w.Len()
		for _, b := range nar {
			r.frameHdrs = append(r.frameHdrs, w.Len())
			w.str(string([]byte{b}))
		}
		r.dataEnd = w.Len()
		r.stream = w.Bytes()
		r.check = func(cl *proto.Client) (bool, error) { return checkPath(cl, path) }
		return r
	}},
	{"AddMultipleToStore", func(e *dcEnv, i int) *dcRequest {
		var w dcWriter
		w.handshake(38)
		r := &dcRequest{headerAt: w.Len()}
		w.u64(rawOpAddMultipleToStore)
		w.u64(0) // repair
		w.u64(1) // dontCheckSigs
		r.dataAt = w.Len()
		// Three paths, each referring to the ones before: a batch is all or nothing,
		// and never a path without its references.
		var inner dcWriter
		var paths []string
		inner.u64(3)
		for j := range 3 {
			p := disconnectStore + "/" + e.randomName(fmt.Sprintf("dc-multi-%d-%d", i, j))
			nar, _ := e.randomNAR()
			inner.writePathInfo(p, nar, append([]string{e.base}, paths...))
			inner.Write(nar)
			paths = append(paths, p)
		}
		r.frameHdrs = w.framed(inner.Bytes())
		r.dataEnd = w.Len()
		r.stream = w.Bytes()
		r.check = func(cl *proto.Client) (bool, error) {
			ok, err := checkPathSet(cl, paths)
			if err != nil {
				return ok, err
			}
			for j := 1; j < len(paths); j++ {
				prev, _ := cl.IsValidPath(paths[j-1])
				cur, _ := cl.IsValidPath(paths[j])
				if cur && !prev {
					return false, fmt.Errorf("half-added batch: %s valid without %s", paths[j], paths[j-1])
				}
			}
			return ok, nil
		}
		return r
	}},
	{"AddToStore", func(e *dcEnv, i int) *dcRequest {
		// Protocol ≥ 1.25: method string, framed dump; recursive or flat by turns.
		var w dcWriter
		w.handshake(38)
		r := &dcRequest{headerAt: w.Len()}
		name := fmt.Sprintf("dc-ca-%d", i)
		nar, contents := e.randomNAR()
		ca := store.CA{Method: store.CANAR, Algo: "sha256"}
		method, dump := "fixed:r:sha256", nar
		if i%2 == 1 {
			ca.Method, method, dump = store.CAFlat, "fixed:sha256", contents
		}
		sum := sha256.Sum256(dump)
		ca.Hash = sum[:]
		base, err := ca.Path(disconnectStore, name, nil, false)
		if err != nil {
			e.t.Fatal(err)
		}
		w.u64(dcOpAddToStore)
		w.str(name)
		w.str(method)
		w.strs(nil) // references
		w.u64(0)    // repair
		r.dataAt = w.Len()
		r.frameHdrs = w.framed(dump)
		r.dataEnd = w.Len()
		r.stream = w.Bytes()
		r.check = func(cl *proto.Client) (bool, error) { return checkPath(cl, disconnectStore+"/"+base) }
		return r
	}},
	{"AddToStore/1.24", func(e *dcEnv, i int) *dcRequest {
		// Before protocol 1.25: fixed, recursive, algo, then the NAR itself unframed.
		var w dcWriter
		w.handshake(24)
		r := &dcRequest{headerAt: w.Len()}
		name := fmt.Sprintf("dc-ca-old-%d", i)
		nar, contents := e.randomNAR()
		ca := store.CA{Method: store.CANAR, Algo: "sha256"}
		recursive, hashed := uint64(1), nar
		if i%2 == 1 {
			ca.Method, recursive, hashed = store.CAFlat, 0, contents
		}
		sum := sha256.Sum256(hashed)
		ca.Hash = sum[:]
		base, err := ca.Path(disconnectStore, name, nil, false)
		if err != nil {
			e.t.Fatal(err)
		}
		w.u64(dcOpAddToStore)
		w.str(name)
		w.u64(1) // fixed
		w.u64(recursive)
		w.str("sha256")
		r.dataAt = w.Len()
		w.Write(nar)
		r.dataEnd = w.Len()
		r.stream = w.Bytes()
		r.check = func(cl *proto.Client) (bool, error) { return checkPath(cl, disconnectStore+"/"+base) }
		return r
	}},
	{"AddTextToStore", func(e *dcEnv, i int) *dcRequest {
		var w dcWriter
		w.handshake(38)
		r := &dcRequest{headerAt: w.Len()}
		name := fmt.Sprintf("dc-text-%d", i)
		// Over 64 KiB at times: the daemon then spools the text to a file.
		text := make([]byte, 1+e.rng.IntN(96<<10))
		e.bytes.Read(text)
		text = []byte(base64.StdEncoding.EncodeToString(text))
		sum := sha256.Sum256(text)
		refs := []string{filepath.Base(e.base)}
		base, err := store.CA{Method: store.CAText, Algo: "sha256", Hash: sum[:]}.Path(disconnectStore, name, refs, false)
		if err != nil {
			e.t.Fatal(err)
		}
		w.u64(rawOpAddTextToStore)
		w.str(name)
		w.u64(uint64(len(text)))
		r.dataAt = w.Len()
		w.Write(text)
		w.Write(make([]byte, (8-len(text)%8)%8))
		r.dataEnd = w.Len()
		w.strs([]string{e.base})
		r.stream = w.Bytes()
		r.check = func(cl *proto.Client) (bool, error) { return checkPath(cl, disconnectStore+"/"+base) }
		return r
	}},
	{"AddSignatures", func(e *dcEnv, i int) *dcRequest {
		var w dcWriter
		w.handshake(38)
		r := &dcRequest{headerAt: w.Len()}
		sigs := []string{e.sig(fmt.Sprintf("dc-a-%d", i)), e.sig(fmt.Sprintf("dc-b-%d", i))}
		w.u64(dcOpAddSignatures)
		w.str(e.base)
		w.strs(sigs)
		r.dataAt, r.dataEnd = w.Len(), w.Len()
		r.stream = w.Bytes()
		r.check = func(cl *proto.Client) (bool, error) {
			pi, err := cl.QueryPathInfo(e.base)
			if err != nil || pi == nil {
				return false, fmt.Errorf("QueryPathInfo %s: %v, %v", e.base, pi, err)
			}
			a, b := slices.Contains(pi.Sigs, sigs[0]), slices.Contains(pi.Sigs, sigs[1])
			if a != b {
				return false, fmt.Errorf("half-added signatures: %s has %v of %q", e.base, []bool{a, b}, sigs)
			}
			return a, nil
		}
		return r
	}},
	{"AddTempRoot", func(e *dcEnv, i int) *dcRequest {
		// The root lives as long as the connection: the check is that it is gone
		// after (checkTempRoots, after every trial).
		var w dcWriter
		w.handshake(38)
		r := &dcRequest{headerAt: w.Len()}
		w.u64(rawOpAddTempRoot)
		w.str(e.base)
		r.dataAt, r.dataEnd = w.Len(), w.Len()
		r.stream = w.Bytes()
		r.check = func(cl *proto.Client) (bool, error) { return false, nil }
		return r
	}},
	{"AddIndirectRoot", func(e *dcEnv, i int) *dcRequest {
		link := filepath.Join(e.tmp, fmt.Sprintf("indirect-%d", i))
		if err := os.Symlink(e.base, link); err != nil {
			e.t.Fatal(err)
		}
		var w dcWriter
		w.handshake(38)
		r := &dcRequest{headerAt: w.Len()}
		w.u64(rawOpAddIndirectRoot)
		w.str(link)
		r.dataAt, r.dataEnd = w.Len(), w.Len()
		r.stream = w.Bytes()
		r.check = func(*proto.Client) (bool, error) { return e.autoRoot(link) }
		return r
	}},
	{"AddPermRoot", func(e *dcEnv, i int) *dcRequest {
		link := filepath.Join(e.tmp, fmt.Sprintf("perm-%d", i))
		var w dcWriter
		w.handshake(38)
		r := &dcRequest{headerAt: w.Len()}
		w.u64(rawOpAddPermRoot)
		w.str(e.base)
		w.str(link)
		r.dataAt, r.dataEnd = w.Len(), w.Len()
		r.stream = w.Bytes()
		r.check = func(*proto.Client) (bool, error) {
			target, lerr := os.Readlink(link)
			auto, err := e.autoRoot(link)
			switch {
			case err != nil:
				return false, err
			case lerr == nil && target != e.base:
				return false, fmt.Errorf("perm root %s points to %s, want %s", link, target, e.base)
			case (lerr == nil) != auto:
				// A link without its registration is a root GC does not know of;
				// a registration without its link, a dangling one.
				return false, fmt.Errorf("half-added perm root %s: link there %v, registered %v", link, lerr == nil, auto)
			}
			return auto, nil
		}
		return r
	}},
	{"RegisterDrvOutput", func(e *dcEnv, i int) *dcRequest {
		var h [32]byte
		e.bytes.Read(h[:])
		id := "sha256:" + hex.EncodeToString(h[:]) + "!out"
		real := (&store.Realisation{ID: id, OutPath: filepath.Base(e.base), DependentRealisations: map[string]string{}}).JSON()
		var w dcWriter
		w.handshake(38)
		r := &dcRequest{headerAt: w.Len()}
		w.u64(rawOpRegisterDrvOutput)
		w.str(real)
		r.dataAt, r.dataEnd = w.Len(), w.Len()
		r.stream = w.Bytes()
		r.check = func(*proto.Client) (bool, error) {
			rs, err := e.realise.queryRealisation(id)
			if err != nil {
				return false, fmt.Errorf("QueryRealisation %s: %w", id, err)
			}
			if len(rs) == 0 {
				return false, nil
			}
			got, err := store.ParseRealisation(rs[0])
			if err != nil || len(rs) != 1 || got.OutPath != filepath.Base(e.base) {
				return false, fmt.Errorf("realisation %s is %q (%v), want out path %s", id, rs, err, e.base)
			}
			return true, nil
		}
		return r
	}},
	{"AddBuildLog", func(e *dcEnv, i int) *dcRequest {
		// casnix stores no build logs (it refuses them after reading them): what is
		// checked is that a cut upload leaks nothing.
		var w dcWriter
		w.handshake(38)
		r := &dcRequest{headerAt: w.Len()}
		w.u64(dcOpAddBuildLog)
		w.str(e.base)
		r.dataAt = w.Len()
		log := make([]byte, 4<<10+e.rng.IntN(32<<10))
		e.bytes.Read(log)
		r.frameHdrs = w.framed(log)
		r.dataEnd = w.Len()
		r.stream = w.Bytes()
		r.check = func(*proto.Client) (bool, error) { return false, nil }
		return r
	}},
	{"CollectGarbage", func(e *dcEnv, i int) *dcRequest {
		// Deletes a dead path added just before (completely): the path is then
		// there, complete, or gone, never half.
		path := disconnectStore + "/" + e.randomName(fmt.Sprintf("dc-dead-%d", i))
		nar, _ := e.randomNAR()
		e.add(path, nar)
		var w dcWriter
		w.handshake(38)
		r := &dcRequest{headerAt: w.Len()}
		w.u64(rawOpCollectGarbage)
		w.u64(rawGCDeleteSpecific)
		w.strs([]string{path})
		w.u64(0) // ignore liveness
		w.u64(0) // max freed
		for range 3 {
			w.u64(0)
		}
		r.dataAt, r.dataEnd = w.Len(), w.Len()
		r.stream = w.Bytes()
		r.check = func(cl *proto.Client) (bool, error) {
			ok, err := checkPath(cl, path)
			return !ok, err // the change is the deletion
		}
		return r
	}},
}

// add adds a path on a connection of its own, and waits for the connection's temp root
// to go: the path is then dead.
func (e *dcEnv) add(path string, nar []byte) {
	e.t.Helper()
	cl, err := proto.Dial(e.socket)
	if err != nil {
		e.t.Fatal(err)
	}
	defer waitTempRoots(e.cas.DataDir)
	defer cl.Close()
	if err := cl.AddToStoreNar(proto.AddInfo{Path: path, NarHash: sha256Hex(nar), NarSize: uint64(len(nar)), DontCheckSigs: true}, bytes.NewReader(nar)); err != nil {
		e.t.Fatalf("add %s: %v", path, err)
	}
}

// sig is a signature-shaped string (name:base64 of 64 bytes).
func (e *dcEnv) sig(name string) string {
	var b [64]byte
	e.bytes.Read(b[:])
	return name + ":" + base64.StdEncoding.EncodeToString(b[:])
}

// autoRoot reports whether link is registered as an indirect root (the daemon's
// gcroots/auto/HASH symlink to it).
func (e *dcEnv) autoRoot(link string) (bool, error) {
	h := sha256.Sum256([]byte(link))
	auto := filepath.Join(e.cas.DataDir, store.GCRootsDir, store.AutoRootsDir, hex.EncodeToString(h[:16]))
	target, err := os.Readlink(auto)
	if errors.Is(err, os.ErrNotExist) {
		return false, nil
	}
	if err != nil {
		return false, fmt.Errorf("indirect root of %s: %w", link, err)
	}
	if target != link {
		return false, fmt.Errorf("indirect root %s points to %s, want %s", auto, target, link)
	}
	return true, nil
}

// dcCut is where a trial stops sending and how it hangs up.
type dcCut struct {
	at        int    // bytes sent
	region    string // where at lies
	frameHdr  bool   // at lies inside a frame header
	readReply int    // region reply: reply bytes to read before closing (0: none)
	close     string
}

// pickCut chooses the k-th region the request has (so every op is cut in each of its
// regions in turn), then a random byte in it and a random way to hang up.
func pickCut(rng *mrand.Rand, r *dcRequest, k int) dcCut {
	var regions []string
	for _, reg := range disconnectRegions {
		if reg != regionData || r.dataEnd > r.dataAt {
			regions = append(regions, reg)
		}
	}
	c := dcCut{region: regions[k%len(regions)], close: disconnectCloses[rng.IntN(len(disconnectCloses))]}
	switch c.region {
	case regionHandshake:
		c.at = rng.IntN(r.headerAt) // 0: connect and hang up
	case regionHeader:
		// The header runs from the op code to the data, and on past it for ops whose
		// arguments follow their data (AddTextToStore's references).
		if r.dataEnd < len(r.stream) && rng.IntN(2) == 0 {
			c.at = r.dataEnd + rng.IntN(len(r.stream)-r.dataEnd)
		} else {
			c.at = r.headerAt + rng.IntN(max(r.dataAt-r.headerAt, 1))
		}
	case regionData:
		if len(r.frameHdrs) > 0 && rng.IntN(2) == 0 {
			h := r.frameHdrs[rng.IntN(len(r.frameHdrs))]
			c.at, c.frameHdr = h+1+rng.IntN(7), true
		} else {
			c.at = r.dataAt + 1 + rng.IntN(r.dataEnd-r.dataAt-1)
		}
	case regionReply:
		c.at = len(r.stream)
		if rng.IntN(2) == 0 {
			c.readReply = 1 + rng.IntN(16)
		}
	}
	return c
}

// runTrial connects, sends the cut request and hangs up as the cut says. It returns
// whether the close left bytes of the daemon unread (for a reset, whether there was
// something to reset).
func runTrial(socket string, r *dcRequest, c dcCut) (unread bool, err error) {
	conn, err := net.DialTimeout("unix", socket, rawDialTimeout)
	if err != nil {
		return false, err
	}
	uc := conn.(*net.UnixConn)
	defer uc.Close()
	uc.SetDeadline(time.Now().Add(disconnectSettle))
	if _, err := uc.Write(r.stream[:c.at]); err != nil {
		return false, fmt.Errorf("write %d bytes: %w", c.at, err)
	}
	if c.readReply > 0 {
		// Wait for the daemon to answer (the stderr LAST or ERROR of the op), then
		// take a few bytes of it.
		buf := make([]byte, c.readReply)
		io.ReadFull(uc, buf)
	}
	switch c.close {
	case closeHard:
		// Take what has arrived, so the close is a plain EOF for the daemon.
		uc.SetReadDeadline(time.Now().Add(2 * time.Millisecond))
		io.Copy(io.Discard, uc)
	case closeHalf:
		if err := uc.CloseWrite(); err != nil {
			return false, fmt.Errorf("CloseWrite: %w", err)
		}
		// The daemon sees EOF wherever it is in the request and must hang up too.
		uc.SetReadDeadline(time.Now().Add(disconnectSettle))
		if _, err := io.Copy(io.Discard, uc); err != nil {
			return false, fmt.Errorf("after CloseWrite at byte %d (%s), the daemon did not close the connection: %w", c.at, c.region, err)
		}
	case closeRST:
		// A Unix socket has no RST (SetLinger is TCP's): closing it with received
		// bytes unread is what makes the peer's next read or write fail with
		// ECONNRESET on Linux. Give the daemon's answer a moment to arrive.
		time.Sleep(200 * time.Microsecond)
	}
	if raw, err := uc.SyscallConn(); err == nil {
		raw.Control(func(fd uintptr) {
			n, err := unix.IoctlGetInt(int(fd), unix.SIOCINQ)
			unread = err == nil && n > 0
		})
	}
	return unread, nil
}

// pending is a trial: its request, its cut and how it went.
type pending struct {
	i      int
	op     string
	r      *dcRequest
	cut    dcCut
	unread bool
	err    error
}

func (p pending) String() string {
	return fmt.Sprintf("trial %d (%s, cut at byte %d of %d in %s, %s)", p.i, p.op, p.cut.at, len(p.r.stream), p.cut.region, p.cut.close)
}

// chachaSeed spreads a seed over a ChaCha8 key.
func chachaSeed(seed uint64) [32]byte {
	var k [32]byte
	binary.LittleEndian.PutUint64(k[:], seed)
	return k
}

// dcMetrics reads go_goroutines and process_open_fds from the daemon's /metrics.
func dcMetrics(url string) (goroutines, fds int, err error) {
	cl := &http.Client{Transport: &http.Transport{DisableKeepAlives: true}, Timeout: 10 * time.Second}
	resp, err := cl.Get(url + "/metrics")
	if err != nil {
		return 0, 0, err
	}
	defer resp.Body.Close()
	goroutines, fds = -1, -1
	sc := bufio.NewScanner(resp.Body)
	for sc.Scan() {
		f := strings.Fields(sc.Text())
		if len(f) != 2 {
			continue
		}
		v, err := strconv.Atoi(f[1])
		if err != nil {
			continue
		}
		switch f[0] {
		case "go_goroutines":
			goroutines = v
		case "process_open_fds":
			fds = v
		}
	}
	if goroutines < 0 || fds < 0 {
		return 0, 0, fmt.Errorf("/metrics has no go_goroutines or process_open_fds")
	}
	return goroutines, fds, sc.Err()
}

// tempRootFiles counts the daemon's temp-root files: one per connection that added a
// path or a temp root, until it closes.
func tempRootFiles(dataDir string) (int, error) {
	ents, err := os.ReadDir(filepath.Join(dataDir, store.TempRootsDir))
	if errors.Is(err, os.ErrNotExist) {
		return 0, nil
	}
	return len(ents), err
}

// disconnectTrials is CASNIX_DISCONNECTS or disconnectDefault.
func disconnectTrials(t *testing.T) int {
	if s := os.Getenv("CASNIX_DISCONNECTS"); s != "" {
		n, err := strconv.Atoi(s)
		if err != nil || n <= 0 {
			t.Fatalf("CASNIX_DISCONNECTS=%q", s)
		}
		return n
	}
	return disconnectDefault
}

// disconnectParallel is CASNIX_DISCONNECT_PARALLEL or disconnectDefaultParallel: how many
// trials run at once.
func disconnectParallel(t *testing.T) int {
	if s := os.Getenv("CASNIX_DISCONNECT_PARALLEL"); s != "" {
		n, err := strconv.Atoi(s)
		if err != nil || n <= 0 {
			t.Fatalf("CASNIX_DISCONNECT_PARALLEL=%q", s)
		}
		return n
	}
	return disconnectDefaultParallel
}

// TestClientDisconnects runs `casnix serve` and, for every op that changes state, cuts
// fresh recorded requests at random bytes (in the handshake, in the op's arguments,
// inside NAR data and frame headers, after the whole request before or while the reply is
// read) and hangs up by close, half-close or reset. After every trial, what the op would
// change is absent or complete: no path valid without its NAR or its references, no
// batch half there, no signature pair, perm root or realisation half made; the
// connection's temp roots are gone. After all trials the daemon's goroutines and open
// descriptors are back to where they were before, its RSS stopped growing, it stops
// cleanly and `casnix verify` is clean.
func TestClientDisconnects(t *testing.T) {
	trials := disconnectTrials(t)
	par := disconnectParallel(t)
	cas := nixtest.NewCasnix(t)
	ln, err := net.Listen("tcp", "127.0.0.1:0")
	if err != nil {
		t.Fatal(err)
	}
	httpAddr := ln.Addr().String()
	ln.Close()
	socket := filepath.Join(t.TempDir(), "casnix.sock")
	d := cas.Serve(t, socket, "--http", httpAddr, "--no-require-sigs", "--memory-limit", disconnectMemoryLimit,
		"--handshake-timeout", disconnectSettle.String(), "--stall-timeout", disconnectSettle.String())
	metricsURL := "http://" + httpAddr

	seed := uint64(time.Now().UnixNano())
	if s := os.Getenv("CASNIX_DISCONNECT_SEED"); s != "" {
		if seed, err = strconv.ParseUint(s, 10, 64); err != nil {
			t.Fatalf("CASNIX_DISCONNECT_SEED=%q", s)
		}
	}
	t.Logf("seed %d (CASNIX_DISCONNECT_SEED)", seed)
	rng := mrand.New(mrand.NewPCG(seed, 13))

	// The checks' connections add no temp roots: only queries.
	checker, err := proto.Dial(socket)
	if err != nil {
		t.Fatal(err)
	}
	defer checker.Close()
	realise, err := rawDial(socket)
	if err != nil {
		t.Fatal(err)
	}
	defer realise.Close()
	e := &dcEnv{t: t, cas: cas, tmp: t.TempDir(), rng: rng, bytes: mrand.NewChaCha8(chachaSeed(seed)), socket: socket, realise: realise}
	e.base = disconnectStore + "/" + e.randomName("dc-base")
	baseNAR, _ := e.randomNAR()
	e.add(e.base, baseNAR) // the path everything refers to

	// Each op's recorded request succeeds when sent whole and answered: the cuts are
	// of requests that work. This also warms up what the daemon creates once (temp
	// roots dir, spool dir, pack writer, SQLite connections) before the baseline.
	for _, op := range disconnectOps {
		for range 2 {
			r := op.gen(e, -1-rng.IntN(1<<30))
			if err := sendWhole(socket, r); err != nil {
				t.Fatalf("%s: the whole request fails: %v", op.name, err)
			}
			if changed, err := r.check(checker); err != nil {
				t.Fatalf("%s: after the whole request: %v", op.name, err)
			} else if !changed && op.name != "AddTempRoot" && op.name != "AddBuildLog" {
				t.Fatalf("%s: the whole request changed nothing", op.name)
			}
		}
	}
	// Then whole requests par at a time, as the trials will run: the daemon opens a
	// pack per concurrent writer and grows its SQLite reader pool to what concurrent
	// connections need, and keeps both (bounded by the concurrency, not the number of
	// connections). The baseline is taken after.
	for round := range 4 {
		var wg sync.WaitGroup
		errs := make([]error, par)
		for j := range par {
			op := disconnectOps[(round*par+j)%len(disconnectOps)]
			r := op.gen(e, -1-rng.IntN(1<<30))
			wg.Add(1)
			go func() {
				defer wg.Done()
				if err := sendWhole(socket, r); err != nil {
					errs[j] = fmt.Errorf("%s: the whole request fails: %w", op.name, err)
				}
			}()
		}
		wg.Wait()
		if err := errors.Join(errs...); err != nil {
			t.Fatal(err)
		}
	}
	if err := waitTempRoots(cas.DataDir); err != nil {
		t.Fatal(err)
	}
	base, err := settle(d, metricsURL, cas.DataDir, nil)
	if err != nil {
		t.Fatal(err)
	}
	g0, fd0 := base.goroutines, base.fds
	fds0, _ := d.OpenFDs()
	rss0, _ := d.RSS()
	var rssSeries []string

	type opStats struct {
		trials, changed int
		regions         map[string]int
	}
	stats := map[string]*opStats{}
	regions := map[string]int{}
	closes := map[string]int{}
	frameHdrCuts, resetsUnread, halfAdded := 0, 0, 0
	var rssMid int64
	var maxSettle time.Duration
	var all []pending
	start := time.Now()
	for first := 0; first < trials; first += par {
		// A batch: requests made and cut one after another (gen adds CollectGarbage's
		// dead paths), sent and hung up at once, so disconnects land while other
		// connections are mid-op.
		batch := make([]pending, 0, par)
		for i := first; i < min(first+par, trials); i++ {
			op := disconnectOps[i%len(disconnectOps)]
			r := op.gen(e, i)
			batch = append(batch, pending{i: i, op: op.name, r: r, cut: pickCut(rng, r, i/len(disconnectOps))})
		}
		var wg sync.WaitGroup
		for j := range batch {
			wg.Add(1)
			go func() {
				defer wg.Done()
				p := &batch[j]
				p.unread, p.err = runTrial(socket, p.r, p.cut)
			}()
		}
		wg.Wait()
		for _, p := range batch {
			if p.err != nil {
				t.Fatalf("%s: %v", p, p.err)
			}
			if p.cut.close == closeRST && p.unread {
				resetsUnread++
			}
			st := stats[p.op]
			if st == nil {
				st = &opStats{regions: map[string]int{}}
				stats[p.op] = st
			}
			st.trials++
			st.regions[p.cut.region]++
			regions[p.cut.region]++
			closes[p.cut.close]++
			if p.cut.frameHdr {
				frameHdrCuts++
			}
		}
		// The daemon ends the connections (its goroutines and descriptors back to the
		// baseline) and drops their temp roots; then what each op changed is absent or
		// complete, and stays so (checked again at the end).
		t0 := time.Now()
		l, err := settle(d, metricsURL, cas.DataDir, &base)
		if err != nil {
			t.Fatal(err)
		}
		if !l.within(base) {
			fds, _ := d.OpenFDs()
			t.Fatalf("trials %v: %v after the close, the daemon has %+v, %+v before the trials: the daemon leaks; fds opened since: %q",
				batch, disconnectSettle, l, base, fdDiff(fds0, fds))
		}
		if err := waitTempRoots(cas.DataDir); err != nil {
			t.Fatalf("trials %v: %v", batch, err)
		}
		maxSettle = max(maxSettle, time.Since(t0))
		for _, p := range batch {
			changed, err := p.r.check(checker)
			if err != nil {
				halfAdded++
				t.Errorf("%s: %v", p, err)
			}
			if changed {
				stats[p.op].changed++
			}
			all = append(all, p)
		}
		done := first + len(batch)
		if rssMid == 0 && done >= trials/2 {
			rssMid, _ = d.RSS()
		}
		if done*10/trials > len(rssSeries) {
			rss, _ := d.RSS()
			rssSeries = append(rssSeries, fmt.Sprintf("%.1f", float64(rss)/(1<<20)))
		}
		if d.Exited() {
			t.Fatalf("casnix serve exited after trial %d: %v", done-1, d.Stop(0))
		}
	}
	elapsed := time.Since(start)
	// And still so once everything has settled (a late commit would show here).
	end, err := settle(d, metricsURL, cas.DataDir, &base)
	if err != nil {
		t.Fatal(err)
	}
	g1, fd1 := end.goroutines, end.fds
	for _, p := range all {
		if _, err := p.r.check(checker); err != nil {
			halfAdded++
			t.Errorf("after all trials, %s: %v", p, err)
		}
	}
	rss1, _ := d.RSS()

	var perOp []string
	for _, op := range disconnectOps {
		if st := stats[op.name]; st != nil {
			perOp = append(perOp, fmt.Sprintf("%s %d (changed %d; %s)", op.name, st.trials, st.changed, fmtCounts(st.regions)))
		}
	}
	t.Logf("%d trials, %d at a time, in %v: %s", trials, par, elapsed.Round(time.Millisecond), strings.Join(perOp, ", "))
	t.Logf("RSS every tenth of the trials (MiB): %s; longest wait for the daemon to end a connection %v", strings.Join(rssSeries, " "), maxSettle.Round(time.Millisecond))
	fds1, _ := d.OpenFDs()
	t.Logf("fds opened since the baseline: %q", fdDiff(fds0, fds1))
	t.Logf("SUMMARY trials=%d cuts: %s (inside a frame header %d); closes: %s (resets with daemon bytes unread %d); half-added=%d; goroutines %d -> %d; open fds %d -> %d (not data files %d -> %d); RSS %.1f -> %.1f (mid %.1f) MiB",
		trials, fmtCounts(regions), frameHdrCuts, fmtCounts(closes), resetsUnread, halfAdded, g0, g1, fd0, fd1, base.connFDs, end.connFDs,
		float64(rss0)/(1<<20), float64(rss1)/(1<<20), float64(rssMid)/(1<<20))

	if g1 > g0+disconnectGoroutineSlack {
		t.Errorf("goroutines: %d after the trials, %d before (slack %d): a disconnect leaks goroutines", g1, g0, disconnectGoroutineSlack)
	}
	if end.connFDs > base.connFDs {
		// What a connection holds (its socket, spool files, pipes, temp-roots file)
		// must all be gone: no slack for those.
		t.Errorf("descriptors other than data files: %d after the trials, %d before: a disconnect leaks descriptors\nbefore: %q\nafter: %q", end.connFDs, base.connFDs, fds0, fds1)
	}
	if fd1 > fd0+disconnectFDSlack {
		t.Errorf("open fds: %d after the trials, %d before (slack %d): a disconnect leaks descriptors\nbefore: %q\nafter: %q", fd1, fd0, disconnectFDSlack, fds0, fds1)
	}
	if rssMid > 0 && rss1 > rssMid+disconnectRSSGrowth {
		t.Errorf("RSS grew from %.1f MiB at trial %d to %.1f MiB at the end (limit +%d MiB)", float64(rssMid)/(1<<20), trials/2, float64(rss1)/(1<<20), disconnectRSSGrowth>>20)
	}
	if trials >= len(disconnectOps)*len(disconnectRegions) {
		for _, op := range disconnectOps {
			for _, reg := range disconnectRegions {
				if stats[op.name].regions[reg] == 0 && (reg != regionData || opHasData(all, op.name)) {
					t.Errorf("%s: no cut in region %s", op.name, reg)
				}
			}
		}
	}

	checker.Close()
	realise.Close()
	if err := d.Stop(30 * time.Second); err != nil {
		t.Errorf("casnix serve after SIGTERM: %v", err)
	}
	checkServeLog(t, d)
	if r := cas.Try("verify"); !r.OK() {
		t.Errorf("casnix verify after the trials:\n%s", r)
	}
}

// opHasData reports whether op's requests have bulk data.
func opHasData(all []pending, op string) bool {
	for _, p := range all {
		if p.op == op {
			return p.r.dataEnd > p.r.dataAt
		}
	}
	return false
}

// fdDiff lists the descriptors in after and not in before (as multisets).
func fdDiff(before, after []string) []string {
	left := map[string]int{}
	for _, f := range before {
		left[f]++
	}
	var out []string
	for _, f := range after {
		if left[f] > 0 {
			left[f]--
			continue
		}
		out = append(out, f)
	}
	return out
}

// sendWhole sends a request whole and reads its answer up to the op's STDERR_LAST; a
// daemon error fails.
func sendWhole(socket string, r *dcRequest) error {
	conn, err := net.DialTimeout("unix", socket, rawDialTimeout)
	if err != nil {
		return err
	}
	defer conn.Close()
	conn.SetDeadline(time.Now().Add(disconnectSettle))
	rc := &rawConn{c: conn, r: bufio.NewReader(conn), w: bufio.NewWriter(conn)}
	if _, err := conn.Write(r.stream); err != nil {
		return err
	}
	// Server magic and version, then (1.38) features, version string and trust.
	if _, err := rc.readU64(); err != nil {
		return err
	}
	sv, err := rc.readU64()
	if err != nil {
		return err
	}
	cv := binary.LittleEndian.Uint64(r.stream[8:16])
	rc.minor = min(sv&0xff, cv&0xff)
	if rc.minor >= 38 {
		if _, err := rc.readStrs(); err != nil {
			return err
		}
	}
	if rc.minor >= 33 {
		if _, err := rc.readStr(); err != nil {
			return err
		}
	}
	if rc.minor >= 35 {
		if _, err := rc.readU64(); err != nil {
			return err
		}
	}
	for step := range 3 { // handshake, SetOptions, the op
		if err := rc.result(); err != nil {
			if step == 2 && isRemote(err) && strings.Contains(err.Error(), "build logs") {
				return nil // AddBuildLog: refused, as intended, after reading the log
			}
			return fmt.Errorf("step %d: %w", step, err)
		}
	}
	return nil
}

// waitTempRoots waits for every temp-root file to go: the daemon drops a connection's
// when it ends.
func waitTempRoots(dataDir string) error {
	deadline := time.Now().Add(disconnectSettle)
	for {
		n, err := tempRootFiles(dataDir)
		if err != nil {
			return err
		}
		if n == 0 {
			return nil
		}
		if time.Now().After(deadline) {
			return fmt.Errorf("%d temp-root files still there %v after the connection closed: its temp roots leak", n, disconnectSettle)
		}
		time.Sleep(time.Millisecond)
	}
}

// dcLevels is what the daemon holds: goroutines and open descriptors (from /metrics),
// and of those descriptors the ones that are not its data files (/proc/PID/fd):
// sockets, pipes, spool and temp-roots files, what a connection holds.
type dcLevels struct{ goroutines, fds, connFDs int }

// dataFile reports whether fd (a /proc/PID/fd link target) is one of the daemon's data
// files: the database, its WAL, a pack (also one a compaction removed, whose read handle
// the daemon drops within seconds).
func dataFile(dataDir, fd string) bool {
	return strings.HasPrefix(fd, dataDir+"/casnix.db") || strings.HasPrefix(fd, dataDir+"/packs/")
}

func levels(d *nixtest.Daemon, url, dataDir string) (dcLevels, error) {
	g, f, err := dcMetrics(url)
	if err != nil {
		return dcLevels{}, err
	}
	fds, err := d.OpenFDs()
	if err != nil {
		return dcLevels{}, err
	}
	l := dcLevels{goroutines: g, fds: f}
	for _, fd := range fds {
		if !dataFile(dataDir, fd) {
			l.connFDs++
		}
	}
	return l, nil
}

// within reports whether l is back to base: goroutines and connection descriptors
// exactly, all descriptors up to the slack.
func (l dcLevels) within(base dcLevels) bool {
	return l.goroutines <= base.goroutines+disconnectGoroutineSlack && l.fds <= base.fds+disconnectFDSlack && l.connFDs <= base.connFDs
}

// settle waits until the daemon's levels are back within base (a nil base: until two
// readings 200 ms apart agree) or disconnectSettle passes, and returns the last reading.
func settle(d *nixtest.Daemon, url, dataDir string, base *dcLevels) (dcLevels, error) {
	deadline := time.Now().Add(disconnectSettle)
	var prev dcLevels
	for {
		l, err := levels(d, url, dataDir)
		if err != nil {
			return l, err
		}
		if (base == nil && l == prev) || (base != nil && l.within(*base)) || time.Now().After(deadline) {
			return l, nil
		}
		prev = l
		if base == nil {
			time.Sleep(200 * time.Millisecond)
		} else {
			time.Sleep(time.Millisecond)
		}
	}
}
