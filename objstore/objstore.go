// Package objstore is casnix's access to S3-compatible object storage (AWS S3, Ceph RGW,
// Garage, SeaweedFS, R2): a bucket and key prefix named by an s3:// URL, whole-object uploads
// from files (multipart above a size, so a large pack never sits in memory), ranged reads,
// listing, deletion and a create-if-absent write for leases. Every request and byte is
// counted, so an operator can see what S3 costs per GB served.
//
// Only what casnix needs is here; everything is built on aws-sdk-go-v2, which brings the
// credential chain users expect (AWS_ACCESS_KEY_ID/AWS_SECRET_ACCESS_KEY, AWS_PROFILE and
// ~/.aws files, instance roles).
package objstore

import (
	"bytes"
	"context"
	"errors"
	"fmt"
	"io"
	"net/http"
	"net/url"
	"path"
	"strconv"
	"strings"
	"sync/atomic"
	"time"

	"github.com/aws/aws-sdk-go-v2/aws"
	"github.com/aws/aws-sdk-go-v2/config"
	"github.com/aws/aws-sdk-go-v2/service/s3"
	"github.com/aws/aws-sdk-go-v2/service/s3/types"
	"github.com/aws/smithy-go"
)

// ErrNotFound is returned for a key the bucket does not hold.
var ErrNotFound = errors.New("object not found")

// ErrExists is returned by PutIfAbsent for a key the bucket already holds.
var ErrExists = errors.New("object already exists")

// Location is a parsed s3:// URL: s3://BUCKET/PREFIX?endpoint=URL&region=R.
type Location struct {
	Bucket string
	// Prefix is the key prefix, without leading or trailing slash ("" for the bucket's root).
	Prefix string
	// Endpoint is the S3 server's base URL; empty means AWS's own for Region.
	Endpoint string
	Region   string
	// PathStyle addresses the bucket in the path rather than the host name: what self-hosted
	// servers (SeaweedFS, Garage, MinIO, Ceph) need. Default: on when Endpoint is set.
	PathStyle bool
}

// IsURL reports whether s names object storage rather than a local path.
func IsURL(s string) bool { return strings.HasPrefix(s, "s3://") }

// ParseURL parses s3://BUCKET/PREFIX?endpoint=…&region=…&path-style=true|false.
func ParseURL(raw string) (Location, error) {
	u, err := url.Parse(raw)
	if err != nil {
		return Location{}, fmt.Errorf("parse %q: %w", raw, err)
	}
	if u.Scheme != "s3" {
		return Location{}, fmt.Errorf("%q: not an s3:// URL", raw)
	}
	if u.Host == "" {
		return Location{}, fmt.Errorf("%q: no bucket", raw)
	}
	l := Location{Bucket: u.Host, Prefix: strings.Trim(u.Path, "/")}
	q := u.Query()
	for k := range q {
		switch k {
		case "endpoint", "region", "path-style":
		default:
			return Location{}, fmt.Errorf("%q: unknown parameter %q (endpoint, region, path-style)", raw, k)
		}
	}
	l.Endpoint = q.Get("endpoint")
	if l.Endpoint != "" {
		e, err := url.Parse(l.Endpoint)
		if err != nil || (e.Scheme != "http" && e.Scheme != "https") || e.Host == "" {
			return Location{}, fmt.Errorf("%q: endpoint %q is not an http(s) URL", raw, l.Endpoint)
		}
	}
	l.Region = q.Get("region")
	l.PathStyle = l.Endpoint != ""
	if ps := q.Get("path-style"); ps != "" {
		b, err := strconv.ParseBool(ps)
		if err != nil {
			return Location{}, fmt.Errorf("%q: path-style=%q: %w", raw, ps, err)
		}
		l.PathStyle = b
	}
	return l, nil
}

// String is the URL l was parsed from, in canonical form.
func (l Location) String() string {
	u := url.URL{Scheme: "s3", Host: l.Bucket, Path: "/" + l.Prefix}
	q := url.Values{}
	if l.Endpoint != "" {
		q.Set("endpoint", l.Endpoint)
	}
	if l.Region != "" {
		q.Set("region", l.Region)
	}
	if l.PathStyle != (l.Endpoint != "") {
		q.Set("path-style", strconv.FormatBool(l.PathStyle))
	}
	u.RawQuery = q.Encode()
	return u.String()
}

