package replicate

import (
	"context"
	"crypto/rand"
	"encoding/json"
	"errors"
	"fmt"
	"io"
	"os"
	"sync"
	"time"

	"github.com/casnix/casnix/objstore"
)

// LeaseName is the lease object under a store's bucket prefix.
const LeaseName = "lease.json"

// ErrLeaseHeld means another primary holds the bucket's writer lease.
var ErrLeaseHeld = errors.New("another primary holds the bucket's writer lease")

// ErrLeaseLost means the lease was taken over while held (this primary was cut off from
// the bucket for longer than the lease lasts): it must stop writing.
var ErrLeaseLost = errors.New("writer lease lost")

// leaseBody is what the lease object holds: who holds it and until when it counts.
type leaseBody struct {
	// Owner identifies the data dir that holds it (the same data dir restarted after a
	// crash takes its own lease back at once).
	Owner   string    `json:"owner"`
	Host    string    `json:"host"`
	PID     int       `json:"pid"`
	Renewed time.Time `json:"renewed"`
	TTL     Duration  `json:"ttl"`
	// Token is random per acquisition: a holder tells its own renewals from those of a
	// later acquisition by the same data dir, even in the same process.
	Token string `json:"token,omitempty"`
}

// Duration is a time.Duration that reads and writes as "30s" in JSON.
type Duration time.Duration

func (d Duration) MarshalJSON() ([]byte, error) { return json.Marshal(time.Duration(d).String()) }

func (d *Duration) UnmarshalJSON(b []byte) error {
	var s string
	if err := json.Unmarshal(b, &s); err != nil {
		return err
	}
	v, err := time.ParseDuration(s)
	*d = Duration(v)
	return err
}

// Lease is the single-writer lease of a bucket prefix: at most one primary writes a
// store's packs and database there. It is an object created only if absent (If-None-Match)
// and renewed or taken over only if unchanged since read (If-Match), so two processes
// cannot both hold it; one that cannot renew it for longer than its TTL loses it to the
// next that asks.
type Lease struct {
	b     *objstore.Bucket
	body  leaseBody
	mu    sync.Mutex
	etag  string
	lost  chan struct{}
	once  sync.Once
	stop  chan struct{}
	done  chan struct{}
	state error
}

// AcquireLease takes the writer lease under loc for owner (the data dir's identity),
// renewing it every ttl/3 until Release. A lease held by another owner and renewed within
// the last ttl is ErrLeaseHeld, naming its holder; an expired one is taken over.
func AcquireLease(ctx context.Context, loc objstore.Location, owner string, ttl time.Duration) (*Lease, error) {
	b, err := objstore.Open(ctx, loc, objstore.Options{})
	if err != nil {
		return nil, err
	}
	host, _ := os.Hostname()
	l := &Lease{b: b, body: leaseBody{Owner: owner, Host: host, PID: os.Getpid(), TTL: Duration(ttl), Token: rand.Text()},
		lost: make(chan struct{}), stop: make(chan struct{}), done: make(chan struct{})}
	if err := l.acquire(ctx); err != nil {
		return nil, err
	}
	go l.renewLoop(ttl)
	return l, nil
}

func (l *Lease) encode() []byte {
	l.body.Renewed = time.Now().UTC()
	b, _ := json.Marshal(l.body)
	return b
}

func (l *Lease) acquire(ctx context.Context) error {
	err := l.b.PutIfAbsent(ctx, LeaseName, l.encode())
	if err == nil {
		return l.readETag(ctx)
	}
	if !errors.Is(err, objstore.ErrExists) {
		return fmt.Errorf("writer lease: %w", err)
	}
	cur, etag, err := l.read(ctx)
	if errors.Is(err, objstore.ErrNotFound) {
		return l.acquire(ctx) // released between the two requests
	}
	if err != nil {
		return fmt.Errorf("writer lease: %w", err)
	}
	expired := time.Since(cur.Renewed) > time.Duration(cur.TTL)
	if cur.Owner != l.body.Owner && !expired {
		return fmt.Errorf("%w: %s (data dir %s, pid %d on %s, renewed %s ago, lasts %s)", ErrLeaseHeld,
			l.b.Location(), cur.Owner, cur.PID, cur.Host, time.Since(cur.Renewed).Round(time.Second), time.Duration(cur.TTL))
	}
	// Ours from before a crash, or expired: take it over, unless someone else did first.
	if err := l.b.PutIfMatch(ctx, LeaseName, l.encode(), etag); err != nil {
		if errors.Is(err, objstore.ErrExists) {
			return fmt.Errorf("%w: %s (taken over by another process just now)", ErrLeaseHeld, l.b.Location())
		}
		return fmt.Errorf("writer lease: take over: %w", err)
	}
	return l.readETag(ctx)
}

