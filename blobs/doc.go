// Package blobs stores file contents (blobs) as content-defined chunks in
// append-only pack files, indexed in SQLite (package db).
//
// Vocabulary:
//   - A blob is a file's whole contents, addressed by its BLAKE3 digest.
//   - A chunk is a content-defined piece of a blob (FastCDC, see Chunker),
//     addressed by the BLAKE3 of its bytes and stored once however many blobs
//     share it.
//   - A frame is one zstd frame holding one or more consecutive new chunks,
//     up to Options.FrameSize raw bytes. Grouping chunks gives zstd context
//     (64 KiB frames alone compress ~15% worse) while dedup stays per chunk;
//     reading a chunk decodes its frame, and a small cache of decoded frames
//     makes sequential reads decode each frame once.
//   - A pack is a file packs/NN/<id>.pack of frame records (layout: package
//     pack). A pack has at most one writer at a time (an flock and the
//     in-process free list), so writers never interleave.
//
// Durability: a Writer appends frames, Flush fsyncs the packs, and only then
// does the caller commit the index rows (Writer.Commit inside its SQLite
// transaction). Bytes past a pack's last committed frame are a crashed or
// aborted writer's tail; they are truncated the next time the pack is taken
// for writing, never read, and never referenced.
package blobs
