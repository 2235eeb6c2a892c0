package cli

import "testing"

// TestStoreNew: --ingest auto stores new data uncompressed unless a
// --zstd-level is given, serve has a --max-size budget or packs go to a
// bucket; store and zstd say so whatever else is given; a Globals made
// without kong's defaults (Ingest "") is auto.
func TestStoreNew(t *testing.T) {
	for _, tc := range []struct {
		name string
		g    Globals
		want bool
	}{
		{"auto", Globals{Ingest: "auto"}, true},
		{"unset", Globals{}, true},
		{"auto with a level", Globals{Ingest: "auto", ZstdLevel: 3}, false},
		{"auto with a budget", Globals{Ingest: "auto", Budgeted: true}, false},
		{"auto with a bucket", Globals{Ingest: "auto", Packs: "s3://b/p"}, false},
		{"store", Globals{Ingest: "store", ZstdLevel: 3, Budgeted: true}, true},
		{"zstd", Globals{Ingest: "zstd"}, false},
	} {
		if got := tc.g.storeNew(); got != tc.want {
			t.Errorf("%s: storeNew() = %v, want %v", tc.name, got, tc.want)
		}
	}
}
