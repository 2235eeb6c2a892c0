// Package migrations holds casnix's SQL schema as numbered files
// NNNN_name.sql, applied in order. The number of the last applied file is the
// schema version, kept in SQLite's user_version. Files are never edited once
// released: a change is a new file.
package migrations

import "embed"

// FS holds the *.sql files.
//
//go:embed *.sql
var FS embed.FS
