// Package nar converts between Nix archives (NAR) and the castore tree:
// Ingest parses a NAR stream into castore directories and blobs while
// computing its SHA-256 and size; Render writes the canonical NAR of a tree.
//
// NAR grammar (every string is a u64 little-endian length, the bytes, and
// zero padding to a multiple of 8):
//
//	nar       = "nix-archive-1" node
//	node      = "(" "type" ( regular | symlink | directory ) ")"
//	regular   = "regular" [ "executable" "" ] "contents" <bytes>
//	symlink   = "symlink" "target" <target>
//	directory = "directory" { "entry" "(" "name" <name> "node" node ")" }
//
// Entries are strictly sorted by name bytes. Because the encoding of a tree
// is unique, a NAR rendered from what Ingest stored is byte-identical to the
// NAR that was ingested, so the recorded NAR hash stays valid.
//
// Why not go-nix's pkg/nar Reader and Writer: its Reader builds entry paths
// with path.Join, which folds the names "", "." and ".." into other paths
// (so they cannot be rejected, and a hostile NAR aliases another entry), and
// it accepts duplicate names; its Writer treats a child whose name begins
// with ".." (such as "..data") as a step up the tree. Both hand every entry
// across goroutines. This package uses go-nix's wire primitives, and its
// tests check it against go-nix's Reader on valid archives.
package nar
