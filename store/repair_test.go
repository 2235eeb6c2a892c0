package store

import (
	"bytes"
	"context"
	"crypto/sha256"
	"database/sql"
	"errors"
	"fmt"
	"math/rand/v2"
	"os"
	"path/filepath"
	"slices"
	"strings"
	"testing"

	"golang.org/x/sys/unix"

	"github.com/casnix/casnix/blobs"
	"github.com/casnix/casnix/tests/fliptest"
)

// repairFixture is a small store: C stands alone and is added first (so
// the small files every tree has live in its frames), A has a big file of
// its own, B refers to A and D to B. Every batch gets packs of its own.
type repairFixture struct {
	dir  string
	nars map[string][]byte
}

func repairOptions() Options {
	return Options{Blobs: blobs.Options{PackSize: 1, FrameSize: blobs.MaxChunk}}
}

func newRepairFixture(t *testing.T) *repairFixture {
	t.Helper()
	st, err := Open(context.Background(), t.TempDir(), repairOptions())
	if err != nil {
		t.Fatal(err)
	}
	fx := &repairFixture{dir: st.Dir(), nars: map[string][]byte{
		pathC: treeNAR(t, 10), pathA: treeNAR(t, 600<<10), pathB: treeNAR(t, 10), pathD: treeNAR(t, 10),
	}}
	for _, p := range []struct {
		name string
		refs []string
	}{{pathC, nil}, {pathA, nil}, {pathB, []string{pathA}}, {pathD, []string{pathB}}} {
		if err := add(t, st, p.name, fx.nars[p.name], p.refs...); err != nil {
			t.Fatal(err)
		}
	}
	if err := st.Close(); err != nil {
		t.Fatal(err)
	}
	return fx
}

func (fx *repairFixture) raw(t *testing.T) *sql.DB {
	t.Helper()
	raw, err := sql.Open("sqlite", "file:"+filepath.Join(fx.dir, DBFile)+"?_pragma=foreign_keys(0)")
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { raw.Close() })
	return raw
}

// bigFrame is the frame (pack, offset of the compressed data, its length)
// holding A's largest chunk.
func (fx *repairFixture) bigFrame(t *testing.T) (pack, dataOff, clen int64) {
	t.Helper()
	raw := fx.raw(t)
	defer raw.Close()
	err := raw.QueryRow(`SELECT f.pack, f.data_off, f.clen FROM chunks c JOIN frames f ON f.id = c.frame
		ORDER BY c.len DESC LIMIT 1`).Scan(&pack, &dataOff, &clen)
	if err != nil {
		t.Fatal(err)
	}
	return pack, dataOff, clen
}

func (fx *repairFixture) packPath(id int64) string {
	return blobs.PackFile(filepath.Join(fx.dir, PackDir), id)
}

// damageIndexPage flips the last byte of the first page of index name (the
// rowid of its last-written entry, on a store this small), so
// integrity_check finds the index and its table disagree.
func damageIndexPage(t *testing.T, fx *repairFixture, name string) {
	t.Helper()
	raw := fx.raw(t)
	var root, size int64
	if err := raw.QueryRow("SELECT rootpage FROM sqlite_master WHERE name = ?", name).Scan(&root); err != nil {
		t.Fatal(err)
	}
	if err := raw.QueryRow("PRAGMA page_size").Scan(&size); err != nil {
		t.Fatal(err)
	}
	raw.Close()
	flipByte(t, filepath.Join(fx.dir, DBFile), root*size-1, 0x40)
}

