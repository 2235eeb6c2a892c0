package proto

import (
	"bufio"
	"fmt"
	"io"
	"net"
	"time"

	"github.com/casnix/casnix/nar"
)

// Client is a minimal worker-protocol client: enough for load tests and
// benchmarks to drive casnix and a real nix-daemon the same way. It is not
// safe for concurrent use; open one per goroutine.
type Client struct {
	c     net.Conn
	r     wireReader
	w     wireWriter
	Minor uint64
	// DaemonVersion and Trusted are what the handshake reported.
	DaemonVersion string
	Trusted       uint64
}

// PathInfo is a QueryPathInfo answer.
type PathInfo struct {
	Deriver          string
	NarHash          string
	References       []string
	RegistrationTime uint64
	NarSize          uint64
	Ultimate         bool
	Sigs             []string
	CA               string
}

// Dial connects to a daemon socket and completes the handshake and
// SetOptions as protocol 1.38.
func Dial(socket string) (*Client, error) {
	c, err := net.DialTimeout("unix", socket, 10*time.Second)
	if err != nil {
		return nil, err
	}
	cl := &Client{c: c, r: wireReader{r: bufio.NewReaderSize(c, 64<<10)}, w: wireWriter{w: bufio.NewWriterSize(c, 64<<10)}}
	if err := cl.handshake(); err != nil {
		c.Close()
		return nil, fmt.Errorf("handshake with %s: %w", socket, err)
	}
	return cl, nil
}

// Close closes the connection.
func (cl *Client) Close() error { return cl.c.Close() }

func (cl *Client) handshake() error {
	cl.w.u64(workerMagic1)
	if err := cl.w.flush(); err != nil {
		return err
	}
	if m, err := cl.r.u64(); err != nil || m != workerMagic2 {
		return fmt.Errorf("bad server magic %#x: %v", m, err)
	}
	sv, err := cl.r.u64()
	if err != nil {
		return err
	}
	cl.Minor = min(sv&0xff, ServerMinor)
	cl.w.u64(1<<8 | ServerMinor)
	if cl.Minor >= 38 {
		cl.w.strings(nil)
		if err := cl.w.flush(); err != nil {
			return err
		}
		if _, err := cl.r.strings(maxPath); err != nil {
			return err
		}
	}
	cl.w.u64(0) // cpu affinity
	cl.w.u64(0) // reserve space
	if err := cl.w.flush(); err != nil {
		return err
	}
	if cl.Minor >= 33 {
		if cl.DaemonVersion, err = cl.r.str(maxPath); err != nil {
			return err
		}
	}
	if cl.Minor >= 35 {
		if cl.Trusted, err = cl.r.u64(); err != nil {
			return err
		}
	}
	if err := cl.result(); err != nil {
		return err
	}
	cl.w.u64(opSetOptions)
	for i := 0; i < 12; i++ {
		cl.w.u64(0)
	}
	cl.w.u64(0)
	return cl.result()
}

// RemoteError is an error the daemon reported.
type RemoteError struct{ Msg string }

func (e *RemoteError) Error() string { return e.Msg }

// result flushes the request and reads the stderr channel up to LAST.
func (cl *Client) result() error {
	if err := cl.w.flush(); err != nil {
		return err
	}
	for {
		code, err := cl.r.u64()
		if err != nil {
			return err
		}
		switch code {
		case stderrLast:
			return nil
		case stderrNext:
			if _, err := cl.r.str(maxString); err != nil {
				return err
			}
		case stderrError:
			return cl.readError()
		case 0x53545254: // START_ACTIVITY: id, level, type, text, fields, parent
			if err := cl.skipActivity(true); err != nil {
				return err
			}
		case 0x53544f50: // STOP_ACTIVITY: id
			if _, err := cl.r.u64(); err != nil {
				return err
			}
		case 0x52534c54: // RESULT: id, type, fields
			if err := cl.skipActivity(false); err != nil {
				return err
			}
		default:
			return fmt.Errorf("%w: unexpected stderr message %#x", errProtocol, code)
		}
	}
}

func (cl *Client) skipActivity(start bool) error {
	n := 2
	if start {
		n = 3
	}
	for i := 0; i < n; i++ {
		if _, err := cl.r.u64(); err != nil {
			return err
		}
	}
	if start {
		if _, err := cl.r.str(maxString); err != nil {
			return err
		}
	}
	nf, err := cl.r.u64()
	if err != nil {
		return err
	}
	for i := uint64(0); i < nf; i++ {
		typ, err := cl.r.u64()
		if err != nil {
			return err
		}
		if typ == 0 {
			_, err = cl.r.u64()
		} else {
			_, err = cl.r.str(maxString)
		}
		if err != nil {
			return err
		}
	}
	if start {
		_, err = cl.r.u64() // parent
	}
	return err
}

func (cl *Client) readError() error {
	if _, err := cl.r.str(maxPath); err != nil { // "Error"
		return err
	}
	if _, err := cl.r.u64(); err != nil { // level
		return err
	}
	if _, err := cl.r.str(maxPath); err != nil { // name
		return err
	}
	msg, err := cl.r.str(maxString)
	if err != nil {
		return err
	}
	if _, err := cl.r.u64(); err != nil { // havePos
		return err
	}
	n, err := cl.r.u64()
	if err != nil {
		return err
	}
	for i := uint64(0); i < n; i++ {
		if _, err := cl.r.u64(); err != nil {
			return err
		}
		if _, err := cl.r.str(maxString); err != nil {
			return err
		}
	}
	return &RemoteError{msg}
}

