#!/usr/bin/env bash
# Substitution benchmark (issue 15): casnix as a substituter in front of an upstream binary cache,
# against going to that upstream directly, in one run, alternating, median of RUNS.
#
# The upstream: the output closure of a bench corpus (releases: bookworm, trixie and sid, 544
# paths) copied by real Nix into a signed binary cache (`nix copy --to file://…?compression=zstd`,
# and =xz), served by a static file server on loopback (bench/cmd/cachebench serve: Go's
# net/http file server, sendfile). Figures:
#
#   first   `nix copy --from http://UPSTREAM --to local?root=EMPTY PATHS` (the anchor) against the
#           same client fetching the same paths through an EMPTY `casnix serve --http ADDR
#           --substituters http://UPSTREAM --trusted-public-keys K` (HTTP pull-through: each
#           narinfo a client asks for makes casnix fetch the closure first). Target ≤ 1.1× time.
#   proxy   the same client through a plain streaming reverse proxy in front of the upstream
#           (bench/cmd/cachebench proxy, PROXY=1: no disk, no cache, no checks), against the same
#           direct fetch: what only relaying the requests and bodies costs on this machine, beside
#           the first fetch's ratio. Not a target, and not casnix's anchor.
#   second  casnix now holding the paths: the same `nix copy --from http://casnix` into another
#           empty store, against the same from the static server of the zstd cache (a prebuilt
#           cache of the same paths). Target ≥ 0.8× the static server's speed.
#   daemon  `nix-store --store unix://SOCKET -r PATHS` (Nix 2.8 client) against an empty casnix
#           serve --substituters … on the socket, and against a real nix-daemon 2.34 (the sid
#           root; and 2.8 with DAEMON_ANCHORS) with an empty local store and the same substituter.
#   narinfo `nix path-info -r --store http://UPSTREAM PATHS` (the anchor) against the same through
#           a fresh, empty casnix serve --http (NARINFO=1): what a client's closure walk costs before
#           any NAR is fetched (each narinfo answered starts that path's closure fetch and prefetch).
#   tail    how long casnix's ingest goes on after the client's first fetch (waited for: casnix
#           must hold every path before the second fetch and the bytes row), and its CPU.
#   bytes   du -sB1 of the casnix data dir after the first fetch (as written, and after
#           `casnix repack`; without its NAR cache, http-cache/, which is counted apart) against
#           du -sB1 of the upstream caches (whole, and nar/).
#
# Wall seconds, and CPU seconds (user+sys, cpuacct cgroups: client, casnix, upstream server,
# nix-daemon each counted apart) per figure. Every timed step starts from fresh stores and a
# fresh Nix narinfo cache (XDG_CACHE_HOME), after a sync and a drop of the page cache, with what
# it reads warm again on both sides: the upstream caches' files, a running casnix's data dir (the
# second fetch), the Nix client and casnix binaries. Without the drop, the same copy's client
# cost grew run by run on this machine (kernel CPU 4.6, 12.7, 16.2 s over three identical direct
# copies; 5.4, 5.2, 4.6 s with it). Writes its section of bench/RESULTS.md.
#
#   bench/subst.sh                       # RUNS=3, the whole corpus, upstreams zstd and xz
#   RUNS=1 PATHS=100 UPSTREAMS=zstd bench/subst.sh   # quick: the closure of the first 100 paths
#   CLIENT=2.8 bench/subst.sh            # nix copy of the host's Nix 2.8 instead of Nix 2.34
#   DAEMON=0 bench/subst.sh              # without the daemon figures
#   CASNIX=/path/to/casnix bench/subst.sh
#
# Knobs: RUNS (3), CORPUS (releases), PATHS (all; N: the closure of the first N paths in
# references-first order), UPSTREAMS ("zstd xz"; a missing cache is made once, xz takes minutes),
# CLIENT (2.34 if the sid root is there, else 2.8), DAEMON (1), DAEMON_ANCHORS ("2.34 2.34-fsync";
# 2.34-fsync is nix-daemon 2.34 with fsync-store-paths = true, the durability casnix keeps; add 2.8),
# SID_ROOT, QUIET_BUSY/QUIET_TIMEOUT (wait for other work before each timed step), RESULTS,
# SECTION (subst.sh: the RESULTS.md section it rewrites; another name keeps a partial run apart),
# DROP_CACHES (1; 0 keeps the page cache between timed steps, as before), FRESH_FS (1: RUN and the
# steps' stores are fresh journaled ext4s on loop devices, below; 0: directories of BENCH_DIR's),
# PROFILE=1 (CPU profiles of casnix serve: $BENCH_DIR/subst/run/casnix-*.cpu.pprof, daemon-casnix/),
# PERF=1 (perf record of casnix serve during each first fetch only: $BENCH_DIR/subst/run/first_*.perf.data),
# NARINFO (1; 0 skips the narinfo figure), PROXY (1; 0 skips the plain proxy's first fetch).
# Run it at nice 0: only the build, the upstream caches' making, repack and verify run at nice 10.
set -Eeuo pipefail