func TestRepair(t *testing.T) {
	all := []string{pathA, pathB, pathC, pathD}
	for _, tc := range []struct {
		name    string
		damage  func(t *testing.T, fx *repairFixture)
		dropped []string // the damaged paths and their referrers
		reindex bool     // REINDEX must run
		rebuild bool     // and not be enough: the database is copied
	}{
		{"flipped byte in a frame", func(t *testing.T, fx *repairFixture) {
			pack, off, clen := fx.bigFrame(t)
			flipByte(t, fx.packPath(pack), off+clen/2, 0xff)
		}, []string{pathA, pathB, pathD}, false, false},
		{"damaged record header", func(t *testing.T, fx *repairFixture) {
			pack, off, _ := fx.bigFrame(t)
			flipByte(t, fx.packPath(pack), off-10, 0x01) // inside the last chunk entry, before the CRC
		}, []string{pathA, pathB, pathD}, false, false},
		{"truncated pack", func(t *testing.T, fx *repairFixture) {
			pack, off, clen := fx.bigFrame(t)
			if err := os.Truncate(fx.packPath(pack), off+clen/2); err != nil {
				t.Fatal(err)
			}
		}, []string{pathA, pathB, pathD}, false, false},
		{"deleted pack file", func(t *testing.T, fx *repairFixture) {
			pack, _, _ := fx.bigFrame(t)
			if err := os.Remove(fx.packPath(pack)); err != nil {
				t.Fatal(err)
			}
		}, []string{pathA, pathB, pathD}, false, false},
		{"chunk rows deleted", func(t *testing.T, fx *repairFixture) {
			mustExec(t, fx.raw(t), "DELETE FROM chunks WHERE digest IN (SELECT digest FROM chunks ORDER BY len DESC LIMIT 3)")
		}, nil, false, false},
		{"frame row deleted", func(t *testing.T, fx *repairFixture) {
			mustExec(t, fx.raw(t), "DELETE FROM frames WHERE id = (SELECT frame FROM chunks ORDER BY len DESC LIMIT 1)")
		}, nil, false, false},
		{"pack row deleted", func(t *testing.T, fx *repairFixture) {
			pack, _, _ := fx.bigFrame(t)
			mustExec(t, fx.raw(t), "DELETE FROM packs WHERE id = ?", pack)
		}, nil, false, false},
		{"damaged index b-tree", func(t *testing.T, fx *repairFixture) {
			damageIndexPage(t, fx, "frames_pack")
		}, nil, true, false},
		{"pack header and frame", func(t *testing.T, fx *repairFixture) {
			pack, off, clen := fx.bigFrame(t)
			flipByte(t, fx.packPath(pack), 0, 0x20)
			flipByte(t, fx.packPath(pack), off+clen/2, 0xff)
		}, []string{pathA, pathB, pathD}, false, false},
		{"damaged free-page count", func(t *testing.T, fx *repairFixture) {
			// The header's count of free pages: no index covers it, so
			// REINDEX leaves it wrong; a copy of every row mends it.
			flipByte(t, filepath.Join(fx.dir, DBFile), 39, 0x03)
		}, nil, true, true},
		{"pack header", func(t *testing.T, fx *repairFixture) {
			pack, _, _ := fx.bigFrame(t)
			flipByte(t, fx.packPath(pack), 3, 0x20)
		}, nil, false, false},
		{"root directory row deleted", func(t *testing.T, fx *repairFixture) {
			mustExec(t, fx.raw(t), "DELETE FROM directories WHERE digest = (SELECT digest FROM paths WHERE name = ?)", pathA)
		}, []string{pathA, pathB, pathD}, false, false},
		{"signature of a missing path", func(t *testing.T, fx *repairFixture) {
			mustExec(t, fx.raw(t), "INSERT INTO sigs(path, sig) VALUES (999, 'cache.example.org-1:AAAA')")
		}, nil, false, false},
		{"dangling reference", func(t *testing.T, fx *repairFixture) {
			mustExec(t, fx.raw(t), "UPDATE refs SET reference = 999 WHERE referrer = (SELECT id FROM paths WHERE name = ?)", pathB)
		}, []string{pathB, pathD}, false, false},
	} {
		t.Run(tc.name, func(t *testing.T) {
			ctx := context.Background()
			fx := newRepairFixture(t)
			tc.damage(t, fx)
			st, err := Open(ctx, fx.dir, repairOptions())
			if err != nil {
				t.Fatal(err)
			}
			defer st.Close()
			before, err := st.Verify(ctx, nil)
			if err != nil {
				t.Fatal(err)
			}
			if before.OK() {
				t.Fatal("verify sees no damage: the test damages nothing")
			}
			dry, err := st.Repair(ctx, RepairOptions{DryRun: true})
			if err != nil {
				t.Fatalf("dry run: %v", err)
			}
			if again, err := st.Verify(ctx, nil); err != nil || again.OK() {
				t.Fatalf("the dry run changed the store: verify %v, %v", again, err)
			}
			rep, err := st.Repair(ctx, RepairOptions{})
			if err != nil {
				t.Fatal(err)
			}
			if rep.Reindexed != tc.reindex || rep.Rebuilt != tc.rebuild {
				t.Fatalf("reindexed %v rebuilt %v, want %v %v (database problems %q)", rep.Reindexed, rep.Rebuilt, tc.reindex, tc.rebuild, rep.DB)
			}
			t.Logf("scan damage: %q", rep.Index.Damage)
			if len(rep.Remaining) > 0 {
				t.Fatalf("repair reports damage left: %q", rep.Remaining)
			}
			got := droppedNames(rep)
			if !slices.Equal(got, tc.dropped) {
				t.Fatalf("dropped %q, want %q (report %+v)", got, tc.dropped, rep)
			}
			if d := droppedNames(dry); !slices.Equal(d, got) {
				t.Fatalf("dry run would drop %q, repair dropped %q", d, got)
			}
			after, err := st.Verify(ctx, nil)
			if err != nil {
				t.Fatal(err)
			}
			if !after.OK() {
				t.Fatalf("verify after repair: %+v", after)
			}
			for _, name := range all {
				if slices.Contains(got, name) {
					if ok, err := st.IsValid(ctx, name); err != nil || ok {
						t.Fatalf("dropped %s is still valid (%v)", name, err)
					}
					continue
				}
				n := render(t, st, name)
				pi, err := st.Info(ctx, name)
				if err != nil {
					t.Fatal(err)
				}
				if sha256.Sum256(n) != pi.NarHash || sha256.Sum256(n) != sha256.Sum256(fx.nars[name]) {
					t.Fatalf("%s renders wrong after repair", name)
				}
			}
			second, err := st.Repair(ctx, RepairOptions{})
			if err != nil {
				t.Fatal(err)
			}
			if second.Index.Changed() || len(second.Dropped) > 0 || second.RowsDropped > 0 || second.Reindexed || second.Rebuilt || len(second.DB) > 0 {
				t.Fatalf("second repair changed something: %+v", second)
			}
		})
	}
}

