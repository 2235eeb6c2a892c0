package nixtest

import (
	"fmt"
	"net"
	"net/url"
	"os"
	"path/filepath"
	"strings"
	"sync"
	"testing"
	"time"
)

var (
	sshdOnce sync.Once
	sshdErr  error
)

// RequireSSHD makes sure OpenSSH's server (/usr/sbin/sshd) and ssh-keygen are installed on
// the host, running nixenv/install-host-sshd.sh once per process; the system's ssh service
// is neither started nor used. When that fails the test is skipped, or fails when Strict.
func RequireSSHD(t testing.TB) {
	t.Helper()
	sshdOnce.Do(func() {
		if os.Geteuid() != 0 {
			sshdErr = fmt.Errorf("need root (apt, sshd)")
			return
		}
		r := (&Cmd{Name: "sh", Args: []string{ScriptPath("install-host-sshd.sh")}, Timeout: 10 * time.Minute}).Try()
		if !r.OK() {
			sshdErr = fmt.Errorf("install-host-sshd.sh failed:\n%s", r)
		}
	})
	if sshdErr != nil {
		SkipOrFatal(t, "sshd unavailable: %v", sshdErr)
	}
}

// SSHD is an OpenSSH server of the test's own on a loopback port of the host, started by
// StartSSHD: its own configuration and host key in Dir, and one authorized key, for root,
// whose private half is Key. Roots share the host's network, so their ssh clients reach it
// at 127.0.0.1 too (bind Dir so they find Key).
type SSHD struct {
	Dir  string // configuration, keys and log; bind it into roots whose ssh uses Key
	Port int
	Key  string // the client's private key (ed25519, no passphrase)

	daemon *Daemon
}

// StartSSHD starts `sshd -D -e` on 127.0.0.1 with a fresh host key and a fresh client key
// authorized for root, waits until it answers, and stops it at the end of the test. Keys
// are made with ssh-keygen; nothing outside Dir is read or written apart from sshd's usual
// privilege separation directory /run/sshd.
func StartSSHD(t testing.TB) *SSHD {
	t.Helper()
	RequireSSHD(t)
	dir := t.TempDir()
	s := &SSHD{Dir: dir, Key: filepath.Join(dir, "client_key")}
	hostKey := filepath.Join(dir, "host_key")
	for _, k := range []string{hostKey, s.Key} {
		(&Cmd{Name: "ssh-keygen", Args: []string{"-q", "-t", "ed25519", "-N", "", "-C", "casnix-test", "-f", k}}).Run(t)
	}
	pub, err := os.ReadFile(s.Key + ".pub")
	if err != nil {
		t.Fatal(err)
	}
	authorized := filepath.Join(dir, "authorized_keys")
	if err := os.WriteFile(authorized, pub, 0o600); err != nil {
		t.Fatal(err)
	}
	// sshd refuses to start without its privilege separation directory.
	if err := os.MkdirAll("/run/sshd", 0o755); err != nil {
		t.Fatal(err)
	}

	var lastErr string
	for attempt := 0; attempt < 5; attempt++ {
		s.Port = freeLoopbackPort(t)
		conf := filepath.Join(dir, "sshd_config")
		// StrictModes no: the test's temporary directories need not satisfy sshd's
		// ownership checks. UsePAM no: no PAM session for a loopback test login.
		writeFile(t, conf, fmt.Sprintf(`# sshd of a casnix test (nixtest.StartSSHD)
ListenAddress 127.0.0.1
Port %d
HostKey %s
PidFile %s
AuthorizedKeysFile %s
PermitRootLogin prohibit-password
PubkeyAuthentication yes
PasswordAuthentication no
KbdInteractiveAuthentication no
UsePAM no
StrictModes no
AllowTcpForwarding no
X11Forwarding no
PrintMotd no
LogLevel VERBOSE
MaxStartups 100
MaxSessions 100
`, s.Port, hostKey, filepath.Join(dir, "sshd.pid"), authorized), 0o600)
		// Check the configuration first for a readable error.
		(&Cmd{Name: "/usr/sbin/sshd", Args: []string{"-t", "-f", conf}}).Run(t)
		cmd := &Cmd{Name: "/usr/sbin/sshd", Args: []string{"-D", "-e", "-f", conf}}
		d := startTCPDaemon(t, "sshd", fmt.Sprintf("127.0.0.1:%d", s.Port), cmd)
		if d != nil {
			s.daemon = d
			break
		}
		lastErr = "port taken"
	}
	if s.daemon == nil {
		t.Fatalf("sshd did not start: %s", lastErr)
	}
	// A login runs a command.
	r := (&Cmd{Name: "ssh", Args: append(s.SSHArgs(), "root@127.0.0.1", "echo", "ok")}).Try()
	if !r.OK() || strings.TrimSpace(string(r.Stdout)) != "ok" {
		t.Fatalf("ssh to the test's sshd failed:\n%s\nsshd output:\n%s", r, s.daemon.Output())
	}
	return s
}

// SSHArgs are the ssh options that reach this sshd as root with Key, without host key
// checks or known_hosts updates.
func (s *SSHD) SSHArgs() []string {
	return []string{
		"-p", fmt.Sprint(s.Port), "-i", s.Key,
		"-o", "StrictHostKeyChecking=no", "-o", "UserKnownHostsFile=/dev/null",
		"-o", "LogLevel=ERROR", "-o", "BatchMode=yes", "-o", "IdentitiesOnly=yes",
	}
}

// NixSSHOpts is the value of NIX_SSHOPTS for Nix's ssh:// and ssh-ng:// stores reaching
// this sshd (Nix splits it at whitespace; no argument here holds any).
func (s *SSHD) NixSSHOpts() string { return strings.Join(s.SSHArgs(), " ") }

// StoreURL is the ssh-ng:// store URL of root@127.0.0.1 whose remote-program is the
// command remoteProgram (words joined with spaces; Nix appends " --stdio"). Extra query
// parameters (e.g. "max-connections=1") are appended.
func (s *SSHD) StoreURL(remoteProgram []string, extra ...string) string {
	q := "remote-program=" + strings.ReplaceAll(url.QueryEscape(strings.Join(remoteProgram, " ")), "+", "%20")
	for _, e := range extra {
		q += "&" + e
	}
	return "ssh-ng://root@127.0.0.1?" + q
}

// Output is what sshd logged so far.
func (s *SSHD) Output() string { return s.daemon.Output() }

// freeLoopbackPort returns a TCP port on 127.0.0.1 that was free a moment ago.
func freeLoopbackPort(t testing.TB) int {
	t.Helper()
	l, err := net.Listen("tcp", "127.0.0.1:0")
	if err != nil {
		t.Fatal(err)
	}
	defer l.Close()
	return l.Addr().(*net.TCPAddr).Port
}
