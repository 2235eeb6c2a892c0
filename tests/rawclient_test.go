package tests

import (
	"bufio"
	"encoding/binary"
	"errors"
	"fmt"
	"io"
	"net"
	"time"
)

// rawConn speaks the worker protocol (1.38) byte by byte, so a test can send what no
// well-behaved client would: announced lengths with nothing behind them, half an op, an
// op whose answer it never reads. proto.Client stays the polite client; this one is the
// hostile one, and it also reaches the ops proto.Client does not have.
type rawConn struct {
	c     net.Conn
	r     *bufio.Reader
	w     *bufio.Writer
	minor uint64
}

// Worker-protocol constants, as Nix's worker-protocol.hh defines them.
const (
	rawMagic1 = 0x6e697863
	rawMagic2 = 0x6478696f

	rawStderrNext   = 0x6f6c6d67
	rawStderrRead   = 0x64617461
	rawStderrWrite  = 0x64617416
	rawStderrLast   = 0x616c7473
	rawStderrError  = 0x63787470
	rawStderrStart  = 0x53545254
	rawStderrStop   = 0x53544f50
	rawStderrResult = 0x52534c54

	rawOpAddTempRoot          = 11
	rawOpAddTextToStore       = 8
	rawOpAddIndirectRoot      = 12
	rawOpSetOptions           = 19
	rawOpCollectGarbage       = 20
	rawOpQueryValidPaths      = 31
	rawOpQueryValidDerivers   = 33
	rawOpVerifyStore          = 35
	rawOpNarFromPath          = 38
	rawOpAddToStoreNar        = 39
	rawOpQueryDrvOutputMap    = 41
	rawOpRegisterDrvOutput    = 42
	rawOpQueryRealisation     = 43
	rawOpAddMultipleToStore   = 44
	rawOpAddPermRoot          = 47
	rawMaxAnswer              = 16 << 20
	rawGCReturnDead           = 1
	rawGCDeleteDead           = 2
	rawGCDeleteSpecific       = 3
	rawDialTimeout            = 10 * time.Second
	rawDefaultOpAnswerTimeout = 2 * time.Minute
)

// errRawRemote is an error the daemon sent on its stderr channel.
type errRawRemote struct{ msg string }

func (e *errRawRemote) Error() string { return "daemon: " + e.msg }

// isRemote reports whether err is an error the daemon reported (the connection is then
// still in step, unless the daemon also closed it).
func isRemote(err error) bool {
	var re *errRawRemote
	return errors.As(err, &re)
}

// rawDial connects and completes the handshake and SetOptions. A daemon that refuses the
// connection in the handshake (allowed-users, connection limits) gives an *errRawRemote.
func rawDial(socket string) (*rawConn, error) {
	c, err := net.DialTimeout("unix", socket, rawDialTimeout)
	if err != nil {
		return nil, err
	}
	rc := &rawConn{c: c, r: bufio.NewReaderSize(c, 64<<10), w: bufio.NewWriterSize(c, 64<<10)}
	if err := rc.handshake(); err != nil {
		c.Close()
		return nil, err
	}
	return rc, nil
}

func (rc *rawConn) Close() error { return rc.c.Close() }

func (rc *rawConn) handshake() error {
	rc.c.SetDeadline(time.Now().Add(30 * time.Second))
	defer rc.c.SetDeadline(time.Time{})
	rc.u64(rawMagic1)
	if err := rc.flush(); err != nil {
		return err
	}
	if m, err := rc.readU64(); err != nil || m != rawMagic2 {
		return fmt.Errorf("server magic %#x: %v", m, err)
	}
	sv, err := rc.readU64()
	if err != nil {
		return err
	}
	rc.minor = min(sv&0xff, 38)
	rc.u64(1<<8 | 38)
	if rc.minor >= 38 {
		rc.strs(nil)
		if err := rc.flush(); err != nil {
			return err
		}
		if _, err := rc.readStrs(); err != nil {
			return err
		}
	}
	rc.u64(0) // cpu affinity
	rc.u64(0) // reserve space
	if err := rc.flush(); err != nil {
		return err
	}
	if rc.minor >= 33 {
		if _, err := rc.readStr(); err != nil {
			return err
		}
	}
	if rc.minor >= 35 {
		if _, err := rc.readU64(); err != nil {
			return err
		}
	}
	if err := rc.result(); err != nil {
		return err
	}
	rc.u64(rawOpSetOptions)
	for range 12 {
		rc.u64(0)
	}
	rc.u64(0) // no overrides
	return rc.result()
}