func (l *Lease) read(ctx context.Context) (leaseBody, string, error) {
	info, err := l.b.Head(ctx, LeaseName)
	if err != nil {
		return leaseBody{}, "", err
	}
	rc, err := l.b.Get(ctx, LeaseName)
	if err != nil {
		return leaseBody{}, "", err
	}
	defer rc.Close()
	data, err := io.ReadAll(io.LimitReader(rc, 1<<16))
	if err != nil {
		return leaseBody{}, "", err
	}
	var body leaseBody
	if err := json.Unmarshal(data, &body); err != nil {
		return leaseBody{}, "", fmt.Errorf("lease object %s: %w", LeaseName, err)
	}
	return body, info.ETag, nil
}

func (l *Lease) readETag(ctx context.Context) error {
	cur, etag, err := l.read(ctx)
	if err != nil {
		return fmt.Errorf("writer lease: %w", err)
	}
	if cur.Owner != l.body.Owner || cur.PID != l.body.PID || cur.Host != l.body.Host || cur.Token != l.body.Token {
		return fmt.Errorf("%w: %s (taken over by another process just now)", ErrLeaseHeld, l.b.Location())
	}
	l.mu.Lock()
	l.etag = etag
	l.mu.Unlock()
	return nil
}

// renewLoop renews every ttl/3; a renewal refused because the object changed means the
// lease was taken over: Lost closes.
func (l *Lease) renewLoop(ttl time.Duration) {
	defer close(l.done)
	t := time.NewTicker(ttl / 3)
	defer t.Stop()
	for {
		select {
		case <-l.stop:
			return
		case <-t.C:
		}
		ctx, cancel := context.WithTimeout(context.Background(), ttl/3)
		l.mu.Lock()
		etag := l.etag
		l.mu.Unlock()
		err := l.b.PutIfMatch(ctx, LeaseName, l.encode(), etag)
		if err == nil || errors.Is(err, objstore.ErrExists) {
			// Refused as changed: maybe by this process's own renewal whose
			// answer was lost (the server went away, or the request timed out,
			// after it stored the object). readETag takes the lease's current
			// ETag if it is still this process's, and says it was taken over
			// otherwise.
			err = l.readETag(ctx)
		}
		cancel()
		if errors.Is(err, objstore.ErrExists) || errors.Is(err, ErrLeaseHeld) || errors.Is(err, objstore.ErrNotFound) {
			l.mu.Lock()
			l.state = fmt.Errorf("%w: %s: %v", ErrLeaseLost, l.b.Location(), err)
			l.mu.Unlock()
			l.once.Do(func() { close(l.lost) })
			return
		}
		// Other errors (the server down): try again next tick; the lease lasts ttl.
	}
}

// Lost is closed when the lease is taken over by another process.
func (l *Lease) Lost() <-chan struct{} { return l.lost }

// Err is why the lease was lost (nil while held).
func (l *Lease) Err() error {
	l.mu.Lock()
	defer l.mu.Unlock()
	return l.state
}

// Release stops renewing and deletes the lease if it is still this process's.
func (l *Lease) Release(ctx context.Context) error {
	close(l.stop)
	<-l.done
	if l.Err() != nil {
		return nil
	}
	cur, _, err := l.read(ctx)
	if err != nil || cur.Owner != l.body.Owner || cur.PID != l.body.PID || cur.Token != l.body.Token {
		return err
	}
	return l.b.Delete(ctx, LeaseName)
}
