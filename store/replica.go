package store

import (
	"context"
	"crypto/rand"
	"encoding/hex"
	"errors"
	"fmt"
	"io/fs"
	"os"
	"path/filepath"
	"strings"

	"github.com/casnix/casnix/blobs"
	"github.com/casnix/casnix/db"
	"github.com/casnix/casnix/objstore"
)

// ReplicaFile, in a data dir, makes it a read replica of the primary whose bucket
// prefix it names (an s3:// URL): its casnix.db is the primary's, kept current by a
// follower (`casnix replica follow`), and its packs are read from the bucket through
// the local block cache. Every command opens such a data dir read-only.
const ReplicaFile = "replica-of"

// ReplicaOf is the bucket URL the data dir dir is a read replica of, "" if it is not one.
func ReplicaOf(dir string) (string, error) {
	b, err := os.ReadFile(filepath.Join(dir, ReplicaFile))
	if errors.Is(err, fs.ErrNotExist) {
		return "", nil
	}
	if err != nil {
		return "", fmt.Errorf("read %s: %w", ReplicaFile, err)
	}
	return strings.TrimSpace(string(b)), nil
}

// MakeReplica makes dir (absent, or empty, or already a replica of the same bucket and
// prefix) a read replica of url.
func MakeReplica(dir, url string) error {
	loc, err := objstore.ParseURL(url)
	if err != nil {
		return err
	}
	have, err := ReplicaOf(dir)
	if err != nil {
		return err
	}
	if have != "" {
		old, err := objstore.ParseURL(have)
		if err != nil {
			return fmt.Errorf("%s: %w", filepath.Join(dir, ReplicaFile), err)
		}
		if old.Bucket != loc.Bucket || old.Prefix != loc.Prefix {
			return fmt.Errorf("data dir %s is a replica of %s, not of %s", dir, have, url)
		}
		if have == loc.String() {
			return nil
		}
	} else if _, err := os.Stat(filepath.Join(dir, DBFile)); err == nil {
		return fmt.Errorf("data dir %s holds a store of its own: a replica needs an empty data dir", dir)
	}
	if err := os.MkdirAll(dir, 0o755); err != nil {
		return err
	}
	// Written whole or not at all; the endpoint may change (another host's view of
	// the same bucket), the bucket and prefix may not.
	tmp := filepath.Join(dir, ReplicaFile+".tmp")
	if err := os.WriteFile(tmp, []byte(loc.String()+"\n"), 0o644); err != nil {
		return err
	}
	if err := os.Rename(tmp, filepath.Join(dir, ReplicaFile)); err != nil {
		return err
	}
	return syncPath(dir)
}

// openReplica opens the read replica dir of url: the follower's database (read-only,
// showing only the paths whose packs are in the bucket), packs from the bucket.
func openReplica(ctx context.Context, dir, url string, opts Options) (*Store, error) {
	file := filepath.Join(dir, DBFile)
	if _, err := os.Stat(file); err != nil {
		return nil, fmt.Errorf("read replica %s of %s: no database yet (is `casnix replica follow` running?): %w", dir, url, err)
	}
	lock, err := openDirLock(ctx, dir)
	if err != nil {
		return nil, err
	}
	d, err := db.OpenReplica(ctx, file)
	if err != nil {
		lock.Close()
		return nil, err
	}
	d.SetReadOnlyReason("this store is a read replica of " + url + ": write to its primary")
	bucket, err := openBucket(ctx, url)
	if err != nil {
		d.Close()
		lock.Close()
		return nil, fmt.Errorf("read replica of %s: %w", url, err)
	}
	bopts := opts.Blobs
	bopts.ReadOnly = true
	bopts.Upload = false
	bopts.Remote = bucket
	b, err := blobs.Open(filepath.Join(dir, PackDir), d, bopts)
	if err != nil {
		d.Close()
		lock.Close()
		return nil, err
	}
	return &Store{StoreDir: opts.StoreDir, dir: dir, db: d, blobs: b, blobOpts: bopts, bucket: bucket, log: opts.Logger, dirLock: lock, replicaOf: url}, nil
}

// ReplicaOf is the bucket URL the store is a read replica of ("" for a primary).
func (s *Store) ReplicaOf() string { return s.replicaOf }

// identitySetting is the settings row with the data dir's random identity.
const identitySetting = "id"

// Identity is the data dir's random identity, made at first use: what the bucket's
// writer lease names, so that this data dir restarted after a crash takes its own lease
// back while any other is refused.
func (s *Store) Identity(ctx context.Context) (string, error) {
	id, err := s.db.Setting(ctx, identitySetting)
	if err != nil || id != "" {
		return id, err
	}
	var b [16]byte
	if _, err := rand.Read(b[:]); err != nil {
		return "", err
	}
	id = hex.EncodeToString(b[:])
	err = s.db.Write(ctx, func(tx *db.Tx) error {
		have, err := tx.Setting(ctx, identitySetting)
		if err != nil {
			return err
		}
		if have != "" {
			id = have
			return nil
		}
		return tx.SetSetting(ctx, identitySetting, id)
	})
	return id, err
}

// DropNotInBucket makes a data dir whose database was restored from its bucket replica
// (replicate.Restore) hold only what the bucket holds: the packs the primary had not
// uploaded when it was lost are gone with its disk, so the paths that may have data in
// them (those committed once the first frame of those packs existed: db.ReplicaPaths) are
// deleted, and then the packs' rows. This is the stated window of the local promise: a write is in the
// bucket within the upload window. It returns the deleted paths.
func DropNotInBucket(ctx context.Context, dir string) ([]string, error) {
	st, err := Open(ctx, dir, Options{})
	if err != nil {
		return nil, err
	}
	defer st.Close()
	packs, first, ok, err := st.db.NotInBucket(ctx)
	if err != nil || !ok {
		return nil, err
	}
	names, err := st.db.PathsFromFrameMark(ctx, first)
	if err != nil {
		return nil, err
	}
	if len(names) > 0 {
		if _, err := st.GC(ctx, GCOptions{Action: GCDeleteSpecific, Paths: names, IgnoreLiveness: true}); err != nil {
			return nil, fmt.Errorf("delete the paths whose data was not in the bucket: %w", err)
		}
	}
	if n, err := st.db.ChunksInPacks(ctx, packs); err != nil || n > 0 {
		if err == nil {
			err = fmt.Errorf("%d chunks still in packs %v that never reached the bucket (a compaction moved them after their paths were committed)", n, packs)
		}
		return nil, err
	}
	if err := st.db.Write(ctx, func(tx *db.Tx) error { return tx.DropPacks(ctx, packs) }); err != nil {
		return nil, err
	}
	return names, nil
}
