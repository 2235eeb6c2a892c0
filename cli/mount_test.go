package cli

import (
	"os"
	"path/filepath"
	"testing"
)

// TestAllowOther: --allow-other is honoured as root, and for other users
// when fuse.conf has user_allow_other (what fusermount requires), not
// merely commented out or missing.
func TestAllowOther(t *testing.T) {
	dir := t.TempDir()
	conf := func(text string) string {
		p := filepath.Join(dir, "fuse.conf."+filepath.Base(t.Name())+text[:min(len(text), 3)])
		if err := os.WriteFile(p, []byte(text), 0o644); err != nil {
			t.Fatal(err)
		}
		return p
	}
	cases := []struct {
		name      string
		requested bool
		euid      int
		conf      string
		want      bool
	}{
		{"root", true, 0, filepath.Join(dir, "missing"), true},
		{"not requested", false, 0, filepath.Join(dir, "missing"), false},
		{"user, user_allow_other", true, 1000, conf("# fuse.conf\nmount_max = 1000\n  user_allow_other  \n"), true},
		{"user, commented out", true, 1000, conf("#user_allow_other\n"), false},
		{"user, no fuse.conf", true, 1000, filepath.Join(dir, "missing"), false},
	}
	for _, tc := range cases {
		got, why := allowOther(tc.requested, tc.euid, tc.conf)
		if got != tc.want || (!got && why == "") {
			t.Errorf("%s: allowOther = %v (%q), want %v", tc.name, got, why, tc.want)
		}
	}
}
