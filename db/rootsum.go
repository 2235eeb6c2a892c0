package db

import (
	"bytes"
	"encoding/binary"

	"github.com/casnix/casnix/digest"
)

// RootSum is the checksum InsertPath writes into a path's root_sum
// (migration 0008): the BLAKE3 of the row's name, root node columns and NAR
// hash and size, each field length-prefixed so no two rows encode alike. A
// bit flipped in any of them (or in root_sum) makes the row's sum differ
// from RootSum of what is read back (RootSealed).
func RootSum(p *PathRow) []byte {
	var b bytes.Buffer
	field := func(v []byte) {
		b.Write(binary.AppendUvarint(nil, uint64(len(v))))
		b.Write(v)
	}
	b.WriteString("casnix root_sum v1\x00")
	field([]byte(p.Name))
	b.WriteByte(p.Kind)
	field(p.Digest)
	b.Write(binary.BigEndian.AppendUint64(nil, uint64(p.Size)))
	if p.Executable {
		b.WriteByte(1)
	} else {
		b.WriteByte(0)
	}
	field(p.Target)
	field(p.NarHash)
	b.Write(binary.BigEndian.AppendUint64(nil, uint64(p.NarSize)))
	d := digest.Sum(b.Bytes())
	return d[:]
}

// RootSealed reports whether the row read back (Path) carries the
// root_sum of its own columns: then its root node, NAR hash and NAR size
// are the ones committed with it.
func (p *PathRow) RootSealed() bool {
	return len(p.RootSum) == digest.Size && bytes.Equal(p.RootSum, RootSum(p))
}