func droppedNames(rep *RepairReport) []string {
	var out []string
	for _, d := range rep.Dropped {
		out = append(out, d.Name)
	}
	return out
}

// indexRows is the chunk index as the packs can give it back: every frame
// by its place, every chunk by where it is (frame ids are the database's
// own and are not in the packs).
func indexRows(t *testing.T, fx *repairFixture) (frames, chunks []string) {
	t.Helper()
	raw := fx.raw(t)
	defer raw.Close()
	rows, err := raw.Query("SELECT pack, offset, data_off, clen, rawlen FROM frames")
	if err != nil {
		t.Fatal(err)
	}
	for rows.Next() {
		var v [5]int64
		if err := rows.Scan(&v[0], &v[1], &v[2], &v[3], &v[4]); err != nil {
			t.Fatal(err)
		}
		frames = append(frames, fmt.Sprint(v))
	}
	rows.Close()
	rows, err = raw.Query("SELECT hex(c.digest), f.pack, f.offset, c.off, c.len FROM chunks c JOIN frames f ON f.id = c.frame")
	if err != nil {
		t.Fatal(err)
	}
	for rows.Next() {
		var d string
		var v [4]int64
		if err := rows.Scan(&d, &v[0], &v[1], &v[2], &v[3]); err != nil {
			t.Fatal(err)
		}
		chunks = append(chunks, d+fmt.Sprint(v))
	}
	rows.Close()
	slices.Sort(frames)
	slices.Sort(chunks)
	return frames, chunks
}

// TestRepairRebuildsIndexFromPacks empties the packs, frames and chunks
// tables and gets them back identical from the pack files alone (frame ids
// aside: they are the database's own and not in the packs).
func TestRepairRebuildsIndexFromPacks(t *testing.T) {
	ctx := context.Background()
	fx := newRepairFixture(t)
	frames, chunks := indexRows(t, fx)
	if len(frames) < 3 || len(chunks) < 5 {
		t.Fatalf("fixture too small: %d frames, %d chunks", len(frames), len(chunks))
	}
	raw := fx.raw(t)
	mustExec(t, raw, "DELETE FROM chunks")
	mustExec(t, raw, "DELETE FROM frames")
	mustExec(t, raw, "DELETE FROM packs")
	raw.Close()
	st, err := Open(ctx, fx.dir, repairOptions())
	if err != nil {
		t.Fatal(err)
	}
	rep, err := st.Repair(ctx, RepairOptions{})
	if err != nil {
		t.Fatal(err)
	}
	if len(rep.Dropped) > 0 || rep.Index.ChunksAdded != len(chunks) || rep.Index.FramesAdded != len(frames) {
		t.Fatalf("repair: %+v", rep)
	}
	v, err := st.Verify(ctx, nil)
	if err != nil || !v.OK() {
		t.Fatalf("verify: %+v %v", v, err)
	}
	st.Close()
	frames2, chunks2 := indexRows(t, fx)
	if !slices.Equal(frames, frames2) || !slices.Equal(chunks, chunks2) {
		t.Fatalf("rebuilt index differs:\nframes %q\nwant   %q\nchunks %q\nwant   %q", frames2, frames, chunks2, chunks)
	}
}