// Sub is l with elem appended to its prefix.
func (l Location) Sub(elem string) Location {
	l.Prefix = strings.Trim(path.Join(l.Prefix, elem), "/")
	return l
}

// Stats counts what a Bucket asked of the server, for /metrics and benchmarks.
type Stats struct {
	Requests      atomic.Int64 // every request, retries included
	Gets          atomic.Int64
	Puts          atomic.Int64 // single puts and multipart parts
	BytesSent     atomic.Int64 // request bodies (uploads)
	BytesReceived atomic.Int64 // response bodies (downloads)
}

// Bucket is a bucket and key prefix on an S3-compatible server.
type Bucket struct {
	loc    Location
	client *s3.Client
	stats  *Stats
	// partSize is the multipart part size; objects up to it go in one PUT.
	partSize int64
}

// Options tune Open.
type Options struct {
	// PartSize is the multipart upload part size (default 16 MiB, at least 5 MiB as S3 requires).
	PartSize int64
	// HTTPClient replaces the SDK's HTTP client (tests).
	HTTPClient *http.Client
}

// Open connects to the bucket named by loc. It makes no request: a server that is down
// shows up on first use, so a casnix that only reads its local cache can still start.
func Open(ctx context.Context, loc Location, opts Options) (*Bucket, error) {
	region := loc.Region
	if region == "" {
		region = "us-east-1"
	}
	cfg, err := config.LoadDefaultConfig(ctx, config.WithRegion(region))
	if err != nil {
		return nil, fmt.Errorf("s3 %s: load AWS configuration: %w", loc, err)
	}
	stats := &Stats{}
	client := s3.NewFromConfig(cfg, func(o *s3.Options) {
		if loc.Endpoint != "" {
			o.BaseEndpoint = aws.String(loc.Endpoint)
		}
		o.UsePathStyle = loc.PathStyle
		if opts.HTTPClient != nil {
			// Set on the client, not the configuration: the configuration applies
			// AWS_CA_BUNDLE to its HTTP client, which a plain *http.Client refuses.
			o.HTTPClient = opts.HTTPClient
		}
		// Checksums on every request only where the server needs them: self-hosted servers
		// do not all accept the newer CRC trailers.
		o.RequestChecksumCalculation = aws.RequestChecksumCalculationWhenRequired
		o.ResponseChecksumValidation = aws.ResponseChecksumValidationWhenRequired
		o.APIOptions = append(o.APIOptions, countRequests(stats))
	})
	ps := opts.PartSize
	if ps == 0 {
		ps = 16 << 20
	}
	if ps < 5<<20 {
		return nil, fmt.Errorf("s3 %s: part size %d below S3's 5 MiB minimum", loc, ps)
	}
	return &Bucket{loc: loc, client: client, stats: stats, partSize: ps}, nil
}

// Location is where b is.
func (b *Bucket) Location() Location { return b.loc }

// Stats are b's counters.
func (b *Bucket) Stats() *Stats { return b.stats }

// key is name under b's prefix.
func (b *Bucket) key(name string) string {
	if b.loc.Prefix == "" {
		return name
	}
	return b.loc.Prefix + "/" + name
}

// Info describes one object.
type Info struct {
	// Name is the key relative to the bucket's prefix.
	Name     string
	Size     int64
	Modified time.Time
	ETag     string // Head only
}

// Put uploads size bytes of r as name, whole: one PUT up to the part size, a multipart
// upload above it (parts read straight from r, so memory does not grow with the object).
// The object appears only when complete; a failed multipart upload is aborted.
func (b *Bucket) Put(ctx context.Context, name string, r io.ReaderAt, size int64) error {
	if size <= b.partSize {
		b.stats.Puts.Add(1)
		_, err := b.client.PutObject(ctx, &s3.PutObjectInput{
			Bucket:        &b.loc.Bucket,
			Key:           aws.String(b.key(name)),
			Body:          io.NewSectionReader(r, 0, size),
			ContentLength: aws.Int64(size),
		})
		if err != nil {
			return b.wrap("put", name, err)
		}
		b.stats.BytesSent.Add(size)
		return nil
	}
	return b.putMultipart(ctx, name, r, size)
}

