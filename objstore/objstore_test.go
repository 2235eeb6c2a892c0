package objstore_test

import (
	"bytes"
	"context"
	"errors"
	"io"
	"math/rand/v2"
	"net/http"
	"strings"
	"testing"

	"github.com/casnix/casnix/objstore"
	"github.com/casnix/casnix/tests/nixtest"
)

func TestParseURL(t *testing.T) {
	for _, tc := range []struct {
		in   string
		want objstore.Location
		err  string
	}{
		{in: "s3://b", want: objstore.Location{Bucket: "b"}},
		{in: "s3://b/p/q/", want: objstore.Location{Bucket: "b", Prefix: "p/q"}},
		{in: "s3://b/p?region=eu-west-1", want: objstore.Location{Bucket: "b", Prefix: "p", Region: "eu-west-1"}},
		{in: "s3://b/p?endpoint=http://127.0.0.1:8333", want: objstore.Location{Bucket: "b", Prefix: "p", Endpoint: "http://127.0.0.1:8333", PathStyle: true}},
		{in: "s3://b?endpoint=https://x.r2.example&path-style=false", want: objstore.Location{Bucket: "b", Endpoint: "https://x.r2.example"}},
		{in: "http://b/p", err: "not an s3:// URL"},
		{in: "s3:///p", err: "no bucket"},
		{in: "s3://b?endpoint=ftp://x", err: "not an http(s) URL"},
		{in: "s3://b?endpoint=127.0.0.1:8333", err: "not an http(s) URL"},
		{in: "s3://b?path-style=maybe", err: "path-style"},
		{in: "s3://b?bucket=x", err: "unknown parameter"},
	} {
		t.Run(tc.in, func(t *testing.T) {
			got, err := objstore.ParseURL(tc.in)
			if tc.err != "" {
				if err == nil || !strings.Contains(err.Error(), tc.err) {
					t.Fatalf("ParseURL(%q) = %+v, %v; want error with %q", tc.in, got, err, tc.err)
				}
				return
			}
			if err != nil || got != tc.want {
				t.Fatalf("ParseURL(%q) = %+v, %v; want %+v", tc.in, got, err, tc.want)
			}
			again, err := objstore.ParseURL(got.String())
			if err != nil || again != got {
				t.Fatalf("round trip of %q through %q = %+v, %v", tc.in, got.String(), again, err)
			}
		})
	}
}

func FuzzParseURL(f *testing.F) {
	f.Add("s3://b/p?endpoint=http://127.0.0.1:8333&region=x&path-style=true")
	f.Add("s3://b")
	f.Fuzz(func(t *testing.T, s string) {
		l, err := objstore.ParseURL(s)
		if err != nil {
			return
		}
		if l.Bucket == "" {
			t.Fatalf("%q: parsed without a bucket", s)
		}
		again, err := objstore.ParseURL(l.String())
		if err != nil || again != l {
			t.Fatalf("%q: round trip through %q = %+v, %v; want %+v", s, l.String(), again, err, l)
		}
	})
}

// TestBucket runs every operation against a real S3 server (SeaweedFS on loopback).
func TestBucket(t *testing.T) {
	srv := nixtest.StartS3(t)
	srv.SetEnv(t)
	ctx := context.Background()
	loc, err := objstore.ParseURL(srv.URL("t/x"))
	if err != nil {
		t.Fatal(err)
	}
	b, err := objstore.Open(ctx, loc, objstore.Options{PartSize: 5 << 20})
	if err != nil {
		t.Fatal(err)
	}
	small := []byte("hello, bucket")
	big := make([]byte, 12<<20+123) // three parts
	r := rand.New(rand.NewPCG(1, 2))
	for i := range big {
		big[i] = byte(r.Uint32())
	}
	if err := b.Put(ctx, "a/small", bytes.NewReader(small), int64(len(small))); err != nil {
		t.Fatal(err)
	}
	if err := b.Put(ctx, "a/big", bytes.NewReader(big), int64(len(big))); err != nil {
		t.Fatal(err)
	}
	if got := read(t)(b.Get(ctx, "a/big")); !bytes.Equal(got, big) {
		t.Fatalf("multipart object read back %d bytes, differing from the %d put", len(got), len(big))
	}
	if got := read(t)(b.GetRange(ctx, "a/big", 5<<20-3, 10)); !bytes.Equal(got, big[5<<20-3:5<<20+7]) {
		t.Fatalf("range across a part boundary: %x", got)
	}
	info, err := b.Head(ctx, "a/small")
	if err != nil || info.Size != int64(len(small)) {
		t.Fatalf("Head = %+v, %v", info, err)
	}
	if _, err := b.Head(ctx, "a/none"); !errors.Is(err, objstore.ErrNotFound) {
		t.Fatalf("Head of a missing key: %v, want ErrNotFound", err)
	}
	if _, err := b.Get(ctx, "a/none"); !errors.Is(err, objstore.ErrNotFound) {
		t.Fatalf("Get of a missing key: %v, want ErrNotFound", err)
	}
	if err := b.PutIfAbsent(ctx, "lease", []byte("one")); err != nil {
		t.Fatal(err)
	}
	if err := b.PutIfAbsent(ctx, "lease", []byte("two")); !errors.Is(err, objstore.ErrExists) {
		t.Fatalf("second PutIfAbsent: %v, want ErrExists", err)
	}
	if got := read(t)(b.Get(ctx, "lease")); string(got) != "one" {
		t.Fatalf("lease holds %q after a refused second write", got)
	}
	var names []string
	if err := b.List(ctx, "a/", func(i objstore.Info) error { names = append(names, i.Name); return nil }); err != nil {
		t.Fatal(err)
	}
	if strings.Join(names, ",") != "a/big,a/small" {
		t.Fatalf("List = %v", names)
	}
	if err := b.Delete(ctx, "a/small", "a/big", "a/never"); err != nil {
		t.Fatal(err)
	}
	names = nil
	if err := b.List(ctx, "a/", func(i objstore.Info) error { names = append(names, i.Name); return nil }); err != nil || len(names) != 0 {
		t.Fatalf("List after Delete = %v, %v", names, err)
	}
	// A caller's own HTTP client works beside AWS_CA_BUNDLE (which the SDK applies to
	// the configuration's client only).
	t.Setenv("AWS_CA_BUNDLE", "/etc/ssl/certs/ca-certificates.crt")
	hb, err := objstore.Open(ctx, loc, objstore.Options{HTTPClient: &http.Client{}})
	if err != nil {
		t.Fatal(err)
	}
	if _, err := hb.Head(ctx, "lease"); err != nil {
		t.Fatalf("with a caller's HTTP client and AWS_CA_BUNDLE: %v", err)
	}
	st := b.Stats()
	if st.Puts.Load() < 5 || st.BytesSent.Load() < int64(len(big)) || st.BytesReceived.Load() < int64(len(big)) || st.Requests.Load() < 10 {
		t.Fatalf("stats: puts %d sent %d received %d requests %d", st.Puts.Load(), st.BytesSent.Load(), st.BytesReceived.Load(), st.Requests.Load())
	}
}

// read returns a function that reads all of what a Get returned, failing t on an error.
func read(t *testing.T) func(io.ReadCloser, error) []byte {
	return func(rc io.ReadCloser, err error) []byte {
		t.Helper()
		if err != nil {
			t.Fatal(err)
		}
		defer rc.Close()
		b, err := io.ReadAll(rc)
		if err != nil {
			t.Fatal(err)
		}
		return b
	}
}
