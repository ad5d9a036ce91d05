package daxfs

// Encoding the metadata and the superblocks, after the file data.

import (
	"fmt"
	"io"
)

// seqWriter writes a run of bytes sequentially through a buffer.
type seqWriter struct {
	out io.WriterAt
	off int64
	buf []byte
	n   int
	err error
}

func (s *seqWriter) flush() {
	if s.err != nil || s.n == 0 {
		return
	}
	if _, err := s.out.WriteAt(s.buf[:s.n], s.off); err != nil {
		s.err = fmt.Errorf("daxfs: writing metadata at %d: %w", s.off, err)
	}
	s.off += int64(s.n)
	s.n = 0
}

// next returns a zeroed slice of n bytes (n <= len(buf)) to fill in.
func (s *seqWriter) next(n int) []byte {
	if s.n+n > len(s.buf) {
		s.flush()
	}
	b := s.buf[s.n : s.n+n]
	clear(b)
	s.n += n
	return b
}

func (s *seqWriter) write(p []byte) {
	for len(p) > 0 {
		if s.n == len(s.buf) {
			s.flush()
		}
		k := copy(s.buf[s.n:], p)
		s.n += k
		p = p[k:]
	}
}

func (s *seqWriter) zeros(n uint64) {
	for n > 0 {
		k := min(n, uint64(len(s.buf)))
		s.next(int(k))
		n -= k
	}
}

func (w *Writer) writeMeta() error {
	l := &w.lay
	if w.buf == nil {
		w.buf = make([]byte, copyBufSize)
	}
	baseSize := l.end
	total := BaseOffset + l.end
	if w.basesSet {
		total = w.window
		baseSize = w.window - BaseOffset
	}

	// Metadata after the file data; the superblocks go last, so that an
	// image whose writing failed has no valid magic.
	s := &seqWriter{out: w.out, off: int64(BaseOffset + l.inodeOff), buf: w.buf}
	for i, n := range l.order {
		nd := w.nodes.at(n)
		r := s.next(InodeSize)
		inIno.put(r, uint32(i+1))
		inMode.put(r, nd.mode)
		inUID.put(r, nd.uid)
		inGID.put(r, nd.gid)
		inSize.put(r, nd.size)
		data := nd.data
		if nd.ref >= 0 {
			data = 0
			if nd.size > 0 {
				data = w.bases[nd.ref] + nd.data - BaseOffset
			}
		}
		inData.put(r, data)
		inNlink.put(r, nd.nlink)
	}
	for _, n := range l.order {
		nd := w.nodes.at(n)
		if nd.dir < 0 {
			continue
		}
		for _, k := range w.dirs[nd.dir] {
			e := w.ents.at(k)
			c := w.nodes.at(e.node)
			r := s.next(DirentStride)
			deIno.put(r, c.ino)
			deMode.put(r, c.mode)
			deNameLen.put(r, uint16(len(e.name)))
			copy(r[direntName:], e.name)
		}
	}
	pos := uint64(s.off-BaseOffset) + uint64(s.n)
	for _, n := range l.order {
		nd := w.nodes.at(n)
		if nd.mode&ModeTypeMask == ModeSymlink {
			s.write([]byte(w.extras[nd.extra].target))
			s.next(1)
			pos += nd.size + 1
		}
	}
	if !w.opts.NoExtension {
		s.zeros(l.extOff - pos)
		pos = l.extOff
		h := s.next(extHeaderSize)
		ehMagic.put(h, ExtMagic)
		ehVersion.put(h, ExtVersion)
		ehInodeCount.put(h, uint32(len(l.order)))
		ehRecordSize.put(h, extRecordSize)
		ehXattrOff.put(h, extHeaderSize+uint64(len(l.order))*extRecordSize)
		ehXattrSize.put(h, l.xattrSize)
		var xoff uint64
		for _, n := range l.order {
			nd := w.nodes.at(n)
			r := s.next(extRecordSize)
			erMtimeSec.put(r, uint64(nd.mtimeSec))
			erMtimeNsec.put(r, nd.mtimeNsec)
			if nd.extra >= 0 {
				ex := &w.extras[nd.extra]
				erXattrCount.put(r, uint32(len(ex.xattrs)))
				erRdev.put(r, ex.rdev)
				if len(ex.xattrs) > 0 {
					erXattrOff.put(r, xoff)
				}
				for _, xa := range ex.xattrs {
					xoff += xattrHdrSize + uint64(len(xa.Name)) + uint64(len(xa.Value))
				}
			}
		}
		for _, n := range l.order {
			nd := w.nodes.at(n)
			if nd.extra < 0 {
				continue
			}
			for _, xa := range w.extras[nd.extra].xattrs {
				xh := s.next(xattrHdrSize)
				xaNameLen.put(xh, uint16(len(xa.Name)))
				xaValueLen.put(xh, uint32(len(xa.Value)))
				s.write([]byte(xa.Name))
				s.write(xa.Value)
			}
		}
		pos += l.extSize
	}
	s.zeros(l.end - pos)
	s.flush()

	// Superblocks.
	if s.err != nil {
		return s.err
	}
	s.off = 0
	sb := s.next(BlockSize)
	sbMagic.put(sb, SuperMagic)
	sbVersion.put(sb, Version)
	sbBlockSize.put(sb, BlockSize)
	sbTotalSize.put(sb, total)
	sbBaseOffset.put(sb, BaseOffset)
	sbBaseSize.put(sb, baseSize)
	sbNextInodeID.put(sb, uint64(len(l.order))+1)
	bs := s.next(BlockSize)
	bsMagic.put(bs, BaseMagic)
	bsVersion.put(bs, Version)
	bsBlockSize.put(bs, BlockSize)
	bsTotalSize.put(bs, baseSize)
	bsInodeOff.put(bs, l.inodeOff)
	bsInodeCount.put(bs, uint32(len(l.order)))
	bsRootIno.put(bs, RootIno)
	bsDataOff.put(bs, BlockSize) // file data starts right after the base superblock
	bsExtMagic.put(bs, ExtMagic)
	bsExtVersion.put(bs, ExtVersion)
	bsExtFlags.put(bs, ExtFlagSorted)
	bsExtOffset.put(bs, l.extOff)
	bsExtSize.put(bs, l.extSize)
	s.flush()

	return s.err
}
