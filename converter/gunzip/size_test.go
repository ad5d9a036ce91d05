package gunzip

// blockSizeForTest is a size around which the readers change buffers
// (the ISA-L reader's block size).
const blockSizeForTest = 1 << 20
