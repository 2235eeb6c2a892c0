// Package tests holds casnix's end-to-end tests: the built casnix binary against real Nix
// stores and clients (see package nixtest for the harness and nixenv for the scripts that
// install real Nix). Run them as root with
//
//	go test -timeout 30m -v ./tests/
//
// (one package at a time, so that -v output streams as the tests run).
//
// With CI=true, and by default as root, a missing prerequisite fails the tests instead of
// skipping them (nixtest.Strict); CI=false makes it a skip.
package tests
