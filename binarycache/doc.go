// Package binarycache moves store paths between casnix and Nix binary
// caches (the layout of `nix copy --to file://…` and of HTTP caches:
// nix-cache-info, <hash>.narinfo, nar/<filehash>.nar.<ext>): parsing and
// writing narinfo, importing closures from a file:// or http(s):// cache,
// exporting closures to a cache directory, and serving the store live as
// an HTTP binary cache.
package binarycache
