# shellcheck shell=bash
# Shell functions shared by the bench scripts (sourced, not run).

# gen_mib COUNT FIRST-UNIT: COUNT MiB of semi-compressible data on stdout.
# Each MiB: 384 KiB random, 384 KiB base64 of random, 256 KiB of zero-padded
# decimal numbers (unique, very compressible); zstd -3 gets about 1.4x and
# no chunk repeats.
gen_mib() {
  local u
  for ((u = $2; u < $2 + $1; u++)); do
    head -c 393216 /dev/urandom
    head -c 294912 /dev/urandom | base64 -w 0
    seq -f '%015.0f' $((u * 16384)) $((u * 16384 + 16383))
  done
}

# merge_section SCRIPT SECTION RESULTS: put the markdown file SECTION into RESULTS between
# the markers "<!-- bench/SCRIPT: begin" and "<!-- bench/SCRIPT: end -->" (replacing what
# was there), or append it, so every bench script owns one section of RESULTS.md.
merge_section() {
  local script=$1 section=$2 results=$3 tmp=$3.tmp
  if [[ -f $results ]] && grep -q "^<!-- bench/$script: begin" "$results"; then
    awk -v f="$section" -v b="<!-- bench/$script: begin" -v e="<!-- bench/$script: end" '
      index($0, b) == 1 { while ((getline l < f) > 0) print l; skip = 1; next }
      index($0, e) == 1 { skip = 0; next }
      !skip { print }' "$results" >"$tmp"
  else
    { [[ -f $results ]] && cat "$results" && echo; cat "$section"; } >"$tmp"
  fi
  mv "$tmp" "$results"
}

# median: the median of the numbers on stdin, one per line.
median() { sort -g | awk '{ v[NR] = $1 } END { if (NR % 2) print v[(NR + 1) / 2]; else print (v[NR / 2] + v[NR / 2 + 1]) / 2 }'; }

# cpu_busy: the fraction of all cores busy over one second, every process counted (run it while
# the benchmark's own processes are idle, to see whether other work shares the machine).
cpu_busy() {
  local a b
  a=$(awk '/^cpu / { print $2 + $3 + $4 + $7 + $8 + $9, $5 + $6; exit }' /proc/stat)
  sleep 1
  b=$(awk '/^cpu / { print $2 + $3 + $4 + $7 + $8 + $9, $5 + $6; exit }' /proc/stat)
  awk -v a="$a" -v b="$b" 'BEGIN { split(a, x, " "); split(b, y, " ");
    busy = y[1] - x[1]; idle = y[2] - x[2]; printf "%.2f\n", (busy + idle) ? busy / (busy + idle) : 0 }'
}

# log MSG…: a timestamped line on stderr, prefixed with $BENCH (the script's short name).
log() { printf '%s %s: %s\n' "$(date +%T)" "${BENCH:-bench}" "$*" >&2; }
# die MSG…: log MSG as an error and exit 1.
die() {
  log "error: $*"
  exit 1
}

# in_sid NIXDIR TMPDIR SCRIPT: run the bash SCRIPT inside the Debian sid root $SID_ROOT of
# tests/nixenv (Nix 2.34; made by tests/nixenv/make-root.sh sid), in a private mount namespace:
# the root read-only, NIXDIR bound at /nix and TMPDIR at /tmp (both writable; Nix 2.34 tries to
# remount a read-only /nix/store writable, so /nix must not be the root's own). The network is the
# host's (loopback servers are reachable). In a subshell (`in_sid … &`, `$(in_sid …)`, a pipeline)
# it execs, so `in_sid … 'exec nix-daemon …' &` leaves $! the daemon's PID, to stop it by.
in_sid() {
  local run=()
  [[ $BASHPID == "$$" ]] || run=(exec)
  "${run[@]}" unshare -m --propagation private bash -c '
    set -e; b=$1
    mount --bind "$b" "$b"; mount -o remount,bind,ro "$b"
    mount --rbind /dev "$b/dev"; mount -t proc proc "$b/proc"
    mount --bind "$2" "$b/nix"; mount --bind "$3" "$b/tmp"
    exec chroot "$b" /bin/bash -c "$4"' in_sid "${SID_ROOT:?}" "$1" "$2" "$3"
}