// TestRepairKeepsPackIDs: a pack file whose row is gone (here: a stray copy
// numbered just above every pack row) keeps its id from new packs, so an
// import after repair does not collide with the file.
func TestRepairKeepsPackIDs(t *testing.T) {
	ctx := context.Background()
	fx := newRepairFixture(t)
	raw := fx.raw(t)
	var top int64
	if err := raw.QueryRow("SELECT MAX(id) FROM packs").Scan(&top); err != nil {
		t.Fatal(err)
	}
	raw.Close()
	b, err := os.ReadFile(fx.packPath(top))
	if err != nil {
		t.Fatal(err)
	}
	os.MkdirAll(filepath.Dir(fx.packPath(top+1)), 0o755)
	if err := os.WriteFile(fx.packPath(top+1), b, 0o644); err != nil {
		t.Fatal(err)
	}
	st, err := Open(ctx, fx.dir, repairOptions())
	if err != nil {
		t.Fatal(err)
	}
	defer st.Close()
	if _, err := st.Repair(ctx, RepairOptions{}); err != nil {
		t.Fatal(err)
	}
	const e = "44444444444444444444444444444444-e"
	if err := add(t, st, e, treeNAR(t, 10)); err != nil {
		t.Fatalf("import after repair: %v", err)
	}
}

// TestRepairNeedsDataDirAlone: repair refuses while another store has the
// data dir open (a dry run does not), keeps its own shared hold on the data
// dir after refusing, and runs once the other is closed.
func TestRepairNeedsDataDirAlone(t *testing.T) {
	ctx := context.Background()
	fx := newRepairFixture(t)
	st, err := Open(ctx, fx.dir, repairOptions())
	if err != nil {
		t.Fatal(err)
	}
	defer st.Close()
	other, err := Open(ctx, fx.dir, repairOptions())
	if err != nil {
		t.Fatal(err)
	}
	if _, err := st.Repair(ctx, RepairOptions{}); !errors.Is(err, ErrInUse) {
		t.Fatalf("repair beside another open store: %v, want ErrInUse", err)
	}
	if _, err := st.Repair(ctx, RepairOptions{DryRun: true}); err != nil {
		t.Fatalf("dry run beside another open store: %v", err)
	}
	other.Close()
	if f, err := lockDir(fx.dir, unix.LOCK_EX); err == nil {
		f.Close()
		t.Fatal("the refused repair let go of its store's data-dir lock")
	}
	if _, err := st.Repair(ctx, RepairOptions{}); err != nil {
		t.Fatal(err)
	}
}

// TestRepairRefusesDamagedTable: a paths table page that cannot be read is
// not mended by REINDEX nor copyable row by row, so repair refuses with
// ErrUnrepairable and leaves the database file as it was.
func TestRepairRefusesDamagedTable(t *testing.T) {
	ctx := context.Background()
	fx := newRepairFixture(t)
	raw := fx.raw(t)
	var root, size int64
	if err := raw.QueryRow("SELECT rootpage FROM sqlite_master WHERE name = 'paths'").Scan(&root); err != nil {
		t.Fatal(err)
	}
	if err := raw.QueryRow("PRAGMA page_size").Scan(&size); err != nil {
		t.Fatal(err)
	}
	raw.Close()
	file := filepath.Join(fx.dir, DBFile)
	flipByte(t, file, (root-1)*size, 0xff) // the page's b-tree type
	before, err := os.ReadFile(file)
	if err != nil {
		t.Fatal(err)
	}
	st, err := Open(ctx, fx.dir, repairOptions())
	if err != nil {
		t.Fatal(err)
	}
	defer st.Close()
	for _, dry := range []bool{true, false} {
		if _, err := st.Repair(ctx, RepairOptions{DryRun: dry}); !errors.Is(err, ErrUnrepairable) {
			t.Fatalf("repair (dry run %v) of a damaged table: %v, want ErrUnrepairable", dry, err)
		}
	}
	st.Close()
	after, err := os.ReadFile(file)
	if err != nil {
		t.Fatal(err)
	}
	if !slices.Equal(before, after) {
		t.Fatal("the refused repair changed the database file")
	}
}