BENCH=subst
CG_PREFIX=casnix-subst
BENCH_DIR=${BENCH_DIR:-/var/tmp/casnix-bench}
RUNS=${RUNS:-3}
CORPUS=${CORPUS:-releases}
PATHS=${PATHS:-all}
UPSTREAMS=${UPSTREAMS:-zstd xz}
DAEMON=${DAEMON:-1}
DAEMON_ANCHORS=${DAEMON_ANCHORS:-2.34 2.34-fsync}
PROFILE=${PROFILE:-0}
PERF=${PERF:-0}
NARINFO=${NARINFO:-1}
PROXY=${PROXY:-1}
SID_ROOT=${SID_ROOT:-/var/cache/casnix-tests/roots/sid}
HERE=$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)
# shellcheck source=bench/lib.sh
. "$HERE/lib.sh"
REPO=$(cd "$HERE/.." && pwd)
CASNIX=${CASNIX:-}
RESULTS=${RESULTS:-$HERE/RESULTS.md}
SECTION=${SECTION:-subst.sh}
SRC=$BENCH_DIR/corpora/$CORPUS
W=$BENCH_DIR/subst
RUN=$W/run
nixo=(--option experimental-features nix-command --option build-users-group '' --option substituters '')
trap 'log "failed at line $LINENO: $BASH_COMMAND"' ERR

[[ $(id -u) == 0 ]] || die "needs root"
[[ -f $SRC/nix/var/nix/db/db.sqlite ]] || die "no corpus at $SRC: run bench/build-corpora.sh first"
command -v nix-daemon >/dev/null || apt-get install -y -q nix-bin >&2
HAVE234=0
[[ -x $SID_ROOT/usr/bin/nix && -d $SID_ROOT/tmp ]] && HAVE234=1
CLIENT=${CLIENT:-$([[ $HAVE234 == 1 ]] && echo 2.34 || echo 2.8)}
[[ $CLIENT == 2.8 || $HAVE234 == 1 ]] || die "CLIENT=$CLIENT needs the sid root at $SID_ROOT (tests/nixenv/make-root.sh sid)"
# (grep -v finding nothing to keep exits 1, which would end the script under set -e.)
[[ $HAVE234 == 1 ]] || DAEMON_ANCHORS=$(printf '%s\n' $DAEMON_ANCHORS | { grep -v '^2\.34' || true; } | xargs)
export SID_ROOT
export -f in_sid
mkdir -p "$W/bin" "$RUN"
# Everything the timed steps write goes to journaled ext4s made afresh (lib.sh's fresh_fs, which
# says why): RUN for each bench run; in it, before each timed step, the client's side ($RUN/sid-tmp:
# the client's store and narinfo cache), and before each casnix first fetch and each daemon step
# the server's ($RUN/srv-UPSTREAM: casnix's data dir, kept for the second fetch and the bytes row;
# $RUN/dmn: the daemon's store or data dir). One filesystem for a whole run was not enough: a
# client writing where an earlier step's store had been deleted and casnix's data dir written
# (the second fetch) spent 1.2 s more CPU than on a fresh one. FRESH_FS=0: directories of
# BENCH_DIR's filesystem, as before.
FRESH_FS=${FRESH_FS:-1}
if [[ $FRESH_FS == 1 ]]; then fresh_fs "$RUN" "$W/run.img"; else unmount_fs "$RUN"; fi
if [[ -z $CASNIX ]]; then
  CASNIX=$W/bin/casnix
  log "building casnix from $REPO"
  (cd "$REPO" && CGO_ENABLED=0 nice -n 10 go build -o "$CASNIX" .) || die "go build failed"
  COMMIT=$(cd "$REPO" && git rev-parse --short HEAD)$(cd "$REPO" && git diff --quiet HEAD -- . ':!bench/RESULTS.md' || echo "+dirty")
else
  COMMIT="binary $CASNIX"
fi
(cd "$REPO" && CGO_ENABLED=0 nice -n 10 go build -o "$W/bin/cachebench" ./bench/cmd/cachebench) || die "cachebench build failed"

PIDS=()
cleanup() {
  local p
  for p in "${PIDS[@]}"; do kill "$p" 2>/dev/null || true; done
  for p in "${PIDS[@]}"; do wait "$p" 2>/dev/null || true; done
  cg_rm client casnix daemon proxy static-zstd static-xz
}
trap cleanup EXIT
cg_new client casnix daemon proxy

# The paths: every output (no .drv), references first; PATHS=N keeps the closure of the first N.
if [[ ! -s $W/paths.$CORPUS || $W/paths.$CORPUS -ot $SRC/nix/var/nix/db/db.sqlite ]]; then
  mapfile -t outs < <(ls "$SRC/nix/store" | grep -v '\.drv$' | sed 's|^|/nix/store/|')
  nix-store --store "local?root=$SRC" "${nixo[@]}" -qR "${outs[@]}" | grep -v '\.drv$' >"$W/paths.$CORPUS"
fi
if [[ $PATHS == all ]]; then
  cp "$W/paths.$CORPUS" "$RUN/paths"
else
  mapfile -t first < <(head -n "$PATHS" "$W/paths.$CORPUS")
  nix-store --store "local?root=$SRC" "${nixo[@]}" -qR "${first[@]}" >"$RUN/paths"
fi
NPATHS=$(wc -l <"$RUN/paths")
NAR_BYTES=$(nix "${nixo[@]}" path-info --store "local?root=$SRC" --json $(cat "$RUN/paths") |
  python3 -c 'import json, sys; d = json.load(sys.stdin); v = d.values() if isinstance(d, dict) else d; print(sum(p["narSize"] for p in v))')
log "corpus $CORPUS: $NPATHS paths ($PATHS), $NAR_BYTES NAR bytes"