# now: wall-clock seconds with nanoseconds.
now() { date +%s.%N; }

# The cpuacct cgroup (v1, as this machine mounts it) counts the CPU of a process and of every
# process it forks afterwards, waited for or not (nix-daemon's per-connection children, which a
# /proc cutime would miss). Group NAME is the directory $CG_PREFIX-NAME (set CG_PREFIX per script,
# so scripts running at once keep apart).
CPUACCT=${CPUACCT:-/sys/fs/cgroup/cpuacct}
# cg_new NAME…: make the groups (empty).
cg_new() {
  local n
  for n; do mkdir -p "$CPUACCT/${CG_PREFIX:-casnix-bench}-$n"; done
}
# cg_add NAME PID: put PID (and its future children) into the group NAME, made if missing.
cg_add() {
  cg_new "$1"
  echo "$2" >"$CPUACCT/${CG_PREFIX:-casnix-bench}-$1/cgroup.procs"
}
# cg_exec NAME CMD…: run CMD in the group NAME (made if missing).
cg_exec() {
  local g=$CPUACCT/${CG_PREFIX:-casnix-bench}-$1
  shift
  mkdir -p "$g"
  bash -c 'echo $$ >"$0/cgroup.procs" && exec "$@"' "$g" "$@"
}
# cg_cpu NAME: the CPU seconds (user+sys) the group NAME has used so far.
cg_cpu() { awk '{ printf "%.2f\n", $1 / 1e9 }' "$CPUACCT/${CG_PREFIX:-casnix-bench}-$1/cpuacct.usage"; }
# cg_kill NAME: SIGTERM every process in the group NAME (a daemon and the children it forked).
cg_kill() {
  local p
  for p in $(cat "$CPUACCT/${CG_PREFIX:-casnix-bench}-$1/cgroup.procs"); do kill "$p" 2>/dev/null || true; done
}
# cg_rm NAME…: remove the groups (their processes must have exited).
cg_rm() {
  local n d
  for n; do
    d=$CPUACCT/${CG_PREFIX:-casnix-bench}-$n
    [[ ! -d $d ]] || rmdir "$d" 2>/dev/null || true
  done
}

# wait_quiet: waits up to QUIET_TIMEOUT (60) s until other processes keep the CPUs less than
# QUIET_BUSY (0.25) busy; prints the busy fraction the caller starts with.
wait_quiet() {
  local busy waited=0
  busy=$(cpu_busy)
  while awk -v b="$busy" -v l="${QUIET_BUSY:-0.25}" 'BEGIN { exit !(b > l) }' && ((waited < ${QUIET_TIMEOUT:-60})); do
    sleep 2
    waited=$((waited + 3))
    busy=$(cpu_busy)
  done
  echo "$busy"
}

# free_port: a TCP port free on 127.0.0.1 now.
free_port() { python3 -c 'import socket; s = socket.socket(); s.bind(("127.0.0.1", 0)); print(s.getsockname()[1])'; }
# wait_http PORT PID: waits until http://127.0.0.1:PORT/nix-cache-info answers; dies if PID exits.
wait_http() {
  local i
  for ((i = 0; i < 300; i++)); do
    kill -0 "$2" 2>/dev/null || die "the server for port $1 exited"
    curl -fsS -o /dev/null "http://127.0.0.1:$1/nix-cache-info" 2>/dev/null && return 0
    sleep 0.1
  done
  die "nothing serves on port $1"
}

