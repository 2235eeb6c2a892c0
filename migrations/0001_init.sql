-- casnix schema version 1.
-- Content lives in pack files; these tables index it. Every row that points
-- into a pack is committed only after the pack bytes it names are fsynced.

-- One row per pack file packs/NN/<id>.pack. Rows are created (and committed)
-- before the file, so an id is never reused even across crashes.
CREATE TABLE packs (
    id      INTEGER PRIMARY KEY,
    created INTEGER NOT NULL          -- unix seconds
);

-- A frame is one zstd frame in a pack holding one or more consecutive chunks.
CREATE TABLE frames (
    id       INTEGER PRIMARY KEY,
    pack     INTEGER NOT NULL REFERENCES packs(id),
    offset   INTEGER NOT NULL,         -- of the frame record header
    data_off INTEGER NOT NULL,         -- of the compressed bytes
    clen     INTEGER NOT NULL,         -- compressed length
    rawlen   INTEGER NOT NULL          -- decompressed length
);
CREATE INDEX frames_pack ON frames(pack, offset);

-- A chunk: BLAKE3 of its raw bytes -> where it sits inside a frame.
CREATE TABLE chunks (
    digest BLOB PRIMARY KEY,
    frame  INTEGER NOT NULL REFERENCES frames(id),
    off    INTEGER NOT NULL,           -- offset inside the decompressed frame
    len    INTEGER NOT NULL
) WITHOUT ROWID;
CREATE INDEX chunks_frame ON chunks(frame);

-- A blob: BLAKE3 of a whole file's contents -> its chunks. chunks is NULL
-- when the blob is a single chunk (whose digest then equals the blob's),
-- else the concatenation of (32-byte chunk digest, 4-byte little-endian
-- length) records in file order.
CREATE TABLE blobs (
    digest BLOB PRIMARY KEY,
    size   INTEGER NOT NULL,
    chunks BLOB
) WITHOUT ROWID;

-- castore Directory messages by digest (BLAKE3 of data).
CREATE TABLE directories (
    digest BLOB PRIMARY KEY,
    data   BLOB NOT NULL
) WITHOUT ROWID;

-- One row per valid store path. name is the basename "<hash>-<name>".
-- The root node: kind 1 directory (digest, size), 2 file (digest, size,
-- executable), 3 symlink (target).
CREATE TABLE paths (
    id           INTEGER PRIMARY KEY,
    name         TEXT NOT NULL UNIQUE,
    kind         INTEGER NOT NULL,
    digest       BLOB,
    size         INTEGER NOT NULL DEFAULT 0,
    executable   INTEGER NOT NULL DEFAULT 0,
    target       BLOB,
    nar_hash     BLOB NOT NULL,         -- sha256, 32 bytes
    nar_size     INTEGER NOT NULL,
    deriver      TEXT,                  -- basename, NULL if unknown
    registered   INTEGER NOT NULL,      -- unix seconds
    ultimate     INTEGER NOT NULL DEFAULT 0,
    ca           TEXT                   -- content address, NULL if none
);

CREATE TABLE refs (
    referrer  INTEGER NOT NULL REFERENCES paths(id) ON DELETE CASCADE,
    reference INTEGER NOT NULL REFERENCES paths(id) ON DELETE RESTRICT,
    PRIMARY KEY (referrer, reference)
) WITHOUT ROWID;
CREATE INDEX refs_reference ON refs(reference);

CREATE TABLE sigs (
    path INTEGER NOT NULL REFERENCES paths(id) ON DELETE CASCADE,
    sig  TEXT NOT NULL,
    PRIMARY KEY (path, sig)
) WITHOUT ROWID;

-- Outputs of the derivations (.drv paths) in the store, parsed from the
-- .drv files at import: what nix-store --query --valid-derivers and
-- QueryDerivationOutputMap answer from. path is a basename ("" for an
-- output whose path is not known in advance, e.g. floating CA).
CREATE TABLE drv_outputs (
    drv  INTEGER NOT NULL REFERENCES paths(id) ON DELETE CASCADE,
    name TEXT NOT NULL,
    path TEXT NOT NULL,
    PRIMARY KEY (drv, name)
) WITHOUT ROWID;
CREATE INDEX drv_outputs_path ON drv_outputs(path);
