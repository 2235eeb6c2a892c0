package tests

import (
	"bytes"
	"context"
	"crypto/sha256"
	"database/sql"
	"encoding/hex"
	"errors"
	"fmt"
	"io"
	"io/fs"
	"math/rand/v2"
	"net"
	"net/http"
	"os"
	"os/exec"
	"path/filepath"
	"slices"
	"strconv"
	"strings"
	"syscall"
	"testing"
	"time"

	"github.com/klauspost/compress/zstd"
	_ "modernc.org/sqlite"

	"github.com/casnix/casnix/castore"
	"github.com/casnix/casnix/digest"
	"github.com/casnix/casnix/nar"
	"github.com/casnix/casnix/proto"
	"github.com/casnix/casnix/tests/fliptest"
	"github.com/casnix/casnix/tests/nixtest"
)

// TestFlippedBytesReadPaths flips one random bit per trial in a pack or in
// casnix.db (checkpointed, nothing running) of a store of a few dozen paths
// (shared and unshared chunks, a multi-frame file, directories, symlinks,
// empty files and directories, references), and checks promises I3 and I5:
//
//   - `casnix verify` names exactly the damaged store paths. The expected
//     set is computed here, from the pristine database and the paths' own
//     trees: a pack byte belongs to a frame (record and compressed data),
//     whose chunks belong to blobs, which belong to paths; a database byte
//     changes rows (found by diffing every table with the pristine copy),
//     attributed the same way. When SQLite's own integrity check fails on
//     the damaged copy, or its schema text changed, no row diff is trusted:
//     verify must then report database damage, and no exact set is required.
//   - every read path (daemon NarFromPath over the socket, every file and
//     symlink through the FUSE mount, the HTTP cache's NAR, `casnix
//     export`) gives the right bytes or an error, never other bytes; and a
//     path outside the damaged set (for export: whose closure is outside
//     it) reads right on each.
//
// A trial is one bit flip. Trials are batched into runs of
// CASNIX_FLIPS_PER_RUN (default 4) flips, all in casnix.db or all in packs
// (pack flips of a run damage disjoint sets of paths, so each path's
// damage has one cause): a run copies the pristine data dir, flips, runs
// verify, starts one serve process (socket, --mount, --http) and reads
// everything, then exports everything. Serve starts after the flips, so
// no frame cache or kernel page cache can hide one. CASNIX_FLIP_TRIALS
// sets the number of trials (default 40), CASNIX_FLIP_SEED the seed.
func TestFlippedBytesReadPaths(t *testing.T) {
	trials := fliptest.EnvInt(t, "CASNIX_FLIP_TRIALS", 40)
	seed := uint64(fliptest.EnvInt(t, "CASNIX_FLIP_SEED", 1))
	perRun := max(1, fliptest.EnvInt(t, "CASNIX_FLIPS_PER_RUN", 4))
	if _, err := os.Stat("/dev/fuse"); err != nil {
		nixtest.SkipOrFatal(t, "no /dev/fuse: %v", err)
	}
	rng := rand.New(rand.NewPCG(seed, 0))
	c := nixtest.NewCasnix(t)
	st := buildFlipStore(t, c, rng)
	idx := loadFlipIndex(t, filepath.Join(c.DataDir, "casnix.db"), st)
	targets := fliptest.NewTargets(t, c.DataDir, append([]string{"casnix.db"}, idx.packFiles...))
	t.Logf("store: %d paths, %d frames, %d chunks, %d blobs; casnix.db %d bytes, packs %d bytes",
		len(st.names), len(idx.frames), len(idx.chunkFrame), len(idx.blobChunks), targets.Sizes[0], targets.Total-targets.Sizes[0])

	sum := &flipSummary{reads: map[string]*readCounts{}}
	for _, rp := range readPathNames {
		sum.reads[rp] = &readCounts{}
	}
	work := filepath.Join(t.TempDir(), "w")
	start := time.Now()
	// CASNIX_FLIP_UNTIL (RFC 3339) stops starting runs after that time, so
	// a long run that must end by then still reports how many trials ran.
	var until time.Time
	if u := os.Getenv("CASNIX_FLIP_UNTIL"); u != "" {
		var err error
		if until, err = time.Parse(time.RFC3339, u); err != nil {
			t.Fatalf("CASNIX_FLIP_UNTIL: %v", err)
		}
	}
	done := 0
	for done < trials {
		if !until.IsZero() && time.Now().After(until) {
			t.Logf("CASNIX_FLIP_UNTIL passed: stopping after %d of %d trials", done, trials)
			break
		}
		if sum.runs > 0 && sum.runs%25 == 0 {
			t.Logf("after %d trials (%.0fs): %s", done, time.Since(start).Seconds(), sum.String(done, int(seed)))
		}
		os.RemoveAll(work)
		if err := fliptest.CopyDir(c.DataDir, work); err != nil {
			t.Fatal(err)
		}
		// Half the runs flip bits in the database, half across the packs;
		// a run's pack flips damage disjoint sets of paths, so each
		// flip's damage is known.
		k := min(perRun, trials-done)
		var flips []fliptest.Flip
		if rng.IntN(2) == 0 {
			for range k {
				flips = append(flips, targets.PickIn(rng, 0))
			}
		} else {
			taken := map[string]bool{}
		pick:
			for tries := 0; len(flips) < k && tries < 100; tries++ {
				f := targets.PickExcept(rng, 0)
				d := idx.packDamage(f)
				for p := range d {
					if taken[p] {
						continue pick
					}
				}
				for p := range d {
					taken[p] = true
				}
				flips = append(flips, f)
			}
		}
		for _, f := range flips {
			if err := f.Apply(work); err != nil {
				t.Fatal(err)
			}
		}
		runFlipTrial(t, c, st, idx, work, sum.runs, flips, sum)
		sum.runs++
		done += len(flips)
	}
	t.Logf("%d trials in %.1fs", done, time.Since(start).Seconds())
	t.Log(sum.String(done, int(seed)))
}

