package nixtest

import (
	"bytes"
	"context"
	"crypto/sha256"
	"encoding/hex"
	"fmt"
	"math/rand/v2"
	"net"
	"net/http"
	"os"
	"os/exec"
	"path/filepath"
	"strconv"
	"strings"
	"sync"
	"syscall"
	"testing"
	"time"

	"github.com/aws/aws-sdk-go-v2/aws"
	"github.com/aws/aws-sdk-go-v2/credentials"
	"github.com/aws/aws-sdk-go-v2/service/s3"
)

// S3 is a real S3 server on loopback for tests: SeaweedFS's `weed server -s3` (master,
// volume, filer and S3 gateway in one process), built from the Go module proxy as a Go
// tool (tools/weed/go.mod pins the version). Credentials are fixed test keys, given to
// casnix through the usual AWS variables (Env).
type S3 struct {
	Endpoint string // http://127.0.0.1:PORT
	Bucket   string
	dir      string
	args     []string
	log      *bytes.Buffer
	cmd      *exec.Cmd
	exited   chan struct{} // closed once cmd has been waited for
	t        testing.TB
}

const (
	s3AccessKey = "casnix-test"
	s3SecretKey = "casnix-test-secret-key"
)

var (
	weedOnce sync.Once
	weedPath string
	weedErr  error
)

// WeedBinary returns the path of SeaweedFS's weed, built once per machine from
// tools/weed (the first build takes about ten minutes on two cores; the binary is kept in
// the user's cache directory under a name derived from tools/weed/go.sum, so a version
// change builds anew). Concurrent test processes wait for one build (a file lock).
func WeedBinary(t testing.TB) string {
	t.Helper()
	weedOnce.Do(func() {
		if p := os.Getenv("CASNIX_WEED_BIN"); p != "" {
			weedPath = p
			return
		}
		toolDir := filepath.Join(ModuleRoot(), "tools", "weed")
		sum, err := os.ReadFile(filepath.Join(toolDir, "go.sum"))
		if err != nil {
			weedErr = fmt.Errorf("read tools/weed/go.sum: %w", err)
			return
		}
		h := sha256.Sum256(sum)
		cache, err := os.UserCacheDir()
		if err != nil {
			cache = os.TempDir()
		}
		dir := filepath.Join(cache, "casnix-test")
		if err := os.MkdirAll(dir, 0o755); err != nil {
			weedErr = err
			return
		}
		out := filepath.Join(dir, "weed-"+hex.EncodeToString(h[:8]))
		lock, err := os.OpenFile(out+".lock", os.O_CREATE|os.O_RDWR, 0o644)
		if err != nil {
			weedErr = err
			return
		}
		defer lock.Close()
		if err := syscall.Flock(int(lock.Fd()), syscall.LOCK_EX); err != nil {
			weedErr = fmt.Errorf("lock %s: %w", lock.Name(), err)
			return
		}
		if _, err := os.Stat(out); err == nil {
			weedPath = out
			return
		}
		r := (&Cmd{
			Name:    "go",
			Args:    []string{"build", "-o", out + ".tmp", "github.com/seaweedfs/seaweedfs/weed"},
			Env:     []string{"CGO_ENABLED=0"},
			Dir:     toolDir,
			Timeout: 40 * time.Minute,
		}).Try()
		if !r.OK() {
			weedErr = fmt.Errorf("building SeaweedFS's weed (Go module proxy):\n%s", r)
			return
		}
		if err := os.Rename(out+".tmp", out); err != nil {
			weedErr = err
			return
		}
		weedPath = out
	})
	if weedErr != nil {
		SkipOrFatal(t, "no S3 server: %v", weedErr)
	}
	return weedPath
}

