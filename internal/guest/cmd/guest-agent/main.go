// Command guest-agent runs inside the test guests (busybox init respawns
// it from the kit share, /kit/agent): it serves the agent protocol
// (package agent) on port agent.Port, running the commands the host's
// harness sends, and has two helpers the tests run in guests:
//
//	guest-agent tree [-xdev] DIR
//	                       testenv.Snapshot (SnapshotOneFS with -xdev: no
//	                       mount points below DIR) of DIR as JSON on
//	                       standard output
//	guest-agent relay HOST:PORT
//	                       (on the host) relays standard input and output to
//	                       a TCP address, for QEMU's guestfwd
//	guest-agent mmapcheck FILE
//	                       compares FILE's private and shared read-only
//	                       mappings with its bytes, then maps it private and
//	                       writable (as exec maps a data segment) and says
//	                       whether that works
package main

import (
	"bytes"
	"context"
	"encoding/json"
	"errors"
	"fmt"
	"io"
	"log"
	"net"
	"net/http"
	"os"
	"os/exec"
	"path/filepath"
	"slices"
	"strconv"
	"strings"
	"syscall"
	"time"

	"github.com/containerd-daxfs/containerd-daxfs/internal/guest/agent"
	"github.com/containerd-daxfs/containerd-daxfs/internal/testenv"
)

func main() {
	if len(os.Args) > 1 {
		if err := helper(os.Args[1], os.Args[2:]); err != nil {
			fmt.Fprintln(os.Stderr, "guest-agent:", err)
			os.Exit(1)
		}
		return
	}
	mux := http.NewServeMux()
	mux.HandleFunc(agent.PathPing, func(w http.ResponseWriter, r *http.Request) { io.WriteString(w, "ok\n") })
	mux.HandleFunc(agent.PathRun, handleRun)
	mux.HandleFunc(agent.PathStart, handleStart)
	srv := &http.Server{Addr: ":" + strconv.Itoa(agent.Port), Handler: mux, ReadHeaderTimeout: time.Minute}
	log.Fatal(srv.ListenAndServe())
}

func helper(name string, args []string) error {
	switch name {
	case "tree":
		snap := testenv.Snapshot
		if len(args) == 2 && args[0] == "-xdev" {
			snap, args = testenv.SnapshotOneFS, args[1:]
		}
		if len(args) != 1 {
			return errors.New("usage: tree [-xdev] DIR")
		}
		tree, err := snap(args[0])
		if err != nil {
			return err
		}
		return json.NewEncoder(os.Stdout).Encode(tree)
	case "relay":
		if len(args) != 1 {
			return errors.New("usage: relay HOST:PORT")
		}
		return relay(args[0])
	case "mmapcheck":
		if len(args) != 1 {
			return errors.New("usage: mmapcheck FILE")
		}
		return mmapCheck(args[0])
	}
	return fmt.Errorf("unknown helper %q (want tree, relay or mmapcheck)", name)
}

// relay copies standard input to a TCP connection to addr and the
// connection to standard output, until both directions end: QEMU's
// guestfwd runs it (on the host) for each guest connection.
func relay(addr string) error {
	conn, err := net.Dial("tcp", addr) //nolint:gosec // G704: the address is the test's, on QEMU's command line
	if err != nil {
		return err
	}
	defer conn.Close()
	done := make(chan struct{})
	go func() {
		io.Copy(os.Stdout, conn)
		os.Stdout.Close()
		close(done)
	}()
	io.Copy(conn, os.Stdin)
	conn.(*net.TCPConn).CloseWrite()
	<-done
	return nil
}

// mmapCheck compares FILE's bytes read with read(2) against private and
// shared read-only mappings of it, naming the first page that differs.
func mmapCheck(path string) error {
	want, err := os.ReadFile(path)
	if err != nil {
		return err
	}
	f, err := os.Open(path)
	if err != nil {
		return err
	}
	defer f.Close()
	for _, mode := range []struct {
		name  string
		flags int
	}{{"private", syscall.MAP_PRIVATE}, {"shared", syscall.MAP_SHARED}} {
		m, err := syscall.Mmap(int(f.Fd()), 0, len(want), syscall.PROT_READ, mode.flags)
		if err != nil {
			return fmt.Errorf("mmap %s %s: %w", mode.name, path, err)
		}
		for off := 0; off < len(want); off += 4096 {
			end := min(off+4096, len(want))
			if !bytes.Equal(m[off:end], want[off:end]) {
				syscall.Munmap(m)
				return fmt.Errorf("%s mapping of %s differs from its bytes at page %d (offset %d)", mode.name, path, off/4096, off)
			}
		}
		syscall.Munmap(m)
		fmt.Printf("%s mapping of %s: %d bytes as read\n", mode.name, path, len(want))
	}
	// What exec does with an ELF program's data segment.
	m, err := syscall.Mmap(int(f.Fd()), 0, len(want), syscall.PROT_READ|syscall.PROT_WRITE, syscall.MAP_PRIVATE)
	if err != nil {
		fmt.Printf("private writable mapping of %s: %v\n", path, err)
		return nil
	}
	m[0] ^= 0xff // copy on write: the file must not change
	syscall.Munmap(m)
	again, err := os.ReadFile(path)
	if err != nil {
		return err
	}
	if !bytes.Equal(again, want) {
		return fmt.Errorf("a write to a private mapping of %s changed the file", path)
	}
	fmt.Printf("private writable mapping of %s: ok, copy on write\n", path)
	return nil
}

