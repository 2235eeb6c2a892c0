// Package nixtest is the shared harness for casnix's end-to-end tests against real Nix.
//
// Vocabulary:
//
//   - Host Nix: Debian bookworm's nix-bin (Nix 2.8) on the test machine, installed on demand
//     by ../nixenv/install-host-nix.sh (RequireHostNix). When it cannot be installed the
//     calling test is skipped, or fails when Strict (CI=true, or root without CI set).
//   - Root: a Debian root with a newer real Nix (trixie: 2.26, sid: 2.34), made and cached
//     by ../nixenv/make-root.sh (RequireRoot); commands run inside it in a mount namespace
//     of their own with pivot_root, a private /nix, /tmp and /root per test, and host
//     directories bound in (Root.Bind), so Nix's build sandbox works there.
//   - Casnix: the casnix binary, built once per test process from the module root
//     (CasnixBinary), or taken from $CASNIX_BIN when that is set, and run against a data
//     directory of the test's own (NewCasnix).
//   - Store: a real Nix local store in a temporary directory ROOT (NewStore): its store
//     directory is /nix/store, so store paths look normal, while its files live under
//     ROOT/nix/store and its database at ROOT/nix/var/nix/db/db.sqlite. Every Nix command
//     is given --store ROOT; Nix calls that a chroot store and forces its build sandbox,
//     which works as root on this machine.
//   - Fixture: a Store populated by PopulateFixture with tiny busybox-built derivations
//     (a chain, a diamond, self references, multiple outputs, symlink, single-file,
//     executable and empty outputs, a tree with nested, empty and big entries),
//     content-addressed paths (nix-store --add, --add-fixed, fixed-output derivations,
//     builtins.toFile), signatures and the .drv files themselves.
//   - NixClient: one of the real Nix versions the daemon tests drive as clients
//     (ClientSuites: bookworm = host Nix 2.8, trixie = 2.26, sid = 2.34), run on the host
//     or in its Root alike (RequireNixClient).
//   - Daemon: a background process serving the worker protocol on a Unix socket, `casnix
//     serve` (Casnix.Serve) or a real nix-daemon of a NixClient (StartNixDaemon), with
//     its output, RSS and open file descriptors at hand, stopped at the end of the test.
//   - SSHD: an OpenSSH server of the test's own on a loopback port (StartSSHD; openssh-server
//     installed on demand by ../nixenv/install-host-sshd.sh), for ssh-ng:// stores.
//
// Commands run through Cmd, whose failures report the command line, exit status, duration
// and the tail of both output streams. Large outputs (NARs) are streamed into a Digest
// (sha256 and length), never held in memory. NAR listings are parsed by WalkNAR, written
// here independently of the NAR code under test.
//
// Test binaries that use this package should call Main from their TestMain so that the
// temporary build directory of the casnix binary is removed at exit.
package nixtest
