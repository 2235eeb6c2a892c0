package castore

import (
	"bytes"
	"errors"
	"fmt"
	"math"
	"math/bits"

	"google.golang.org/protobuf/encoding/protowire"

	"github.com/casnix/casnix/digest"
)

// Limits from Linux and snix: a name is one path component, a symlink target
// at most one PATH_MAX.
const (
	MaxNameLen   = 255
	MaxTargetLen = 4095
)

// ErrInvalid is wrapped by every validation and decoding error.
var ErrInvalid = errors.New("invalid castore data")

// DirectoryEntry names a child directory by digest. Size is the number of
// nodes in the subtree below it (see Directory.Size).
type DirectoryEntry struct {
	Name   []byte
	Digest digest.Digest
	Size   uint64
}

// FileEntry names a file by the digest of its whole contents.
type FileEntry struct {
	Name       []byte
	Digest     digest.Digest
	Size       uint64
	Executable bool
}

// SymlinkEntry is a symlink and its target.
type SymlinkEntry struct {
	Name   []byte
	Target []byte
}

// Directory is one level of the tree.
type Directory struct {
	Directories []DirectoryEntry
	Files       []FileEntry
	Symlinks    []SymlinkEntry
}

// Size is the number of nodes in the subtree this directory roots, not
// counting itself: its entries plus every child directory's Size. This is the
// value a parent's DirectoryEntry.Size carries. It saturates rather than
// overflowing so a hostile decoded tree cannot wrap it; Validate rejects that.
func (d *Directory) Size() uint64 {
	n := uint64(len(d.Directories) + len(d.Files) + len(d.Symlinks))
	for _, e := range d.Directories {
		var carry uint64
		n, carry = bits.Add64(n, e.Size, 0)
		if carry != 0 {
			return math.MaxUint64
		}
	}
	return n
}

// Encode returns the canonical protobuf encoding.
func (d *Directory) Encode() []byte {
	return d.AppendEncode(nil)
}

// AppendEncode appends the canonical protobuf encoding to b.
func (d *Directory) AppendEncode(b []byte) []byte {
	var tmp []byte
	for _, e := range d.Directories {
		tmp = tmp[:0]
		tmp = appendBytesField(tmp, 1, e.Name)
		tmp = appendBytesField(tmp, 2, e.Digest[:])
		tmp = appendUintField(tmp, 3, e.Size)
		b = appendBytesField(b, 1, tmp)
	}
	for _, e := range d.Files {
		tmp = tmp[:0]
		tmp = appendBytesField(tmp, 1, e.Name)
		tmp = appendBytesField(tmp, 2, e.Digest[:])
		tmp = appendUintField(tmp, 3, e.Size)
		if e.Executable {
			tmp = appendUintField(tmp, 4, 1)
		}
		b = appendBytesField(b, 2, tmp)
	}
	for _, e := range d.Symlinks {
		tmp = tmp[:0]
		tmp = appendBytesField(tmp, 1, e.Name)
		tmp = appendBytesField(tmp, 2, e.Target)
		b = appendBytesField(b, 3, tmp)
	}
	return b
}

// Digest is the BLAKE3 of the canonical encoding.
func (d *Directory) Digest() digest.Digest {
	return digest.Sum(d.Encode())
}

func appendBytesField(b []byte, num protowire.Number, v []byte) []byte {
	if len(v) == 0 { // proto3 default, omitted
		return b
	}
	b = protowire.AppendTag(b, num, protowire.BytesType)
	return protowire.AppendBytes(b, v)
}

func appendUintField(b []byte, num protowire.Number, v uint64) []byte {
	if v == 0 {
		return b
	}
	b = protowire.AppendTag(b, num, protowire.VarintType)
	return protowire.AppendVarint(b, v)
}

