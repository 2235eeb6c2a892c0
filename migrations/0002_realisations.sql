-- casnix schema: realisations of content-addressed derivation outputs
-- (Nix's RegisterDrvOutput / QueryRealisation). id is the DrvOutput
-- "sha256:<hash modulo>!<output>"; path the output path it resolved to;
-- json the realisation as Nix serialises it (outPath, signatures and
-- dependentRealisations), kept verbatim so signatures stay checkable.
CREATE TABLE realisations (
    id   TEXT PRIMARY KEY,
    path INTEGER NOT NULL REFERENCES paths(id) ON DELETE CASCADE,
    json TEXT NOT NULL
) WITHOUT ROWID;
CREATE INDEX realisations_path ON realisations(path);
