// Package gunzip decompresses gzip streams (every member, as
// compress/gzip's multistream mode) ahead of the reader, in a goroutine of
// its own, so that inflating overlaps whatever the reader does with the
// data (parsing, hashing and copying a layer tar).
//
// Built with the "isal" tag (and cgo), it inflates with Intel's ISA-L
// (libisal, Debian's libisal-dev), about twice as fast as the fastest Go
// inflater on x86: inflating is most of a gzip layer's conversion time.
// Without the tag it is klauspost/pgzip.
package gunzip

import "io"

// NewReader returns a reader of the decompressed contents of the gzip
// stream r. Errors reading r are returned wrapped (errors.Is and As see
// them); corrupt data gives an error wrapping ErrCorrupt.
func NewReader(r io.Reader) (io.ReadCloser, error) { return newReader(r) }

// Implementation names the inflater this build uses: "isa-l" or "go".
const Implementation = implementation
