// Package agent is the wire protocol between the guest harness
// (internal/guest) and the program it runs inside each guest
// (internal/guest/cmd/guest-agent): JSON over HTTP on the guest's port
// Port, forwarded by QEMU to a loopback port of the host.
package agent

import "time"

// Port is the guest TCP port the agent listens on.
const Port = 7000

// Paths of the agent's endpoints.
const (
	PathPing  = "/ping"  // GET: 200 when the agent serves
	PathRun   = "/run"   // POST RunRequest -> RunResult
	PathStart = "/start" // POST StartRequest -> StartResult
)

// RunRequest runs Args (Args[0] looked up in PATH) and waits for it.
type RunRequest struct {
	Args    []string
	Env     []string // added to the agent's environment
	Dir     string
	Stdin   []byte
	Timeout time.Duration // 0: no limit but the request's
}

// RunResult is what a command did. Exit is -1 when it did not start or
// was killed by a signal; Error then says why.
type RunResult struct {
	Stdout, Stderr []byte
	Exit           int
	Error          string
	Elapsed        time.Duration
}

// StartRequest starts Args in the background in a session of its own,
// with standard output and error appended to Log.
type StartRequest struct {
	Args []string
	Env  []string
	Log  string
}

// StartResult names the started process.
type StartResult struct {
	PID int
}