// flipStore is the store the trials damage: each path's NAR and the file
// tree it was made from.
type flipStore struct {
	names []string // basenames, in import order (references first)
	nars  map[string][]byte
	src   map[string]string          // basename → file tree the NAR was dumped from
	blobs map[string][]digest.Digest // basename → its files' blob digests (non-empty files)
	refs  map[string][]string
}

// buildFlipStore makes the paths and imports them with `casnix import --nar`.
func buildFlipStore(t *testing.T, c *nixtest.Casnix, rng *rand.Rand) *flipStore {
	t.Helper()
	random := func(n int) []byte {
		b := make([]byte, n)
		for i := range b {
			b[i] = byte(rng.Uint32())
		}
		return b
	}
	r := random(300 << 10)
	tail := random(40 << 10)
	big := random(4<<20 + 300<<10) // more than one 4 MiB frame
	common := random(9 << 10)      // a single-chunk blob shared by many paths
	fs := &flipStore{nars: map[string][]byte{}, src: map[string]string{}, blobs: map[string][]digest.Digest{}, refs: map[string][]string{}}
	srcDir := t.TempDir()
	storePath := func(name string) string {
		h := sha256.Sum256([]byte(name))
		return "/nix/store/" + nixtest.NixBase32Encode(h[:20]) + "-" + name
	}
	// entry: contents (file), "->target" (symlink), nil with a trailing
	// slash in the name (directory); "x:" prefix on a name makes it executable.
	type entry struct {
		name string
		data []byte
		link string
	}
	add := func(name string, root *entry, entries []entry, refs ...string) {
		full := storePath(name)
		base := filepath.Base(full)
		p := filepath.Join(srcDir, base)
		if root != nil {
			switch {
			case root.link != "":
				must(t, os.Symlink(root.link, p))
			default:
				must(t, os.WriteFile(p, root.data, 0o644))
			}
		} else {
			must(t, os.MkdirAll(p, 0o755))
		}
		for _, e := range entries {
			name, mode := e.name, os.FileMode(0o644)
			if n, ok := strings.CutPrefix(name, "x:"); ok {
				name, mode = n, 0o755
			}
			q := filepath.Join(p, name)
			must(t, os.MkdirAll(filepath.Dir(q), 0o755))
			switch {
			case strings.HasSuffix(name, "/"):
				must(t, os.MkdirAll(q, 0o755))
			case e.link != "":
				must(t, os.Symlink(e.link, q))
			default:
				must(t, os.WriteFile(q, e.data, mode))
			}
		}
		var b bytes.Buffer
		if _, err := nar.DumpPath(&b, p); err != nil {
			t.Fatal(err)
		}
		narFile := p + ".nar"
		must(t, os.WriteFile(narFile, b.Bytes(), 0o644))
		args := []string{"import", "--nar", narFile, "--path", full}
		for _, r := range refs {
			args = append(args, "--references", storePath(r))
			fs.refs[base] = append(fs.refs[base], filepath.Base(storePath(r)))
		}
		c.Run(t, args...)
		fs.names = append(fs.names, base)
		fs.nars[base] = b.Bytes()
		fs.src[base] = p
		err := filepath.WalkDir(p, func(q string, d os.DirEntry, err error) error {
			if err != nil || !d.Type().IsRegular() {
				return err
			}
			data, err := os.ReadFile(q)
			if err == nil && len(data) > 0 {
				fs.blobs[base] = append(fs.blobs[base], digest.Sum(data))
			}
			return err
		})
		must(t, err)
	}
	add("a", nil, []entry{{name: "r", data: r}, {name: "small", data: []byte("hello")}, {name: "x:sub/x", data: []byte("#!/bin/sh\n")},
		{name: "empty", data: []byte{}}, {name: "link", link: "r"}, {name: "emptydir/"}, {name: "common", data: common}})
	add("b", nil, []entry{{name: "r", data: r}, {name: "rt", data: append(slices.Clone(r), tail...)}, {name: "y", data: []byte("y")}})
	add("c", nil, []entry{{name: "ref", data: []byte(storePath("a"))}}, "a")
	add("d", &entry{data: r[:50<<10]}, nil)
	add("big", &entry{data: big}, nil)
	add("big-dir", nil, []entry{{name: "m", data: big[:1<<20]}, {name: "n", data: random(100 << 10)}, {name: "common", data: common}}, "c")
	add("link", &entry{link: storePath("a") + "/r"}, nil, "a")
	add("empty-file", &entry{data: []byte{}}, nil)
	add("empty-dir", nil, nil)
	for i := range 22 {
		var es []entry
		for j := range 1 + rng.IntN(4) {
			n := fmt.Sprintf("f%d", j)
			if rng.IntN(3) == 0 {
				n = "x:bin/" + n
			}
			es = append(es, entry{name: n, data: random(1 + rng.IntN(120<<10))})
		}
		if rng.IntN(2) == 0 {
			es = append(es, entry{name: "common", data: common})
		}
		if rng.IntN(2) == 0 {
			es = append(es, entry{name: "lnk", link: "f0"})
		}
		if i%5 == 4 {
			add(fmt.Sprintf("single-%d", i), &entry{data: random(1 + rng.IntN(80<<10))}, nil)
			continue
		}
		add(fmt.Sprintf("p-%d", i), nil, es)
	}
	// The database alone, checkpointed, and nothing else in the data dir a
	// flip could miss or a later process could read instead.
	db, err := sql.Open("sqlite", filepath.Join(c.DataDir, "casnix.db"))
	must(t, err)
	_, err = db.Exec("PRAGMA wal_checkpoint(TRUNCATE)")
	db.Close()
	must(t, err)
	for _, f := range []string{"casnix.db-wal", "casnix.db-shm"} {
		if err := os.Remove(filepath.Join(c.DataDir, f)); err != nil && !errors.Is(err, os.ErrNotExist) {
			t.Fatal(err)
		}
	}
	c.Run(t, "verify")
	return fs
}