# The signing key and the upstream caches, made once by Nix 2.8 (every path of the corpus; a
# PATHS subset is fetched from the same caches).
[[ -f $W/upstream.sk ]] || nix-store --generate-binary-cache-key casnix-bench-upstream-1 "$W/upstream.sk" "$W/upstream.pk"
PK=$(cat "$W/upstream.pk")
for u in $UPSTREAMS; do
  [[ $u == zstd || $u == xz ]] || die "UPSTREAMS: zstd or xz, not $u"
  stamp=$W/up-$u.$CORPUS.stamp
  if [[ ! -f $stamp || $stamp -ot $SRC/nix/var/nix/db/db.sqlite ]]; then
    log "making the $u upstream cache (once)"
    rm -rf "$W/up-$u"
    par=
    [[ $u == xz ]] && par='&parallel-compression=true'
    nice -n 10 nix "${nixo[@]}" copy --store "local?root=$SRC" --to "file://$W/up-$u?compression=$u$par&secret-key=$W/upstream.sk" \
      $(cat "$W/paths.$CORPUS") 2>"$W/up-$u.log" || die "nix copy to the $u cache failed: $(tail -3 "$W/up-$u.log")"
    touch "$stamp"
  fi
done

# The static servers (started once, each in its own cgroup) and the page cache: each upstream
# cache is read once, so every fetch reads it from memory.
declare -A PORT SPID
UPSTREAMS_DIRS=()
for u in $UPSTREAMS; do
  UPSTREAMS_DIRS+=("$W/up-$u")
  PORT[$u]=$(free_port)
  "$W/bin/cachebench" serve -dir "$W/up-$u" -addr "127.0.0.1:${PORT[$u]}" &
  SPID[$u]=$!
  PIDS+=($!)
  cg_add "static-$u" "$!"
  wait_http "${PORT[$u]}" "${SPID[$u]}"
  tar -C "$W/up-$u" -cf - . | cat >/dev/null
done

# Client side. Nix keeps a narinfo cache under XDG_CACHE_HOME keyed by the cache's URL: every
# fetch gets a fresh one, or a later run would skip the narinfo requests (and casnix's pull-through).
export NIX_CONF_DIR=$RUN/conf NIX_USER_CONF_FILES=$RUN/conf/nix.conf NIX_REMOTE=
mkdir -p "$RUN/conf"
# The 2.8 client of the daemon figures asks the daemon to substitute; its own substituters setting
# (sent to the daemon, which honours a trusted client's) names the same upstream.
printf 'experimental-features = nix-command\nbuild-users-group =\nsubstituters = http://127.0.0.1:%s\ntrusted-public-keys = %s\n' \
  "${PORT[zstd]:-0}" "$PK" >"$RUN/conf/nix.conf"
mkdir -p "$RUN/sid-nix" "$RUN/sid-tmp"
NIX28=$(nix --version | awk '{ print $NF }')
NIX234=
[[ $HAVE234 == 1 ]] && NIX234=$(in_sid "$RUN/sid-nix" "$RUN/sid-tmp" 'nix --version' | awk '{ print $NF }')
[[ $HAVE234 == 0 || $NIX234 == 2.3[4-9]* ]] || die "the sid root's Nix is $NIX234, not 2.34 or newer"

declare -A M
# fresh_caches [DIR…]: sync, drop the page cache, then read back what the timed step reads on
# both sides (the upstream caches, the DIRs, the client's and casnix's binaries), so every step
# starts from the same memory state.
DROP_CACHES=${DROP_CACHES:-1}
fresh_caches() {
  sync
  [[ $DROP_CACHES == 1 ]] || return 0
  echo 1 >/proc/sys/vm/drop_caches
  local d
  for d in "${UPSTREAMS_DIRS[@]}" "$@"; do tar -C "$d" -cf - . | cat >/dev/null; done
  cat "$CASNIX" >/dev/null
  nix --version >/dev/null
  [[ $HAVE234 == 0 ]] || in_sid "$RUN/sid-nix" "$RUN/sid-tmp" 'nix --version' >/dev/null
}
# WARM: directories fresh_caches reads back before a fetch (a running casnix's data dir).
WARM=()
# fetch NAME RUN URL: one timed `nix copy --from URL` of the paths into an empty local store
# (client CLIENT), in the cgroup "client"; records NAME:RUN (wall s) and NAME_client_cpu:RUN.
fetch() {
  local name=$1 r=$2 url=$3 t0 t1 c0
  fresh_dir "$RUN/sid-tmp" "$W/client.img"
  cp "$RUN/paths" "$RUN/sid-tmp/paths"
  fresh_caches "${WARM[@]}"
  M[busy_$name:$r]=$(wait_quiet)
  M[load_$name:$r]=$(cut -d' ' -f1 /proc/loadavg)
  c0=$(cg_cpu client)
  t0=$(now)
  if [[ $CLIENT == 2.8 ]]; then
    XDG_CACHE_HOME=$RUN/sid-tmp/xdg cg_exec client nix "${nixo[@]}" --option trusted-public-keys "$PK" \
      copy --from "$url" --to "local?root=$RUN/sid-tmp/dst" $(cat "$RUN/paths") 2>"$RUN/$name.client.log" ||
      die "$name: nix copy failed: $(tail -3 "$RUN/$name.client.log")"
  else
    cg_exec client bash -c 'in_sid "$@"' in_sid "$RUN/sid-nix" "$RUN/sid-tmp" \
      "XDG_CACHE_HOME=/tmp/xdg nix --option experimental-features nix-command --option build-users-group '' \
        --option substituters '' --option trusted-public-keys '$PK' \
        copy --from '$url' --to local?root=/tmp/dst \$(cat /tmp/paths)" 2>"$RUN/$name.client.log" ||
      die "$name: nix copy failed: $(tail -3 "$RUN/$name.client.log")"
  fi
  t1=$(now)
  M[$name:$r]=$(awk -v a="$t0" -v b="$t1" 'BEGIN { printf "%.2f", b - a }')
  M[${name}_client_cpu:$r]=$(awk -v a="$c0" -v b="$(cg_cpu client)" 'BEGIN { printf "%.2f", b - a }')
  local n d=$RUN/sid-tmp/dst/nix/store
  n=$(ls "$d" | wc -l)
  ((n == NPATHS)) || die "$name: the client's store holds $n paths, not $NPATHS"
}
# server_cpu NAME RUN GROUP C0: records NAME_GROUP_cpu:RUN, GROUP's CPU seconds since C0.
server_cpu() { M[$1_$3_cpu:$2]=$(awk -v a="$4" -v b="$(cg_cpu "$3")" 'BEGIN { printf "%.2f", b - a }'); }

