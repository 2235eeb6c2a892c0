package proto

import (
	"bytes"
	"testing"
)

func TestClient(t *testing.T) {
	f := newFixture(t)
	cl, err := Dial(f.sock)
	if err != nil {
		t.Fatal(err)
	}
	defer cl.Close()
	if cl.DaemonVersion != "test" || cl.Minor != 38 {
		t.Fatalf("handshake: %q %d", cl.DaemonVersion, cl.Minor)
	}
	pi, err := cl.QueryPathInfo(full(testB))
	if err != nil || pi == nil || len(pi.References) != 2 {
		t.Fatalf("QueryPathInfo: %+v %v", pi, err)
	}
	if pi, err := cl.QueryPathInfo(full("33333333333333333333333333333333-x")); err != nil || pi != nil {
		t.Fatalf("missing path: %+v %v", pi, err)
	}
	var buf bytes.Buffer
	n, err := cl.NarFromPath(full(testA), &buf)
	if err != nil || n != int64(len(f.narA)) || !bytes.Equal(buf.Bytes(), f.narA) {
		t.Fatalf("NarFromPath: %d %v", n, err)
	}
	// The connection is in step after the NAR.
	if ok, err := cl.IsValidPath(full(testA)); err != nil || !ok {
		t.Fatalf("IsValidPath after NAR: %v %v", ok, err)
	}
	if _, err := cl.NarFromPath(full("33333333333333333333333333333333-x"), &buf); err == nil {
		t.Fatal("NarFromPath of a missing path succeeded")
	}
	all, err := cl.QueryAllValidPaths()
	if err != nil || len(all) != 2 {
		t.Fatalf("all: %v %v", all, err)
	}
}