func must(t *testing.T, err error) {
	t.Helper()
	if err != nil {
		t.Fatal(err)
	}
}

// flipIndex is what the pristine database says about where things are,
// read with plain SQL: the expected damage of a flip is computed from it.
type flipIndex struct {
	packFiles  []string // relative to the data dir
	packOf     map[string]int64
	frames     []flipFrame
	chunkFrame map[digest.Digest]int64
	blobChunks map[digest.Digest][]digest.Digest
	pathID     map[int64]string
	pathDirs   map[string][]digest.Digest // directories of each path's tree
	rows       map[string]map[string]string
	schema     string // sqlite_schema, as schemaText reads it
	// users: for each frame, blob, chunk, directory and pack, the paths
	// using it, keyed "frame:ID", "blob:HEX", "chunk:HEX", "dir:HEX", "pack:ID".
	users map[string]map[string]bool
}

type flipFrame struct {
	id, pack, off, end int64
}

// flipTables are the tables diffed after a database flip, each with its
// key columns (the rest is the row's value).
var flipTables = map[string]string{
	"packs": "id", "frames": "id", "chunks": "digest", "blobs": "digest", "directories": "digest",
	"paths": "id", "refs": "referrer, reference", "sigs": "path, sig", "drv_outputs": "drv, name",
	"realisations": "id", "id_floor": "tbl",
}

func loadFlipIndex(t *testing.T, dbFile string, fs *flipStore) *flipIndex {
	t.Helper()
	db, err := sql.Open("sqlite", "file:"+dbFile+"?mode=ro")
	must(t, err)
	defer db.Close()
	ix := &flipIndex{packOf: map[string]int64{}, chunkFrame: map[digest.Digest]int64{}, blobChunks: map[digest.Digest][]digest.Digest{},
		pathID: map[int64]string{}, pathDirs: map[string][]digest.Digest{}, users: map[string]map[string]bool{}}
	dataDir := filepath.Dir(dbFile)
	packs, _ := filepath.Glob(filepath.Join(dataDir, "packs", "*", "*.pack"))
	for _, p := range packs {
		rel, _ := filepath.Rel(dataDir, p)
		id, err := strconv.ParseInt(strings.TrimSuffix(filepath.Base(p), ".pack"), 10, 64)
		must(t, err)
		ix.packFiles = append(ix.packFiles, rel)
		ix.packOf[rel] = id
	}
	if len(packs) == 0 {
		t.Fatal("no packs")
	}
	query := func(q string, fn func(*sql.Rows) error) {
		rows, err := db.Query(q)
		must(t, err)
		defer rows.Close()
		for rows.Next() {
			must(t, fn(rows))
		}
		must(t, rows.Err())
	}
	query("SELECT id, pack, offset, data_off + clen FROM frames", func(r *sql.Rows) error {
		var f flipFrame
		err := r.Scan(&f.id, &f.pack, &f.off, &f.end)
		ix.frames = append(ix.frames, f)
		return err
	})
	query("SELECT digest, frame FROM chunks", func(r *sql.Rows) error {
		var d []byte
		var f int64
		err := r.Scan(&d, &f)
		ix.chunkFrame[digest.Digest(d)] = f
		return err
	})
	query("SELECT digest, chunks FROM blobs", func(r *sql.Rows) error {
		var d, cs []byte
		err := r.Scan(&d, &cs)
		if cs == nil {
			ix.blobChunks[digest.Digest(d)] = []digest.Digest{digest.Digest(d)}
		}
		for i := 0; i+digest.Size <= len(cs); i += digest.Size + 4 {
			ix.blobChunks[digest.Digest(d)] = append(ix.blobChunks[digest.Digest(d)], digest.Digest(cs[i:i+digest.Size]))
		}
		return err
	})
	dirs := map[digest.Digest][]byte{}
	query("SELECT digest, data FROM directories", func(r *sql.Rows) error {
		var d, data []byte
		err := r.Scan(&d, &data)
		dirs[digest.Digest(d)] = data
		return err
	})
	roots := map[string]digest.Digest{}
	query("SELECT id, name, kind, digest FROM paths", func(r *sql.Rows) error {
		var id, kind int64
		var name string
		var d []byte
		err := r.Scan(&id, &name, &kind, &d)
		ix.pathID[id] = name
		if kind == int64(castore.KindDirectory) && len(d) == digest.Size {
			roots[name] = digest.Digest(d)
		}
		return err
	})
	use := func(key, path string) {
		if ix.users[key] == nil {
			ix.users[key] = map[string]bool{}
		}
		ix.users[key][path] = true
	}
	var walk func(path string, d digest.Digest)
	walk = func(path string, d digest.Digest) {
		if d == digest.Empty {
			return
		}
		ix.pathDirs[path] = append(ix.pathDirs[path], d)
		use("dir:"+d.String(), path)
		dir, err := castore.Decode(dirs[d])
		must(t, err)
		for _, e := range dir.Directories {
			walk(path, e.Digest)
		}
	}
	frameByID := map[int64]flipFrame{}
	for _, f := range ix.frames {
		frameByID[f.id] = f
	}
	for _, name := range fs.names {
		if d, ok := roots[name]; ok {
			walk(name, d)
		}
		for _, b := range fs.blobs[name] {
			use("blob:"+b.String(), name)
			cs, ok := ix.blobChunks[b]
			if !ok {
				t.Fatalf("%s: blob %s not in the index", name, b)
			}
			for _, c := range cs {
				use("chunk:"+c.String(), name)
				fid := ix.chunkFrame[c]
				use(fmt.Sprintf("frame:%d", fid), name)
				use(fmt.Sprintf("pack:%d", frameByID[fid].pack), name)
			}
		}
	}
	var err2 error
	ix.rows, err2 = tableRows(dbFile)
	must(t, err2)
	ix.schema, err2 = schemaText(dbFile)
	must(t, err2)
	return ix
}

