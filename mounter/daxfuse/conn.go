package daxfuse

import (
	"context"
	"errors"
	"fmt"
	stdlog "log"
	"os"
	"runtime/debug"
	"strings"
	"sync"
	"syscall"
	"unsafe"

	"github.com/containerd/log"
	"github.com/hanwen/go-fuse/v2/fuse"
	"golang.org/x/sys/unix"
)

// Opcodes the serving loop looks at itself (include/uapi/linux/fuse.h).
const (
	opRead        = 15
	opInit        = 26
	opForget      = 2
	opInterrupt   = 36
	opBatchForget = 42
	opDestroy     = 38
)

const (
	inHeaderSize  = int(unsafe.Sizeof(fuse.InHeader{}))
	outHeaderSize = int(unsafe.Sizeof(fuse.OutHeader{}))

	// maxWrite is what we tell the kernel in INIT (max_write, and through
	// max_pages the largest READ). 128 KiB matches the readahead window.
	maxWrite = 128 << 10
	// readBufSize is the size of a request buffer: the kernel refuses
	// reads into buffers smaller than a maximal WRITE request.
	readBufSize = maxWrite + 4096
	// outBufSize bounds every non-READ reply: a readdir buffer (overlayfs
	// asks for up to max_pages pages) or an xattr value (64 KiB max),
	// plus headers.
	outBufSize = maxReadPages*4096 + 4096

	// maxReadPages is the largest READ, in pages (the kernel caps it at
	// fs.fuse.max_pages_limit, 256 by default).
	maxReadPages = 256

	// maxReaders caps the goroutines reading one connection.
	maxReaders = 8
	// maxBackground lets the kernel keep that many readahead requests in
	// flight.
	maxBackground = 64
)

// notifyResend is FUSE_NOTIFY_RESEND (Linux 6.9): the kernel puts every
// request a previous reader took but never answered back on the queue.
// A notification is a reply with unique 0 and the (positive) notification
// code in the error field.
const notifyResend = 7

var bufPool = sync.Pool{New: func() any { b := make([]byte, readBufSize); return &b }}
var outPool = sync.Pool{New: func() any { b := make([]byte, outBufSize); return &b }}

// MountOptions are the options our INIT reply is built from. A replacement
// server must use the same values to rebuild the negotiated state.
func mountOptions(logger *log.Entry) *fuse.MountOptions {
	return &fuse.MountOptions{
		MaxWrite:             maxWrite,
		MaxBackground:        maxBackground,
		EnableSymlinkCaching: true,
		// Images never change: no attribute checks on cached reads
		// (AUTO_INVAL_DATA would revalidate on every read).
		ExplicitDataCacheControl: true,
		// Stop OPENDIR/RELEASEDIR round trips (see FS.OpenDir).
		ExtraCapabilities: fuse.CAP_NO_OPENDIR_SUPPORT,
		DisableSplice:     true,
		Debug:             os.Getenv("DAXFUSE_DEBUG") != "",
		Logger:            stdlog.New(logWriter{logger}, "", 0),
		PanicHandler: func(v any) fuse.Status {
			logger.WithField("panic", v).Error("recovered in a FUSE handler: answering EIO")
			return fuse.EIO
		},
	}
}

// FileSystem is what a Conn serves: go-fuse's raw API plus zero-copy
// reads.
type FileSystem interface {
	fuse.RawFileSystem
	// ReadSlice returns file bytes [off, off+size) clipped at the end of
	// the file, without copying.
	ReadSlice(nodeID uint64, off uint64, size uint32) ([]byte, fuse.Status)
}

// Conn serves one FUSE connection: a /dev/fuse descriptor whose INIT has
// been answered, either by this Conn (NewConn) or by an earlier server
// (Adopt).
type Conn struct {
	f      *os.File
	rc     syscall.RawConn
	fs     FileSystem
	ps     *fuse.ProtocolServer
	init   []byte
	logger *log.Entry
	debug  bool

	mu      sync.Mutex
	readers int // goroutines in the loop
	waiting int // goroutines waiting for a request
	done    chan struct{}
	err     error
}

