package store

import (
	"context"
	"strings"
	"testing"
)

// TestPacksRemembered: the data dir records --packs at first use, later
// opens (read-only ones too) use it without the flag, and a different URL
// is refused. Opening a bucket makes no request, so no server is needed.
func TestPacksRemembered(t *testing.T) {
	t.Setenv("AWS_ACCESS_KEY_ID", "x")
	t.Setenv("AWS_SECRET_ACCESS_KEY", "y")
	t.Setenv("AWS_EC2_METADATA_DISABLED", "true")
	ctx := context.Background()
	dir := t.TempDir()
	const url = "s3://bkt/some/prefix?endpoint=http://127.0.0.1:1&region=us-east-1"
	canon := "s3://bkt/some/prefix?endpoint=http%3A%2F%2F127.0.0.1%3A1&region=us-east-1"

	// A local data dir first: no location.
	st, err := Open(ctx, dir, Options{})
	if err != nil {
		t.Fatal(err)
	}
	if st.Packs() != "" {
		t.Fatalf("local data dir has packs at %q", st.Packs())
	}
	st.Close()
	for _, tc := range []struct {
		name     string
		flag     string
		readOnly bool
		want     string
		err      string
	}{
		{"read-only open with a flag records it through a writable open", url, true, canon, ""},
		{"no flag uses the recorded URL", "", false, canon, ""},
		{"no flag, read-only", "", true, canon, ""},
		{"the same URL in another spelling", "s3://bkt/some/prefix/?region=us-east-1&endpoint=http://127.0.0.1:1", false, canon, ""},
		{"another prefix is refused", "s3://bkt/other?endpoint=http://127.0.0.1:1&region=us-east-1", false, "", "cannot change"},
		{"another endpoint is refused, read-only too", "s3://bkt/some/prefix?endpoint=http://127.0.0.1:2&region=us-east-1", true, "", "cannot change"},
		{"not a URL", "http://x", false, "", "not an s3:// URL"},
	} {
		t.Run(tc.name, func(t *testing.T) {
			st, err := Open(ctx, dir, Options{Packs: tc.flag, ReadOnly: tc.readOnly})
			if tc.err != "" {
				if err == nil || !strings.Contains(err.Error(), tc.err) {
					if err == nil {
						st.Close()
					}
					t.Fatalf("Open: %v, want an error with %q", err, tc.err)
				}
				return
			}
			if err != nil {
				t.Fatal(err)
			}
			defer st.Close()
			if st.Packs() != tc.want {
				t.Fatalf("packs at %q, want %q", st.Packs(), tc.want)
			}
		})
	}
}
