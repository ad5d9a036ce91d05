package daxmem

import (
	"errors"
	"fmt"
	"os"
	"path/filepath"
	"strconv"
	"strings"
	"unsafe"

	"golang.org/x/sys/unix"
)

// Backend names accepted in Options.Backend.
const (
	BackendFile      = "file"
	BackendHugetlbfs = "hugetlbfs"
	BackendDevDAX    = "devdax"
	BackendFSDAX     = "fsdax"
)

// DefaultPath is where the file backend keeps the region by default.
const DefaultPath = "/dev/shm/containerd-daxfs/region"

const (
	hugetlbfsMagic = 0x958458f6
	mib2           = 2 << 20
)

// mmapFunc is unix.Mmap; tests substitute it to check flag choices.
type mmapFunc func(fd int, offset int64, length int, prot int, flags int) ([]byte, error)

// backend is what the region needs from the memory behind it.
type backend struct {
	name string
	path string
	f    *os.File
	// align is the granule sizes must be a multiple of (and the alignment
	// of the mapping): 4096 for files, the huge page size for hugetlbfs,
	// the device alignment for device DAX.
	align int64
	// phys is the physical address of byte 0 when physKnown (device DAX):
	// the kernel daxfs mounter needs it.
	phys      uint64
	physKnown bool
	// mapSync reports that an fsdax file is mapped MAP_SYNC.
	mapSync bool
	// msync says Flush must msync the range to make it durable.
	msync bool
	// aligned says the mapping was placed by mapAligned (unmap with
	// MunmapPtr, not unix.Munmap).
	aligned bool
	// reserve: fallocate extents before a writer stores to them, so a full
	// tmpfs gives an error instead of SIGBUS; punch: give freed extents'
	// memory back.
	reserve, punch bool
}

// Durability says in words how published bytes reach other participants
// and stable storage with this backend.
func (b *backend) Durability() string {
	switch b.name {
	case BackendFile:
		return "page cache shared by all mappers on this kernel; msync at publish (durable if the file is on a disk filesystem, nothing more on tmpfs)"
	case BackendHugetlbfs:
		return "huge pages shared by all mappers on this kernel; not durable, no flush needed"
	case BackendDevDAX:
		return "device memory mapped directly; stores are visible to every coherent mapper; no msync (device DAX has none)"
	case BackendFSDAX:
		if b.mapSync {
			return "DAX file mapped MAP_SYNC: msync at publish flushes CPU caches to the media"
		}
		return "DAX file mapped MAP_SHARED (MAP_SYNC refused): msync at publish writes back"
	}
	return "unknown"
}

// openBackend opens (or, with create, creates at size bytes) the backing
// object and returns it with the size to map. For create, size 0 means the
// whole device (device DAX) or is an error. sysRoot is "/sys" except in tests.
func openBackend(name, path string, size int64, create bool, sysRoot string) (*backend, int64, error) {
	switch name {
	case "", BackendFile:
		return openFileBackend(BackendFile, path, size, create, pageSize)
	case BackendHugetlbfs:
		var st unix.Statfs_t
		dir := path
		if create {
			dir = filepath.Dir(path)
		}
		if err := unix.Statfs(dir, &st); err != nil {
			return nil, 0, fmt.Errorf("hugetlbfs %s: %w", dir, err)
		}
		if uint32(st.Type) != hugetlbfsMagic {
			return nil, 0, fmt.Errorf("hugetlbfs backend: %s is not on a hugetlbfs mount", path)
		}
		return openFileBackend(BackendHugetlbfs, path, size, create, int64(st.Bsize))
	case BackendFSDAX:
		return openFileBackend(BackendFSDAX, path, size, create, pageSize)
	case BackendDevDAX:
		return openDevDAX(path, size, sysRoot)
	}
	return nil, 0, fmt.Errorf("unknown region backend %q (want file, hugetlbfs, devdax or fsdax)", name)
}

