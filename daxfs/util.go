package daxfs

import (
	"encoding/base64"
	"unicode/utf8"
)

func isUTF8(b []byte) bool { return utf8.Valid(b) }

func base64Std(b []byte) string { return base64.StdEncoding.EncodeToString(b) }
