-- casnix schema version 8: a checksum of each path's root row. root_sum is the BLAKE3 of
-- the path's name, root node columns (kind, digest, size, executable, target) and NAR hash
-- and size (db.RootSum), written with the row. Every other part of a rendered NAR already
-- checks itself on every read (directories and chunks by their BLAKE3 digests), so a row
-- whose root_sum matches renders to its NAR hash without hashing the NAR again; a row
-- without one (from before this migration) or whose sum does not match is rendered and
-- hashed as before.
ALTER TABLE paths ADD COLUMN root_sum BLOB;
