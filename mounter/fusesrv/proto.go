// Package fusesrv is the long-lived process that owns the DAXFS FUSE
// mounts (the "fuse-serve" sub-command), the tiny descriptor holder that
// lets a replacement server adopt those mounts, and the client the
// snapshotter uses to talk to the server.
//
// Processes and files in the state directory:
//
//	serve.sock   the server's control socket (JSON lines: mount, unmount, list, ping, quit, stop-idle)
//	serve.lock   flock held by the one running server
//	holder.sock  the holder's socket (SOCK_SEQPACKET, JSON + SCM_RIGHTS)
//	holder.lock  flock held by the one running holder
//	serve.log, holder.log
//
// The server mounts each image with mount(2) on a fresh /dev/fuse
// descriptor, answers INIT and hands a duplicate of the descriptor, the
// INIT request and the mount's source to the holder. If the server dies,
// the connections live on in the holder's descriptors (the kernel only
// aborts a FUSE connection when its last descriptor closes, or at
// unmount), so readers block instead of failing with ENOTCONN. The holder
// notices the server's socket close and starts a new server, which
// fetches every descriptor, rebuilds the negotiated protocol state by
// replaying INIT to its protocol layer, sends FUSE_NOTIFY_RESEND so the
// kernel requeues requests the dead server had read but not answered, and
// serves on. The file system is stateless per inode, so nothing else
// needs to be carried over.
package fusesrv

import (
	"bufio"
	"encoding/json"
	"errors"
	"fmt"
	"net"
	"path/filepath"
	"time"

	"golang.org/x/sys/unix"
)

// Source says where an image lives: Length bytes of the file at Path from
// Offset (Length 0: to the end of the file).
type Source struct {
	Path   string `json:"path"`
	Offset int64  `json:"offset,omitempty"`
	Length int64  `json:"length,omitempty"`
}

func (s Source) String() string {
	if s.Offset == 0 && s.Length == 0 {
		return s.Path
	}
	return fmt.Sprintf("%s@%d+%d", s.Path, s.Offset, s.Length)
}

// Mount states reported by list.
const (
	StateMounted  = "mounted"  // on its target directory
	StateDetached = "detached" // unmounted, still served for remaining users (an overlay)
)

// MountRecord describes one FUSE connection the server serves.
type MountRecord struct {
	ID     string `json:"id"`
	Target string `json:"target"`
	Source Source `json:"source"`
	State  string `json:"state"`
	// Validate asks for a full daxfs.Validate before mounting.
	Validate bool `json:"validate,omitempty"`
	// Init is the raw FUSE INIT request the connection was set up with.
	Init []byte `json:"init,omitempty"`
	// Since is when the connection was mounted.
	Since time.Time `json:"since"`
	// Adoptions counts how many replacement servers took it over.
	Adoptions int `json:"adoptions,omitempty"`
}

// Request is one control request to the server.
type Request struct {
	Op       string `json:"op"` // mount, unmount, list, ping, quit, stop-idle
	Target   string `json:"target,omitempty"`
	Source   Source `json:"source,omitzero"`
	Validate bool   `json:"validate,omitempty"`
}

// Response answers a Request.
type Response struct {
	Error  string        `json:"error,omitempty"`
	Code   string        `json:"code,omitempty"` // "not_found", "already_exists", "invalid", "stopping" or ""
	Mounts []MountRecord `json:"mounts,omitempty"`
	PID    int           `json:"pid,omitempty"`
	// Holder reports whether a descriptor holder is connected, i.e.
	// whether the mounts survive this server's death.
	Holder bool `json:"holder,omitempty"`
	// Stopped answers stop-idle: the server served nothing and stops.
	Stopped bool `json:"stopped,omitempty"`
}

// Error codes.
const (
	CodeNotFound      = "not_found"
	CodeAlreadyExists = "already_exists"
	CodeInvalid       = "invalid"
	// CodeStopping: the server is stopping (it was idle and told to
	// stop); a client starts a new one and asks again.
	CodeStopping = "stopping"
)

// Paths in the state directory.
func serveSock(dir string) string  { return filepath.Join(dir, "serve.sock") }
func serveLock(dir string) string  { return filepath.Join(dir, "serve.lock") }
func holderSock(dir string) string { return filepath.Join(dir, "holder.sock") }
func holderLock(dir string) string { return filepath.Join(dir, "holder.lock") }

// holderMsg is one SOCK_SEQPACKET message between server and holder.
type holderMsg struct {
	Op string `json:"op"` // hello, store, drop, fetch, entry, end, ping, quit, ok, error
	// Command is the argv the holder uses to start a replacement server
	// (hello).
	Command []string     `json:"command,omitempty"`
	Env     []string     `json:"env,omitempty"`
	Record  *MountRecord `json:"record,omitempty"`
	ID      string       `json:"id,omitempty"`
	Error   string       `json:"error,omitempty"`
	Count   int          `json:"count,omitempty"`
}

const maxHolderMsg = 64 << 10

// sendMsg sends m with at most one descriptor (fd < 0: none).
func sendMsg(c *net.UnixConn, m *holderMsg, fd int) error {
	b, err := json.Marshal(m)
	if err != nil {
		return err
	}
	if len(b) > maxHolderMsg {
		return fmt.Errorf("holder message too large (%d bytes)", len(b))
	}
	var oob []byte
	if fd >= 0 {
		oob = unix.UnixRights(fd)
	}
	_, _, err = c.WriteMsgUnix(b, oob, nil)
	return err
}

// recvMsg receives one message and the descriptor it carries (-1: none).
// Extra descriptors are closed.
func recvMsg(c *net.UnixConn) (*holderMsg, int, error) {
	buf := make([]byte, maxHolderMsg)
	oob := make([]byte, unix.CmsgSpace(4*4))
	n, oobn, flags, _, err := c.ReadMsgUnix(buf, oob)
	if err != nil {
		return nil, -1, err
	}
	fd := -1
	if oobn > 0 {
		cmsgs, err := unix.ParseSocketControlMessage(oob[:oobn])
		if err == nil {
			for _, cm := range cmsgs {
				fds, err := unix.ParseUnixRights(&cm)
				if err != nil {
					continue
				}
				for _, f := range fds {
					if fd < 0 {
						fd = f
						unix.CloseOnExec(f)
					} else {
						unix.Close(f)
					}
				}
			}
		}
	}
	if flags&(unix.MSG_TRUNC|unix.MSG_CTRUNC) != 0 {
		if fd >= 0 {
			unix.Close(fd)
		}
		return nil, -1, errors.New("holder message truncated")
	}
	if n == 0 {
		if fd >= 0 {
			unix.Close(fd)
		}
		return nil, -1, errEOF
	}
	var m holderMsg
	if err := json.Unmarshal(buf[:n], &m); err != nil {
		if fd >= 0 {
			unix.Close(fd)
		}
		return nil, -1, fmt.Errorf("decode holder message: %w", err)
	}
	return &m, fd, nil
}

var errEOF = errors.New("peer closed the connection")

// writeJSONLine and readJSONLine frame the control protocol.
func writeJSONLine(c net.Conn, v any) error {
	b, err := json.Marshal(v)
	if err != nil {
		return err
	}
	_, err = c.Write(append(b, '\n'))
	return err
}

func readJSONLine(r *bufio.Reader, v any) error {
	line, err := r.ReadBytes('\n')
	if err != nil {
		return err
	}
	return json.Unmarshal(line, v)
}
