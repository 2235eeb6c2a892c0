package tests

import (
	"os"
	"testing"

	"github.com/casnix/casnix/tests/nixtest"
)

func TestMain(m *testing.M) {
	if os.Getenv(hostileAttackerEnv) != "" {
		// This binary was started by TestHostileClients as its untrusted attacker.
		os.Exit(hostileAttackerMain())
	}
	os.Exit(nixtest.Main(m))
}
