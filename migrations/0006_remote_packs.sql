-- casnix schema version 6: packs on object storage (`--packs s3://…`).
-- A pack is written locally as before; once full, or once its oldest frame
-- waited --upload-within, the uploader seals it (no writer appends to it
-- again: writers check the mark under the pack's flock, which sealing holds)
-- and uploads it whole, then marks it uploaded. Only an uploaded pack's
-- local file may be evicted; reads then go to the bucket.
ALTER TABLE packs ADD COLUMN sealed INTEGER NOT NULL DEFAULT 0;
ALTER TABLE packs ADD COLUMN uploaded INTEGER NOT NULL DEFAULT 0;
-- Uploaded packs a compaction dropped from the index. Their objects stay in
-- the bucket (metadata snapshots and replicas may still name them); deleting
-- them waits for a snapshot retention policy.
CREATE TABLE dead_packs (
    id      INTEGER PRIMARY KEY,
    dropped INTEGER NOT NULL
);
-- Data-dir settings that must not change under existing data: `packs` is the
-- canonical s3:// URL the packs live at (no row: local packs only).
CREATE TABLE settings (
    key   TEXT PRIMARY KEY,
    value TEXT NOT NULL
);
