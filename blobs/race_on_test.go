//go:build race

package blobs

// raceEnabled: the race detector is on, under which sync.Pool drops a
// quarter of what is put in it at random (to shake out code that relies on
// it keeping things), so tests of what a pool saves cannot run.
const raceEnabled = true
