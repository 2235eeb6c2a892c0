// Package castore is casnix's merkle tree of file-system nodes, encoded exactly
// like snix's castore (protobuf package snix.castore.v1) so that digests can be
// exchanged and compared with snix.
//
// Vocabulary:
//   - A Node is one of a directory, a file or a symlink, with a name.
//   - A Directory lists its child nodes in three lists (directories, files,
//     symlinks), each sorted by name as raw bytes, names unique across lists.
//   - A Digest is a BLAKE3-256 hash. A Directory's digest is the hash of its
//     canonical protobuf encoding; a file's digest is the hash of its whole
//     contents (how those contents are chunked is a storage detail of package
//     blobs).
//
// Wire layout of a Directory (proto3, fields in number order, defaults omitted):
//
//	Directory      { repeated DirectoryEntry directories = 1; repeated FileEntry files = 2; repeated SymlinkEntry symlinks = 3; }
//	DirectoryEntry { bytes name = 1; bytes digest = 2; uint64 size = 3; }
//	FileEntry      { bytes name = 1; bytes digest = 2; uint64 size = 3; bool executable = 4; }
//	SymlinkEntry   { bytes name = 1; bytes target = 2; }
//
// The encoder is hand-written on protowire so the bytes (and thus digests)
// never depend on a protobuf library's field ordering choices.
package castore