# start_casnix DATA ARGS…: an empty casnix serve substituting from the zstd or xz upstream, in the
# cgroup "casnix"; sets CPID. --repack-quiet 0: no background repack starts between the figures.
start_casnix() {
  local data=$1 prof=()
  shift
  rm -rf "$data"
  # The profile is written when serve stops: the last run's of each figure is kept.
  [[ $PROFILE == 0 ]] || prof=(--cpu-profile "$data.cpu.pprof")
  "$CASNIX" --data-dir "$data" "${prof[@]}" --log-level warn serve --repack-quiet 0 --trusted-public-keys "$PK" "$@" \
    >"$data.log" 2>&1 &
  CPID=$!
  PIDS+=($CPID)
  cg_add casnix "$CPID"
}
stop() {
  kill "$1" 2>/dev/null || true
  wait "$1" 2>/dev/null || true
}
hwm() { awk '/^VmHWM:/ { print $2 * 1024 }' "/proc/$1/status"; }

# http_round RUN UPSTREAM: direct fetch from UPSTREAM, (PROXY=1) the same through a plain reverse
# proxy, first fetch through an empty casnix pulling from it, and (zstd) the second fetch from that
# casnix; the order rotates with the run.
http_round() {
  local r=$1 u=$2 step c0 s0 p k data=$RUN/srv-$2/casnix
  local steps=(direct casnix)
  [[ $PROXY == 0 ]] || steps=(direct proxy casnix)
  k=$(((r - 1) % ${#steps[@]}))
  steps=("${steps[@]:k}" "${steps[@]:0:k}")
  for step in "${steps[@]}"; do
    if [[ $step == proxy ]]; then
      p=$(free_port)
      "$W/bin/cachebench" proxy -to "http://127.0.0.1:${PORT[$u]}" -addr "127.0.0.1:$p" &
      local ppid=$!
      PIDS+=($ppid)
      cg_add proxy "$ppid"
      wait_http "$p" "$ppid"
      c0=$(cg_cpu proxy) s0=$(cg_cpu "static-$u")
      fetch "proxy_$u" "$r" "http://127.0.0.1:$p"
      server_cpu "proxy_$u" "$r" proxy "$c0"
      server_cpu "proxy_$u" "$r" "static-$u" "$s0"
      stop "$ppid"
      log "run $r $u through a plain proxy: ${M[proxy_$u:$r]} s (client ${M[proxy_${u}_client_cpu:$r]} s, proxy ${M[proxy_${u}_proxy_cpu:$r]} s CPU)"
      continue
    fi
    if [[ $step == direct ]]; then
      s0=$(cg_cpu "static-$u")
      fetch "direct_$u" "$r" "http://127.0.0.1:${PORT[$u]}"
      server_cpu "direct_$u" "$r" "static-$u" "$s0"
      log "run $r $u direct: ${M[direct_$u:$r]} s (client ${M[direct_${u}_client_cpu:$r]} s CPU)"
      continue
    fi
    p=$(free_port)
    fresh_dir "$RUN/srv-$u" "$W/server-$u.img"
    start_casnix "$data" --http "127.0.0.1:$p" --http-only --substituters "http://127.0.0.1:${PORT[$u]}"
    wait_http "$p" "$CPID"
    c0=$(cg_cpu casnix) s0=$(cg_cpu "static-$u")
    local perf=
    if [[ $PERF == 1 ]]; then
      # The client's window only (a Go profile would take in the ingest tail too).
      perf record -q -F 999 -g -p "$CPID" -o "$RUN/first_$u.perf.data" 2>/dev/null &
      perf=$!
    fi
    fetch "first_$u" "$r" "http://127.0.0.1:$p"
    if [[ -n $perf ]]; then
      kill -INT "$perf"
      wait "$perf" || true
    fi
    server_cpu "first_$u" "$r" casnix "$c0"
    server_cpu "first_$u" "$r" "static-$u" "$s0"
    M[first_${u}_hwm:$r]=$(hwm "$CPID")
    # The pull-through's ingest can still run once the client is done (the client gets NARs from
    # the download's spool and the NAR cache): wait until casnix holds every path (the second
    # fetch's premise, and the bytes row's), timing that tail and its CPU apart.
    c0=$(cg_cpu casnix) t0=$(now)
    until "$CASNIX" --data-dir "$data" --log-level error path-info $(cat "$RUN/paths") >/dev/null 2>&1; do
      awk -v a="$t0" -v b="$(now)" 'BEGIN { exit !(b - a > 900) }' && die "casnix lacks paths 15 min after the first fetch"
      sleep 0.2
    done
    M[tail_$u:$r]=$(awk -v a="$t0" -v b="$(now)" 'BEGIN { printf "%.2f", b - a }')
    server_cpu "tail_$u" "$r" casnix "$c0"
    M[bytes_casnix_$u:$r]=$(du -sB1 --exclude=http-cache "$data" | cut -f1)
    M[bytes_httpcache_$u:$r]=$(du -sB1 "$data/http-cache" 2>/dev/null | cut -f1 || echo 0)
    log "run $r $u first through casnix: ${M[first_$u:$r]} s (client ${M[first_${u}_client_cpu:$r]} s, casnix ${M[first_${u}_casnix_cpu:$r]} s CPU), then ingest tail ${M[tail_$u:$r]} s (casnix ${M[tail_${u}_casnix_cpu:$r]} s CPU), data dir ${M[bytes_casnix_$u:$r]} B"
    if [[ $u == zstd ]]; then
      c0=$(cg_cpu casnix)
      WARM=("$data")
      fetch "second" "$r" "http://127.0.0.1:$p"
      WARM=()
      server_cpu "second" "$r" casnix "$c0"
      M[second_hwm:$r]=$(hwm "$CPID")
      log "run $r second from casnix: ${M[second:$r]} s (casnix ${M[second_casnix_cpu:$r]} s CPU)"
    fi
    stop "$CPID"
  done
}

# narinfos NAME RUN URL: one timed `nix path-info -r --store URL PATHS` (client CLIENT, fresh narinfo
# cache), in the cgroup "client"; records NAME:RUN (wall s).
narinfos() {
  local name=$1 r=$2 url=$3 t0 t1 n
  rm -rf "$RUN/xdg" "$RUN/sid-tmp/xdg"
  fresh_caches
  M[busy_$name:$r]=$(wait_quiet)
  M[load_$name:$r]=$(cut -d' ' -f1 /proc/loadavg)
  t0=$(now)
  if [[ $CLIENT == 2.8 ]]; then
    n=$(XDG_CACHE_HOME=$RUN/xdg cg_exec client nix "${nixo[@]}" --option trusted-public-keys "$PK" \
      path-info --store "$url" -r $(cat "$RUN/paths") 2>"$RUN/$name.client.log" | wc -l) ||
      die "$name: nix path-info failed: $(tail -3 "$RUN/$name.client.log")"
  else
    n=$(cg_exec client bash -c 'in_sid "$@"' in_sid "$RUN/sid-nix" "$RUN/sid-tmp" \
      "XDG_CACHE_HOME=/tmp/xdg nix --option experimental-features nix-command --option build-users-group '' \
        --option substituters '' --option trusted-public-keys '$PK' \
        path-info --store '$url' -r \$(cat /tmp/paths)" 2>"$RUN/$name.client.log" | wc -l) ||
      die "$name: nix path-info failed: $(tail -3 "$RUN/$name.client.log")"
  fi
  t1=$(now)
  M[$name:$r]=$(awk -v a="$t0" -v b="$t1" 'BEGIN { printf "%.2f", b - a }')
  ((n == NPATHS)) || die "$name: nix path-info -r listed $n paths, not $NPATHS"
}

# narinfo_round RUN UPSTREAM: the narinfo figure, straight from UPSTREAM and through a fresh casnix
# pulling from it (stopped right after: its closure fetches are not waited for); order alternating.
narinfo_round() {
  local r=$1 u=$2 step p
  local steps=(direct casnix)
  ((r % 2)) || steps=(casnix direct)
  for step in "${steps[@]}"; do
    if [[ $step == direct ]]; then
      narinfos "narinfo_direct_$u" "$r" "http://127.0.0.1:${PORT[$u]}"
      continue
    fi
    p=$(free_port)
    start_casnix "$RUN/casnix-narinfo-$u" --http "127.0.0.1:$p" --http-only --substituters "http://127.0.0.1:${PORT[$u]}"
    wait_http "$p" "$CPID"
    narinfos "narinfo_casnix_$u" "$r" "http://127.0.0.1:$p"
    stop "$CPID"
  done
  log "run $r $u narinfos: through casnix ${M[narinfo_casnix_$u:$r]} s, direct ${M[narinfo_direct_$u:$r]} s"
}

# daemon_one NAME RUN: `nix-store --store unix://SOCKET -r PATHS` (Nix 2.8 client) against an empty
# casnix serve --substituters (NAME casnix) or nix-daemon 2.34 / 2.8 with an empty local store.
daemon_one() {
  local name=$1 r=$2 sock dpid c0 s0 k0 t0 t1 dest=$RUN/dmn/daemon-$1 up=http://127.0.0.1:${PORT[zstd]}
  rm -rf "$RUN/xdg"
  fresh_dir "$RUN/dmn" "$W/daemon.img"
  mkdir -p "$dest"
  case $name in
  casnix)
    sock=$RUN/casnix.sock
    start_casnix "$dest/data" --socket "$sock" --substituters "$up"
    dpid=$CPID
    ;;
  nix234 | nix234-fsync)
    local fsync=
    # fsync-store-paths: each path's files synced before it is registered, as casnix syncs a
    # path's packs before its commit (Nix's default leaves them to writeback: a crash can lose
    # paths the database holds valid).
    [[ $name == nix234 ]] || fsync="--option fsync-store-paths true"
    mkdir -p "$dest/nix" "$dest/tmp"
    sock=$dest/tmp/d.sock
    # In the cgroup before it forks: every process of the daemon is counted and stopped.
    cg_exec daemon bash -c 'in_sid "$@"' in_sid "$dest/nix" "$dest/tmp" "export XDG_CACHE_HOME=/tmp/xdg \
      NIX_DAEMON_SOCKET_PATH=/tmp/d.sock; exec nix-daemon $fsync --option build-users-group '' --option experimental-features \
      nix-command --option substituters $up --option trusted-public-keys '$PK'" >"$dest.log" 2>&1 &
    dpid=$!
    ;;
  nix28)
    sock=$dest/d.sock
    XDG_CACHE_HOME=$dest/xdg NIX_DAEMON_SOCKET_PATH=$sock cg_exec daemon nix-daemon --store "local?root=$dest" \
      --option substituters "$up" --option trusted-public-keys "$PK" >"$dest.log" 2>&1 &
    dpid=$!
    ;;
  esac
  PIDS+=($dpid)
  [[ $name != casnix ]] || cg_add daemon "$dpid"
  local i
  for ((i = 0; i < 300; i++)); do
    kill -0 "$dpid" 2>/dev/null || die "daemon $name exited: $(tail -3 "$dest.log")"
    [[ -S $sock ]] && XDG_CACHE_HOME=$RUN/xdg nix store ping --store "unix://$sock" >/dev/null 2>&1 && break
    sleep 0.1
  done
  fresh_caches
  M[busy_daemon_$name:$r]=$(wait_quiet)
  M[load_daemon_$name:$r]=$(cut -d' ' -f1 /proc/loadavg)
  c0=$(cg_cpu daemon) s0=$(cg_cpu static-zstd) k0=$(cg_cpu client)
  t0=$(now)
  XDG_CACHE_HOME=$RUN/xdg cg_exec client nix-store --store "unix://$sock" -r $(cat "$RUN/paths") >/dev/null 2>"$RUN/daemon-$name.client.log" ||
    die "daemon $name: nix-store -r failed: $(tail -3 "$RUN/daemon-$name.client.log")"
  t1=$(now)
  M[daemon_$name:$r]=$(awk -v a="$t0" -v b="$t1" 'BEGIN { printf "%.2f", b - a }')
  server_cpu "daemon_$name" "$r" daemon "$c0"
  server_cpu "daemon_$name" "$r" client "$k0"
  server_cpu "daemon_$name" "$r" static-zstd "$s0"
  local n
  n=$(XDG_CACHE_HOME=$RUN/xdg nix path-info --store "unix://$sock" --all | wc -l)
  ((n >= NPATHS)) || die "daemon $name holds $n paths, not $NPATHS"
  [[ $name != casnix ]] || M[daemon_casnix_hwm:$r]=$(hwm "$dpid")
  cg_kill daemon
  stop "$dpid"
  log "run $r daemon $name: ${M[daemon_$name:$r]} s (daemon ${M[daemon_${name}_daemon_cpu:$r]} s CPU)"
}