// ReadInit reads the INIT request the kernel queued at mount time. It
// blocks until the request arrives or ctx ends.
func ReadInit(ctx context.Context, devFD int) ([]byte, error) {
	buf := make([]byte, readBufSize)
	for {
		var n int
		var rerr error
		if err := ctx.Err(); err != nil {
			return nil, err
		}
		// Poll with a short timeout so ctx is honoured even when the fd
		// is a blocking one.
		pfd := []unix.PollFd{{Fd: int32(devFD), Events: unix.POLLIN}}
		k, err := unix.Poll(pfd, 100)
		if err != nil || k == 0 {
			rerr = err
			if err == nil {
				rerr = unix.EAGAIN
			}
		} else {
			n, rerr = unix.Read(devFD, buf)
		}
		switch rerr {
		case nil:
		case unix.EAGAIN, unix.EINTR, unix.ENOENT:
			continue
		default:
			return nil, fmt.Errorf("read INIT from /dev/fuse: %w", rerr)
		}
		if n < inHeaderSize {
			return nil, fmt.Errorf("short INIT request (%d bytes)", n)
		}
		h := (*fuse.InHeader)(unsafe.Pointer(&buf[0]))
		if h.Opcode != opInit {
			return nil, fmt.Errorf("first request is opcode %d, not INIT", h.Opcode)
		}
		return append([]byte(nil), buf[:n]...), nil
	}
}

func newConn(devFD int, fs FileSystem, init []byte, logger *log.Entry) (*Conn, []byte, error) {
	if logger == nil {
		logger = log.L
	}
	// Work on a dup so the caller keeps its own descriptor. Nonblocking,
	// so waiting readers park in Go's poller instead of holding an OS
	// thread each: one process serves many mounts. (O_NONBLOCK lives in
	// the shared open file description; nobody else reads from it.)
	fd, err := unix.FcntlInt(uintptr(devFD), unix.F_DUPFD_CLOEXEC, 3)
	if err != nil {
		return nil, nil, fmt.Errorf("dup /dev/fuse descriptor: %w", err)
	}
	if err := unix.SetNonblock(fd, true); err != nil {
		unix.Close(fd)
		return nil, nil, fmt.Errorf("set /dev/fuse nonblocking: %w", err)
	}
	nf := os.NewFile(uintptr(fd), "/dev/fuse")
	rc, err := nf.SyscallConn()
	if err != nil {
		nf.Close()
		return nil, nil, err
	}
	c := &Conn{
		f: nf, rc: rc, fs: fs, init: append([]byte(nil), init...), logger: logger,
		ps:    fuse.NewProtocolServer(fs, mountOptions(logger)),
		done:  make(chan struct{}),
		debug: os.Getenv("DAXFUSE_DEBUG") != "",
	}
	out := make([]byte, outBufSize)
	n, st := c.ps.HandleRequest([][]byte{c.init}, [][]byte{out})
	if !st.Ok() || n < outHeaderSize {
		nf.Close()
		return nil, nil, fmt.Errorf("answer INIT: %v", st)
	}
	if oh := (*fuse.OutHeader)(unsafe.Pointer(&out[0])); oh.Status != 0 {
		nf.Close()
		return nil, nil, fmt.Errorf("INIT refused: %v", syscall.Errno(-oh.Status))
	}
	// go-fuse derives max_pages from max_write. We never receive WRITE
	// requests, so keep request buffers at max_write but let READ replies
	// (which come straight from the mapping) be up to maxReadPages pages.
	if n >= outHeaderSize+int(unsafe.Sizeof(fuse.InitOut{})) {
		io := (*fuse.InitOut)(unsafe.Pointer(&out[outHeaderSize]))
		io.MaxPages = maxReadPages
	}
	return c, out[:n], nil
}

// NewConn answers the INIT request init (from ReadInit) on devFD and
// returns a Conn ready to Serve. devFD stays owned by the caller (the Conn
// serves a duplicate).
func NewConn(devFD int, fs FileSystem, init []byte, logger *log.Entry) (*Conn, error) {
	c, reply, err := newConn(devFD, fs, init, logger)
	if err != nil {
		return nil, err
	}
	if err := c.write(reply); err != nil {
		c.f.Close()
		return nil, fmt.Errorf("write INIT reply: %w", err)
	}
	return c, nil
}