// schemaText is the database's schema (every object's type, name, table and
// SQL text), which no checksum covers: a flip in it can rename a column,
// leaving a database SQLite's integrity check passes and every query naming
// the column fails, damage to the whole database rather than to rows.
func schemaText(dbFile string) (string, error) {
	db, err := sql.Open("sqlite", "file:"+dbFile+"?mode=ro&immutable=1")
	if err != nil {
		return "", err
	}
	defer db.Close()
	var s sql.NullString
	err = db.QueryRow(`SELECT group_concat(type || ' ' || name || ' ' || tbl_name || ' ' || IFNULL(sql, ''), char(10))
		FROM (SELECT * FROM sqlite_schema ORDER BY name)`).Scan(&s)
	return s.String, err
}

// tableRows reads every row of the flipTables, keyed by table and key.
func tableRows(dbFile string) (map[string]map[string]string, error) {
	db, err := sql.Open("sqlite", "file:"+dbFile+"?mode=ro&immutable=1")
	if err != nil {
		return nil, err
	}
	defer db.Close()
	out := map[string]map[string]string{}
	for tbl, key := range flipTables {
		out[tbl] = map[string]string{}
		rows, err := db.Query(fmt.Sprintf("SELECT quote(%s), * FROM %s", strings.ReplaceAll(key, ", ", ")||','||quote("), tbl))
		if err != nil {
			return nil, fmt.Errorf("read %s: %w", tbl, err)
		}
		cols, _ := rows.Columns()
		for rows.Next() {
			vals := make([]any, len(cols))
			ptrs := make([]any, len(cols))
			for i := range vals {
				ptrs[i] = &vals[i]
			}
			if err := rows.Scan(ptrs...); err != nil {
				rows.Close()
				return nil, fmt.Errorf("read %s: %w", tbl, err)
			}
			var b strings.Builder
			for i, v := range vals[1:] {
				fmt.Fprintf(&b, "%s=%s:%x;", cols[i+1], valueKind(v), fmt.Sprint(v))
			}
			out[tbl][fmt.Sprint(vals[0])] = b.String()
		}
		err = rows.Err()
		rows.Close()
		if err != nil {
			return nil, fmt.Errorf("read %s: %w", tbl, err)
		}
	}
	return out, nil
}

// valueKind is the SQLite storage class of a scanned value, text and blob
// together (both scan into strings and byte slices alike).
func valueKind(v any) string {
	switch v.(type) {
	case nil:
		return "null"
	case int64:
		return "int"
	case float64:
		return "real"
	}
	return "bytes"
}

// integrityOK runs SQLite's own integrity and foreign-key checks.
func integrityOK(dbFile string) bool {
	db, err := sql.Open("sqlite", "file:"+dbFile+"?mode=ro&immutable=1")
	if err != nil {
		return false
	}
	defer db.Close()
	var res string
	if err := db.QueryRow("PRAGMA integrity_check").Scan(&res); err != nil || res != "ok" {
		return false
	}
	rows, err := db.Query("PRAGMA foreign_key_check")
	if err != nil {
		return false
	}
	defer rows.Close()
	return !rows.Next() && rows.Err() == nil
}

// pathMetaColumns are path-info fields no checksum covers (see
// ARCHITECTURE.md, verify): a flip there changes no byte any read path
// returns and verify cannot tell it from a real value.
var pathMetaColumns = []string{"deriver", "registered", "ultimate", "ca"}