// TestRepairAfterFlippedBytes flips random bytes (seeded; CASNIX_REPAIR_FLIPS
// for more) across casnix.db and the packs of a repair fixture, one flip
// per copy, and repairs each: repair (and its dry run before it, which
// must name the same paths) either refuses a database whose
// tables it cannot read (ErrUnrepairable) or leaves a store that verifies
// clean, whose remaining paths render to their NARs, whose dropped set is
// closed under referrers, and that a second repair leaves alone.
func TestRepairAfterFlippedBytes(t *testing.T) {
	flips := fliptest.EnvInt(t, "CASNIX_REPAIR_FLIPS", 40)
	ctx := context.Background()
	rng := rand.New(rand.NewPCG(2, 0))
	fx := newRepairFixture(t)
	referrers := map[string][]string{pathA: {pathB}, pathB: {pathD}}
	files := []string{DBFile}
	packs, _ := filepath.Glob(filepath.Join(fx.dir, PackDir, "*", "*.pack"))
	for _, p := range packs {
		files = append(files, strings.TrimPrefix(p, fx.dir+"/"))
	}
	targets := fliptest.NewTargets(t, fx.dir, files)
	outcomes := map[string]int{}
	work := filepath.Join(t.TempDir(), "w")
	for i := 0; i < flips; i++ {
		os.RemoveAll(work)
		if _, err := copyTree(fx.dir, work); err != nil {
			t.Fatal(err)
		}
		// Half the flips in the database, half across the packs.
		f := targets.PickExcept(rng, 0)
		if rng.IntN(2) == 0 {
			f = targets.PickIn(rng, 0)
		}
		f.Mask = byte(1 + rng.IntN(255))
		where := fmt.Sprintf("flip %d: %s", i, f)
		if err := f.Apply(work); err != nil {
			t.Fatal(err)
		}
		outcome, err := repairFlipped(ctx, work, fx.nars, referrers)
		if err != nil {
			t.Errorf("%s: %v", where, err)
		}
		outcomes[outcome]++
	}
	t.Logf("%d flips: %v", flips, outcomes)
}

// repairFlipped repairs the data dir dir and checks the result.
func repairFlipped(ctx context.Context, dir string, nars map[string][]byte, referrers map[string][]string) (string, error) {
	st, err := Open(ctx, dir, repairOptions())
	if err != nil {
		return "cannot open", nil // nothing runs on it: neither verify nor repair
	}
	defer st.Close()
	dry, dryErr := st.Repair(ctx, RepairOptions{DryRun: true})
	rep, err := st.Repair(ctx, RepairOptions{})
	if errors.Is(err, ErrUnrepairable) != errors.Is(dryErr, ErrUnrepairable) {
		return "error", fmt.Errorf("dry run: %v; repair: %v", dryErr, err)
	}
	if errors.Is(err, ErrUnrepairable) {
		v, verr := st.Verify(ctx, nil)
		if verr == nil && v.OK() {
			return "refused", fmt.Errorf("repair refused a store verify finds clean: %v", err)
		}
		return "refused", nil
	}
	if err != nil || dryErr != nil {
		return "error", fmt.Errorf("repair: %v (dry run: %v)", err, dryErr)
	}
	if d, r := droppedNames(dry), droppedNames(rep); !slices.Equal(d, r) {
		return "error", fmt.Errorf("dry run would drop %q, repair dropped %q", d, r)
	}
	v, err := st.Verify(ctx, nil)
	if err != nil || !v.OK() {
		return "error", fmt.Errorf("verify after repair: %+v %v", v, err)
	}
	dropped := map[string]bool{}
	for _, d := range rep.Dropped {
		dropped[d.Name] = true
	}
	for name, want := range nars {
		if dropped[name] {
			for _, r := range referrers[name] {
				if !dropped[r] {
					return "error", fmt.Errorf("dropped %s but not %s, which refers to it", name, r)
				}
			}
			continue
		}
		var got bytes.Buffer
		if _, err := st.NarRender(ctx, name, &got); err != nil {
			return "error", fmt.Errorf("render %s after repair: %w", name, err)
		}
		if !bytes.Equal(got.Bytes(), want) {
			return "error", fmt.Errorf("%s renders differently after repair", name)
		}
	}
	second, err := st.Repair(ctx, RepairOptions{})
	if err != nil {
		return "error", fmt.Errorf("second repair: %w", err)
	}
	if second.Index.Changed() || len(second.Dropped) > 0 || second.RowsDropped > 0 || second.Reindexed || second.Rebuilt {
		return "error", fmt.Errorf("second repair changed something: %+v", second)
	}
	switch {
	case len(rep.Dropped) > 0:
		return "paths dropped", nil
	case rep.Index.Changed() || rep.RowsDropped > 0 || rep.Reindexed || rep.Rebuilt || len(rep.Packs) > 0:
		return "mended", nil
	}
	return "nothing to do", nil
}
