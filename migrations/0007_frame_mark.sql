-- casnix schema version 7: what a path's data may lie in, for replicas and restores of a
-- primary whose packs go to a bucket. frame_mark is the largest frame id when the path was
-- committed: every frame it uses then has an id at most that (frame ids only grow, and
-- are never reused), so once every frame from frame_mark down is in an uploaded pack, so
-- is all of the path's data. (Registration times cannot tell: a copied path keeps the
-- time its source store registered it.) Paths from before this migration get 0: their
-- data was written before any frame of a pack not uploaded yet.
ALTER TABLE paths ADD COLUMN frame_mark INTEGER NOT NULL DEFAULT 0;