// expectDamage says which paths a flip damages, from the pristine index and
// the damaged copy. dbLevel is set when SQLite's integrity check fails on
// the copy, or its schema changed: then no exact set is known. meta is set when only fields no
// checksum covers changed.
func (ix *flipIndex) expectDamage(work string, flips []fliptest.Flip) (damaged map[string]bool, dbLevel, meta bool) {
	damaged = map[string]bool{}
	addUsers := func(key string) {
		for p := range ix.users[key] {
			damaged[p] = true
		}
	}
	inDB := false
	for _, f := range flips {
		if _, ok := ix.packOf[f.File]; ok {
			for p := range ix.packDamage(f) {
				damaged[p] = true
			}
		} else {
			inDB = true
		}
	}
	if !inDB {
		return damaged, false, false
	}
	dbFile := filepath.Join(work, "casnix.db")
	if !integrityOK(dbFile) {
		return nil, true, false
	}
	if schema, err := schemaText(dbFile); err != nil || schema != ix.schema {
		return nil, true, false
	}
	rows, err := tableRows(dbFile)
	if err != nil {
		return nil, true, false
	}
	for tbl, before := range ix.rows {
		for key, row := range before {
			if rows[tbl][key] == row {
				continue
			}
			switch tbl {
			case "packs":
				if changedOnly(row, rows[tbl][key], false, "created") {
					continue
				}
				addUsers("pack:" + key)
			case "frames":
				addUsers("frame:" + key)
			case "chunks", "blobs", "directories":
				b, err := hex.DecodeString(strings.TrimSuffix(strings.TrimPrefix(key, "X'"), "'"))
				if err != nil || len(b) != digest.Size {
					panic(fmt.Sprintf("%s key %s: %v", tbl, key, err))
				}
				addUsers(map[string]string{"chunks": "chunk:", "blobs": "blob:", "directories": "dir:"}[tbl] + digest.Digest(b).String())
			case "paths":
				id, _ := strconv.ParseInt(key, 10, 64)
				if changedOnly(row, rows[tbl][key], true, pathMetaColumns...) {
					meta = true
					continue
				}
				damaged[ix.pathID[id]] = true
			default:
				// References, signatures, derivation outputs: path-info with
				// no checksum, which no read path returns as bytes.
				meta = true
			}
		}
	}
	return damaged, false, meta && len(damaged) == 0
}

// packDamage is the set of paths a flip in a pack damages: those using a
// chunk of the frame (record or compressed data) holding the byte. A pack
// header byte or one no frame holds damages none.
func (ix *flipIndex) packDamage(f fliptest.Flip) map[string]bool {
	out := map[string]bool{}
	id := ix.packOf[f.File]
	for _, fr := range ix.frames {
		if fr.pack == id && fr.off <= f.Off && f.Off < fr.end {
			for p := range ix.users[fmt.Sprintf("frame:%d", fr.id)] {
				out[p] = true
			}
		}
	}
	return out
}

// changedOnly reports whether rows a and b (tableRows format) differ only
// in the columns given (b missing counts as a change of everything); with
// typed, a column whose value turned from or into an integer counts as
// damage (the row no longer scans), not as a change of that column.
func changedOnly(a, b string, typed bool, cols ...string) bool {
	if b == "" {
		return false
	}
	fa, fb := strings.Split(a, ";"), strings.Split(b, ";")
	if len(fa) != len(fb) {
		return false
	}
	for i := range fa {
		if fa[i] == fb[i] {
			continue
		}
		name, va, _ := strings.Cut(fa[i], "=")
		_, vb, _ := strings.Cut(fb[i], "=")
		ka, _, _ := strings.Cut(va, ":")
		kb, _, _ := strings.Cut(vb, ":")
		if !slices.Contains(cols, name) || (typed && ka != kb && (ka == "int" || kb == "int")) {
			// A value that changed type from or to an integer no longer
			// scans: that is damage, not a changed field.
			return false
		}
	}
	return true
}

// readPathNames are the read paths checked, in summary order.
var readPathNames = []string{"daemon", "fuse", "http", "export"}

type readCounts struct {
	ok, failed, wrong, undamagedFailed int
}

type flipSummary struct {
	dbTrials, packTrials                  int
	damagedTrials, damagedPaths, detected int
	missed, falsePos                      int
	dbLevel, dbLevelReported, metaOnly    int
	runs                                  int
	slowestStop                           time.Duration
	verifyRefused                         int
	reads                                 map[string]*readCounts
	phases                                map[string]time.Duration
}

// phase adds the time since start to the phase's total.
func (s *flipSummary) phase(name string, start time.Time) {
	if s.phases == nil {
		s.phases = map[string]time.Duration{}
	}
	s.phases[name] += time.Since(start)
}