for ((r = 1; r <= RUNS; r++)); do
  ups=($UPSTREAMS)
  ((r % 2)) || ups=($(printf '%s\n' "${ups[@]}" | tac))
  for u in "${ups[@]}"; do
    http_round "$r" "$u"
    [[ $NARINFO == 0 ]] || narinfo_round "$r" "$u"
  done
  if [[ $DAEMON == 1 && -n ${PORT[zstd]:-} ]]; then
    ds=(casnix $DAEMON_ANCHORS)
    ((r % 2)) || ds=($(printf '%s\n' "${ds[@]}" | tac))
    for d in "${ds[@]}"; do daemon_one "${d/2./nix2}" "$r"; done
  fi
  M[load:$r]=$(cut -d' ' -f1-3 /proc/loadavg)
done

# Bytes: the upstream caches, and the last casnix data dir again after `casnix repack`.
# With PATHS=N, the upstream's bytes are those of the fetched paths' narinfos and NAR files.
for u in $UPSTREAMS; do
  if [[ $PATHS == all ]]; then
    M[bytes_up_$u]=$(du -sB1 "$W/up-$u" | cut -f1)
    M[bytes_up_${u}_nar]=$(du -sB1 "$W/up-$u/nar" | cut -f1)
  else
    sed 's|^/nix/store/\([^-]*\)-.*|'"$W/up-$u"'/\1.narinfo|' "$RUN/paths" >"$RUN/narinfos"
    sed -n 's|^URL: |'"$W/up-$u"'/|p' $(cat "$RUN/narinfos") >"$RUN/nars"
    M[bytes_up_${u}_nar]=$(du -cB1 $(cat "$RUN/nars") | tail -1 | cut -f1)
    M[bytes_up_$u]=$(du -cB1 $(cat "$RUN/nars" "$RUN/narinfos") | tail -1 | cut -f1)
  fi
