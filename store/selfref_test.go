package store

import (
	"bytes"
	"context"
	"crypto/sha256"
	"errors"
	"math/rand/v2"
	"os"
	"path/filepath"
	"strconv"
	"testing"

	"github.com/casnix/casnix/nar"
)

// moduloReference is Nix's hash modulo written plainly over the whole
// stream: zero every occurrence (left to right, no overlap), then append
// "|<offset>" for each.
func moduloReference(data []byte, modulus string) []byte {
	var offs []int
	z := bytes.Clone(data)
	for j := 0; ; {
		k := bytes.Index(z[j:], []byte(modulus))
		if k < 0 {
			break
		}
		j += k
		offs = append(offs, j)
		clear(z[j : j+len(modulus)])
		j += len(modulus)
	}
	for _, o := range offs {
		z = append(z, "|"+strconv.Itoa(o)...)
	}
	h := sha256.Sum256(z)
	return h[:]
}

// TestModuloHashStreams: written in pieces of any size, the modulo hash is
// the one over the whole stream, also for occurrences split across writes.
func TestModuloHashStreams(t *testing.T) {
	const mod = "0123456789abcdfghijklmnpqrsvwxyz"
	rng := rand.New(rand.NewPCG(3, 0))
	for _, data := range [][]byte{
		nil,
		[]byte("no reference here"),
		[]byte(mod),
		[]byte("x" + mod + mod + "y" + mod[:31]),
		bytes.Repeat([]byte("ab"+mod), 50),
	} {
		want := moduloReference(data, mod)
		for trial := 0; trial < 20; trial++ {
			m := newModuloHash(sha256.New(), mod)
			for rest := data; len(rest) > 0; {
				n := 1 + rng.IntN(len(rest))
				m.Write(rest[:n])
				rest = rest[n:]
			}
			got, err := m.Sum()
			if err != nil || !bytes.Equal(got, want) {
				t.Fatalf("%q: got %x (%v), want %x", data, got, err, want)
			}
		}
	}
}

// TestSelfReferencingCA: a fixed:r:sha256 path that refers to itself is
// accepted when its NAR, hashed modulo its own hash part, gives its content
// address and, with ":self", its name; a changed byte is refused.
func TestSelfReferencingCA(t *testing.T) {
	const name = "selfref"
	// Build as a builder would: under a scratch hash part, then rewrite to
	// the final one, which leaves the modulo hash unchanged.
	const scratch = "00000000000000000000000000000000"
	mk := func(hp string) []byte {
		root := filepath.Join(t.TempDir(), "t")
		os.MkdirAll(filepath.Join(root, "bin"), 0o755)
		os.WriteFile(filepath.Join(root, "bin", "run"), []byte("#!/bin/sh\nexec "+DefaultStoreDir+"/"+hp+"-"+name+"/bin/run\n"), 0o755)
		os.Symlink(DefaultStoreDir+"/"+hp+"-"+name+"/bin/run", filepath.Join(root, "link"))
		var b bytes.Buffer
		if _, err := nar.DumpPath(&b, root); err != nil {
			t.Fatal(err)
		}
		return b.Bytes()
	}
	h := moduloReference(mk(scratch), scratch)
	ca := CA{Method: CANAR, Algo: "sha256", Hash: h}
	base, err := ca.Path(DefaultStoreDir, name, nil, true)
	if err != nil {
		t.Fatal(err)
	}
	good := mk(base[:32])
	bad := bytes.Clone(good)
	bad[len(bad)-100] ^= 1
	for _, tc := range []struct {
		name string
		nar  []byte
		refs []string
		ok   bool
	}{
		{"changed byte", bad, []string{base}, false},
		{"self reference not claimed", good, nil, false},
		{"good", good, []string{base}, true},
	} {
		st := openStore(t)
		b := st.NewBatch(context.Background())
		_, err := b.Add(bytes.NewReader(tc.nar), PathInfo{Name: base, References: tc.refs, CA: ca.String()})
		if err == nil {
			_, err = b.Commit()
		} else {
			b.Abort()
		}
		if tc.ok != (err == nil) || (err != nil && !errors.Is(err, ErrCAMismatch)) {
			t.Fatalf("%s: %v", tc.name, err)
		}
		if tc.ok {
			mustVerify(t, st)
		}
	}
}
