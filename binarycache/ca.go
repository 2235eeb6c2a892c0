package binarycache

import (
	"bytes"

	"github.com/casnix/casnix/store"
)

// CAVerified reports whether in's content address, name and references
// make its store path (Nix's makeFixedOutputPathFromCA). Such a path needs
// no signature, as Nix takes content-addressed paths from untrusted caches:
// its contents are checked against the address when it is ingested
// (store.Batch.Add verifies every content address), so a cache cannot pass
// other contents off under that name.
func CAVerified(storeDir string, in *Info) bool {
	if in.CA == "" {
		return false
	}
	ca, err := store.ParseCA(in.CA)
	if err != nil {
		return false
	}
	if ca.Method == store.CANAR && ca.Algo == "sha256" && !bytes.Equal(ca.Hash, in.NarHash[:]) {
		return false // the NAR hash is the address: they must agree
	}
	p, err := ca.PathOf(storeDir, in.Name, in.References)
	return err == nil && p == in.Name
}