func (s *flipSummary) String(trials int, seed int) string {
	var b strings.Builder
	fmt.Fprintf(&b, "flip summary (seed %d): %d trials (one bit flip each: %d in casnix.db, %d in packs) in %d runs (copy, flip, verify, serve, export); "+
		"%d runs damaged %d paths: verify named %d, missed %d, false positives %d; "+
		"%d database runs SQLite's check fails on (verify reported %d); %d runs changed only unchecksummed path-info; verify refused to run %d times\n",
		seed, trials, s.dbTrials, s.packTrials, s.runs, s.damagedTrials, s.damagedPaths, s.detected, s.missed, s.falsePos, s.dbLevel, s.dbLevelReported, s.metaOnly, s.verifyRefused)
	fmt.Fprintf(&b, "  slowest serve stop %.1fs; time per phase:", s.slowestStop.Seconds())
	for _, k := range slices.Sorted(func(yield func(string) bool) {
		for k := range s.phases {
			if !yield(k) {
				return
			}
		}
	}) {
		fmt.Fprintf(&b, " %s %.1fs", k, s.phases[k].Seconds())
	}
	b.WriteString("\n")
	for _, rp := range readPathNames {
		r := s.reads[rp]
		fmt.Fprintf(&b, "  %-7s reads right %6d, failed %5d, wrong bytes %d, undamaged-path failures %d\n", rp, r.ok, r.failed, r.wrong, r.undamagedFailed)
	}
	return b.String()
}

// runFlipTrial checks verify and every read path on the damaged copy work.
func runFlipTrial(t *testing.T, c *nixtest.Casnix, fs *flipStore, ix *flipIndex, work string, i int, flips []fliptest.Flip, sum *flipSummary) {
	where := fmt.Sprintf("run %d: %v", i, flips)
	fail := func(format string, args ...any) {
		t.Errorf("%s: %s", where, fmt.Sprintf(format, args...))
	}
	if flips[0].File == "casnix.db" {
		sum.dbTrials += len(flips)
	} else {
		sum.packTrials += len(flips)
	}
	want, dbLevel, meta := ix.expectDamage(work, flips)
	if meta {
		sum.metaOnly++
	}
	wc := &nixtest.Casnix{Bin: c.Bin, DataDir: work}

	t0 := time.Now()
	defer func() { sum.phase("total", t0) }()
	// verify.
	r := wc.Try("verify")
	sum.phase("verify", t0)
	named, reported, refused := parseVerify(r)
	switch {
	case refused:
		sum.verifyRefused++
		if !dbLevel {
			fail("verify failed to run on a database SQLite finds intact: %s", r)
		}
	case dbLevel:
		sum.dbLevel++
		if reported {
			sum.dbLevelReported++
		} else {
			fail("database-level damage (SQLite's integrity check fails, or the schema changed), verify reports nothing")
		}
	default:
		if len(want) > 0 {
			sum.damagedTrials++
		}
		sum.damagedPaths += len(want)
		for p := range want {
			if named[p] {
				sum.detected++
			} else {
				sum.missed++
				fail("verify does not name damaged %s (names %v)\n%s", p, slices.Sorted(mapKeys(named)), r.Stdout)
			}
		}
		for p := range named {
			if !want[p] {
				sum.falsePos++
				fail("verify names %s, which the flip did not damage (want %v)\n%s", p, slices.Sorted(mapKeys(want)), r.Stdout)
			}
		}
	}
	// undamaged: reads must succeed. With database-level damage nothing is
	// known to be undamaged.
	undamaged := func(p string) bool { return !dbLevel && !want[p] }
	closureUndamaged := func(p string) bool {
		seen := map[string]bool{}
		var ok func(string) bool
		ok = func(p string) bool {
			if seen[p] {
				return true
			}
			seen[p] = true
			if !undamaged(p) {
				return false
			}
			for _, r := range fs.refs[p] {
				if !ok(r) {
					return false
				}
			}
			return true
		}
		return ok(p)
	}
	record := func(rp, p string, err error, wrong string, mustRead bool) {
		rc := sum.reads[rp]
		switch {
		case wrong != "":
			rc.wrong++
			fail("%s read of %s returned wrong bytes: %s", rp, p, wrong)
		case err != nil:
			rc.failed++
			if mustRead {
				rc.undamagedFailed++
				fail("%s read of undamaged %s failed: %v", rp, p, err)
			}
		default:
			rc.ok++
		}
	}

	// serve: daemon, mount and HTTP cache in one process, started after
	// the flip.
	t1 := time.Now()
	srv, err := startFlipServe(wc, t.TempDir())
	sum.phase("serve start", t1)
	if err != nil {
		for _, p := range fs.names {
			for _, rp := range []string{"daemon", "fuse", "http"} {
				record(rp, p, err, "", undamaged(p))
			}
		}
	} else {
		for _, p := range fs.names {
			err, wrong := daemonRead(srv.sock, "/nix/store/"+p, fs.nars[p])
			record("daemon", p, err, wrong, undamaged(p))
			err, wrong = fuseRead(fs.src[p], filepath.Join(srv.mnt, p))
			record("fuse", p, err, wrong, undamaged(p))
			err, wrong = httpRead(srv.url, p, fs.nars[p])
			record("http", p, err, wrong, undamaged(p))
		}
		sum.phase("serve reads", t1)
		t2 := time.Now()
		if err := srv.stop(); err != nil {
			fail("casnix serve: %v", err)
		}
		sum.slowestStop = max(sum.slowestStop, srv.took)
		sum.phase("serve stop", t2)
	}

	// export --all. When that fails, the paths whose closure is undamaged
	// and that it did not write must still export: together, then (if
	// that fails too) one at a time.
	t3 := time.Now()
	defer sum.phase("export", t3)
	cache := t.TempDir()
	export := func(paths ...string) bool {
		args := []string{"export", "--to", "file://" + cache, "--level", "1"}
		if len(paths) == 0 {
			args = append(args, "--all")
		}
		for _, p := range paths {
			args = append(args, "/nix/store/"+p)
		}
		return wc.Try(args...).OK()
	}
	allOK := export()
	// A path --all did not write: export it alone (an undamaged one must
	// export; a damaged one may fail, or be gone from the valid set).
	var retry []string
	for _, p := range fs.names {
		if err, _ := exportedNAR(cache, p, nil); err != nil && (allOK || closureUndamaged(p)) {
			retry = append(retry, p)
		}
	}
	retryOK := map[string]bool{}
	if len(retry) > 0 && !allOK && export(retry...) {
		for _, p := range retry {
			retryOK[p] = true
		}
	} else {
		for _, p := range retry {
			retryOK[p] = export(p)
		}
	}
	for _, p := range fs.names {
		err, wrong := exportedNAR(cache, p, fs.nars[p])
		if err != nil && retryOK[p] {
			wrong = "export of the path succeeded without writing it: " + err.Error()
		}
		record("export", p, err, wrong, closureUndamaged(p))
	}
}

