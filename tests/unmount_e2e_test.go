package tests

import (
	"bytes"
	"os"
	"os/exec"
	"path/filepath"
	"testing"
	"time"

	"github.com/casnix/casnix/nar"
	"github.com/casnix/casnix/tests/nixtest"
)

// TestServeStopsWithMountHeldElsewhere: a mount namespace created while
// `casnix serve --mount` runs (as every Nix build sandbox is) holds a copy
// of the mount, and the kernel keeps the FUSE connection until that copy
// goes. serve must still stop promptly on SIGTERM; before, it waited for
// the other namespace to end (TestFlippedBytesReadPaths saw stops of 20 to
// 45+ s while other tests ran Nix builds).
func TestServeStopsWithMountHeldElsewhere(t *testing.T) {
	if os.Geteuid() != 0 {
		nixtest.SkipOrFatal(t, "needs root for unshare -m")
	}
	unshare, err := exec.LookPath("unshare")
	if err != nil {
		nixtest.SkipOrFatal(t, "no unshare: %v", err)
	}
	c := nixtest.NewCasnix(t)
	f := filepath.Join(t.TempDir(), "f")
	must(t, os.WriteFile(f, []byte("hello\n"), 0o644))
	narFile := f + ".nar"
	var b bytes.Buffer
	if _, err := nar.DumpPath(&b, f); err != nil {
		t.Fatal(err)
	}
	must(t, os.WriteFile(narFile, b.Bytes(), 0o644))
	c.Run(t, "import", "--nar", narFile, "--path", "/nix/store/00000000000000000000000000000000-f")
	srv, err := startFlipServe(c, t.TempDir())
	if err != nil {
		t.Fatal(err)
	}
	if b, err := os.ReadFile(filepath.Join(srv.mnt, "00000000000000000000000000000000-f")); err != nil || string(b) != "hello\n" {
		t.Fatalf("read through the mount: %q %v", b, err)
	}
	// Another mount namespace with a copy of the mount, held for a minute.
	holder := exec.Command(unshare, "-m", "--propagation", "private", "sleep", "60")
	must(t, holder.Start())
	defer func() {
		holder.Process.Kill()
		holder.Wait()
	}()
	time.Sleep(500 * time.Millisecond) // let unshare copy the mounts
	if err := srv.stop(); err != nil {
		t.Fatal(err)
	}
	if srv.took > 20*time.Second {
		t.Fatalf("serve took %v to stop while another namespace held the mount", srv.took)
	}
	t.Logf("serve stopped in %v while another namespace held the mount", srv.took)
}
