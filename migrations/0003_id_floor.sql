-- casnix schema version 3: garbage collection.
-- SQLite hands out max(id)+1 for a new row, so deleting the newest pack or
-- frame would let its id come back. Ids must never be reused: a process's
-- decoded-frame cache is keyed by frame id and its open pack handles by pack
-- id. GC raises `top` to the largest id it ever deleted, and new packs and
-- frames are numbered above both `top` and the current maximum.
CREATE TABLE id_floor (
    tbl TEXT PRIMARY KEY,
    top INTEGER NOT NULL
) WITHOUT ROWID;
INSERT INTO id_floor(tbl, top) VALUES
    ('packs', IFNULL((SELECT MAX(id) FROM packs), 0)),
    ('frames', IFNULL((SELECT MAX(id) FROM frames), 0));