// freePorts returns n distinct TCP ports free on loopback right now, drawn at random
// below the kernel's ephemeral range: ports the kernel hands out (to every outgoing
// connection of the tests running beside this one, and to listeners on port 0) could
// be taken again between this check and weed binding them, and weed's servers die on
// a port in use (TestBackupAfterRestoreFork failed so once). Without room below that
// range it falls back to ports the kernel picks.
func freePorts(t testing.TB, n int) []int {
	t.Helper()
	var ports []int
	var held []net.Listener
	defer func() {
		for _, l := range held {
			l.Close()
		}
	}()
	lo, hi := 10000, ephemeralStart()
	for tries := 0; len(ports) < n && hi-lo >= 1000 && tries < 100*n; tries++ {
		l, err := net.Listen("tcp", "127.0.0.1:"+strconv.Itoa(lo+rand.IntN(hi-lo)))
		if err != nil {
			continue // in use
		}
		held = append(held, l)
		ports = append(ports, l.Addr().(*net.TCPAddr).Port)
	}
	for len(ports) < n {
		l, err := net.Listen("tcp", "127.0.0.1:0")
		if err != nil {
			t.Fatalf("free port: %v", err)
		}
		held = append(held, l)
		ports = append(ports, l.Addr().(*net.TCPAddr).Port)
	}
	return ports
}

// ephemeralStart is the first port of the kernel's ephemeral range (32768 if unknown).
func ephemeralStart() int {
	b, _ := os.ReadFile("/proc/sys/net/ipv4/ip_local_port_range")
	if f := strings.Fields(string(b)); len(f) > 0 {
		if v, err := strconv.Atoi(f[0]); err == nil {
			return v
		}
	}
	return 32768
}

// StartS3 starts a SeaweedFS S3 server on loopback with its data under a test directory,
// waits until it accepts writes and creates the bucket "casnix". It is stopped when the
// test ends. A server that dies because another process took one of its ports meanwhile
// is started again on other ports (up to three times).
func StartS3(t testing.TB) *S3 {
	t.Helper()
	WeedBinary(t) // build or fail before anything else is set up
	dir := t.TempDir()
	cfg := filepath.Join(dir, "s3.json")
	ident := fmt.Sprintf(`{"identities":[{"name":"casnix","credentials":[{"accessKey":%q,"secretKey":%q}],"actions":["Admin","Read","Write","List","Tagging"]}]}`, s3AccessKey, s3SecretKey)
	if err := os.WriteFile(cfg, []byte(ident), 0o600); err != nil {
		t.Fatal(err)
	}
	data := filepath.Join(dir, "data")
	s := &S3{Bucket: "casnix", dir: dir, t: t}
	t.Cleanup(func() { s.Stop() })
	for attempt := 1; ; attempt++ {
		if err := os.RemoveAll(data); err != nil {
			t.Fatal(err)
		}
		if err := os.MkdirAll(data, 0o755); err != nil {
			t.Fatal(err)
		}
		p := freePorts(t, 9)
		s.Endpoint = "http://127.0.0.1:" + strconv.Itoa(p[0])
		s.args = []string{"server", "-s3",
			"-ip=127.0.0.1", "-ip.bind=127.0.0.1",
			"-dir=" + data,
			"-s3.port=" + strconv.Itoa(p[0]), "-s3.port.grpc=" + strconv.Itoa(p[1]),
			"-s3.config=" + cfg,
			"-master.port=" + strconv.Itoa(p[2]), "-master.port.grpc=" + strconv.Itoa(p[3]),
			"-volume.port=" + strconv.Itoa(p[4]), "-volume.port.grpc=" + strconv.Itoa(p[5]),
			"-filer.port=" + strconv.Itoa(p[6]), "-filer.port.grpc=" + strconv.Itoa(p[7]),
			"-metricsPort=" + strconv.Itoa(p[8]),
			// Small volumes: the default 30 GB limit makes weed refuse writes on a test
			// machine's disk.
			"-master.volumeSizeLimitMB=256", "-volume.max=0",
		}
		err := s.start(t)
		if err == nil {
			break
		}
		s.Stop()
		if attempt == 3 || !strings.Contains(s.log.String(), "address already in use") {
			t.Fatalf("S3 server: %v:\n%s", err, s.log)
		}
		t.Logf("S3 server: a port was taken meanwhile (attempt %d), starting on other ports", attempt)
	}
	if err := s.createBucket(); err != nil {
		t.Fatalf("S3 server: create bucket: %v\n%s", err, s.log)
	}
	return s
}

// Start (re)starts the server with the same data and ports and waits until it accepts
// writes again (SeaweedFS takes a while after a restart).
func (s *S3) Start(t testing.TB) {
	t.Helper()
	if err := s.start(t); err != nil {
		t.Fatalf("S3 server: %v:\n%s", err, s.log)
	}
}

