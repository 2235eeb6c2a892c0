package binarycache

import (
	"crypto/sha256"
	"encoding/hex"
	"strings"

	"github.com/casnix/casnix/store"
)

// caVerified reports whether in's content address proves its store path
// without a signature, which is what lets Nix take content-addressed paths
// from untrusted caches. Only recursive SHA-256 ("fixed:r:sha256:…", what
// `nix-store --add` and most fixed-output derivations make) can be checked
// from the narinfo alone: its hash is the NAR hash, which the import checks.
// The other kinds hash the flat file contents and still need a signature.
func caVerified(storeDir string, in *Info) bool {
	h, ok := strings.CutPrefix(in.CA, "fixed:r:sha256:")
	if !ok || h != store.NixBase32(in.NarHash[:]) {
		return false
	}
	_, name, ok := strings.Cut(in.Name, "-")
	if !ok {
		return false
	}
	// Nix's makeFixedOutputPath for recursive SHA-256: makeStorePath of
	// type "source" with the references (and ":self"), the NAR hash, name.
	typ := "source"
	for _, r := range in.References {
		if r == in.Name {
			continue
		}
		typ += ":" + storeDir + "/" + r
	}
	for _, r := range in.References {
		if r == in.Name {
			typ += ":self"
			break
		}
	}
	return makeStorePathHash(typ, "sha256:"+hex.EncodeToString(in.NarHash[:]), storeDir, name) == store.HashPart(in.Name)
}

// makeStorePathHash is the hash part of Nix's makeStorePath: SHA-256 of
// "type:hash:storeDir:name", folded to 20 bytes, in Nix's base32.
func makeStorePathHash(typ, hash, storeDir, name string) string {
	sum := sha256.Sum256([]byte(typ + ":" + hash + ":" + storeDir + ":" + name))
	var folded [20]byte
	for i, b := range sum {
		folded[i%20] ^= b
	}
	return store.NixBase32(folded[:])
}