func openFileBackend(name, path string, size int64, create bool, align int64) (*backend, int64, error) {
	b := &backend{name: name, path: path, align: align}
	switch name {
	case BackendFile:
		b.msync, b.reserve, b.punch = true, true, true
	case BackendFSDAX:
		b.msync, b.reserve, b.punch = true, true, true
	case BackendHugetlbfs:
		// hugetlbfs reserves pages at mmap time; fallocate/punch need huge
		// page granules, which our page-aligned extents are not.
	}
	var f *os.File
	var err error
	if create {
		size = alignUp(size, align)
		if size <= 0 {
			return nil, 0, fmt.Errorf("%s backend: %w: region size %d", name, ErrInvalidSize, size)
		}
		f, err = os.OpenFile(path, os.O_RDWR|os.O_CREATE|os.O_EXCL, 0o600)
		if err != nil {
			return nil, 0, err
		}
		if err := f.Truncate(size); err != nil {
			f.Close()
			os.Remove(path)
			return nil, 0, fmt.Errorf("size %s to %d bytes: %w", path, size, err)
		}
	} else {
		f, err = os.OpenFile(path, os.O_RDWR, 0)
		if err != nil {
			return nil, 0, err
		}
		st, err := f.Stat()
		if err != nil {
			f.Close()
			return nil, 0, err
		}
		if !st.Mode().IsRegular() {
			f.Close()
			return nil, 0, fmt.Errorf("%s backend: %s is not a regular file (use backend devdax for a DAX device)", name, path)
		}
		size = st.Size()
	}
	b.f = f
	return b, size, nil
}

// raiseAlign makes a new region's alignment want (0: keep the backend's)
// and returns its size n rounded down to it. want must be a multiple of
// the backend's own alignment.
func (b *backend) raiseAlign(n, want int64) (int64, error) {
	if want == 0 || want == b.align {
		return n, nil
	}
	if want%b.align != 0 {
		return 0, fmt.Errorf("%w: alignment %d is not a multiple of the %s backend's %d", ErrInvalidSize, want, b.name, b.align)
	}
	b.align = want
	if n = n / want * want; n == 0 {
		return 0, fmt.Errorf("%w: less than one %d-byte aligned unit", ErrInvalidSize, want)
	}
	return n, nil
}

// devDAXInfo is what sysfs says about a device DAX instance.
type devDAXInfo struct {
	size      int64
	align     int64
	phys      uint64
	physKnown bool
}

// readDevDAXSysfs reads /sys/dev/char/MAJ:MIN/{size,align,resource}. size
// is required; align defaults to 2 MiB (kernels before 5.10 have no align
// file and map 2 MiB pages); resource (the physical base) is readable by
// root only and may be absent.
func readDevDAXSysfs(sysRoot string, major, minor uint32) (devDAXInfo, error) {
	dir := filepath.Join(sysRoot, "dev", "char", fmt.Sprintf("%d:%d", major, minor))
	var info devDAXInfo
	readInt := func(name string, base int) (uint64, bool, error) {
		b, err := os.ReadFile(filepath.Join(dir, name))
		if errors.Is(err, os.ErrNotExist) || errors.Is(err, os.ErrPermission) {
			return 0, false, nil
		}
		if err != nil {
			return 0, false, err
		}
		s := strings.TrimSpace(string(b))
		if base == 16 {
			s = strings.TrimPrefix(strings.TrimPrefix(s, "0x"), "0X")
		}
		v, err := strconv.ParseUint(s, base, 64)
		if err != nil {
			return 0, false, fmt.Errorf("%s/%s: %q: %w", dir, name, s, err)
		}
		return v, true, nil
	}
	size, ok, err := readInt("size", 10)
	if err != nil {
		return info, err
	}
	if !ok || size == 0 || size > 1<<62 {
		return info, fmt.Errorf("device DAX %d:%d: no usable size in %s", major, minor, dir)
	}
	info.size = int64(size)
	align, ok, err := readInt("align", 10)
	if err != nil {
		return info, err
	}
	if !ok {
		align = mib2
	}
	if align < pageSize || align&(align-1) != 0 || align > 1<<30 {
		return info, fmt.Errorf("device DAX %d:%d: alignment %d is not a power of two between 4 KiB and 1 GiB", major, minor, align)
	}
	info.align = int64(align)
	if info.phys, info.physKnown, err = readInt("resource", 16); err != nil {
		return info, err
	}
	if info.physKnown && info.phys%align != 0 {
		return info, fmt.Errorf("device DAX %d:%d: physical base %#x not aligned to %d", major, minor, info.phys, align)
	}
	return info, nil
}