// ValidateName checks one path component against castore's rules.
func ValidateName(name []byte) error {
	switch {
	case len(name) == 0:
		return fmt.Errorf("%w: empty name", ErrInvalid)
	case len(name) > MaxNameLen:
		return fmt.Errorf("%w: name of %d bytes exceeds %d", ErrInvalid, len(name), MaxNameLen)
	case bytes.Equal(name, []byte(".")) || bytes.Equal(name, []byte("..")):
		return fmt.Errorf("%w: name %q", ErrInvalid, name)
	case bytes.IndexByte(name, '/') >= 0:
		return fmt.Errorf("%w: name %q contains '/'", ErrInvalid, name)
	case bytes.IndexByte(name, 0) >= 0:
		return fmt.Errorf("%w: name %q contains NUL", ErrInvalid, name)
	}
	return nil
}

// ValidateTarget checks a symlink target.
func ValidateTarget(target []byte) error {
	switch {
	case len(target) == 0:
		return fmt.Errorf("%w: empty symlink target", ErrInvalid)
	case len(target) > MaxTargetLen:
		return fmt.Errorf("%w: symlink target of %d bytes exceeds %d", ErrInvalid, len(target), MaxTargetLen)
	case bytes.IndexByte(target, 0) >= 0:
		return fmt.Errorf("%w: symlink target contains NUL", ErrInvalid)
	}
	return nil
}

// Validate checks names, ordering, uniqueness across the three lists, symlink
// targets and that the recursive size does not overflow. It does not check
// DirectoryEntry sizes against the children: snix has computed them
// differently in some versions and the child may not be at hand.
func (d *Directory) Validate() error {
	for i, e := range d.Directories {
		if err := ValidateName(e.Name); err != nil {
			return fmt.Errorf("directory entry %d: %w", i, err)
		}
		if i > 0 && bytes.Compare(d.Directories[i-1].Name, e.Name) >= 0 {
			return fmt.Errorf("%w: directories not sorted or duplicate at %q", ErrInvalid, e.Name)
		}
	}
	for i, e := range d.Files {
		if err := ValidateName(e.Name); err != nil {
			return fmt.Errorf("file entry %d: %w", i, err)
		}
		if i > 0 && bytes.Compare(d.Files[i-1].Name, e.Name) >= 0 {
			return fmt.Errorf("%w: files not sorted or duplicate at %q", ErrInvalid, e.Name)
		}
	}
	for i, e := range d.Symlinks {
		if err := ValidateName(e.Name); err != nil {
			return fmt.Errorf("symlink entry %d: %w", i, err)
		}
		if err := ValidateTarget(e.Target); err != nil {
			return fmt.Errorf("symlink %q: %w", e.Name, err)
		}
		if i > 0 && bytes.Compare(d.Symlinks[i-1].Name, e.Name) >= 0 {
			return fmt.Errorf("%w: symlinks not sorted or duplicate at %q", ErrInvalid, e.Name)
		}
	}
	if dup := d.duplicateName(); dup != nil {
		return fmt.Errorf("%w: name %q used twice", ErrInvalid, dup)
	}
	if d.Size() == math.MaxUint64 {
		return fmt.Errorf("%w: recursive size overflows", ErrInvalid)
	}
	return nil
}

// duplicateName finds a name present in more than one list by merging the
// three sorted lists.
func (d *Directory) duplicateName() []byte {
	i, j, k := 0, 0, 0
	var prev []byte
	for {
		var next []byte
		which := -1
		if i < len(d.Directories) {
			next, which = d.Directories[i].Name, 0
		}
		if j < len(d.Files) && (which < 0 || bytes.Compare(d.Files[j].Name, next) < 0) {
			next, which = d.Files[j].Name, 1
		}
		if k < len(d.Symlinks) && (which < 0 || bytes.Compare(d.Symlinks[k].Name, next) < 0) {
			next, which = d.Symlinks[k].Name, 2
		}
		switch which {
		case -1:
			return nil
		case 0:
			i++
		case 1:
			j++
		case 2:
			k++
		}
		if prev != nil && bytes.Equal(prev, next) {
			return next
		}
		prev = next
	}
}

