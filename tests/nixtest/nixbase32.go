package nixtest

import "fmt"

// nixBase32Alphabet omits e, o, u and t, as Nix's does.
const nixBase32Alphabet = "0123456789abcdfghijklmnpqrsvwxyz"

// NixBase32Encode encodes b in Nix's base32: least significant bits first, printed from the
// last character backwards. Written here rather than imported so that the tests do not share
// an encoder with the code they check.
func NixBase32Encode(b []byte) string {
	if len(b) == 0 {
		return ""
	}
	n := (len(b)*8-1)/5 + 1
	out := make([]byte, n)
	for i := n - 1; i >= 0; i-- {
		bit := i * 5
		c, j := bit/8, uint(bit%8)
		v := b[c] >> j
		if c+1 < len(b) {
			v |= b[c+1] << (8 - j)
		}
		out[n-1-i] = nixBase32Alphabet[v&0x1f]
	}
	return string(out)
}

// NixBase32Decode is the inverse of NixBase32Encode.
func NixBase32Decode(s string) ([]byte, error) {
	outLen := len(s) * 5 / 8
	out := make([]byte, outLen)
	for n := 0; n < len(s); n++ {
		c := s[len(s)-n-1]
		digit := -1
		for k := 0; k < len(nixBase32Alphabet); k++ {
			if nixBase32Alphabet[k] == c {
				digit = k
				break
			}
		}
		if digit < 0 {
			return nil, fmt.Errorf("nixbase32 %q: invalid character %q", s, c)
		}
		bit := n * 5
		i, j := bit/8, uint(bit%8)
		if i < outLen {
			out[i] |= byte(digit << j)
		}
		carry := byte(digit >> (8 - j))
		if i+1 < outLen {
			out[i+1] |= carry
		} else if carry != 0 || (i >= outLen && digit != 0) {
			return nil, fmt.Errorf("nixbase32 %q: non-zero padding bits", s)
		}
	}
	return out, nil
}