# start_weed DIR: a SeaweedFS S3 server (the weed binary tests/nixtest builds: $WEED, else
# ~/.cache/casnix-test/weed-*) on free loopback ports with its data under DIR, test
# credentials exported as the AWS variables, and a bucket "bench"; sets ENDPOINT and
# WEED_PID. The caller stops it (kill $WEED_PID).
start_weed() {
  local dir=$1 i
  WEED=${WEED:-$(ls "$HOME"/.cache/casnix-test/weed-* 2>/dev/null | grep -v '\.lock$\|\.tmp$' | head -1)}
  [[ -x $WEED ]] || die "no weed binary: run go test -run TestBucket ./objstore once (it builds it)"
  export AWS_ACCESS_KEY_ID=casnix-bench AWS_SECRET_ACCESS_KEY=casnix-bench-secret AWS_REGION=us-east-1 AWS_EC2_METADATA_DISABLED=true
  mkdir -p "$dir/data"
  printf '{"identities":[{"name":"b","credentials":[{"accessKey":"%s","secretKey":"%s"}],"actions":["Admin","Read","Write","List","Tagging"]}]}' \
    "$AWS_ACCESS_KEY_ID" "$AWS_SECRET_ACCESS_KEY" >"$dir/s3.json"
  local s3p
  s3p=$(free_port)
  (cd "$dir" && exec "$WEED" server -s3 -ip=127.0.0.1 -ip.bind=127.0.0.1 -dir="$dir/data" \
    -s3.port="$s3p" -s3.port.grpc="$(free_port)" -s3.config="$dir/s3.json" \
    -master.port="$(free_port)" -master.port.grpc="$(free_port)" -volume.port="$(free_port)" -volume.port.grpc="$(free_port)" \
    -filer.port="$(free_port)" -filer.port.grpc="$(free_port)" -metricsPort="$(free_port)" \
    -master.volumeSizeLimitMB=1024 -volume.max=0 >"$dir/weed.log" 2>&1) &
  WEED_PID=$!
  ENDPOINT=http://127.0.0.1:$s3p
  for ((i = 0; i < 600; i++)); do
    if curl -sf -X PUT --aws-sigv4 "aws:amz:us-east-1:s3" -u "$AWS_ACCESS_KEY_ID:$AWS_SECRET_ACCESS_KEY" "$ENDPOINT/bench" >/dev/null 2>&1; then return; fi
    sleep 0.5
  done
  die "S3 server did not come up: $(tail -5 "$dir/weed.log")"
}

# fresh_fs DIR IMAGE: mount a journaled ext4 made afresh in the sparse file IMAGE (16 GiB) on DIR
# (a loop device), unmounting what a previous run left there; DIR's old contents go. For what a
# bench's timed steps write (stores, data dirs): this machine's root filesystem is an ext4 without
# a journal, and such an ext4 steps past every inode deleted in the last minutes when it creates a
# file (fs/ext4/ialloc.c, recently_deleted), so a store created right after the previous step's
# rm -rf cost its writer more kernel CPU, more with every run (perf of `nix copy --from` a binary
# cache, 2026-12-07: a third of all CPU in find_inode_bit/recently_deleted; the client's CPU
# 10.8-15.3 s there against 6.1-8.1 s on a fresh journaled ext4), which inflated the anchors that
# create many files (Nix's stores) and diluted every ratio. DIR stays mounted after the bench (its
# logs), until the next run of it.
fresh_fs() {
  local dir=$1 img=$2
  unmount_fs "$dir"
  rm -rf "$dir" "$img"
  mkdir -p "$dir"
  truncate -s 16G "$img"
  # Initialised now, not lazily: with lazy_itable_init the kernel's ext4lazyinit zeroes inode
  # tables in the background for the first minutes, beside the first steps (the first casnix copy
  # of write.sh took 30 s against 12 s after it); and a journal left as holes of the sparse file
  # (assume_storage_prezeroed) has every journal write of the first pass allocate its blocks in
  # the file, which cost the writer that syncs most (casnix, a sync per path) the most: 14-19 s
  # per copy against 12 s.
  mkfs.ext4 -q -F -E lazy_itable_init=0,lazy_journal_init=0 "$img" || die "mkfs.ext4 of $img failed"
  mount -o loop "$img" "$dir" || die "cannot mount $img (loop device) on $dir"
}

# unmount_fs DIR: unmount what fresh_fs left mounted on DIR (and inside it), if anything.
unmount_fs() {
  ! mountpoint -q "$1" || umount -R "$1" || die "cannot unmount the last run's $1"
}

# fresh_dir DIR IMAGE: DIR empty; with FRESH_FS=1 (the scripts' default) a fresh filesystem in
# IMAGE (fresh_fs), else a directory of the filesystem it is on (a previous run's filesystem
# unmounted first).
fresh_dir() {
  if [[ ${FRESH_FS:-1} == 1 ]]; then
    fresh_fs "$1" "$2"
  else
    unmount_fs "$1"
    rm -rf "$1"
    mkdir -p "$1"
  fi
}
