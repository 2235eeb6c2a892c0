package cli

import (
	"reflect"
	"strings"
	"testing"
)

// TestConfigFlagsHaveEnv: every flag that configures the daemon or its checks can also be
// set by a CASNIX_* environment variable (containers and systemd units configure casnix
// that way). Per-invocation flags (import's sources, restore --force) are left out on
// purpose.
func TestConfigFlagsHaveEnv(t *testing.T) {
	for _, v := range []any{Globals{}, ServeCmd{}, MountFlags{}, DoctorCmd{}, PingCmd{}} {
		typ := reflect.TypeOf(v)
		for i := range typ.NumField() {
			f := typ.Field(i)
			name, ok := f.Tag.Lookup("name")
			if !ok || f.Anonymous || f.Tag.Get("kong") == "-" {
				continue
			}
			if _, hidden := f.Tag.Lookup("hidden"); hidden && name == "cpu-profile" {
				continue // a developer's knob
			}
			env := f.Tag.Get("env")
			if !strings.HasPrefix(env, "CASNIX_") {
				t.Errorf("%s --%s has no CASNIX_* env var (env:%q)", typ.Name(), name, env)
			}
		}
	}
}

func TestSubstituterURLs(t *testing.T) {
	for _, tc := range []struct{ in, want []string }{
		{[]string{"https://a"}, []string{"https://a"}},
		{[]string{"https://a file:///b?priority=1", " http://c "}, []string{"https://a", "file:///b?priority=1", "http://c"}},
		{nil, nil},
	} {
		if got := substituterURLs(tc.in); !reflect.DeepEqual(got, tc.want) {
			t.Errorf("%q: %q, want %q", tc.in, got, tc.want)
		}
	}
}
