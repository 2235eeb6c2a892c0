package binarycache

import (
	"bytes"
	"crypto/sha256"
	"errors"
	"fmt"
	"io"
	"path"
	"strconv"
	"strings"

	"github.com/nix-community/go-nix/pkg/narinfo"
	"github.com/nix-community/go-nix/pkg/narinfo/signature"
	"github.com/nix-community/go-nix/pkg/nixhash"

	"github.com/casnix/casnix/store"
)

// ErrBadNarinfo marks a narinfo that cannot be used.
var ErrBadNarinfo = errors.New("bad narinfo")

// maxNarinfo caps how much of a narinfo is read: real ones are a few
// hundred bytes, the biggest (thousands of references) a few hundred KiB.
const maxNarinfo = 1 << 20

// Compressions a cache's NARs may use, with their file name extensions.
var extensions = map[string]string{"none": "", "xz": ".xz", "zstd": ".zst", "bzip2": ".bz2"}

// Info is a validated narinfo with store paths as basenames.
type Info struct {
	Name        string // basename of StorePath
	URL         string // relative to the cache root
	Compression string // none, xz, zstd or bzip2
	FileHash    []byte // SHA-256 of the file at URL, nil when not given
	FileSize    int64  // 0 when not given
	NarHash     [sha256.Size]byte
	NarSize     int64
	References  []string
	Deriver     string
	Sigs        []string
	CA          string
}

// ParseNarinfo reads and validates a narinfo of a cache whose store
// directory is storeDir.
func ParseNarinfo(r io.Reader, storeDir string) (*Info, error) {
	data, err := io.ReadAll(io.LimitReader(r, maxNarinfo+1))
	if err != nil {
		return nil, fmt.Errorf("read narinfo: %w", err)
	}
	if len(data) > maxNarinfo {
		return nil, fmt.Errorf("%w: longer than %d bytes", ErrBadNarinfo, maxNarinfo)
	}
	n, err := parseNarinfoText(data)
	if err != nil {
		return nil, fmt.Errorf("%w: %v", ErrBadNarinfo, err)
	}
	return fromNarinfo(n, storeDir)
}

// parseNarinfoText parses a narinfo's lines as go-nix's narinfo.Parse does
// (the same keys, rules and errors; FuzzNarinfoText holds it to that), over
// bytes already read: narinfo.Parse gives its line scanner a fresh 1 MiB
// buffer per narinfo, which for a pull-through looking up every path of a
// closure was most of its allocation and garbage-collection work.
func parseNarinfoText(data []byte) (*narinfo.NarInfo, error) {
	n := &narinfo.NarInfo{}
	for len(data) > 0 {
		var line []byte
		if i := bytes.IndexByte(data, '\n'); i >= 0 {
			line, data = data[:i], data[i+1:]
		} else {
			line, data = data, nil
		}
		line = bytes.TrimSuffix(line, []byte{'\r'}) // as bufio.ScanLines
		if len(line) == 0 {
			continue
		}
		k, v, ok := strings.Cut(string(line), ": ")
		if !ok {
			return nil, fmt.Errorf("unable to find separator ': ' in %v", string(line))
		}
		// As go-nix's splitOnce: the separator may not occur again (its
		// search starts one byte into it).
		if strings.Contains(string(line)[len(k)+1:], ": ") {
			return nil, fmt.Errorf("found separator ': ' twice or more in %v", string(line))
		}
		var err error
		switch k {
		case "StorePath":
			n.StorePath = v
		case "URL":
			n.URL = v
		case "Compression":
			n.Compression = v
		case "FileHash":
			n.FileHash, err = nixhash.ParseAny(v, nil)
		case "FileSize":
			n.FileSize, err = strconv.ParseUint(v, 10, 0)
		case "NarHash":
			n.NarHash, err = nixhash.ParseAny(v, nil)
		case "NarSize":
			n.NarSize, err = strconv.ParseUint(v, 10, 0)
		case "References":
			if v != "" {
				n.References = append(n.References, strings.Split(v, " ")...)
			}
		case "Deriver":
			if v != "unknown-deriver" {
				n.Deriver = v
			}
		case "System":
			n.System = v
		case "Sig":
			var sig signature.Signature
			sig, err = signature.ParseSignature(v)
			if err == nil {
				n.Signatures = append(n.Signatures, sig)
			}
		case "CA":
			n.CA = v
		default:
			return nil, fmt.Errorf("unknown key %v", k)
		}
		if err != nil {
			return nil, fmt.Errorf("%s: %w", k, err)
		}
	}
	if n.Compression == "" {
		n.Compression = "bzip2" // as Nix: a narinfo without one is bzip2's
	}
	return n, nil
}

