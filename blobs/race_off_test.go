//go:build !race

package blobs

// raceEnabled: see race_on_test.go.
const raceEnabled = false
