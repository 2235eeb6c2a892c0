#!/usr/bin/env bash
# Daemon benchmark: `casnix serve` against real nix-daemons serving the same store paths (Nix 2.34
# from Debian sid, run in tests/nixenv's sid root on its own copy of the store, and the host's
# Nix 2.8), driven by the same clients: QueryPathInfo req/s with 1 and 16 connections
# (bench/cmd/protobench), `nix path-info -r` of a 1,001-path closure (Nix 2.8 as the client of
# both), NarFromPath MB/s of a 1 GiB path (protobench). Prints a markdown table and merges it,
# as the "Daemon" section, into bench/RESULTS.md. See bench/README.md ("Daemon benchmark").
#
#   bench/daemon.sh                      # build what is missing, check, measure, report
#   bench/daemon.sh prepare              # only the store, the casnix data dir and the binaries
#   bench/daemon.sh merge                # merge the last run's section into RESULTS.md again
#   RUNS=1 QPI_SECS=3 bench/daemon.sh    # a quick run
#   PROFILE=1 bench/daemon.sh            # also a CPU profile of casnix serve (top in the log dir)
#   MAX_LOAD=1.0 bench/daemon.sh         # wait (up to LOAD_WAIT s) for a 1-min load below 1.0
#
# Layout under $BENCH_DIR/daemon (default BENCH_DIR=/var/tmp/casnix-bench):
#   nix234/       a copy of store/ for Nix 2.34 (which may upgrade the schema of a database it opens)
#   store/        ROOT of a real Nix store (ROOT/nix/store, ROOT/nix/var/nix/db/db.sqlite) holding
#                 the closure (daemon-closure.nix, built by nix-build) and the 1 GiB path
#                 (nix-store --add); the two daemons serve it
#   casnix/       casnix data dir, `casnix import --from-nix-store store/`
#   run/          sockets, daemon logs, raw results, profiles
set -euo pipefail

BENCH_DIR=${BENCH_DIR:-/var/tmp/casnix-bench}
RUNS=${RUNS:-3}
QPI_SECS=${QPI_SECS:-10}         # seconds per QueryPathInfo measurement
QPI_CLIENTS=${QPI_CLIENTS:-1 16} # connection counts
PATHINFO_REPS=${PATHINFO_REPS:-7} # nix path-info -r invocations per run (their median is the run's)
WIDTH=${WIDTH:-10}               # closure: DEPTH layers of WIDTH derivations, plus the top path
DEPTH=${DEPTH:-100}
BIG_MIB=${BIG_MIB:-1024}         # size of the big path's files
PROFILE=${PROFILE:-0}            # 1: casnix serve --cpu-profile
MAX_LOAD=${MAX_LOAD:-}           # wait for the 1-min load average to drop below this
REIMPORT=${REIMPORT:-0}          # 1: import into a new casnix data dir even if the paths did not change
LOAD_WAIT=${LOAD_WAIT:-1800}     # ... for at most this many seconds
HERE=$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)
# shellcheck source=bench/lib.sh
. "$HERE/lib.sh"
REPO=$(cd "$HERE/.." && pwd)
CASNIX=${CASNIX:-}               # a prebuilt binary; default: build $REPO into $BENCH_DIR/bin/casnix
RESULTS=${RESULTS:-$HERE/RESULTS.md}
D=$BENCH_DIR/daemon
ROOT=$D/store
DATA=$D/casnix
RUN=$D/run
PROTOBENCH=$BENCH_DIR/bin/protobench
NIX_SOCK=$RUN/nix-daemon.sock
CASNIX_SOCK=$RUN/casnix.sock
SID_ROOT=${SID_ROOT:-/var/cache/casnix-tests/roots/sid}
NIX234_SOCK=$RUN/sid/nix234.sock # /tmp/nix234.sock inside the sid root
BIG_NAME=casnix-bench-big-${BIG_MIB}m

log() { printf '%s daemon: %s\n' "$(date +%T)" "$*" >&2; }
die() {
  log "error: $*"
  exit 1
}

nixo=(--option experimental-features nix-command --option build-users-group '' --option substituters '')

