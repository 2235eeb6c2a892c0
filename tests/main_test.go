package tests

import (
	"os"
	"testing"

	"github.com/casnix/casnix/tests/nixtest"
)

func TestMain(m *testing.M) { os.Exit(nixtest.Main(m)) }
