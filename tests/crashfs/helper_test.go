package crashfs

import (
	"bufio"
	"database/sql"
	"fmt"
	"math/rand"
	"os"
	"os/exec"
	"path/filepath"
	"strconv"
	"testing"

	"golang.org/x/sys/unix"
)

// helperEnv selects a helper mode: the test binary re-runs itself as a client of the
// mount. A process must never fault on a MAP_SHARED page of a FUSE file that it serves
// itself: the faulting thread blocks in the kernel where the Go runtime cannot preempt
// it, and a stop-the-world then also stops the server goroutines that would answer.
const helperEnv = "CRASHFS_HELPER"

func TestMain(m *testing.M) {
	switch os.Getenv(helperEnv) {
	case "":
		os.Exit(m.Run())
	case "sqlite":
		os.Exit(helperSQLite())
	case "mmap":
		os.Exit(helperMmap())
	default:
		fmt.Fprintln(os.Stderr, "unknown helper")
		os.Exit(2)
	}
}

// startHelper runs the test binary in a helper mode with extra environment.
func startHelper(t *testing.T, mode string, env ...string) (*exec.Cmd, *bufio.Scanner) {
	t.Helper()
	cmd := exec.Command(os.Args[0])
	cmd.Env = append(append(os.Environ(), helperEnv+"="+mode), env...)
	cmd.Stderr = os.Stderr
	out, err := cmd.StdoutPipe()
	must(t, err)
	must(t, cmd.Start())
	return cmd, bufio.NewScanner(out)
}

// helperSQLite commits up to 400 transactions to $CRASHFS_DB, printing each id once its
// COMMIT returned, and stops at the first error.
func helperSQLite() int {
	seed, _ := strconv.ParseInt(os.Getenv("CRASHFS_SEED"), 10, 64)
	db, err := openDB(os.Getenv("CRASHFS_DB"), os.Getenv("CRASHFS_SYNC"))
	if err != nil {
		fmt.Fprintln(os.Stderr, err)
		return 1
	}
	defer db.Close()
	rng := rand.New(rand.NewSource(seed))
	w := bufio.NewWriter(os.Stdout)
	for i := 1; i <= 400; i++ {
		v := make([]byte, 100+rng.Intn(3000))
		rng.Read(v)
		if err := commitOne(db, i, v); err != nil {
			fmt.Fprintf(w, "stop %v\n", err)
			w.Flush()
			return 0
		}
		fmt.Fprintf(w, "%d\n", i)
		w.Flush()
	}
	return 0
}

func commitOne(db *sql.DB, id int, v []byte) error {
	tx, err := db.Begin()
	if err != nil {
		return err
	}
	if _, err := tx.Exec(`INSERT INTO t (id, v) VALUES (?, ?)`, id, v); err != nil {
		_ = tx.Rollback()
		return err
	}
	return tx.Commit()
}

// helperMmap writes through a MAP_SHARED mapping of $CRASHFS_DIR/shm, checks a second
// mapping and read(2) see it, and fsyncs file and directory.
func helperMmap() int {
	if err := mmapClient(os.Getenv("CRASHFS_DIR")); err != nil {
		fmt.Fprintln(os.Stderr, err)
		return 1
	}
	return 0
}

func mmapClient(dir string) error {
	p := filepath.Join(dir, "shm")
	fd, err := os.OpenFile(p, os.O_RDWR|os.O_CREATE, 0o644)
	if err != nil {
		return err
	}
	defer fd.Close()
	if err := fd.Truncate(2 * pageSize); err != nil {
		return err
	}
	m, err := unix.Mmap(int(fd.Fd()), 0, 2*pageSize, unix.PROT_READ|unix.PROT_WRITE, unix.MAP_SHARED)
	if err != nil {
		return fmt.Errorf("mmap: %w", err)
	}
	copy(m[pageSize:], "through mmap")
	fd2, err := os.Open(p)
	if err != nil {
		return err
	}
	defer fd2.Close()
	m2, err := unix.Mmap(int(fd2.Fd()), 0, 2*pageSize, unix.PROT_READ, unix.MAP_SHARED)
	if err != nil {
		return fmt.Errorf("second mmap: %w", err)
	}
	if got := string(m2[pageSize : pageSize+12]); got != "through mmap" {
		return fmt.Errorf("second mapping sees %q", got)
	}
	if err := unix.Msync(m, unix.MS_SYNC); err != nil {
		return fmt.Errorf("msync: %w", err)
	}
	if err := fd.Sync(); err != nil {
		return err
	}
	buf := make([]byte, 12)
	if _, err := fd2.ReadAt(buf, pageSize); err != nil {
		return err
	}
	if string(buf) != "through mmap" {
		return fmt.Errorf("read(2) sees %q", buf)
	}
	d, err := os.Open(dir)
	if err != nil {
		return err
	}
	defer d.Close()
	if err := d.Sync(); err != nil {
		return err
	}
	_ = unix.Munmap(m2)
	return unix.Munmap(m)
}