func mapKeys(m map[string]bool) func(func(string) bool) {
	return func(yield func(string) bool) {
		for k := range m {
			if !yield(k) {
				return
			}
		}
	}
}

// parseVerify reads `casnix verify`'s output: the paths it names, whether
// it reported any damage, and whether it failed to run at all.
func parseVerify(r *nixtest.Result) (named map[string]bool, reported, refused bool) {
	named = map[string]bool{}
	for _, line := range strings.Split(string(r.Stdout), "\n") {
		if rest, ok := strings.CutPrefix(line, "damaged path: "); ok {
			p, _, _ := strings.Cut(rest, ": ")
			named[filepath.Base(p)] = true
		}
		if strings.HasPrefix(line, "damaged ") {
			reported = true
		}
	}
	if r.OK() {
		return named, false, false
	}
	return named, reported, !reported
}

type flipServe struct {
	cmd      *exec.Cmd
	sock     string
	mnt, url string
	log      bytes.Buffer
	exited   chan error
	took     time.Duration // to stop
}

// startFlipServe starts `casnix serve` with a socket, a mount and an HTTP
// cache, and waits until all three answer or it exits.
func startFlipServe(c *nixtest.Casnix, dir string) (*flipServe, error) {
	ln, err := net.Listen("tcp", "127.0.0.1:0")
	if err != nil {
		return nil, err
	}
	addr := ln.Addr().String()
	ln.Close()
	s := &flipServe{sock: filepath.Join(dir, "d.sock"), mnt: filepath.Join(dir, "m"), url: "http://" + addr, exited: make(chan error, 1)}
	s.cmd = c.Cmd("serve", "--socket", s.sock, "--mount", s.mnt, "--http", addr).Exec(context.Background())
	s.cmd.Stdout, s.cmd.Stderr = &s.log, &s.log
	if err := s.cmd.Start(); err != nil {
		return nil, err
	}
	go func() { s.exited <- s.cmd.Wait() }()
	deadline := time.Now().Add(30 * time.Second)
	for {
		select {
		case err := <-s.exited:
			s.exited <- err
			exec.Command("fusermount", "-u", "-z", s.mnt).Run()
			return nil, fmt.Errorf("casnix serve exited: %v: %s", err, s.log.String())
		default:
		}
		_, e1 := os.Stat(s.sock)
		var st syscall.Statfs_t
		e2 := syscall.Statfs(s.mnt, &st)
		if e2 == nil && st.Type != 0x65735546 { // FUSE_SUPER_MAGIC
			e2 = errors.New("not mounted yet")
		}
		conn, e3 := net.Dial("tcp", addr)
		if e3 == nil {
			conn.Close()
		}
		if e1 == nil && e2 == nil && e3 == nil {
			return s, nil
		}
		if time.Now().After(deadline) {
			s.stop()
			return nil, fmt.Errorf("casnix serve not ready in 30s: %v %v %v", e1, e2, e3)
		}
		time.Sleep(20 * time.Millisecond)
	}
}

// stop stops serve with SIGTERM and fails if it has not exited after 45 s.
// How long it took is kept: no client connection is open by then, but
// unmounting alone takes seconds on a loaded machine (go-fuse waits for the
// kernel), up to 20 s at a load average of 60.
func (s *flipServe) stop() error {
	start := time.Now()
	s.cmd.Process.Signal(syscall.SIGTERM)
	select {
	case err := <-s.exited:
		if err != nil {
			return fmt.Errorf("%v: %s", err, s.log.String())
		}
		s.took = time.Since(start)
		return nil
	case <-time.After(45 * time.Second):
		s.cmd.Process.Signal(syscall.SIGQUIT) // goroutine dump into the log
		time.Sleep(time.Second)
		s.cmd.Process.Kill()
		<-s.exited
		exec.Command("fusermount", "-u", "-z", s.mnt).Run()
		return fmt.Errorf("did not stop within 45s of SIGTERM: %s", s.log.String())
	}
}

// daemonRead asks the daemon for the path's NAR.
func daemonRead(sock, path string, want []byte) (err error, wrong string) {
	cl, err := proto.Dial(sock)
	if err != nil {
		return err, ""
	}
	defer cl.Close()
	var got bytes.Buffer
	if _, err := cl.NarFromPath(path, &got); err != nil {
		return err, ""
	}
	return nil, diffBytes(got.Bytes(), want)
}