// Adopt takes over a connection an earlier server initialised with the
// INIT request init: it rebuilds the negotiated state by replaying INIT
// to the protocol layer (the reply is not sent: the kernel has its
// answer), then asks the kernel to resend the requests the dead server
// had read but not answered (FUSE_NOTIFY_RESEND). resent reports whether
// the kernel accepted that; without it (Linux < 6.9) those few requests
// stay unanswered.
func Adopt(devFD int, fs FileSystem, init []byte, logger *log.Entry) (c *Conn, resent bool, err error) {
	c, _, err = newConn(devFD, fs, init, logger)
	if err != nil {
		return nil, false, err
	}
	var hdr [16]byte
	oh := (*fuse.OutHeader)(unsafe.Pointer(&hdr[0]))
	oh.Length = uint32(len(hdr))
	oh.Status = notifyResend
	if err := c.write(hdr[:]); err != nil {
		c.logger.WithError(err).Warn("FUSE_NOTIFY_RESEND not accepted: requests the previous server took are lost")
		return c, false, nil
	}
	return c, true, nil
}

// Init returns the INIT request the connection was set up with, to hand
// to a replacement server.
func (c *Conn) Init() []byte { return c.init }

// Done is closed when the connection has ended (unmounted and released).
func (c *Conn) Done() <-chan struct{} { return c.done }

// Err returns why Serve ended (nil for a normal unmount).
func (c *Conn) Err() error {
	c.mu.Lock()
	defer c.mu.Unlock()
	return c.err
}

// Serve answers requests until the kernel ends the connection (ENODEV
// after the last user of the mount goes away) or Close. It returns
// immediately; wait on Done.
func (c *Conn) Serve() {
	c.mu.Lock()
	c.readers = 1
	c.mu.Unlock()
	go c.loop()
}

// Close stops serving and closes this server's descriptor. The kernel
// connection lives on while another descriptor (the fd holder's) is open.
func (c *Conn) Close() error {
	return c.f.Close()
}

func (c *Conn) write(b ...[]byte) error {
	var werr error
	err := c.rc.Control(func(fd uintptr) {
		for {
			_, werr = unix.Writev(int(fd), b)
			if werr != unix.EINTR {
				return
			}
		}
	})
	if err != nil {
		return err
	}
	return werr
}

// read reads one request into buf.
func (c *Conn) read(buf []byte) (int, error) {
	var n int
	var rerr error
	err := c.rc.Read(func(fd uintptr) bool {
		n, rerr = unix.Read(int(fd), buf)
		return rerr != unix.EAGAIN
	})
	if err != nil && !errors.Is(err, os.ErrClosed) {
		// The poller reports EPOLLERR (the connection was aborted or
		// unmounted) as "not pollable": read once more for the real
		// error, normally ENODEV.
		if cerr := c.rc.Control(func(fd uintptr) { n, rerr = unix.Read(int(fd), buf) }); cerr != nil {
			return 0, cerr
		}
		if rerr == unix.EAGAIN {
			return 0, err
		}
		return n, rerr
	}
	if err != nil {
		return 0, err
	}
	return n, rerr
}

// loop is one reader. Like go-fuse's server, a reader that takes a request
// starts another reader when none is left waiting, so requests are served
// in parallel; surplus readers exit after their request.
func (c *Conn) loop() {
	// A fault on the mapping (the source file truncated, a device gone)
	// must become EIO, not kill every mount this process serves.
	debug.SetPanicOnFault(true)
	bp := bufPool.Get().(*[]byte)
	defer bufPool.Put(bp)
	buf := *bp
	for {
		c.mu.Lock()
		c.waiting++
		c.mu.Unlock()
		n, err := c.read(buf)
		c.mu.Lock()
		c.waiting--
		if err != nil {
			switch {
			case err == unix.EINTR || err == unix.ENOENT:
				// ENOENT: the request was interrupted while we read it.
				c.mu.Unlock()
				continue
			case err == unix.ENODEV:
				err = nil // unmounted and released
			case errors.Is(err, os.ErrClosed):
				err = nil
			}
			c.readers--
			last := c.readers == 0
			if err != nil && c.err == nil {
				c.err = err
			}
			c.mu.Unlock()
			if last {
				c.f.Close()
				close(c.done)
			}
			return
		}
		if c.waiting == 0 && c.readers < maxReaders {
			c.readers++
			go c.loop()
		}
		c.mu.Unlock()

		c.handle(buf[:n])

		c.mu.Lock()
		if c.waiting > 0 && c.readers > 1 {
			c.readers--
			c.mu.Unlock()
			return
		}
		c.mu.Unlock()
	}
}