// devDAXMapSize is the length to map: the requested size (0: the whole
// device) rounded down to the device alignment, which must fit the device.
func devDAXMapSize(want int64, info devDAXInfo) (int64, error) {
	if want == 0 {
		want = info.size
	}
	if want > info.size {
		return 0, fmt.Errorf("device DAX: requested %d bytes but the device has %d", want, info.size)
	}
	n := want / info.align * info.align
	if n == 0 {
		return 0, fmt.Errorf("device DAX: size %d is less than one %d-byte aligned mapping", want, info.align)
	}
	return n, nil
}

func openDevDAX(path string, size int64, sysRoot string) (*backend, int64, error) {
	f, err := os.OpenFile(path, os.O_RDWR, 0)
	if err != nil {
		return nil, 0, err
	}
	var st unix.Stat_t
	if err := unix.Fstat(int(f.Fd()), &st); err != nil {
		f.Close()
		return nil, 0, err
	}
	if st.Mode&unix.S_IFMT != unix.S_IFCHR {
		f.Close()
		return nil, 0, fmt.Errorf("devdax backend: %s is not a character device", path)
	}
	info, err := readDevDAXSysfs(sysRoot, unix.Major(st.Rdev), unix.Minor(st.Rdev))
	if err != nil {
		f.Close()
		return nil, 0, fmt.Errorf("%s: %w", path, err)
	}
	n, err := devDAXMapSize(size, info)
	if err != nil {
		f.Close()
		return nil, 0, fmt.Errorf("%s: %w", path, err)
	}
	return &backend{name: BackendDevDAX, path: path, f: f, align: info.align, phys: info.phys, physKnown: info.physKnown}, n, nil
}

// mapFlags lists the mmap flags to try, in order, for a backend.
func mapFlags(name string) []int {
	if name == BackendFSDAX {
		// MAP_SYNC needs MAP_SHARED_VALIDATE; filesystems that cannot honour
		// it (not DAX, or old kernels) fail with EOPNOTSUPP or EINVAL, and
		// we fall back to a plain shared mapping flushed with msync.
		return []int{unix.MAP_SHARED_VALIDATE | unix.MAP_SYNC, unix.MAP_SHARED}
	}
	return []int{unix.MAP_SHARED}
}

// mapBackend maps n bytes of the backend with the first flags that work and
// checks the mapping alignment the backend needs.
func (b *backend) mapBackend(n int64, mmap mmapFunc) ([]byte, error) {
	if n <= 0 || n != int64(int(n)) {
		return nil, fmt.Errorf("map %s: %w: %d bytes", b.path, ErrInvalidSize, n)
	}
	var lastErr error
	for _, flags := range mapFlags(b.name) {
		mem, err := mmap(int(b.f.Fd()), 0, int(n), unix.PROT_READ|unix.PROT_WRITE, flags)
		if err == nil {
			b.mapSync = flags&unix.MAP_SYNC != 0
			if addr := uintptrOf(mem); addr%uintptr(b.align) != 0 && b.name == BackendDevDAX {
				unix.Munmap(mem)
				return nil, fmt.Errorf("map %s: kernel returned address %#x not aligned to %d", b.path, addr, b.align)
			}
			return mem, nil
		}
		lastErr = err
		if !errors.Is(err, unix.EOPNOTSUPP) && !errors.Is(err, unix.EINVAL) {
			break
		}
	}
	return nil, fmt.Errorf("map %s (%s backend, %d bytes): %w", b.path, b.name, n, lastErr)
}

// mapRegion maps n bytes the way the backend needs.
func (b *backend) mapRegion(n int64) ([]byte, error) {
	if b.name == BackendDevDAX {
		return b.mapAligned(n)
	}
	return b.mapBackend(n, unix.Mmap)
}

