package db

import (
	"bytes"
	"context"
	"encoding/binary"
	"fmt"

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

// SealRoot writes root_sum into name's row, if the row as it is now has
// the sum want (the caller checked the path whose row that is: rendered it
// against its NAR hash) and does not carry it yet. It reports whether it
// wrote. Rows written before migration 0008 are sealed this way.
func (q q) SealRoot(ctx context.Context, name string, want []byte) (bool, error) {
	p, err := q.Path(ctx, name)
	if err != nil {
		return false, err
	}
	if sum := RootSum(p); !bytes.Equal(sum, want) || bytes.Equal(p.RootSum, sum) {
		return false, nil // not the row that was checked, or sealed already
	}
	if _, err := q.exec(ctx, "UPDATE paths SET root_sum = ? WHERE id = ?", want, p.ID); err != nil {
		return false, fmt.Errorf("seal path %s: %w", name, err)
	}
	return true, nil
}
