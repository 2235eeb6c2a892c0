// Package proto is a nix-daemon worker-protocol server: the handshake, the
// op loop, the stderr channel (log lines and errors), framed uploads, and
// the ops a Nix client (2.8 through 2.34, protocol 1.21 to 1.38) sends.
//
// Wire format: every integer is a u64 little-endian; a string is its length
// as u64, the bytes, and zero padding to a multiple of 8; a list is a count
// then its items. After an op and its arguments the server may send log
// messages, then exactly one of STDERR_LAST (followed by the op's result)
// or STDERR_ERROR (no result). Framed uploads are u64-length-prefixed chunks
// without padding, ended by a zero length. See ../shared/docs and NixOS/nix
// src/libstore (worker-protocol*.cc, daemon.cc) for the reference.
//
// Connection policy: an unknown op, or bad bytes in an op's arguments,
// gets an error and then the connection is closed (its remaining bytes
// cannot be skipped safely); an op that is understood but refused (a
// missing path, a build, a write to a read-only store) is read to its end,
// answered with STDERR_ERROR, and the connection stays usable.
package proto
