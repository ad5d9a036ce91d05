package main

import (
	"bufio"
	"context"
	"errors"
	"fmt"
	"io"
	"os"
	"strconv"
	"strings"
	"time"

	"github.com/urfave/cli/v3"
	"golang.org/x/sys/unix"

	"github.com/containerd-daxfs/containerd-daxfs/daxfs"
)

func inspectCommand() *cli.Command {
	return &cli.Command{
		Name:      "inspect",
		Usage:     "validate an image and list its tree",
		ArgsUsage: "IMAGE",
		Flags: []cli.Flag{
			&cli.BoolFlag{Name: "json", Usage: "print the tree as JSON (the upstream fixture's expected.json format)"},
		},
		Action: runInspect,
	}
}

// runInspect validates an image file and lists its tree: one ls -l style
// line per path, or with --json the JSON array of the upstream fixture's
// expected.json format.
func runInspect(_ context.Context, cmd *cli.Command) error {
	switch cmd.NArg() {
	case 0:
		return usage("no image given")
	case 1:
	default:
		return usage("more than one image")
	}
	path, asJSON := cmd.Args().First(), cmd.Bool("json")
	b, unmap, err := mmapFile(path)
	if err != nil {
		return err
	}
	defer unmap()
	out := bufio.NewWriter(os.Stdout)
	if err := inspectImage(out, b, asJSON); err != nil {
		return fmt.Errorf("%s: %w", path, err)
	}
	return out.Flush()
}

// inspectImage validates image b and writes its listing to out.
func inspectImage(out io.Writer, b []byte, asJSON bool) error {
	im, err := daxfs.Open(b)
	if err != nil {
		return err
	}
	tree, err := im.Tree() // validates the whole image first
	if err != nil {
		return err
	}
	if asJSON {
		j, err := daxfs.TreeJSON(tree)
		if err != nil {
			return err
		}
		_, err = fmt.Fprintf(out, "%s\n", j)
		return err
	}
	for _, e := range tree {
		if _, err := io.WriteString(out, listLine(e)); err != nil {
			return err
		}
	}
	return nil
}

// listLine renders one path like ls -l: mode, links, owner, size, mtime
// (when the image has an extension block), path, link target.
func listLine(e daxfs.TreeEntry) string {
	var typ byte
	nlink := e.Nlink
	size := strconv.FormatUint(e.Size, 10)
	switch e.Type {
	case "dir":
		typ, nlink, size = 'd', 0, strconv.Itoa(len(e.Entries))+" entries"
	case "symlink":
		typ, nlink, size = 'l', 1, strconv.Itoa(len(e.Target))
	case "char", "block":
		typ = 'c'
		if e.Type == "block" {
			typ = 'b'
		}
		size = fmt.Sprintf("%d, %d", unix.Major(e.Rdev), unix.Minor(e.Rdev))
	case "fifo":
		typ = 'p'
	case "socket":
		typ = 's'
	default:
		typ = '-'
	}
	var line strings.Builder
	fmt.Fprintf(&line, "%s %3s %5d %5d %12s", modeString(typ, e.Mode), linkCount(nlink), e.UID, e.GID, size)
	if e.HasExt {
		line.WriteString(" " + time.Unix(e.MTime.Sec, int64(e.MTime.Nsec)).UTC().Format("2006-01-02 15:04:05"))
	}
	line.WriteString(" " + e.Path)
	if e.Type == "symlink" {
		line.WriteString(" -> " + e.Target)
	}
	for _, x := range e.Xattrs {
		fmt.Fprintf(&line, " [%s=%q]", x.Name, x.Value)
	}
	line.WriteByte('\n')
	return line.String()
}

func linkCount(n uint32) string {
	if n == 0 {
		return "-"
	}
	return strconv.FormatUint(uint64(n), 10)
}

func modeString(typ byte, perm uint32) string {
	const rwx = "rwxrwxrwx"
	s := []byte{typ, '-', '-', '-', '-', '-', '-', '-', '-', '-'}
	for i := range 9 {
		if perm&(1<<(8-i)) != 0 {
			s[1+i] = rwx[i]
		}
	}
	special := func(bit uint32, pos int, set, unset byte) {
		if perm&bit != 0 {
			if s[pos] == '-' {
				s[pos] = unset
			} else {
				s[pos] = set
			}
		}
	}
	special(0o4000, 3, 's', 'S')
	special(0o2000, 6, 's', 'S')
	special(0o1000, 9, 't', 'T')
	return string(s)
}

// mmapFile maps a whole file read-only.
func mmapFile(path string) ([]byte, func(), error) {
	f, err := os.Open(path)
	if err != nil {
		return nil, nil, err
	}
	defer f.Close()
	st, err := f.Stat()
	if err != nil {
		return nil, nil, err
	}
	if st.Size() == 0 {
		return nil, nil, fmt.Errorf("%s: %w: empty file", path, daxfs.ErrCorrupt)
	}
	if int64(int(st.Size())) != st.Size() {
		return nil, nil, errors.New(path + ": file too large to map")
	}
	b, err := unix.Mmap(int(f.Fd()), 0, int(st.Size()), unix.PROT_READ, unix.MAP_SHARED)
	if err != nil {
		return nil, nil, fmt.Errorf("mmap %s: %w", path, err)
	}
	return b, func() { unix.Munmap(b) }, nil
}