func (b *Bucket) putMultipart(ctx context.Context, name string, r io.ReaderAt, size int64) (err error) {
	key := aws.String(b.key(name))
	up, err := b.client.CreateMultipartUpload(ctx, &s3.CreateMultipartUploadInput{Bucket: &b.loc.Bucket, Key: key})
	if err != nil {
		return b.wrap("start multipart upload of", name, err)
	}
	defer func() {
		if err != nil {
			// A detached context: the upload must be aborted even when ctx was cancelled,
			// or its parts stay billed in the bucket.
			actx, cancel := context.WithTimeout(context.WithoutCancel(ctx), 30*time.Second)
			defer cancel()
			_, _ = b.client.AbortMultipartUpload(actx, &s3.AbortMultipartUploadInput{Bucket: &b.loc.Bucket, Key: key, UploadId: up.UploadId})
		}
	}()
	var parts []types.CompletedPart
	for off, n := int64(0), int32(1); off < size; off, n = off+b.partSize, n+1 {
		l := min(b.partSize, size-off)
		b.stats.Puts.Add(1)
		out, err := b.client.UploadPart(ctx, &s3.UploadPartInput{
			Bucket:        &b.loc.Bucket,
			Key:           key,
			UploadId:      up.UploadId,
			PartNumber:    aws.Int32(n),
			Body:          io.NewSectionReader(r, off, l),
			ContentLength: aws.Int64(l),
		})
		if err != nil {
			return b.wrap(fmt.Sprintf("upload part %d of", n), name, err)
		}
		b.stats.BytesSent.Add(l)
		parts = append(parts, types.CompletedPart{ETag: out.ETag, PartNumber: aws.Int32(n)})
	}
	_, err = b.client.CompleteMultipartUpload(ctx, &s3.CompleteMultipartUploadInput{
		Bucket:          &b.loc.Bucket,
		Key:             key,
		UploadId:        up.UploadId,
		MultipartUpload: &types.CompletedMultipartUpload{Parts: parts},
	})
	if err != nil {
		return b.wrap("complete multipart upload of", name, err)
	}
	return nil
}

// PutIfAbsent creates name with body unless it exists (If-None-Match: *), in which case
// it returns ErrExists: the conditional write that makes a lease possible.
func (b *Bucket) PutIfAbsent(ctx context.Context, name string, body []byte) error {
	return b.putIf(ctx, "create", name, body, func(in *s3.PutObjectInput) { in.IfNoneMatch = aws.String("*") })
}

// PutIfMatch replaces name with body only if the object's ETag is still etag (If-Match):
// a compare-and-swap, so that of two writers that read the same object only one replaces
// it. A mismatch is ErrExists (someone else replaced it first).
func (b *Bucket) PutIfMatch(ctx context.Context, name string, body []byte, etag string) error {
	return b.putIf(ctx, "replace", name, body, func(in *s3.PutObjectInput) { in.IfMatch = aws.String(etag) })
}

// putIf is a PUT of body with the condition cond sets; a failed condition is ErrExists.
func (b *Bucket) putIf(ctx context.Context, op, name string, body []byte, cond func(*s3.PutObjectInput)) error {
	b.stats.Puts.Add(1)
	in := &s3.PutObjectInput{
		Bucket:        &b.loc.Bucket,
		Key:           aws.String(b.key(name)),
		Body:          bytes.NewReader(body),
		ContentLength: aws.Int64(int64(len(body))),
	}
	cond(in)
	if _, err := b.client.PutObject(ctx, in); err != nil {
		var ae smithy.APIError
		if errors.As(err, &ae) && (ae.ErrorCode() == "PreconditionFailed" || ae.ErrorCode() == "ConditionalRequestConflict") {
			return fmt.Errorf("s3 %s: %s %s: condition failed: %w", b.loc, op, name, ErrExists)
		}
		return b.wrap(op, name, err)
	}
	b.stats.BytesSent.Add(int64(len(body)))
	return nil
}

// Get reads the whole of name.
func (b *Bucket) Get(ctx context.Context, name string) (io.ReadCloser, error) {
	return b.get(ctx, name, nil)
}

// GetRange reads n bytes of name from off. A short object gives a short read, which the
// caller must treat as damage: casnix only asks for ranges its index names.
func (b *Bucket) GetRange(ctx context.Context, name string, off, n int64) (io.ReadCloser, error) {
	if off < 0 || n <= 0 {
		return nil, fmt.Errorf("s3 %s: %s: bad range %d+%d", b.loc, name, off, n)
	}
	return b.get(ctx, name, aws.String(fmt.Sprintf("bytes=%d-%d", off, off+n-1)))
}

