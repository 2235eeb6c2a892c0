package blobs

import "os"

// UnsafeNoPackFsyncEnv names an environment variable for tests only: set to
// unsafeNoPackFsyncValue, it turns off the fdatasync of pack data before a
// commit, so acknowledged paths can be lost in a power cut. The torture
// suite's negative control (tests/torture_e2e_test.go) sets it to show that
// the suite notices lost data. The value is a sentence no deployment sets by
// accident, and every process that honours it says so on stderr.
const UnsafeNoPackFsyncEnv = "CASNIX_TEST_UNSAFE_NO_PACK_FSYNC"

const unsafeNoPackFsyncValue = "lose-acknowledged-data"

// noPackFsync is read once: the switch holds for the process's life.
var noPackFsync = os.Getenv(UnsafeNoPackFsyncEnv) == unsafeNoPackFsyncValue

func init() {
	if noPackFsync {
		os.Stderr.WriteString("casnix: TESTING ONLY: " + UnsafeNoPackFsyncEnv + " is set: pack data is not fsynced, acknowledged paths may be lost in a crash\n")
	}
}
