package castore

import (
	"bytes"
	"fmt"
	"slices"

	"github.com/casnix/casnix/digest"
)

// Kind says which of the three node types a Node is.
type Kind uint8

// Node kinds. The numbers are stored in the database; never renumber them.
const (
	KindDirectory Kind = 1
	KindFile      Kind = 2
	KindSymlink   Kind = 3
)

func (k Kind) String() string {
	switch k {
	case KindDirectory:
		return "directory"
	case KindFile:
		return "file"
	case KindSymlink:
		return "symlink"
	}
	return fmt.Sprintf("kind(%d)", uint8(k))
}

// Node is an unnamed node: the root of a store path, or a child looked up by
// name. Digest and Size mean the same as in the entries; Target is set only
// for symlinks, Executable only for files.
type Node struct {
	Kind       Kind
	Digest     digest.Digest
	Size       uint64
	Executable bool
	Target     []byte
}

// Validate checks a node on its own.
func (n *Node) Validate() error {
	switch n.Kind {
	case KindDirectory:
		if n.Executable || len(n.Target) != 0 {
			return fmt.Errorf("%w: directory node with file or symlink fields", ErrInvalid)
		}
	case KindFile:
		if len(n.Target) != 0 {
			return fmt.Errorf("%w: file node with a symlink target", ErrInvalid)
		}
	case KindSymlink:
		if n.Executable || n.Size != 0 || n.Digest != (digest.Digest{}) {
			return fmt.Errorf("%w: symlink node with file fields", ErrInvalid)
		}
		return ValidateTarget(n.Target)
	default:
		return fmt.Errorf("%w: unknown node kind %d", ErrInvalid, n.Kind)
	}
	return nil
}

// Lookup finds the child called name in d.
func (d *Directory) Lookup(name []byte) (Node, bool) {
	if i, ok := search(len(d.Directories), func(i int) []byte { return d.Directories[i].Name }, name); ok {
		e := d.Directories[i]
		return Node{Kind: KindDirectory, Digest: e.Digest, Size: e.Size}, true
	}
	if i, ok := search(len(d.Files), func(i int) []byte { return d.Files[i].Name }, name); ok {
		e := d.Files[i]
		return Node{Kind: KindFile, Digest: e.Digest, Size: e.Size, Executable: e.Executable}, true
	}
	if i, ok := search(len(d.Symlinks), func(i int) []byte { return d.Symlinks[i].Name }, name); ok {
		return Node{Kind: KindSymlink, Target: d.Symlinks[i].Target}, true
	}
	return Node{}, false
}

func search(n int, at func(int) []byte, name []byte) (int, bool) {
	lo, hi := 0, n
	for lo < hi {
		m := int(uint(lo+hi) >> 1)
		if bytes.Compare(at(m), name) < 0 {
			lo = m + 1
		} else {
			hi = m
		}
	}
	return lo, lo < n && bytes.Equal(at(lo), name)
}

// NamedNode is a child of a directory with its name.
type NamedNode struct {
	Name []byte
	Node
}

// Entries returns all children merged into one list sorted by name, the
// order a NAR lists them in.
func (d *Directory) Entries() []NamedNode {
	out := make([]NamedNode, 0, len(d.Directories)+len(d.Files)+len(d.Symlinks))
	for _, e := range d.Directories {
		out = append(out, NamedNode{e.Name, Node{Kind: KindDirectory, Digest: e.Digest, Size: e.Size}})
	}
	for _, e := range d.Files {
		out = append(out, NamedNode{e.Name, Node{Kind: KindFile, Digest: e.Digest, Size: e.Size, Executable: e.Executable}})
	}
	for _, e := range d.Symlinks {
		out = append(out, NamedNode{e.Name, Node{Kind: KindSymlink, Target: e.Target}})
	}
	slices.SortFunc(out, func(a, b NamedNode) int { return bytes.Compare(a.Name, b.Name) })
	return out
}

// Add appends a child, which must sort after every child already added (the
// order a NAR delivers them in). It checks the name and the order.
func (d *Directory) Add(name []byte, n Node) error {
	if err := ValidateName(name); err != nil {
		return err
	}
	if err := n.Validate(); err != nil {
		return fmt.Errorf("entry %q: %w", name, err)
	}
	if last := d.lastName(); last != nil && bytes.Compare(last, name) >= 0 {
		return fmt.Errorf("%w: entry %q does not sort after %q (unsorted or duplicate)", ErrInvalid, name, last)
	}
	switch n.Kind {
	case KindDirectory:
		d.Directories = append(d.Directories, DirectoryEntry{Name: name, Digest: n.Digest, Size: n.Size})
	case KindFile:
		d.Files = append(d.Files, FileEntry{Name: name, Digest: n.Digest, Size: n.Size, Executable: n.Executable})
	case KindSymlink:
		d.Symlinks = append(d.Symlinks, SymlinkEntry{Name: name, Target: n.Target})
	}
	return nil
}

// lastName is the greatest name added so far.
func (d *Directory) lastName() []byte {
	var last []byte
	if n := len(d.Directories); n > 0 {
		last = d.Directories[n-1].Name
	}
	if n := len(d.Files); n > 0 && bytes.Compare(d.Files[n-1].Name, last) > 0 {
		last = d.Files[n-1].Name
	}
	if n := len(d.Symlinks); n > 0 && bytes.Compare(d.Symlinks[n-1].Name, last) > 0 {
		last = d.Symlinks[n-1].Name
	}
	return last
}
