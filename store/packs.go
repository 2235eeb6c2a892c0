package store

import (
	"context"
	"fmt"

	"github.com/casnix/casnix/blobs"
	"github.com/casnix/casnix/db"
	"github.com/casnix/casnix/objstore"
)

// packsSetting is the settings row naming where a data dir's packs go.
const packsSetting = "packs"

// resolvePacks returns the canonical s3:// URL the data dir's packs go to
// ("" for local packs only): the one its database records, which the flag
// (if given) must match, or, on a data dir that records none yet, the flag,
// recorded when record is set. A data dir's pack location never changes:
// its uploaded packs are only in that bucket.
func resolvePacks(ctx context.Context, d *db.DB, flag string, record bool) (string, error) {
	want := ""
	if flag != "" {
		loc, err := objstore.ParseURL(flag)
		if err != nil {
			return "", fmt.Errorf("--packs: %w", err)
		}
		want = loc.String()
	}
	have, err := d.Setting(ctx, packsSetting)
	if err != nil {
		return "", err
	}
	switch {
	case have != "" && want != "" && have != want:
		return "", fmt.Errorf("--packs %s: this data dir's packs are at %s, and a data dir's pack location cannot change", want, have)
	case have != "":
		return have, nil
	case want == "":
		return "", nil
	case !record:
		return "", errNeedsWriter
	}
	if err := d.Write(ctx, func(tx *db.Tx) error { return tx.SetSetting(ctx, packsSetting, want) }); err != nil {
		return "", fmt.Errorf("record --packs: %w", err)
	}
	return want, nil
}

// openBucket connects to the bucket of url (credentials from the AWS
// environment) for the blob store.
func openBucket(ctx context.Context, url string) (*objstore.Bucket, error) {
	loc, err := objstore.ParseURL(url)
	if err != nil {
		return nil, err
	}
	return objstore.Open(ctx, loc, objstore.Options{})
}

// Packs is the s3:// URL the store's packs go to ("" for local packs).
func (s *Store) Packs() string {
	if s.bucket == nil {
		return ""
	}
	return s.bucket.Location().String()
}

// BucketStats are the requests and bytes asked of the packs' bucket (nil
// for local packs).
func (s *Store) BucketStats() *objstore.Stats {
	if s.bucket == nil {
		return nil
	}
	return s.bucket.Stats()
}

// RemoteStats is the upload queue and block cache state of a store whose
// packs go to a bucket.
func (s *Store) RemoteStats() blobs.RemoteStats { return s.blobs.RemoteStats() }

// UploadAll seals and uploads every pack holding committed frames now.
func (s *Store) UploadAll(ctx context.Context) error { return s.blobs.UploadAll(ctx) }
