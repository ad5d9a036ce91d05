// Command mkimage writes a busybox OCI image archive built from the host's
// busybox-static, hermetically, for demos and manual testing:
//
//	go run ./internal/testenv/cmd/mkimage -o busybox.oci.tar
//	ctr image import busybox.oci.tar
//	ctr run --rm docker.io/library/busybox-daxfs:latest t1 sh -c 'echo hello'
package main

import (
	"bufio"
	"flag"
	"fmt"
	"os"
	"path/filepath"

	"github.com/containerd-daxfs/containerd-daxfs/internal/testenv/testimage"
)

func main() {
	out := flag.String("o", "busybox.oci.tar", "output OCI image archive")
	name := flag.String("name", "docker.io/library/busybox-daxfs:latest", "image name recorded in the archive")
	compression := flag.String("compression", "gzip", "layer compression: gzip, zstd or none")
	flag.Parse()
	if err := run(*out, *name, *compression); err != nil {
		fmt.Fprintln(os.Stderr, "mkimage:", err)
		os.Exit(1)
	}
}

func run(out, name, compression string) error {
	var c testimage.Compression
	switch compression {
	case "gzip":
		c = testimage.Gzip
	case "zstd":
		c = testimage.Zstd
	case "none", "uncompressed":
		c = testimage.Uncompressed
	default:
		return fmt.Errorf("unknown compression %q (want gzip, zstd or none)", compression)
	}
	img, err := testimage.BusyboxImage(testimage.Layer{Entries: []testimage.Entry{
		testimage.File("etc/motd", []byte("hello from a DAXFS-backed container\n"), 0o644),
	}})
	if err != nil {
		return err
	}
	for i := range img.Layers {
		img.Layers[i].Compression = c
	}
	built, err := img.Build()
	if err != nil {
		return err
	}
	// Write next to the destination and rename, so a failed run never
	// leaves a truncated archive behind.
	tmp, err := os.CreateTemp(filepath.Dir(out), ".mkimage-")
	if err != nil {
		return err
	}
	defer os.Remove(tmp.Name())
	w := bufio.NewWriter(tmp)
	if err := built.WriteArchive(w, name); err != nil {
		tmp.Close()
		return fmt.Errorf("writing %s: %w", out, err)
	}
	if err := w.Flush(); err != nil {
		tmp.Close()
		return err
	}
	if err := tmp.Close(); err != nil {
		return err
	}
	if err := os.Chmod(tmp.Name(), 0o644); err != nil {
		return err
	}
	if err := os.Rename(tmp.Name(), out); err != nil {
		return err
	}
	fmt.Printf("%s: %s (manifest %s, %d layers)\n", out, name, built.Manifest.Descriptor.Digest, len(built.Layers))
	return nil
}
