// Package store is the Nix store casnix keeps: valid store paths with their
// path-info (NAR hash and size, references, deriver, signatures, content
// address, registration time) over a castore tree whose file contents live
// in package blobs. It owns the store invariants: a path becomes valid only
// with all of its references valid, and only once its NAR hash has been
// checked and its contents are durable.
//
// Names: a store path is handled as its basename "<hash>-<name>" (package
// storepath); StoreDir turns it into the full path shown to users.
package store