func fromNarinfo(n *narinfo.NarInfo, storeDir string) (*Info, error) {
	bad := func(format string, args ...any) error {
		return fmt.Errorf("%w: %s: %s", ErrBadNarinfo, n.StorePath, fmt.Sprintf(format, args...))
	}
	if n.StorePath == "" {
		return nil, fmt.Errorf("%w: no StorePath", ErrBadNarinfo)
	}
	if !strings.HasPrefix(n.StorePath, strings.TrimSuffix(storeDir, "/")+"/") {
		return nil, fmt.Errorf("%w: StorePath %q is outside the store directory %s", ErrBadNarinfo, n.StorePath, storeDir)
	}
	name, err := store.ParseName(storeDir, n.StorePath)
	if err != nil {
		return nil, fmt.Errorf("%w: StorePath: %v", ErrBadNarinfo, err)
	}
	in := &Info{Name: name, Compression: n.Compression, CA: n.CA}
	if _, ok := extensions[in.Compression]; !ok {
		return nil, bad("unsupported compression %q", in.Compression)
	}
	// URL is fetched relative to the cache: nothing absolute, nothing
	// climbing out of it, nothing a URL parser would read differently.
	u := n.URL
	if u == "" || strings.HasPrefix(u, "/") || strings.ContainsAny(u, "?#\\\x00") || strings.Contains(u, "://") ||
		path.Clean(u) != u || u == "." || strings.HasPrefix(u, "../") || u == ".." {
		return nil, bad("URL %q is not a plain relative path", u)
	}
	in.URL = u
	if n.NarHash == nil {
		return nil, bad("no NarHash")
	}
	if n.NarHash.Algo() != nixhash.SHA256 || len(n.NarHash.Digest()) != sha256.Size {
		return nil, bad("NarHash is not SHA-256")
	}
	copy(in.NarHash[:], n.NarHash.Digest())
	if n.NarSize == 0 || n.NarSize > 1<<50 {
		return nil, bad("NarSize %d out of range", n.NarSize)
	}
	in.NarSize = int64(n.NarSize)
	if n.FileHash != nil {
		if n.FileHash.Algo() != nixhash.SHA256 || len(n.FileHash.Digest()) != sha256.Size {
			return nil, bad("FileHash is not SHA-256")
		}
		in.FileHash = n.FileHash.Digest()
	}
	if n.FileSize > 1<<50 {
		return nil, bad("FileSize %d out of range", n.FileSize)
	}
	in.FileSize = int64(n.FileSize)
	// FileSize is not covered by the signature, and a download is capped at it: bound it
	// by what any compression of the signed NarSize could make, so that an upstream cannot
	// have a fetch write more than that before the NAR's check refuses it.
	if in.FileSize > maxFileSize(in.NarSize) {
		return nil, bad("FileSize %d is more than any compression of NarSize %d makes", in.FileSize, in.NarSize)
	}
	if in.Compression == "none" {
		if in.FileSize != 0 && in.FileSize != in.NarSize {
			return nil, bad("uncompressed but FileSize %d differs from NarSize %d", in.FileSize, in.NarSize)
		}
		if in.FileHash != nil && !bytes.Equal(in.FileHash, in.NarHash[:]) {
			return nil, bad("uncompressed but FileHash differs from NarHash")
		}
	}
	for _, r := range n.References {
		if err := store.ValidateName(r); err != nil {
			return nil, bad("reference: %v", err)
		}
		in.References = append(in.References, r)
	}
	if n.Deriver != "" {
		if err := store.ValidateName(n.Deriver); err != nil {
			return nil, bad("deriver: %v", err)
		}
		in.Deriver = n.Deriver
	}
	for _, s := range n.Signatures {
		in.Sigs = append(in.Sigs, s.String())
	}
	return in, nil
}

// PathInfo is what the store records for the path.
func (in *Info) PathInfo() store.PathInfo {
	return store.PathInfo{
		Name: in.Name, NarHash: in.NarHash, NarSize: in.NarSize, References: in.References,
		Deriver: in.Deriver, Sigs: in.Sigs, CA: in.CA,
	}
}

// InfoFrom describes a store path for a narinfo; URL and file fields are
// the caller's.
func InfoFrom(pi *store.PathInfo) *Info {
	return &Info{
		Name: pi.Name, NarHash: pi.NarHash, NarSize: pi.NarSize, References: pi.References,
		Deriver: pi.Deriver, Sigs: pi.Sigs, CA: pi.CA,
	}
}

// Format renders the narinfo as Nix writes it.
func (in *Info) Format(storeDir string) []byte {
	var b bytes.Buffer
	b.WriteString("StorePath: " + storeDir + "/" + in.Name + "\n")
	b.WriteString("URL: " + in.URL + "\n")
	b.WriteString("Compression: " + in.Compression + "\n")
	if in.FileHash != nil && in.FileSize != 0 {
		b.WriteString("FileHash: sha256:" + store.NixBase32(in.FileHash) + "\n")
		b.WriteString("FileSize: " + strconv.FormatInt(in.FileSize, 10) + "\n")
	}
	b.WriteString("NarHash: sha256:" + store.NixBase32(in.NarHash[:]) + "\n")
	b.WriteString("NarSize: " + strconv.FormatInt(in.NarSize, 10) + "\n")
	b.WriteString("References: " + strings.Join(in.References, " ") + "\n")
	if in.Deriver != "" {
		b.WriteString("Deriver: " + in.Deriver + "\n")
	}
	for _, s := range in.Sigs {
		b.WriteString("Sig: " + s + "\n")
	}
	if in.CA != "" {
		b.WriteString("CA: " + in.CA + "\n")
	}
	return b.Bytes()
}