// Decode parses and validates a Directory encoding. Unknown fields are
// rejected: a canonical encoding never has them, and accepting them would
// let two different byte strings describe one tree.
func Decode(b []byte) (*Directory, error) {
	d := &Directory{}
	lastField := protowire.Number(0)
	for len(b) > 0 {
		num, typ, n := protowire.ConsumeTag(b)
		if n < 0 {
			return nil, fmt.Errorf("%w: directory: %v", ErrInvalid, protowire.ParseError(n))
		}
		if n != protowire.SizeTag(num) {
			return nil, fmt.Errorf("%w: directory: non-minimal tag", ErrInvalid)
		}
		b = b[n:]
		if typ != protowire.BytesType || num < 1 || num > 3 {
			return nil, fmt.Errorf("%w: directory: unexpected field %d type %d", ErrInvalid, num, typ)
		}
		if num < lastField {
			return nil, fmt.Errorf("%w: directory: field %d after field %d", ErrInvalid, num, lastField)
		}
		lastField = num
		v, n := protowire.ConsumeBytes(b)
		if n < 0 {
			return nil, fmt.Errorf("%w: directory: %v", ErrInvalid, protowire.ParseError(n))
		}
		if n != protowire.SizeBytes(len(v)) {
			return nil, fmt.Errorf("%w: directory: non-minimal length", ErrInvalid)
		}
		b = b[n:]
		var err error
		switch num {
		case 1:
			var e DirectoryEntry
			e, err = decodeDirectoryEntry(v)
			d.Directories = append(d.Directories, e)
		case 2:
			var e FileEntry
			e, err = decodeFileEntry(v)
			d.Files = append(d.Files, e)
		case 3:
			var e SymlinkEntry
			e, err = decodeSymlinkEntry(v)
			d.Symlinks = append(d.Symlinks, e)
		}
		if err != nil {
			return nil, err
		}
	}
	if err := d.Validate(); err != nil {
		return nil, err
	}
	return d, nil
}

// fieldIter walks the fields of an entry message, enforcing strictly
// increasing field numbers (canonical order, no repeats).
type fieldIter struct {
	b    []byte
	last protowire.Number
	what string
}

func (it *fieldIter) next() (protowire.Number, protowire.Type, []byte, uint64, bool, error) {
	if len(it.b) == 0 {
		return 0, 0, nil, 0, false, nil
	}
	num, typ, n := protowire.ConsumeTag(it.b)
	if n < 0 {
		return 0, 0, nil, 0, false, fmt.Errorf("%w: %s: %v", ErrInvalid, it.what, protowire.ParseError(n))
	}
	if n != protowire.SizeTag(num) {
		return 0, 0, nil, 0, false, fmt.Errorf("%w: %s: non-minimal tag", ErrInvalid, it.what)
	}
	it.b = it.b[n:]
	if num <= it.last {
		return 0, 0, nil, 0, false, fmt.Errorf("%w: %s: field %d out of order", ErrInvalid, it.what, num)
	}
	it.last = num
	switch typ {
	case protowire.BytesType:
		v, n := protowire.ConsumeBytes(it.b)
		if n < 0 {
			return 0, 0, nil, 0, false, fmt.Errorf("%w: %s: %v", ErrInvalid, it.what, protowire.ParseError(n))
		}
		if n != protowire.SizeBytes(len(v)) || len(v) == 0 {
			// Canonical encodings omit empty bytes fields and use minimal lengths.
			return 0, 0, nil, 0, false, fmt.Errorf("%w: %s: non-canonical bytes field %d", ErrInvalid, it.what, num)
		}
		it.b = it.b[n:]
		return num, typ, v, 0, true, nil
	case protowire.VarintType:
		v, n := protowire.ConsumeVarint(it.b)
		if n < 0 {
			return 0, 0, nil, 0, false, fmt.Errorf("%w: %s: %v", ErrInvalid, it.what, protowire.ParseError(n))
		}
		if n != protowire.SizeVarint(v) || v == 0 {
			// Canonical encodings omit zero values and use minimal varints.
			return 0, 0, nil, 0, false, fmt.Errorf("%w: %s: non-canonical varint field %d", ErrInvalid, it.what, num)
		}
		it.b = it.b[n:]
		return num, typ, nil, v, true, nil
	default:
		return 0, 0, nil, 0, false, fmt.Errorf("%w: %s: unexpected wire type %d", ErrInvalid, it.what, typ)
	}
}

