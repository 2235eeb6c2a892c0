package replicate

import (
	"context"
	"errors"
	"fmt"
	"io"
	"log/slog"
	"os"
	"path"
	"slices"
	"time"

	"github.com/benbjohnson/litestream"
	"github.com/superfly/ltx"

	"github.com/casnix/casnix/objstore"
)

// bucketClient is a litestream.ReplicaClient on casnix's own objstore.Bucket rather than
// Litestream's S3 client: one S3 client, credential chain and set of request counters
// for everything casnix keeps in the bucket (Litestream's client also replaces the SDK's
// HTTP client, which then refuses AWS_CA_BUNDLE). Objects are laid out as Litestream's
// file replica lays out files: ltx/<level>/<min>-<max>.ltx under the database's prefix.
type bucketClient struct {
	b   *objstore.Bucket
	log *slog.Logger
}

var _ litestream.ReplicaClient = (*bucketClient)(nil)

func (c *bucketClient) Type() string { return "casnix-s3" }

func (c *bucketClient) Init(context.Context) error { return nil }

func (c *bucketClient) SetLogger(l *slog.Logger) { c.log = l }

func (c *bucketClient) LTXFiles(ctx context.Context, level int, seek ltx.TXID, useMetadata bool) (ltx.FileIterator, error) {
	var infos []*ltx.FileInfo
	dir := litestream.LTXLevelDir("", level) + "/"
	err := c.b.List(ctx, dir, func(o objstore.Info) error {
		minTXID, maxTXID, err := ltx.ParseFilename(path.Base(o.Name))
		if err != nil || minTXID < seek {
			return nil
		}
		infos = append(infos, &ltx.FileInfo{Level: level, MinTXID: minTXID, MaxTXID: maxTXID, Size: o.Size, CreatedAt: o.Modified.UTC()})
		return nil
	})
	if err != nil {
		return nil, err
	}
	slices.SortFunc(infos, func(a, b *ltx.FileInfo) int { return int(a.MinTXID) - int(b.MinTXID) })
	if useMetadata {
		// A point-in-time restore needs when each transaction was made, not when its
		// file reached the bucket: the LTX header holds it.
		for _, fi := range infos {
			ts, err := c.headerTime(ctx, fi)
			if err != nil {
				return nil, err
			}
			fi.CreatedAt = ts
		}
	}
	return ltx.NewFileInfoSliceIterator(infos), nil
}

func (c *bucketClient) headerTime(ctx context.Context, fi *ltx.FileInfo) (time.Time, error) {
	rc, err := c.b.GetRange(ctx, litestream.LTXFilePath("", fi.Level, fi.MinTXID, fi.MaxTXID), 0, ltx.HeaderSize)
	if err != nil {
		return time.Time{}, err
	}
	defer rc.Close()
	hdr, _, err := ltx.PeekHeader(rc)
	if err != nil {
		return time.Time{}, fmt.Errorf("LTX header of level %d %s: %w", fi.Level, ltx.FormatFilename(fi.MinTXID, fi.MaxTXID), err)
	}
	return time.UnixMilli(hdr.Timestamp).UTC(), nil
}

func (c *bucketClient) OpenLTXFile(ctx context.Context, level int, minTXID, maxTXID ltx.TXID, offset, size int64) (io.ReadCloser, error) {
	name := litestream.LTXFilePath("", level, minTXID, maxTXID)
	var rc io.ReadCloser
	var err error
	if size > 0 {
		rc, err = c.b.GetRange(ctx, name, offset, size)
	} else {
		rc, err = c.b.GetFrom(ctx, name, offset)
	}
	if errors.Is(err, objstore.ErrNotFound) {
		return nil, os.ErrNotExist // what Litestream looks for
	}
	return rc, err
}

// WriteLTXFile spools the file to disk (an LTX snapshot is the size of the database), then
// uploads it whole: an object appears complete or not at all.
func (c *bucketClient) WriteLTXFile(ctx context.Context, level int, minTXID, maxTXID ltx.TXID, r io.Reader) (*ltx.FileInfo, error) {
	hdr, r, err := ltx.PeekHeader(r)
	if err != nil {
		return nil, fmt.Errorf("LTX header: %w", err)
	}
	f, err := os.CreateTemp("", "casnix-ltx-")
	if err != nil {
		return nil, err
	}
	defer os.Remove(f.Name())
	defer f.Close()
	n, err := io.Copy(f, r)
	if err != nil {
		return nil, fmt.Errorf("spool LTX file: %w", err)
	}
	if err := c.b.Put(ctx, litestream.LTXFilePath("", level, minTXID, maxTXID), f, n); err != nil {
		return nil, err
	}
	return &ltx.FileInfo{Level: level, MinTXID: minTXID, MaxTXID: maxTXID, Size: n, CreatedAt: time.UnixMilli(hdr.Timestamp).UTC()}, nil
}

func (c *bucketClient) DeleteLTXFiles(ctx context.Context, a []*ltx.FileInfo) error {
	names := make([]string, len(a))
	for i, fi := range a {
		names[i] = litestream.LTXFilePath("", fi.Level, fi.MinTXID, fi.MaxTXID)
	}
	return c.b.Delete(ctx, names...)
}

func (c *bucketClient) DeleteAll(ctx context.Context) error {
	var names []string
	if err := c.b.List(ctx, "", func(o objstore.Info) error { names = append(names, o.Name); return nil }); err != nil {
		return err
	}
	return c.b.Delete(ctx, names...)
}