// GetFrom reads name from off to its end.
func (b *Bucket) GetFrom(ctx context.Context, name string, off int64) (io.ReadCloser, error) {
	if off == 0 {
		return b.get(ctx, name, nil)
	}
	if off < 0 {
		return nil, fmt.Errorf("s3 %s: %s: bad offset %d", b.loc, name, off)
	}
	return b.get(ctx, name, aws.String(fmt.Sprintf("bytes=%d-", off)))
}

func (b *Bucket) get(ctx context.Context, name string, rng *string) (io.ReadCloser, error) {
	b.stats.Gets.Add(1)
	out, err := b.client.GetObject(ctx, &s3.GetObjectInput{Bucket: &b.loc.Bucket, Key: aws.String(b.key(name)), Range: rng})
	if err != nil {
		return nil, b.wrap("get", name, err)
	}
	return &countingBody{ReadCloser: out.Body, n: &b.stats.BytesReceived}, nil
}

// Head describes name, or returns ErrNotFound.
func (b *Bucket) Head(ctx context.Context, name string) (Info, error) {
	out, err := b.client.HeadObject(ctx, &s3.HeadObjectInput{Bucket: &b.loc.Bucket, Key: aws.String(b.key(name))})
	if err != nil {
		return Info{}, b.wrap("head", name, err)
	}
	return Info{Name: name, Size: aws.ToInt64(out.ContentLength), Modified: aws.ToTime(out.LastModified), ETag: aws.ToString(out.ETag)}, nil
}

// List calls fn for every object whose name (relative to b's prefix) starts with prefix,
// in key order, a page at a time.
func (b *Bucket) List(ctx context.Context, prefix string, fn func(Info) error) error {
	full := b.key(prefix)
	p := s3.NewListObjectsV2Paginator(b.client, &s3.ListObjectsV2Input{Bucket: &b.loc.Bucket, Prefix: aws.String(full)})
	strip := len(b.key(""))
	for p.HasMorePages() {
		page, err := p.NextPage(ctx)
		if err != nil {
			return b.wrap("list", prefix, err)
		}
		for _, o := range page.Contents {
			k := aws.ToString(o.Key)
			if len(k) < strip {
				continue
			}
			if err := fn(Info{Name: k[strip:], Size: aws.ToInt64(o.Size), Modified: aws.ToTime(o.LastModified)}); err != nil {
				return err
			}
		}
	}
	return nil
}

// Delete removes names; a name that is already gone is not an error.
func (b *Bucket) Delete(ctx context.Context, names ...string) error {
	for len(names) > 0 {
		batch := names[:min(len(names), 1000)]
		names = names[len(batch):]
		ids := make([]types.ObjectIdentifier, len(batch))
		for i, n := range batch {
			ids[i] = types.ObjectIdentifier{Key: aws.String(b.key(n))}
		}
		out, err := b.client.DeleteObjects(ctx, &s3.DeleteObjectsInput{
			Bucket: &b.loc.Bucket,
			Delete: &types.Delete{Objects: ids, Quiet: aws.Bool(true)},
		})
		if err != nil {
			return b.wrap("delete", batch[0], err)
		}
		for _, e := range out.Errors {
			if aws.ToString(e.Code) == "NoSuchKey" {
				continue
			}
			return fmt.Errorf("s3 %s: delete %s: %s", b.loc, aws.ToString(e.Key), aws.ToString(e.Message))
		}
	}
	return nil
}

// wrap names the operation, object and bucket in err and maps "not found" to ErrNotFound.
func (b *Bucket) wrap(op, name string, err error) error {
	var nk *types.NoSuchKey
	var nf *types.NotFound
	var ae smithy.APIError
	if errors.As(err, &nk) || errors.As(err, &nf) || (errors.As(err, &ae) && (ae.ErrorCode() == "NotFound" || ae.ErrorCode() == "NoSuchKey")) {
		return fmt.Errorf("s3 %s: %s %s: %w", b.loc, op, name, ErrNotFound)
	}
	return fmt.Errorf("s3 %s: %s %s: %w", b.loc, op, name, err)
}

type countingBody struct {
	io.ReadCloser
	n *atomic.Int64
}

func (c *countingBody) Read(p []byte) (int, error) {
	n, err := c.ReadCloser.Read(p)
	c.n.Add(int64(n))
	return n, err
}