func decode(w http.ResponseWriter, r *http.Request, v any) bool {
	if r.Method != http.MethodPost {
		http.Error(w, "POST only", http.StatusMethodNotAllowed)
		return false
	}
	if err := json.NewDecoder(r.Body).Decode(v); err != nil {
		http.Error(w, err.Error(), http.StatusBadRequest)
		return false
	}
	return true
}

func handleRun(w http.ResponseWriter, r *http.Request) {
	var req agent.RunRequest
	if !decode(w, r, &req) || !checkArgs(w, req.Args) {
		return
	}
	ctx := r.Context()
	if req.Timeout > 0 {
		var cancel context.CancelFunc
		ctx, cancel = context.WithTimeout(ctx, req.Timeout)
		defer cancel()
	}
	cmd := exec.CommandContext(ctx, lookPath(req.Args[0], req.Env), req.Args[1:]...) //nolint:gosec // G702: running the test's commands in its guest is this agent's job
	cmd.Env = append(os.Environ(), req.Env...)
	cmd.Dir = req.Dir
	cmd.Stdin = bytes.NewReader(req.Stdin)
	var stdout, stderr bytes.Buffer
	cmd.Stdout, cmd.Stderr = &stdout, &stderr
	// Kill the whole process group when the request ends, so a shell's
	// children do not outlive a timed-out command.
	cmd.SysProcAttr = &syscall.SysProcAttr{Setpgid: true}
	cmd.Cancel = func() error { return syscall.Kill(-cmd.Process.Pid, syscall.SIGKILL) }
	cmd.WaitDelay = 5 * time.Second
	start := time.Now()
	err := cmd.Run()
	res := agent.RunResult{Stdout: stdout.Bytes(), Stderr: stderr.Bytes(), Elapsed: time.Since(start)}
	var ee *exec.ExitError
	switch {
	case err == nil:
	case errors.As(err, &ee) && ee.Exited():
		res.Exit = ee.ExitCode()
	default:
		res.Exit = -1
		res.Error = err.Error()
		if ctx.Err() != nil {
			res.Error += " (" + ctx.Err().Error() + ")"
		}
	}
	reply(w, res)
}

func handleStart(w http.ResponseWriter, r *http.Request) {
	var req agent.StartRequest
	if !decode(w, r, &req) || !checkArgs(w, req.Args) {
		return
	}
	logf, err := os.OpenFile(req.Log, os.O_CREATE|os.O_WRONLY|os.O_APPEND, 0o644)
	if err != nil {
		http.Error(w, err.Error(), http.StatusBadRequest)
		return
	}
	defer logf.Close()
	cmd := exec.Command(lookPath(req.Args[0], req.Env), req.Args[1:]...)
	cmd.Env = append(os.Environ(), req.Env...)
	cmd.Stdout, cmd.Stderr = logf, logf
	cmd.SysProcAttr = &syscall.SysProcAttr{Setsid: true}
	if err := cmd.Start(); err != nil {
		http.Error(w, err.Error(), http.StatusInternalServerError)
		return
	}
	go cmd.Wait() // reap it whenever it ends
	reply(w, agent.StartResult{PID: cmd.Process.Pid})
}

// lookPath finds name in the PATH of env (the request's), else in the
// agent's own.
func lookPath(name string, env []string) string {
	if strings.Contains(name, "/") {
		return name
	}
	for _, e := range slices.Backward(env) {
		if path, ok := strings.CutPrefix(e, "PATH="); ok {
			for _, dir := range filepath.SplitList(path) {
				p := filepath.Join(dir, name)
				if st, err := os.Stat(p); err == nil && st.Mode().IsRegular() && st.Mode()&0o111 != 0 {
					return p
				}
			}
			break
		}
	}
	return name
}

func checkArgs(w http.ResponseWriter, args []string) bool {
	if len(args) == 0 {
		http.Error(w, "no command", http.StatusBadRequest)
		return false
	}
	return true
}

func reply(w http.ResponseWriter, v any) {
	w.Header().Set("Content-Type", "application/json")
	if err := json.NewEncoder(w).Encode(v); err != nil {
		log.Printf("reply: %v", err)
	}
}