need_tools() {
  local missing=()
  command -v nix-daemon >/dev/null || missing+=(nix-bin)
  [[ -x /bin/busybox ]] || missing+=(busybox-static)
  command -v go >/dev/null || die "go is not on PATH"
  [[ $(id -u) == 0 ]] || die "needs root (Nix 2.34 runs in a mount namespace of the sid root)"
  [[ -x $SID_ROOT/usr/bin/nix-daemon ]] || die "no Nix 2.34 in $SID_ROOT: run tests/nixenv/make-root.sh sid"
  if ((${#missing[@]})); then
    log "installing ${missing[*]}"
    apt-get install -y -q "${missing[@]}" >&2 || {
      apt-get update -q >&2
      apt-get install -y -q "${missing[@]}" >&2
    }
  fi
}

build_tools() {
  mkdir -p "$BENCH_DIR/bin"
  if [[ -n $CASNIX ]]; then
    [[ -x $CASNIX ]] || die "CASNIX=$CASNIX is not executable"
  else
    CASNIX=$BENCH_DIR/bin/casnix
    log "building casnix from $REPO"
    (cd "$REPO" && CGO_ENABLED=0 go build -o "$CASNIX" .) || die "go build of casnix failed"
  fi
  (cd "$REPO" && CGO_ENABLED=0 go build -o "$PROTOBENCH" ./bench/cmd/protobench) ||
    die "go build of protobench failed"
}

# --- the store -----------------------------------------------------------------------------

build_closure() {
  local top
  log "closure: nix-build of daemon-closure.nix ($DEPTH x $WIDTH derivations + top) into $ROOT"
  mkdir -p "$ROOT"
  top=$(nix-build --store "$ROOT" "${nixo[@]}" --option sandbox true \
    --option extra-sandbox-paths /bin/busybox --option max-jobs 2 --option cores 1 \
    --arg width "$WIDTH" --arg depth "$DEPTH" --no-out-link --quiet "$HERE/daemon-closure.nix") ||
    die "nix-build of the closure failed"
  echo "$top" >"$D/closure.top"
}

# The big path: BIG_MIB MiB of semi-compressible files, 64 MiB each, made by gen_mib (bench/lib.sh,
# the recipe of core.sh's big NAR).
build_big() {
  local p tree=$D/big.tmp/$BIG_NAME i n
  if [[ -f $D/big.path ]]; then
    p=$(cat "$D/big.path")
    if nix-store --store "$ROOT" "${nixo[@]}" --check-validity "$p" 2>/dev/null; then
      return
    fi
  fi
  log "big path: generating $BIG_MIB MiB of files and adding them with nix-store --add"
  rm -rf "$D/big.tmp"
  mkdir -p "$tree"
  n=$((BIG_MIB / 64))
  for ((i = 0; i < n; i++)); do
    gen_mib 64 $((i * 64)) >"$tree/part-$i"
  done
  if ((BIG_MIB % 64)); then
    gen_mib $((BIG_MIB % 64)) $((n * 64)) >"$tree/part-$n"
  fi
  p=$(nix-store --store "$ROOT" "${nixo[@]}" --add "$tree") || die "nix-store --add failed"
  echo "$p" >"$D/big.path"
  rm -rf "$D/big.tmp"
}

import_casnix() {
  local sum
  nix path-info --store "$ROOT" "${nixo[@]}" --all | LC_ALL=C sort >"$D/all.paths"
  sum=$(sha256sum <"$D/all.paths" | cut -d' ' -f1)
  if ((!REIMPORT)) && [[ -f $DATA/.bench-paths && $(cat "$DATA/.bench-paths") == "$sum" ]]; then
    return
  fi
  log "importing $(wc -l <"$D/all.paths") paths into a new casnix data dir $DATA"
  rm -rf "$DATA"
  "$CASNIX" --data-dir "$DATA" import --from-nix-store "$ROOT" >"$D/import.log" 2>&1 ||
    die "casnix import failed, see $D/import.log"
  echo "$sum" >"$DATA/.bench-paths"
}

# Nix 2.34's copy of the store, made again whenever the paths change.
copy_nix234() {
  local sum
  sum=$(sha256sum <"$D/all.paths" | cut -d' ' -f1)
  [[ -f $D/nix234.stamp && $(cat "$D/nix234.stamp") == "$sum" ]] && return
  log "copying the store for Nix 2.34 ($D/nix234)"
  rm -rf "$D/nix234"
  cp -a "$ROOT" "$D/nix234"
  echo "$sum" >"$D/nix234.stamp"
}

prepare() {
  mkdir -p "$D" "$RUN"
  build_tools
  build_closure
  build_big
  import_casnix
  copy_nix234
}

# --- daemons -------------------------------------------------------------------------------

NIX_PID=
NIX234_PID=
CASNIX_PID=

stop_daemons() {
  if [[ -n $CASNIX_PID ]]; then
    kill -TERM "$CASNIX_PID" 2>/dev/null || true
    wait "$CASNIX_PID" 2>/dev/null || true
    CASNIX_PID=
  fi
  if [[ -n $NIX_PID ]]; then
    kill -TERM "$NIX_PID" 2>/dev/null || true
    wait "$NIX_PID" 2>/dev/null || true
    NIX_PID=
  fi
  if [[ -n $NIX234_PID ]]; then
    # in_sid's bash execs chroot, which execs bash, which execs nix-daemon: the pid is the daemon's
    kill -TERM "$NIX234_PID" 2>/dev/null || true
    wait "$NIX234_PID" 2>/dev/null || true
    NIX234_PID=
  fi
}

wait_socket() { # NAME SOCKET PID
  local i
  for ((i = 0; i < 100; i++)); do
    kill -0 "$3" 2>/dev/null || die "$1 exited, see $RUN/$1.log"
    if [[ -S $2 ]] && "$PROTOBENCH" infos -socket "$2" -paths "$D/closure.top" >/dev/null 2>&1; then
      return
    fi
    sleep 0.1
  done
  die "$1 does not answer on $2"
}

start_daemons() {
  local prof=()
  rm -f "$NIX_SOCK" "$CASNIX_SOCK" "$NIX234_SOCK"
  NIX_DAEMON_SOCKET_PATH=$NIX_SOCK nix-daemon --store "local?root=$ROOT" "${nixo[@]}" \
    >"$RUN/nix-daemon.log" 2>&1 &
  NIX_PID=$!
  mkdir -p "$RUN/sid"
  # Nix 2.34 inside the sid root: its /nix is the copy of the store, its /tmp holds the socket.
  in_sid "$D/nix234/nix" "$RUN/sid" 'exec env NIX_DAEMON_SOCKET_PATH=/tmp/nix234.sock nix-daemon --option build-users-group "" \
    --option substituters "" --option experimental-features nix-command' >"$RUN/nix234.log" 2>&1 &
  NIX234_PID=$!
  ((PROFILE)) && prof=(--cpu-profile "$RUN/casnix.cpu.pprof")
  "$CASNIX" --data-dir "$DATA" "${prof[@]}" --log-level warn serve --socket "$CASNIX_SOCK" \
    >"$RUN/casnix.log" 2>&1 &
  CASNIX_PID=$!
  wait_socket nix-daemon "$NIX_SOCK" "$NIX_PID"
  wait_socket nix234 "$NIX234_SOCK" "$NIX234_PID"
  wait_socket casnix "$CASNIX_SOCK" "$CASNIX_PID"
  NIX234_VERSION=$(in_sid "$D/nix234/nix" "$RUN/sid" 'nix-daemon --version' 2>/dev/null | head -1)
  [[ $NIX234_VERSION == *2.3[4-9]* ]] || die "the sid root's nix-daemon is not 2.34 or newer: $NIX234_VERSION"
}

# --- checks and measurements ---------------------------------------------------------------

nix_client() { nix --option experimental-features nix-command "$@"; }

# casnix must give the same answers as both nix-daemons before anything is timed.
check() {
  local top big n
  top=$(cat "$D/closure.top")
  big=$(cat "$D/big.path")
  log "checking that the daemons give the same answers"
  "$PROTOBENCH" infos -socket "$NIX_SOCK" -paths "$D/all.paths" >"$RUN/nix-daemon.infos"
  "$PROTOBENCH" infos -socket "$NIX234_SOCK" -paths "$D/all.paths" >"$RUN/nix234.infos"
  "$PROTOBENCH" infos -socket "$CASNIX_SOCK" -paths "$D/all.paths" >"$RUN/casnix.infos"
  for n in nix-daemon nix234; do
    if ! cmp -s "$RUN/$n.infos" "$RUN/casnix.infos"; then
      diff "$RUN/$n.infos" "$RUN/casnix.infos" | head -6 >&2 || true
      die "QueryPathInfo answers of $n and casnix differ (see $RUN/*.infos)"
    fi
  done
  nix_client path-info --store "unix://$NIX_SOCK" -r "$top" | LC_ALL=C sort >"$RUN/nix-daemon.closure"
  nix_client path-info --store "unix://$CASNIX_SOCK" -r "$top" | LC_ALL=C sort >"$RUN/casnix.closure"
  nix_client path-info --store "unix://$NIX234_SOCK" -r "$top" | LC_ALL=C sort >"$RUN/nix234.closure"
  cmp -s "$RUN/nix-daemon.closure" "$RUN/casnix.closure" || die "nix path-info -r differs"
  cmp -s "$RUN/nix234.closure" "$RUN/casnix.closure" || die "nix path-info -r of nix-daemon 2.34 differs"
  n=$(wc -l <"$RUN/casnix.closure")
  ((n >= 1000)) || die "the closure has only $n paths"
  "$PROTOBENCH" nar -check -socket "$NIX_SOCK" -path "$big" >/dev/null || die "nix-daemon NAR check"
  "$PROTOBENCH" nar -check -socket "$NIX234_SOCK" -path "$big" >/dev/null || die "nix-daemon 2.34 NAR check"
  "$PROTOBENCH" nar -check -socket "$CASNIX_SOCK" -path "$big" >/dev/null || die "casnix NAR check"
}

declare -A M=() # "<daemon>:<figure>:<run>" -> value
DAEMONS=(nix-daemon nix234 casnix)

sock_of() {
  case $1 in
    casnix) echo "$CASNIX_SOCK" ;;
    nix234) echo "$NIX234_SOCK" ;;
    *) echo "$NIX_SOCK" ;;
  esac
}
field() { tr ' ' '\n' | awk -F= -v k="$1" '$1 == k { print $2 }'; }
median() { sort -g | awk '{ v[NR] = $1 } END { if (NR) print v[int((NR + 1) / 2)] }'; }