// mapAligned maps n bytes of a device DAX instance at an address aligned
// to the device alignment: device DAX refuses (or faults on) mappings that
// are not, and the kernel only aligns them itself on some versions. It
// reserves n+align bytes of address space, maps the device over the
// aligned part with MAP_FIXED and returns the rest.
func (b *backend) mapAligned(n int64) ([]byte, error) {
	if n <= 0 || n != int64(int(n)) || n%b.align != 0 {
		return nil, fmt.Errorf("map %s: %w: %d bytes is not a multiple of %d", b.path, ErrInvalidSize, n, b.align)
	}
	size, align := uintptr(n), uintptr(b.align)
	resv, err := unix.MmapPtr(-1, 0, nil, size+align, unix.PROT_NONE, unix.MAP_PRIVATE|unix.MAP_ANONYMOUS|unix.MAP_NORESERVE)
	if err != nil {
		return nil, fmt.Errorf("map %s: reserve %d bytes of address space: %w", b.path, size+align, err)
	}
	head := (align - uintptr(resv)%align) % align
	at := unsafe.Add(resv, head)
	p, err := unix.MmapPtr(int(b.f.Fd()), 0, at, size, unix.PROT_READ|unix.PROT_WRITE, unix.MAP_SHARED|unix.MAP_FIXED)
	if err != nil {
		unix.MunmapPtr(resv, size+align)
		return nil, fmt.Errorf("map %s (%s backend, %d bytes at %d-byte alignment): %w", b.path, b.name, n, align, err)
	}
	if head > 0 {
		unix.MunmapPtr(resv, head)
	}
	if tail := align - head; tail > 0 {
		unix.MunmapPtr(unsafe.Add(at, size), tail)
	}
	b.aligned = true
	return unsafe.Slice((*byte)(p), n), nil
}

func (b *backend) unmap(mem []byte) error {
	if len(mem) == 0 {
		return nil
	}
	if b.aligned {
		return unix.MunmapPtr(unsafe.Pointer(&mem[0]), uintptr(len(mem)))
	}
	return unix.Munmap(mem)
}

// flush makes [off, off+n) durable where the backend needs it.
func (b *backend) flush(mem []byte, off, n int64) error {
	if !b.msync || n <= 0 {
		return nil
	}
	start := off / pageSize * pageSize
	end := alignUp(off+n, pageSize)
	if err := unix.Msync(mem[start:end], unix.MS_SYNC); err != nil {
		return fmt.Errorf("msync %s [%d,%d): %w", b.path, start, end, err)
	}
	return nil
}

// reserveRange backs [off, off+n) of mem with memory so the writer's
// stores cannot fault: fallocate gives a clear ENOSPC on a full tmpfs or
// filesystem (instead of SIGBUS on the first store to a hole), then
// MADV_POPULATE_WRITE maps the pages in one system call instead of one
// page fault per page while the image is written (several times faster
// where faults are expensive, e.g. in virtual machines).
func (b *backend) reserveRange(mem []byte, off, n int64) error {
	if n <= 0 {
		return nil
	}
	if b.reserve {
		if err := unix.Fallocate(int(b.f.Fd()), 0, off, n); err != nil && !errors.Is(err, unix.EOPNOTSUPP) {
			return err
		}
	}
	start := off / pageSize * pageSize
	end := alignUp(off+n, pageSize)
	err := unix.Madvise(mem[start:end], unix.MADV_POPULATE_WRITE)
	if err != nil && !errors.Is(err, unix.EINVAL) { // EINVAL: kernel before 5.14
		return fmt.Errorf("populate [%d,%d): %w", start, end, err)
	}
	return nil
}

// releaseRange gives the memory of a freed range back (best effort).
func (b *backend) releaseRange(off, n int64) {
	if !b.punch || n <= 0 {
		return
	}
	_ = unix.Fallocate(int(b.f.Fd()), unix.FALLOC_FL_PUNCH_HOLE|unix.FALLOC_FL_KEEP_SIZE, off, n)
}

func (b *backend) close() error {
	if b.f == nil {
		return nil
	}
	return b.f.Close()
}