// IsValidPath asks whether a full store path is valid.
func (cl *Client) IsValidPath(path string) (bool, error) {
	cl.w.u64(opIsValidPath)
	cl.w.str(path)
	if err := cl.result(); err != nil {
		return false, err
	}
	return cl.r.boolean()
}

// QueryPathInfo returns a path's info, or nil if it is not valid.
func (cl *Client) QueryPathInfo(path string) (*PathInfo, error) {
	cl.w.u64(opQueryPathInfo)
	cl.w.str(path)
	if err := cl.result(); err != nil {
		return nil, err
	}
	valid, err := cl.r.boolean()
	if err != nil || !valid {
		return nil, err
	}
	pi := &PathInfo{}
	if pi.Deriver, err = cl.r.str(maxPath); err != nil {
		return nil, err
	}
	if pi.NarHash, err = cl.r.str(maxPath); err != nil {
		return nil, err
	}
	if pi.References, err = cl.r.strings(maxPath); err != nil {
		return nil, err
	}
	if pi.RegistrationTime, err = cl.r.u64(); err != nil {
		return nil, err
	}
	if pi.NarSize, err = cl.r.u64(); err != nil {
		return nil, err
	}
	if pi.Ultimate, err = cl.r.boolean(); err != nil {
		return nil, err
	}
	if pi.Sigs, err = cl.r.strings(maxString); err != nil {
		return nil, err
	}
	if pi.CA, err = cl.r.str(maxString); err != nil {
		return nil, err
	}
	return pi, nil
}

// QueryValidPaths returns the valid subset of paths.
func (cl *Client) QueryValidPaths(paths []string) ([]string, error) {
	cl.w.u64(opQueryValidPaths)
	cl.w.strings(paths)
	cl.w.u64(0)
	if err := cl.result(); err != nil {
		return nil, err
	}
	return cl.r.strings(maxPath)
}

// QueryReferrers lists the paths that refer to path.
func (cl *Client) QueryReferrers(path string) ([]string, error) {
	cl.w.u64(opQueryReferrers)
	cl.w.str(path)
	if err := cl.result(); err != nil {
		return nil, err
	}
	return cl.r.strings(maxPath)
}

// QueryAllValidPaths lists every valid path.
func (cl *Client) QueryAllValidPaths() ([]string, error) {
	cl.w.u64(opQueryAllValidPaths)
	if err := cl.result(); err != nil {
		return nil, err
	}
	return cl.r.strings(maxPath)
}

// QueryPathFromHashPart finds a path by its 32-character hash part ("" if
// none).
func (cl *Client) QueryPathFromHashPart(hash string) (string, error) {
	cl.w.u64(opQueryPathFromHashPart)
	cl.w.str(hash)
	if err := cl.result(); err != nil {
		return "", err
	}
	return cl.r.str(maxPath)
}

// NarFromPath streams a path's NAR to w. The NAR is not framed, so it is
// parsed (and checked) to find its end.
func (cl *Client) NarFromPath(path string, w io.Writer) (int64, error) {
	cl.w.u64(opNarFromPath)
	cl.w.str(path)
	if err := cl.result(); err != nil {
		return 0, err
	}
	return nar.Copy(w, cl.r.r)
}

// AddInfo is what AddToStoreNar sends about a path: full store paths, the
// NAR hash in base16.
type AddInfo struct {
	Path, Deriver, NarHash string
	References, Sigs       []string
	NarSize                uint64
	CA                     string
	DontCheckSigs          bool
}

// AddToStoreNar uploads one path's NAR (read from nar, exactly NarSize
// bytes) as a framed stream. A nil error means the daemon acknowledged
// the path: it is valid and durable.
func (cl *Client) AddToStoreNar(info AddInfo, nar io.Reader) error {
	if cl.Minor < 23 {
		return fmt.Errorf("AddToStoreNar needs protocol 1.23, have 1.%d", cl.Minor)
	}
	cl.w.u64(opAddToStoreNar)
	cl.w.str(info.Path)
	cl.w.str(info.Deriver)
	cl.w.str(info.NarHash)
	cl.w.strings(info.References)
	cl.w.u64(uint64(time.Now().Unix()))
	cl.w.u64(info.NarSize)
	cl.w.u64(0) // ultimate
	cl.w.strings(info.Sigs)
	cl.w.str(info.CA)
	cl.w.u64(0) // repair
	cl.w.boolean(info.DontCheckSigs)
	buf := make([]byte, 256<<10)
	for {
		n, err := nar.Read(buf)
		if n > 0 {
			cl.w.u64(uint64(n))
			cl.w.w.Write(buf[:n])
		}
		if err == io.EOF {
			break
		}
		if err != nil {
			return fmt.Errorf("read NAR of %s: %w", info.Path, err)
		}
	}
	cl.w.u64(0)
	return cl.result()
}