# The daemons take turns within each figure, casnix between the two anchors; the order reverses
# between runs.
order() { if (($1 % 2)); then echo nix234 casnix nix-daemon; else echo nix-daemon casnix nix234; fi; }

measure_qpi() { # RUN
  local r=$1 c d out
  for c in $QPI_CLIENTS; do
    for d in $(order "$r"); do
      out=$("$PROTOBENCH" qpi -socket "$(sock_of "$d")" -paths "$D/all.paths" -clients "$c" -duration "${QPI_SECS}s") ||
        die "$d: qpi failed"
      M[$d:qpi$c:$r]=$(field rps <<<"$out")
      log "run $r: $d QueryPathInfo, $c connection(s): ${M[$d:qpi$c:$r]} req/s"
    done
  done
}

measure_pathinfo() { # RUN
  local r=$1 d i t0 t1 top
  top=$(cat "$D/closure.top")
  for d in $(order "$r"); do
    for ((i = 0; i < PATHINFO_REPS; i++)); do
      t0=$(date +%s%N)
      nix_client path-info --store "unix://$(sock_of "$d")" -r "$top" >/dev/null
      t1=$(date +%s%N)
      echo $(((t1 - t0) / 1000))
    done | awk '{ printf "%.4f\n", $1 / 1e6 }' >"$RUN/pathinfo.$d.$r"
    M[$d:pathinfo:$r]=$(median <"$RUN/pathinfo.$d.$r")
    log "run $r: $d nix path-info -r: ${M[$d:pathinfo:$r]} s (median of $PATHINFO_REPS: $(tr '\n' ' ' <"$RUN/pathinfo.$d.$r"))"
  done
}