func wantType(what string, num protowire.Number, got, want protowire.Type) error {
	if got != want {
		return fmt.Errorf("%w: %s field %d: wrong wire type %d", ErrInvalid, what, num, got)
	}
	return nil
}

func decodeDigest(what string, v []byte) (digest.Digest, error) {
	d, err := digest.FromBytes(v)
	if err != nil {
		return d, fmt.Errorf("%w: %s: %v", ErrInvalid, what, err)
	}
	return d, nil
}

func decodeDirectoryEntry(b []byte) (DirectoryEntry, error) {
	var e DirectoryEntry
	it := fieldIter{b: b, what: "directory entry"}
	haveDigest := false
	for {
		num, typ, v, u, ok, err := it.next()
		if err != nil || !ok {
			if err == nil && !haveDigest {
				err = fmt.Errorf("%w: directory entry %q: missing digest", ErrInvalid, e.Name)
			}
			return e, err
		}
		switch num {
		case 1:
			err = wantType(it.what, num, typ, protowire.BytesType)
			e.Name = v
		case 2:
			if err = wantType(it.what, num, typ, protowire.BytesType); err == nil {
				e.Digest, err = decodeDigest(it.what, v)
				haveDigest = true
			}
		case 3:
			err = wantType(it.what, num, typ, protowire.VarintType)
			e.Size = u
		default:
			err = fmt.Errorf("%w: directory entry: unknown field %d", ErrInvalid, num)
		}
		if err != nil {
			return e, err
		}
	}
}

func decodeFileEntry(b []byte) (FileEntry, error) {
	var e FileEntry
	it := fieldIter{b: b, what: "file entry"}
	haveDigest := false
	for {
		num, typ, v, u, ok, err := it.next()
		if err != nil || !ok {
			if err == nil && !haveDigest {
				err = fmt.Errorf("%w: file entry %q: missing digest", ErrInvalid, e.Name)
			}
			return e, err
		}
		switch num {
		case 1:
			err = wantType(it.what, num, typ, protowire.BytesType)
			e.Name = v
		case 2:
			if err = wantType(it.what, num, typ, protowire.BytesType); err == nil {
				e.Digest, err = decodeDigest(it.what, v)
				haveDigest = true
			}
		case 3:
			err = wantType(it.what, num, typ, protowire.VarintType)
			e.Size = u
		case 4:
			if err = wantType(it.what, num, typ, protowire.VarintType); err == nil {
				if u > 1 {
					err = fmt.Errorf("%w: file entry: executable = %d", ErrInvalid, u)
				}
				e.Executable = u == 1
			}
		default:
			err = fmt.Errorf("%w: file entry: unknown field %d", ErrInvalid, num)
		}
		if err != nil {
			return e, err
		}
	}
}

func decodeSymlinkEntry(b []byte) (SymlinkEntry, error) {
	var e SymlinkEntry
	it := fieldIter{b: b, what: "symlink entry"}
	for {
		num, typ, v, _, ok, err := it.next()
		if err != nil || !ok {
			return e, err
		}
		switch num {
		case 1:
			err = wantType(it.what, num, typ, protowire.BytesType)
			e.Name = v
		case 2:
			err = wantType(it.what, num, typ, protowire.BytesType)
			e.Target = v
		default:
			err = fmt.Errorf("%w: symlink entry: unknown field %d", ErrInvalid, num)
		}
		if err != nil {
			return e, err
		}
	}
}
