package crashfs

import (
	"fmt"
	"os/exec"
)

// execCmd runs a program and wraps its output into the error.
type execCmd []string

func (c *execCmd) run() error {
	out, err := exec.Command((*c)[0], (*c)[1:]...).CombinedOutput()
	if err != nil {
		return fmt.Errorf("%v: %w: %s", *c, err, out)
	}
	return nil
}