measure_nar() { # RUN
  local r=$1 d out big
  big=$(cat "$D/big.path")
  for d in $(order "$r"); do
    out=$("$PROTOBENCH" nar -socket "$(sock_of "$d")" -path "$big") || die "$d: nar failed"
    M[$d:nar:$r]=$(field mbps <<<"$out")
    M[$d:nar_bytes:$r]=$(field bytes <<<"$out")
    log "run $r: $d NarFromPath: ${M[$d:nar:$r]} MB/s"
  done
}

warm() {
  local big d
  big=$(cat "$D/big.path")
  log "warming the page cache (store tree, casnix data dir) and every daemon"
  find "$ROOT/nix/store" "$D/nix234/nix/store" "$DATA" -type f -exec cat {} + >/dev/null
  for d in "${DAEMONS[@]}"; do
    "$PROTOBENCH" nar -socket "$(sock_of "$d")" -path "$big" >/dev/null
    "$PROTOBENCH" qpi -socket "$(sock_of "$d")" -paths "$D/all.paths" -clients 2 -duration 1s >/dev/null
  done
}

wait_for_load() {
  local start l
  [[ -n $MAX_LOAD ]] || return 0
  start=$(date +%s)
  while :; do
    l=$(cut -d' ' -f1 /proc/loadavg)
    awk -v l="$l" -v m="$MAX_LOAD" 'BEGIN { exit !(l < m) }' && return
    if (($(date +%s) - start > LOAD_WAIT)); then
      log "load $l still >= $MAX_LOAD after $LOAD_WAIT s; measuring anyway"
      return
    fi
    log "load $l >= $MAX_LOAD; waiting"
    sleep 30
  done
}

