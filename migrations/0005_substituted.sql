-- casnix schema version 5: a space budget for substituted paths.
-- `serve --max-size` evicts the least recently used paths that came from a
-- substituter (a cache can fetch them again); paths clients added or imports
-- brought have no row here and are never evicted. The row goes with its path
-- (cascade), so GC and repair need not know about it. accessed is unix
-- milliseconds, flushed from memory in batches (store/access.go), not per read.
CREATE TABLE substituted (
    path     INTEGER PRIMARY KEY REFERENCES paths(id) ON DELETE CASCADE,
    accessed INTEGER NOT NULL
);