done
ubytes=${UPSTREAMS%% *}
t0=$(now)
nice -n 10 "$CASNIX" --data-dir "$RUN/srv-$ubytes/casnix" repack >"$RUN/repack.log" 2>&1 || die "repack failed: $(tail -3 "$RUN/repack.log")"
M[repack_s]=$(awk -v a="$t0" -v b="$(now)" 'BEGIN { printf "%.1f", b - a }')
M[bytes_casnix_repacked]=$(du -sB1 --exclude=http-cache "$RUN/srv-$ubytes/casnix" | cut -f1)
nice -n 10 "$CASNIX" --data-dir "$RUN/srv-$ubytes/casnix" verify >"$RUN/verify.log" 2>&1 || die "verify after repack failed: $(tail -3 "$RUN/verify.log")"

med() { for ((r = 1; r <= RUNS; r++)); do echo "${M[$1:$r]}"; done | median; }
ratio() { awk -v a="$1" -v b="$2" 'BEGIN { printf "%.2f", a / b }'; }
mbps() { awk -v s="$1" -v n="$NAR_BYTES" 'BEGIN { printf "%.0f", n / 1e6 / s }'; }
mib() { awk -v b="$1" 'BEGIN { printf "%.0f", b / 1048576 }'; }
met() { awk -v v="$1" -v t="$3" -v op="$2" 'BEGIN { ok = op == "<=" ? v <= t : v >= t; print ok ? "yes" : "no" }'; }
loads() { for ((r = 1; r <= RUNS; r++)); do printf '[%s] ' "${M[load:$r]}"; done; }
# lo NAME: the 1-min load average at the start of NAME in each run, "a/b/c".
lo() { for ((r = 1; r <= RUNS; r++)); do printf '%s%s' "${M[load_$1:$r]}" "$( ((r < RUNS)) && echo /)"; done; }
# cpus NAME: "client C s, casnix S s, upstream U s" medians of NAME's CPU seconds.
cpus() {
  local k out=
  for k in client casnix daemon proxy static-zstd static-xz; do
    [[ -n ${M[$1_${k}_cpu:1]:-} ]] || continue
    out+="${out:+, }${k/static-*/upstream server} $(med "$1_${k}_cpu")"
  done
  echo "$out"
}
CLIENTV=$([[ $CLIENT == 2.8 ]] && echo "$NIX28" || echo "$NIX234")
table="| figure | casnix | anchor | casnix / anchor | target | met | 1-min load per run: casnix; anchor |
|---|---|---|---|---|---|---|"
for u in $UPSTREAMS; do
  f=$(med "first_$u") d=$(med "direct_$u") q=$(ratio "$(med "first_$u")" "$(med "direct_$u")")
  table+="