# --- report --------------------------------------------------------------------------------

med() { # DAEMON FIGURE: median over the runs
  local r
  for ((r = 1; r <= RUNS; r++)); do
    [[ -n ${M[$1:$2:$r]:-} ]] && echo "${M[$1:$2:$r]}"
  done | median
}
ratio() { awk -v a="$1" -v b="$2" 'BEGIN { if (b > 0) printf "%.2f", a / b; else print "n/a" }'; }
verdict() { awk -v x="$1" 'BEGIN { if (x == "n/a") print "n/a"; else print (x + 0 >= 1) ? "yes" : "**no**" }'; }
row() { printf '| %s | %s | %s | %s | %s | %s | %s | %s |\n' "$@"; }

report() {
  local c n a b x y z closure mb
  closure=$(wc -l <"$RUN/casnix.closure")
  mb=$(awk -v b="${M[casnix:nar_bytes:1]:-0}" 'BEGIN { printf "%.0f", b / 1048576 }')
  echo "| figure | nix-daemon 2.34 | nix-daemon 2.8 | casnix serve | casnix / 2.34 | casnix / 2.8 | target | met (vs 2.34; vs 2.8) |"
  echo "|---|---|---|---|---|---|---|---|"
  for c in $QPI_CLIENTS; do
    n=client
    ((c > 1)) && n=clients
    y=$(med nix234 "qpi$c")
    a=$(med nix-daemon "qpi$c")
    b=$(med casnix "qpi$c")
    z=$(ratio "$b" "$y")
    x=$(ratio "$b" "$a")
    row "QueryPathInfo, $c $n (req/s)" "$(printf '%.0f' "$y")" "$(printf '%.0f' "$a")" "$(printf '%.0f' "$b")" "$z" "$x" ">= 1.0 (issue 14: >= 2.0)" "$(verdict "$z"); $(verdict "$x")"
  done
  y=$(med nix234 pathinfo)
  a=$(med nix-daemon pathinfo)
  b=$(med casnix pathinfo)
  z=$(ratio "$y" "$b") # speed ratios: time of nix-daemon / time of casnix
  x=$(ratio "$a" "$b")
  row "\`nix path-info -r\`, $closure paths (s, lower is better)" "$y" "$a" "$b" "$z" "$x" ">= 1.0" "$(verdict "$z"); $(verdict "$x")"
  y=$(med nix234 nar)
  a=$(med nix-daemon nar)
  b=$(med casnix nar)
  z=$(ratio "$b" "$y")
  x=$(ratio "$b" "$a")
  row "NarFromPath, $mb MiB NAR (MB/s)" "$y" "$a" "$b" "$z" "$x" ">= 1.0" "$(verdict "$z"); $(verdict "$x")"
}

raw_runs() {
  local k
  for k in "${!M[@]}"; do
    printf '%s %s\n' "$k" "${M[$k]}"
  done | LC_ALL=C sort
}

