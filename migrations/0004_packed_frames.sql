-- casnix schema version 4: write fast, pack tight later.
-- Ingest writes frames with a cheap zstd level so it keeps up with the disk
-- and the client; `casnix repack` rewrites their chunks into frames of the
-- space-optimal form (high level, large frames, similar chunks together) and
-- marks those packed, so it never rewrites them again. GC compaction copies
-- the mark with a frame it moves as it is, and clears it on a frame it
-- recompresses at the ingest level.
ALTER TABLE frames ADD COLUMN packed INTEGER NOT NULL DEFAULT 0;
