package nixtest

import (
	"fmt"
	"os"
	"sync"
	"testing"
	"time"
)

var (
	podmanOnce sync.Once
	podmanErr  error
)

// RequirePodman makes sure podman is installed on the host (rootful: the tests run as
// root), running nixenv/install-host-podman.sh once per process. When that fails the test
// is skipped, or fails when Strict.
func RequirePodman(t testing.TB) {
	t.Helper()
	podmanOnce.Do(func() {
		if os.Geteuid() != 0 {
			podmanErr = fmt.Errorf("need root (apt, rootful podman)")
			return
		}
		r := (&Cmd{Name: "sh", Args: []string{ScriptPath("install-host-podman.sh")}, Timeout: 10 * time.Minute}).Try()
		if !r.OK() {
			podmanErr = fmt.Errorf("install-host-podman.sh failed:\n%s", r)
		}
	})
	if podmanErr != nil {
		SkipOrFatal(t, "podman unavailable: %v", podmanErr)
	}
}
