package tests

import (
	"os"
	"path/filepath"
	"testing"
)

// TestMain removes the daemon binary the tests built (daemonBinary) when
// they are done.
func TestMain(m *testing.M) {
	code := m.Run()
	if daemonPath != "" {
		_ = os.RemoveAll(filepath.Dir(daemonPath))
	}
	os.Exit(code)
}