func (rc *rawConn) u64(v uint64) {
	var b [8]byte
	binary.LittleEndian.PutUint64(b[:], v)
	rc.w.Write(b[:])
}

func (rc *rawConn) boolean(v bool) {
	if v {
		rc.u64(1)
	} else {
		rc.u64(0)
	}
}

func (rc *rawConn) str(s string) {
	rc.u64(uint64(len(s)))
	rc.w.WriteString(s)
	rc.w.Write(make([]byte, (8-len(s)%8)%8))
}

func (rc *rawConn) strs(ss []string) {
	rc.u64(uint64(len(ss)))
	for _, s := range ss {
		rc.str(s)
	}
}

func (rc *rawConn) flush() error { return rc.w.Flush() }

func (rc *rawConn) readU64() (uint64, error) {
	var b [8]byte
	if _, err := io.ReadFull(rc.r, b[:]); err != nil {
		return 0, err
	}
	return binary.LittleEndian.Uint64(b[:]), nil
}

func (rc *rawConn) readStr() (string, error) {
	n, err := rc.readU64()
	if err != nil {
		return "", err
	}
	if n > rawMaxAnswer {
		return "", fmt.Errorf("daemon sent a string of %d bytes", n)
	}
	b := make([]byte, n+(8-n%8)%8)
	if _, err := io.ReadFull(rc.r, b); err != nil {
		return "", err
	}
	return string(b[:n]), nil
}

func (rc *rawConn) readStrs() ([]string, error) {
	n, err := rc.readU64()
	if err != nil {
		return nil, err
	}
	if n > rawMaxAnswer {
		return nil, fmt.Errorf("daemon sent a list of %d strings", n)
	}
	var out []string
	for range n {
		s, err := rc.readStr()
		if err != nil {
			return nil, err
		}
		out = append(out, s)
	}
	return out, nil
}

// result flushes the request and reads the stderr channel up to LAST (nil) or ERROR
// (*errRawRemote); log lines, activities and data pulls (STDERR_READ) are skipped.
func (rc *rawConn) result() error {
	if err := rc.flush(); err != nil {
		return err
	}
	for {
		code, err := rc.readU64()
		if err != nil {
			return err
		}
		switch code {
		case rawStderrLast:
			return nil
		case rawStderrNext:
			if _, err := rc.readStr(); err != nil {
				return err
			}
		case rawStderrRead:
			// A pull of upload data (protocol < 1.23): a caller that uses this
			// form has sent the answers ahead.
			if _, err := rc.readU64(); err != nil {
				return err
			}
		case rawStderrError:
			return rc.readError()
		case rawStderrStart:
			for range 3 { // id, level, type
				if _, err := rc.readU64(); err != nil {
					return err
				}
			}
			if _, err := rc.readStr(); err != nil {
				return err
			}
			if err := rc.skipFields(); err != nil {
				return err
			}
			if _, err := rc.readU64(); err != nil { // parent
				return err
			}
		case rawStderrStop:
			if _, err := rc.readU64(); err != nil {
				return err
			}
		case rawStderrResult:
			for range 2 { // id, type
				if _, err := rc.readU64(); err != nil {
					return err
				}
			}
			if err := rc.skipFields(); err != nil {
				return err
			}
		default:
			return fmt.Errorf("unexpected stderr code %#x", code)
		}
	}
}

func (rc *rawConn) skipFields() error {
	n, err := rc.readU64()
	if err != nil {
		return err
	}
	for range n {
		typ, err := rc.readU64()
		if err != nil {
			return err
		}
		if typ == 0 {
			_, err = rc.readU64()
		} else {
			_, err = rc.readStr()
		}
		if err != nil {
			return err
		}
	}
	return nil
}