section() { # TABLE LOAD-BEFORE LOAD-AFTER SECONDS
  local commit cpu npaths
  commit=$(git -C "$REPO" rev-parse --short HEAD 2>/dev/null || echo "no commit yet")
  [[ -z $(git -C "$REPO" status --porcelain 2>/dev/null | grep -v '^?? bench/' || true) ]] || commit="$commit (+ uncommitted changes)"
  cpu=$(lscpu | awk -F: '/^Model name/ { gsub(/^[ \t]+/, "", $2); print $2; exit }')
  npaths=$(wc -l <"$D/all.paths")
  echo "<!-- bench/daemon.sh: begin (this section is rewritten by every daemon.sh run) -->"
  echo "## Daemon: casnix serve vs nix-daemon"
  echo
  echo "Written by \`bench/daemon.sh\`; see bench/README.md (\"Daemon benchmark\") for what is measured."
  echo
  echo "- date: $(date -u '+%Y-%m-%d %H:%M UTC'); measuring took $4 s"
  echo "- CPU: ${cpu:-unknown}, $(nproc) cores (shared with other jobs), $(awk '/MemTotal/ { printf "%.0f GiB", $2 / 1048576 }' /proc/meminfo) RAM"
  echo "- load average (1, 5, 15 min) before: $2; after: $3"
  echo "- commit: $commit; $(go version 2>/dev/null | cut -d' ' -f3-4); $(nix-daemon --version 2>/dev/null | head -1) (host); ${NIX234_VERSION:-?} (sid root, its own copy of the store)"
  echo "- clients: protobench for QueryPathInfo and NarFromPath, the host's Nix 2.8 for \`nix path-info -r\` (against every daemon)"
  echo "- store: $npaths valid paths ($((WIDTH * DEPTH + 1))-path closure and its .drv files, one $BIG_MIB MiB path);" \
    "casnix data dir $(du -sm "$DATA" | cut -f1) MiB, Nix store $(du -sm "$ROOT/nix" | cut -f1) MiB"
  echo "- runs: $RUNS, each figure is the median run of each daemon; QueryPathInfo: ${QPI_SECS} s per figure;" \
    "\`nix path-info -r\`: median of $PATHINFO_REPS invocations per run"
  echo
  echo "$1"
  echo
  echo "<details><summary>raw per-run values (req/s, seconds, MB/s, bytes)</summary>"
  echo
  echo '```'
  raw_runs
  echo '```'
  echo
  echo "</details>"
  echo "<!-- bench/daemon.sh: end -->"
}

# Replaces the section between the markers in $RESULTS, or appends it.
merge_results() { merge_section daemon.sh "$1" "$RESULTS"; } # SECTION-FILE

profile_top() {
  [[ -f $RUN/casnix.cpu.pprof ]] || return 0
  (cd "$REPO" && go tool pprof -top -nodecount=40 "$CASNIX" "$RUN/casnix.cpu.pprof") >"$RUN/casnix.cpu.top" 2>/dev/null || true
  log "casnix CPU profile: $RUN/casnix.cpu.pprof (top: $RUN/casnix.cpu.top)"
}

main() {
  local step=${1:-all} r started load0 load1 table
  case $step in
    all | prepare) ;;
    merge)
      [[ -f $RUN/section.md ]] || die "no $RUN/section.md yet: run daemon.sh first"
      merge_results "$RUN/section.md"
      log "merged $RUN/section.md into $RESULTS"
      return
      ;;
    *) die "usage: daemon.sh [all|prepare|merge]" ;;
  esac
  need_tools
  prepare
  [[ $step == prepare ]] && return
  trap stop_daemons EXIT
  start_daemons
  check
  wait_for_load
  warm
  started=$(date +%s)
  load0=$(cut -d' ' -f1-3 /proc/loadavg)
  for ((r = 1; r <= RUNS; r++)); do
    measure_qpi "$r"
    measure_pathinfo "$r"
    measure_nar "$r"
  done
  load1=$(cut -d' ' -f1-3 /proc/loadavg)
  stop_daemons
  profile_top
  table=$(report)
  printf '%s\n' "$table"
  section "$table" "$load0" "$load1" "$(($(date +%s) - started))" >"$RUN/section.md"
  merge_results "$RUN/section.md"
  log "merged the Daemon section into $RESULTS (also in $RUN/section.md)"
}

main "$@"