// start starts weed and waits (2 minutes at most) until it accepts writes; a weed that
// exits meanwhile (one of its servers failed: glog's Fatalf exits) ends the wait at once.
func (s *S3) start(t testing.TB) error {
	t.Helper()
	if s.cmd != nil {
		t.Fatalf("S3 server already running")
	}
	s.log = &bytes.Buffer{}
	cmd := exec.Command(WeedBinary(t), s.args...)
	cmd.Dir = s.dir
	cmd.Stdout, cmd.Stderr = s.log, s.log // the same writer: os/exec writes it from one goroutine
	cmd.SysProcAttr = &syscall.SysProcAttr{Setpgid: true, Pdeathsig: syscall.SIGKILL}
	if err := cmd.Start(); err != nil {
		t.Fatalf("start weed: %v", err)
	}
	s.cmd = cmd
	exited := make(chan struct{})
	s.exited = exited
	go func() {
		_ = cmd.Wait()
		close(exited)
	}()
	deadline := time.Now().Add(2 * time.Minute)
	for {
		resp, err := http.Get(s.Endpoint + "/healthz")
		if err == nil {
			resp.Body.Close()
			if resp.StatusCode == http.StatusOK && s.writable() {
				return nil
			}
		}
		select {
		case <-exited:
			return fmt.Errorf("weed exited before it was ready (%v)", cmd.ProcessState)
		default:
		}
		if time.Now().After(deadline) {
			return fmt.Errorf("not ready after 2 minutes")
		}
		time.Sleep(250 * time.Millisecond)
	}
}

// Stop kills the server (its data stays for Start).
func (s *S3) Stop() {
	if s.cmd == nil {
		return
	}
	_ = syscall.Kill(-s.cmd.Process.Pid, syscall.SIGKILL)
	<-s.exited // start's goroutine waits for it
	s.cmd = nil
}

// Log is what the server printed since it last started.
func (s *S3) Log() string { return s.log.String() }

// URL is the s3:// URL of prefix in the test bucket, with the endpoint.
func (s *S3) URL(prefix string) string {
	return fmt.Sprintf("s3://%s/%s?endpoint=%s&region=us-east-1", s.Bucket, prefix, s.Endpoint)
}

// Env is the environment a casnix process needs to reach the server.
func (s *S3) Env() []string {
	return []string{
		"AWS_ACCESS_KEY_ID=" + s3AccessKey,
		"AWS_SECRET_ACCESS_KEY=" + s3SecretKey,
		"AWS_REGION=us-east-1",
		"AWS_EC2_METADATA_DISABLED=true",
		// No shared config of the machine's user may change what the tests talk to.
		"AWS_CONFIG_FILE=/dev/null",
		"AWS_SHARED_CREDENTIALS_FILE=/dev/null",
	}
}

// SetEnv sets Env in this process for the test's duration, for in-process clients.
func (s *S3) SetEnv(t testing.TB) {
	for _, kv := range s.Env() {
		k, v, _ := bytes.Cut([]byte(kv), []byte("="))
		t.Setenv(string(k), string(v))
	}
}

// client is an SDK client with the test credentials, for the harness's own requests.
func (s *S3) client() *s3.Client {
	return s3.New(s3.Options{
		Region:       "us-east-1",
		BaseEndpoint: aws.String(s.Endpoint),
		UsePathStyle: true,
		Credentials:  credentials.NewStaticCredentialsProvider(s3AccessKey, s3SecretKey, ""),
		Retryer:      aws.NopRetryer{},
	})
}

// writable reports whether a PUT succeeds, which is what "ready" means for casnix
// (SeaweedFS answers health checks well before its volumes take writes).
func (s *S3) writable() bool {
	ctx, cancel := context.WithTimeout(context.Background(), 10*time.Second)
	defer cancel()
	c := s.client()
	_, _ = c.CreateBucket(ctx, &s3.CreateBucketInput{Bucket: aws.String("casnix-probe")})
	_, err := c.PutObject(ctx, &s3.PutObjectInput{Bucket: aws.String("casnix-probe"), Key: aws.String("probe"), Body: strings.NewReader("ok")})
	return err == nil
}

func (s *S3) createBucket() error {
	ctx, cancel := context.WithTimeout(context.Background(), time.Minute)
	defer cancel()
	_, err := s.client().CreateBucket(ctx, &s3.CreateBucketInput{Bucket: aws.String(s.Bucket)})
	return err
}