// handle answers one request. READ is answered here, straight from the
// mapping with one writev (one kernel copy); everything else goes through
// go-fuse's protocol server.
func (c *Conn) handle(req []byte) {
	if len(req) < inHeaderSize {
		c.logger.WithField("bytes", len(req)).Warn("short FUSE request")
		return
	}
	h := (*fuse.InHeader)(unsafe.Pointer(&req[0]))
	unique, opcode := h.Unique, h.Opcode
	defer func() {
		if r := recover(); r != nil {
			c.logger.WithField("unique", unique).WithField("opcode", opcode).WithField("panic", r).Error("FUSE request failed: answering EIO")
			c.replyErr(unique, opcode, syscall.EIO)
		}
	}()
	if opcode == opRead && len(req) >= int(unsafe.Sizeof(fuse.ReadIn{})) {
		in := (*fuse.ReadIn)(unsafe.Pointer(&req[0]))
		data, st := c.fs.ReadSlice(in.NodeId, in.Offset, in.Size)
		if c.debug {
			c.logger.Debugf("rx %d: READ n%d [%d +%d): %d bytes, %v", unique, in.NodeId, in.Offset, in.Size, len(data), st)
		}
		if !st.Ok() {
			c.replyErr(unique, opcode, syscall.Errno(st))
			return
		}
		var hdr [16]byte
		oh := (*fuse.OutHeader)(unsafe.Pointer(&hdr[0]))
		oh.Length = uint32(outHeaderSize + len(data))
		oh.Unique = unique
		if err := c.write(hdr[:], data); err != nil {
			if err == unix.EFAULT {
				// The mapping could not be read (kernel copies do not
				// raise SIGBUS): report an I/O error.
				c.replyErr(unique, opcode, syscall.EIO)
				return
			}
			c.writeFailed(opcode, err)
		}
		if c.debug {
			c.logger.Debugf("tx %d: READ done", unique)
		}
		return
	}
	op := outPool.Get().(*[]byte)
	defer outPool.Put(op)
	n, st := c.ps.HandleRequest([][]byte{req}, [][]byte{*op})
	if !st.Ok() {
		c.replyErr(unique, opcode, syscall.Errno(st))
		return
	}
	if n == 0 {
		return // FORGET and friends take no reply
	}
	if err := c.write((*op)[:n]); err != nil {
		c.writeFailed(opcode, err)
	}
}

func (c *Conn) replyErr(unique uint64, opcode uint32, errno syscall.Errno) {
	switch opcode {
	case opForget, opBatchForget, opInterrupt:
		return
	}
	var hdr [16]byte
	oh := (*fuse.OutHeader)(unsafe.Pointer(&hdr[0]))
	oh.Length = uint32(outHeaderSize)
	oh.Status = -int32(errno)
	oh.Unique = unique
	if err := c.write(hdr[:]); err != nil {
		c.writeFailed(opcode, err)
	}
}

func (c *Conn) writeFailed(opcode uint32, err error) {
	// ENOENT: the request was interrupted or the connection is going
	// away; the kernel no longer waits for the answer.
	if err == unix.ENOENT || err == unix.ENODEV || errors.Is(err, os.ErrClosed) {
		return
	}
	c.logger.WithError(err).WithField("opcode", opcode).Warn("writing a FUSE reply")
}

// logWriter gives go-fuse, which logs through the standard log package,
// our structured logger: one line, one entry.
type logWriter struct{ e *log.Entry }

func (w logWriter) Write(p []byte) (int, error) {
	w.e.Info(strings.TrimSuffix(string(p), "\n"))
	return len(p), nil
}