func (rc *rawConn) readError() error {
	if rc.minor < 26 {
		msg, err := rc.readStr()
		if err != nil {
			return err
		}
		if _, err := rc.readU64(); err != nil {
			return err
		}
		return &errRawRemote{msg}
	}
	if _, err := rc.readStr(); err != nil { // "Error"
		return err
	}
	if _, err := rc.readU64(); err != nil { // level
		return err
	}
	if _, err := rc.readStr(); err != nil { // name
		return err
	}
	msg, err := rc.readStr()
	if err != nil {
		return err
	}
	if _, err := rc.readU64(); err != nil { // position
		return err
	}
	traces, err := rc.readU64()
	if err != nil {
		return err
	}
	for range min(traces, 1024) {
		if _, err := rc.readU64(); err != nil {
			return err
		}
		if _, err := rc.readStr(); err != nil {
			return err
		}
	}
	return &errRawRemote{msg}
}

// answer bounds the time the daemon may take to answer the op just sent.
func (rc *rawConn) answer(d time.Duration) func() {
	rc.c.SetReadDeadline(time.Now().Add(d))
	return func() { rc.c.SetReadDeadline(time.Time{}) }
}

func (rc *rawConn) addTextToStore(name, text string, refs []string) (string, error) {
	rc.u64(rawOpAddTextToStore)
	rc.str(name)
	rc.str(text)
	rc.strs(refs)
	if err := rc.result(); err != nil {
		return "", err
	}
	return rc.readStr()
}

func (rc *rawConn) unitOp(op uint64, path string) error {
	rc.u64(op)
	rc.str(path)
	if err := rc.result(); err != nil {
		return err
	}
	_, err := rc.readU64()
	return err
}

func (rc *rawConn) addIndirectRoot(path string) error { return rc.unitOp(rawOpAddIndirectRoot, path) }
func (rc *rawConn) addTempRoot(path string) error     { return rc.unitOp(rawOpAddTempRoot, path) }

func (rc *rawConn) addPermRoot(path, gcRoot string) (string, error) {
	rc.u64(rawOpAddPermRoot)
	rc.str(path)
	rc.str(gcRoot)
	if err := rc.result(); err != nil {
		return "", err
	}
	return rc.readStr()
}

// collectGarbage runs a CollectGarbage op and returns the paths it reported.
func (rc *rawConn) collectGarbage(action uint64, paths []string) ([]string, error) {
	rc.u64(rawOpCollectGarbage)
	rc.u64(action)
	rc.strs(paths)
	rc.boolean(false) // ignore liveness
	rc.u64(0)         // max freed: no limit
	for range 3 {
		rc.u64(0)
	}
	if err := rc.result(); err != nil {
		return nil, err
	}
	out, err := rc.readStrs()
	if err != nil {
		return nil, err
	}
	if _, err := rc.readU64(); err != nil { // bytes freed
		return nil, err
	}
	_, err = rc.readU64() // obsolete
	return out, err
}

func (rc *rawConn) verifyStore(checkContents, repair bool) (bool, error) {
	rc.u64(rawOpVerifyStore)
	rc.boolean(checkContents)
	rc.boolean(repair)
	if err := rc.result(); err != nil {
		return false, err
	}
	v, err := rc.readU64()
	return v != 0, err
}

func (rc *rawConn) queryValidDerivers(path string) ([]string, error) {
	rc.u64(rawOpQueryValidDerivers)
	rc.str(path)
	if err := rc.result(); err != nil {
		return nil, err
	}
	return rc.readStrs()
}

func (rc *rawConn) queryDerivationOutputMap(drv string) (map[string]string, error) {
	rc.u64(rawOpQueryDrvOutputMap)
	rc.str(drv)
	if err := rc.result(); err != nil {
		return nil, err
	}
	n, err := rc.readU64()
	if err != nil {
		return nil, err
	}
	if n > rawMaxAnswer {
		return nil, fmt.Errorf("daemon sent %d outputs", n)
	}
	out := map[string]string{}
	for range n {
		k, err := rc.readStr()
		if err != nil {
			return nil, err
		}
		v, err := rc.readStr()
		if err != nil {
			return nil, err
		}
		out[k] = v
	}
	return out, nil
}

func (rc *rawConn) registerDrvOutput(realisationJSON string) error {
	rc.u64(rawOpRegisterDrvOutput)
	rc.str(realisationJSON)
	return rc.result()
}

func (rc *rawConn) queryRealisation(id string) ([]string, error) {
	rc.u64(rawOpQueryRealisation)
	rc.str(id)
	if err := rc.result(); err != nil {
		return nil, err
	}
	return rc.readStrs()
}
