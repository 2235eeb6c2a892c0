package cli

import (
	"fmt"
	"strings"
	"unicode"
	"unicode/utf8"
)

// Quote makes a name, symlink target or message taken from store contents
// safe to print on a terminal, like ls -b: control characters (C0, DEL,
// C1: escape sequences could rewrite the screen or fake other lines) and
// bytes that are not UTF-8 become C-style escapes, and a backslash is
// doubled so the escapes are unambiguous. Other text, spaces included, is
// left as it is. JSON output needs none of this: encoding/json escapes
// control characters itself.
func Quote(s string) string {
	if !needsQuote(s) {
		return s
	}
	var b strings.Builder
	for i := 0; i < len(s); {
		r, size := utf8.DecodeRuneInString(s[i:])
		switch {
		case r == utf8.RuneError && size == 1:
			fmt.Fprintf(&b, `\x%02x`, s[i])
		case r == '\\':
			b.WriteString(`\\`)
		case r == '\n':
			b.WriteString(`\n`)
		case r == '\t':
			b.WriteString(`\t`)
		case r == '\r':
			b.WriteString(`\r`)
		case r < 0x80 && unicode.IsControl(r):
			fmt.Fprintf(&b, `\x%02x`, r)
		case unicode.IsControl(r):
			fmt.Fprintf(&b, `\u%04x`, r)
		default:
			b.WriteString(s[i : i+size])
		}
		i += size
	}
	return b.String()
}

func needsQuote(s string) bool {
	for i := 0; i < len(s); i++ {
		if c := s[i]; c < 0x20 || c == 0x7f || c == '\\' || c >= 0x80 {
			return true // non-ASCII is checked rune by rune in Quote
		}
	}
	return false
}
