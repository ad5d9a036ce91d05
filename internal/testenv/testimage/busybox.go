package testimage

import (
	"fmt"
	"os"
)

// BusyboxPath is where Debian's busybox-static installs its static binary.
const BusyboxPath = "/bin/busybox"

// busyboxApplets are the commands BusyboxLayer links to /bin/busybox.
var busyboxApplets = []string{
	"sh", "ash", "ls", "cat", "echo", "printf", "sha256sum", "md5sum", "find", "stat",
	"readlink", "test", "[", "true", "false", "sleep", "mkdir", "rm", "rmdir", "mv", "cp",
	"ln", "touch", "chmod", "chown", "head", "tail", "wc", "grep", "sed", "awk", "sort",
	"uniq", "tr", "cut", "du", "df", "mount", "umount", "id", "env", "hostname", "uname",
	"date", "dd", "tar", "gzip", "xargs", "basename", "dirname", "realpath", "which", "tee",
	"mknod", "mkfifo", "sync", "ps", "kill", "pwd", "diff", "cmp", "od", "hexdump", "xxd", "seq",
	"timeout", "truncate", "nproc", "base64", "sha512sum", "vi",
}

// BusyboxLayer returns a layer with a minimal root: the usual top-level
// directories (bin, dev, etc, proc, root, sys, tmp, usr/bin, var),
// /bin/busybox copied from the host's busybox-static and symlinks
// /bin/<applet> -> busybox for the common applets (sh, ls, cat, echo,
// sha256sum, find, stat, readlink, grep, sed, awk, sleep, mount, ...; see
// busyboxApplets), plus /etc/passwd and
// /etc/group for root. Commands run with PATH containing /bin work.
func BusyboxLayer() (Layer, error) {
	bin, err := os.ReadFile(BusyboxPath)
	if err != nil {
		return Layer{}, fmt.Errorf("reading %s (install busybox-static, see scripts/deps.sh): %w", BusyboxPath, err)
	}
	entries := []Entry{
		Dir("bin", 0o755),
		Dir("dev", 0o755),
		Dir("etc", 0o755),
		Dir("proc", 0o555),
		Dir("root", 0o700),
		Dir("sys", 0o555),
		Dir("tmp", 0o1777),
		Dir("usr", 0o755),
		Dir("usr/bin", 0o755),
		Dir("var", 0o755),
		File("bin/busybox", bin, 0o755),
		File("etc/passwd", []byte("root:x:0:0:root:/root:/bin/sh\nnobody:x:65534:65534:nobody:/nonexistent:/bin/false\n"), 0o644),
		File("etc/group", []byte("root:x:0:\nnogroup:x:65534:\n"), 0o644),
	}
	for _, a := range busyboxApplets {
		entries = append(entries, Symlink("bin/"+a, "busybox"))
	}
	return Layer{Entries: entries}, nil
}

// BusyboxImage returns an image of BusyboxLayer followed by the extra
// layers, with Cmd ["/bin/sh"].
func BusyboxImage(extra ...Layer) (Image, error) {
	bb, err := BusyboxLayer()
	if err != nil {
		return Image{}, err
	}
	return Image{Layers: append([]Layer{bb}, extra...)}, nil
}