| first fetch, $u upstream: nix copy --from http:// (Nix $CLIENTV) wall s; CPU s | through an empty casnix serve --http (pull-through): $f s ($(mbps "$f") MB/s); CPU: $(cpus "first_$u") | straight from the upstream: $d s ($(mbps "$d") MB/s); CPU: $(cpus "direct_$u") | $q× time | ≤ 1.1× | $(met "$q" "<=" 1.1) | $(lo "first_$u"); $(lo "direct_$u") |"
  [[ -n ${M[proxy_$u:1]:-} ]] || continue
  x=$(med "proxy_$u")
  table+="
| the same fetch through a plain streaming reverse proxy (cachebench proxy: no disk, no checks), $u upstream; wall s; CPU s | (not casnix) the proxy: $x s ($(mbps "$x") MB/s); CPU: $(cpus "proxy_$u") | straight from the upstream: $d s | $(ratio "$x" "$d")× time; casnix's first fetch $(ratio "$f" "$x")× the proxy's | — (relaying alone, for scale) | | $(lo "proxy_$u"); $(lo "direct_$u") |"
done
for u in $UPSTREAMS; do
  [[ -n ${M[narinfo_casnix_$u:1]:-} ]] || continue
  c=$(med "narinfo_casnix_$u") d=$(med "narinfo_direct_$u")
  table+="
| narinfos of the closure, $u upstream: nix path-info -r --store http:// (Nix $CLIENTV) wall s | through an empty casnix serve --http: $c s | straight from the upstream: $d s | $(ratio "$c" "$d")× time | — | | $(lo "narinfo_casnix_$u"); $(lo "narinfo_direct_$u") |"
done
if [[ -n ${M[second:1]:-} ]]; then
  s=$(med second) d=$(med direct_zstd) q=$(ratio "$(med direct_zstd)" "$(med second)")
  table+="
| second fetch: nix copy --from http:// (Nix $CLIENTV) wall s; CPU s | from casnix holding the paths: $s s ($(mbps "$s") MB/s); CPU: $(cpus second) | static server of the zstd cache: $d s ($(mbps "$d") MB/s); CPU: $(cpus direct_zstd) | $q× speed | ≥ 0.8× | $(met "$q" ">=" 0.8) | $(lo second); $(lo direct_zstd) |"
fi
if [[ -n ${M[daemon_casnix:1]:-} ]]; then
  c=$(med daemon_casnix)
  for a in $DAEMON_ANCHORS; do
    n=nix${a/./}
    [[ $n == nix28 ]] && v=$NIX28 || v=$NIX234
    q=$(ratio "$c" "$(med "daemon_$n")")
    t="≤ 1.1×" mt=$(met "$q" "<=" 1.1)
    if [[ $n == *-fsync ]]; then
      v="$v with fsync-store-paths = true (each path synced before it is registered, as casnix does)"
      t="—" mt=""
    fi
    table+="
| first fetch through the daemon socket: nix-store -r (Nix $NIX28 client), zstd upstream, wall s; CPU s | empty casnix serve --substituters: $c s ($(mbps "$c") MB/s); CPU: $(cpus daemon_casnix) | nix-daemon $v, empty local store, same substituter: $(med "daemon_$n") s ($(mbps "$(med "daemon_$n")") MB/s); CPU: $(cpus "daemon_$n") | $q× time | $t | $mt | $(lo daemon_casnix); $(lo "daemon_$n") |"
  done