// httpRead downloads the path's narinfo and NAR from the HTTP cache.
func httpRead(base, p string, want []byte) (err error, wrong string) {
	hash, _, _ := strings.Cut(p, "-")
	info, err := httpGet(base + "/" + hash + ".narinfo")
	if err != nil {
		return err, ""
	}
	url := ""
	for _, line := range strings.Split(string(info), "\n") {
		if u, ok := strings.CutPrefix(line, "URL: "); ok {
			url = u
		}
	}
	if url == "" {
		return fmt.Errorf("narinfo without URL: %q", info), ""
	}
	body, err := httpGet(base + "/" + url)
	if err != nil {
		return err, ""
	}
	got, err := decompress(url, body)
	if err != nil {
		return err, ""
	}
	return nil, diffBytes(got, want)
}

// httpClient keeps no idle connections, so a serve asked to stop has no
// client connection left open.
var httpClient = &http.Client{Timeout: time.Minute, Transport: &http.Transport{DisableKeepAlives: true}}

func httpGet(url string) ([]byte, error) {
	resp, err := httpClient.Get(url)
	if err != nil {
		return nil, err
	}
	defer resp.Body.Close()
	b, err := io.ReadAll(resp.Body)
	if err != nil {
		return nil, fmt.Errorf("GET %s: %w", url, err)
	}
	if resp.StatusCode != http.StatusOK {
		return nil, fmt.Errorf("GET %s: %s", url, resp.Status)
	}
	return b, nil
}

func decompress(name string, b []byte) ([]byte, error) {
	switch {
	case strings.HasSuffix(name, ".nar"):
		return b, nil
	case strings.HasSuffix(name, ".nar.zst"):
		d, err := zstd.NewReader(nil)
		if err != nil {
			return nil, err
		}
		defer d.Close()
		return d.DecodeAll(b, nil)
	}
	return nil, fmt.Errorf("%s: unexpected compression", name)
}

// exportedNAR reads a path's NAR from an exported cache directory.
func exportedNAR(cache, p string, want []byte) (err error, wrong string) {
	hash, _, _ := strings.Cut(p, "-")
	info, err := os.ReadFile(filepath.Join(cache, hash+".narinfo"))
	if err != nil {
		return err, ""
	}
	url := ""
	for _, line := range strings.Split(string(info), "\n") {
		if u, ok := strings.CutPrefix(line, "URL: "); ok {
			url = u
		}
	}
	body, err := os.ReadFile(filepath.Join(cache, url))
	if err != nil {
		return err, ""
	}
	got, err := decompress(url, body)
	if err != nil {
		return nil, "undecodable NAR file: " + err.Error()
	}
	return nil, diffBytes(got, want)
}

// fuseRead walks the source tree and reads the same entries through the
// mount: types, sizes, contents, symlink targets. err is a failed read;
// wrong is a successful one that disagrees.
func fuseRead(src, mnt string) (rerr error, wrong string) {
	err := filepath.WalkDir(src, func(sp string, d fs.DirEntry, err error) error {
		if err != nil {
			return err
		}
		rel, _ := filepath.Rel(src, sp)
		mp := filepath.Join(mnt, rel)
		si, err := os.Lstat(sp)
		if err != nil {
			return err
		}
		mi, err := os.Lstat(mp)
		if err != nil {
			rerr = err
			return fs.SkipAll
		}
		if si.Mode().Type() != mi.Mode().Type() {
			wrong = fmt.Sprintf("%s: type %v, want %v", rel, mi.Mode().Type(), si.Mode().Type())
			return fs.SkipAll
		}
		switch {
		case si.Mode().IsRegular():
			want, err := os.ReadFile(sp)
			if err != nil {
				return err
			}
			got, err := os.ReadFile(mp)
			if err != nil {
				rerr = err
				return fs.SkipAll
			}
			if w := diffBytes(got, want); w != "" {
				wrong = rel + ": " + w
				return fs.SkipAll
			}
			if mi.Size() != si.Size() {
				wrong = fmt.Sprintf("%s: size %d, want %d", rel, mi.Size(), si.Size())
				return fs.SkipAll
			}
		case si.Mode()&os.ModeSymlink != 0:
			want, _ := os.Readlink(sp)
			got, err := os.Readlink(mp)
			if err != nil {
				rerr = err
				return fs.SkipAll
			}
			if got != want {
				wrong = fmt.Sprintf("%s: -> %q, want %q", rel, got, want)
				return fs.SkipAll
			}
		case si.IsDir():
			se, _ := os.ReadDir(sp)
			me, err := os.ReadDir(mp)
			if err != nil {
				rerr = err
				return fs.SkipAll
			}
			if len(se) != len(me) {
				wrong = fmt.Sprintf("%s: %d entries, want %d", rel, len(me), len(se))
				return fs.SkipAll
			}
		}
		return nil
	})
	if err != nil && rerr == nil && wrong == "" {
		rerr = err
	}
	return rerr, wrong
}

// diffBytes describes how got differs from want ("" if it does not).
func diffBytes(got, want []byte) string {
	if bytes.Equal(got, want) {
		return ""
	}
	i := 0
	for i < len(got) && i < len(want) && got[i] == want[i] {
		i++
	}
	return fmt.Sprintf("%d bytes, want %d; first difference at byte %d", len(got), len(want), i)
}