fi
cb=$(med "bytes_casnix_$ubytes")
for u in $UPSTREAMS; do
  table+="
| bytes stored after the first fetch vs the $u upstream cache (du -sB1) | $(mib "$cb") MiB as substituted, $(mib "${M[bytes_casnix_repacked]}") MiB after casnix repack; NAR cache (http-cache/) $(mib "${M[bytes_httpcache_$u:1]:-0}") MiB more | $(mib "${M[bytes_up_$u]}") MiB (nar/: $(mib "${M[bytes_up_${u}_nar]}") MiB) | $(ratio "$cb" "${M[bytes_up_$u]}")×, $(ratio "${M[bytes_casnix_repacked]}" "${M[bytes_up_$u]}")× repacked | — | | |"
done
echo "$table"

{
  echo "<!-- bench/$SECTION: begin (rewritten by every subst.sh run with SECTION=$SECTION) -->"
  echo "## Substitution: casnix in front of an upstream cache (\`bench/subst.sh\`$([[ $SECTION == subst.sh ]] || echo ", $SECTION"))"
  echo
  echo "$NPATHS output paths of the $CORPUS corpus (PATHS=$PATHS; $((NAR_BYTES / 1000000)) MB of NAR), signed binary caches"
  echo "written by \`nix copy --to file://…?compression=zstd|xz\` (Nix $NIX28), served by a static file server on loopback"
  echo "(\`cachebench serve\`, sendfile). Before each timed step: sync, $([[ $DROP_CACHES == 1 ]] && echo "the page cache dropped, then the upstream caches (and for the second fetch casnix's data dir) and both sides' binaries read back into it" || echo "the page cache kept (DROP_CACHES=0)")$([[ $FRESH_FS == 1 ]] && echo "; the client's store on a journaled ext4 made afresh for each step, casnix's data dir or the daemon's store on one made afresh for each casnix or daemon step (loop devices: bench/lib.sh's fresh_fs), not on this machine's journal-less root ext4, whose file creation right after a deletion costs far more"). Client: \`nix copy --from http://… --to local?root=EMPTY PATHS\`"
  echo "(Nix $CLIENTV, fresh narinfo cache each time), signature checked against the upstream key. casnix: a fresh data dir,"
  echo "\`casnix serve --http … --http-only --substituters http://UPSTREAM --trusted-public-keys K --repack-quiet 0\` (defaults"
  echo "otherwise: the NAR cache in DATA_DIR/http-cache, which keeps the upstream zstd and xz files the pull checked, and NARs rendered from the store once served). Daemon rows: \`nix-store --store unix://S -r"
  echo "PATHS\` (Nix $NIX28). CPU: user+sys seconds per cgroup (cpuacct) over the timed step: the client (Nix, with its"
  echo "unpacking), casnix serve, nix-daemon (its children included), the upstream's static server. Medians of $RUNS runs,"
  echo "order alternating (rotating, with the plain proxy). Targets are issue 15's."
  echo
  echo "- date: $(date -u '+%Y-%m-%d %H:%M UTC'), commit $COMMIT, CPU: $(lscpu | sed -n 's/^Model name: *//p' | head -1), $(nproc) cores"
  echo "- load average (1/5/15 min) after each run: $(loads); each timed step first waited (up to ${QUIET_TIMEOUT:-60} s) for other work to keep the CPUs under ${QUIET_BUSY:-0.25} busy (busy_* below: what it started with)"
  for u in $UPSTREAMS; do
    # Each run's ratios, from the steps of the same round (the machine's speed drifts by the hour).
    pr=
    for ((r = 1; r <= RUNS; r++)); do
      pr+="${pr:+, }$(ratio "${M[first_$u:$r]}" "${M[direct_$u:$r]}")$([[ -n ${M[proxy_$u:$r]:-} ]] && echo " (proxy $(ratio "${M[proxy_$u:$r]}" "${M[direct_$u:$r]}"))")"
    done
    echo "- $u: first fetch / direct per run: $pr"
    if [[ -n ${M[tail_$u:1]:-} ]]; then
      echo "- $u: the pull-through's ingest went on after the client's first fetch for $(med "tail_$u") s (median; casnix CPU meanwhile $(med "tail_${u}_casnix_cpu") s), waited for before the second fetch and the bytes row"
    fi
  done
  echo "- casnix serve peak RSS (VmHWM, median): first fetch $(mib "$(med "first_${ubytes}_hwm")") MiB$([[ -n ${M[second_hwm:1]:-} ]] && echo ", after the second $(mib "$(med second_hwm)") MiB")$([[ -n ${M[daemon_casnix_hwm:1]:-} ]] && echo ", daemon $(mib "$(med daemon_casnix_hwm)") MiB"); \`casnix repack\` of the substituted data dir: ${M[repack_s]} s, \`casnix verify\` clean after it"
  echo
  echo "$table"
  echo
  echo "<details><summary>raw per-run values</summary>"
  echo
  echo '```'
  for k in "${!M[@]}"; do echo "$k=${M[$k]}"; done | sort
  echo '```'
  echo
  echo "</details>"
  echo "<!-- bench/$SECTION: end -->"
} >"$RUN/section.md"
merge_section "$SECTION" "$RUN/section.md" "$RESULTS"
log "wrote $RESULTS"
