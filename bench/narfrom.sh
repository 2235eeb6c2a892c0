#!/usr/bin/env bash
# NarFromPath of a whole closure, one path after another on one connection (as `nix copy --from
# ssh-ng://…` fetches it): `casnix serve` at its default settings against real nix-daemons serving
# the same paths, Nix 2.34 (Debian sid, run inside tests/nixenv's sid root) and Nix 2.8 (the host).
# Corpus: every output path of the releases corpus (bench/build-corpora.sh), references first
# (nix-store -qR order). casnix is measured twice: on the data dir as `casnix import` wrote it
# (the fast form) and after `casnix repack` (what a default `serve` turns it into after a quiet
# spell). Every daemon gets one untimed warming pass, then RUNS timed passes, alternating the
# daemons. Reported: MB/s and paths/s of the client, and the daemon's CPU seconds (user+sys, from
# /proc) per GB sent. Merges its section into bench/RESULTS.md.
#
#   bench/narfrom.sh                 # RUNS=3
#   RUNS=1 bench/narfrom.sh          # a quick run
#   CASNIX=/path/to/casnix bench/narfrom.sh
#   PROFILE=1 bench/narfrom.sh       # CPU profiles of casnix serve in $BENCH_DIR/narfrom/run
set -euo pipefail

BENCH_DIR=${BENCH_DIR:-/var/tmp/casnix-bench}
RUNS=${RUNS:-3}
CORPUS=${CORPUS:-releases}
PROFILE=${PROFILE:-0}
SID_ROOT=${SID_ROOT:-/var/cache/casnix-tests/roots/sid}
HERE=$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)
# shellcheck source=bench/lib.sh
. "$HERE/lib.sh"
REPO=$(cd "$HERE/.." && pwd)
CASNIX=${CASNIX:-}
RESULTS=${RESULTS:-$HERE/RESULTS.md}
SRC=$BENCH_DIR/corpora/$CORPUS
W=$BENCH_DIR/narfrom
RUN=$W/run
PROTOBENCH=$BENCH_DIR/bin/protobench
nixo=(--option experimental-features nix-command --option build-users-group '' --option substituters '')

BENCH=narfrom

[[ -f $SRC/nix/var/nix/db/db.sqlite ]] || die "no corpus at $SRC: run bench/build-corpora.sh first"
command -v nix-daemon >/dev/null || apt-get install -y -q nix-bin >&2
[[ -x $SID_ROOT/usr/bin/nix-daemon ]] || die "no Nix 2.34 in $SID_ROOT: run tests/nixenv/make-root.sh sid"
mkdir -p "$W" "$RUN" "$BENCH_DIR/bin"
if [[ -z $CASNIX ]]; then
  CASNIX=$BENCH_DIR/bin/casnix
  log "building casnix from $REPO"
  (cd "$REPO" && CGO_ENABLED=0 go build -o "$CASNIX" .) || die "go build failed"
fi
(cd "$REPO" && CGO_ENABLED=0 go build -o "$PROTOBENCH" ./bench/cmd/protobench) || die "protobench build failed"
COMMIT=$(cd "$REPO" && git rev-parse --short HEAD 2>/dev/null || echo unknown)

# The paths: every output (no .drv), references first.
mapfile -t outs < <(ls "$SRC/nix/store" | grep -v '\.drv$' | sed 's|^|/nix/store/|')
nix-store --store "local?root=$SRC" "${nixo[@]}" -qR "${outs[@]}" | grep -v '\.drv$' >"$W/paths"
npaths=$(wc -l <"$W/paths")
log "corpus $CORPUS: $npaths paths"

# casnix data dirs: the import (fast form) and a repacked copy, rebuilt when the corpus or the
# casnix binary changed (what the fast form is depends on its defaults: --ingest).
stamp="$(stat -c %Y "$SRC/nix/var/nix/db/db.sqlite") $(sha256sum <"$CASNIX" | cut -c1-16)"
if [[ $(cat "$W/casnix.stamp" 2>/dev/null) != "$stamp" ]]; then
  rm -rf "$W/casnix-fast" "$W/casnix-repacked"
  log "importing the corpus"
  "$CASNIX" --data-dir "$W/casnix-fast" import --from-nix-store "$SRC" >"$W/import.log" 2>&1 || die "import failed"
  cp -a "$W/casnix-fast" "$W/casnix-repacked"
  log "repacking a copy"
  "$CASNIX" --data-dir "$W/casnix-repacked" repack >"$W/repack.log" 2>&1 || die "repack failed"
  echo "$stamp" >"$W/casnix.stamp"
fi
# Nix 2.34 may upgrade the database schema: it serves its own copy of the corpus.
if [[ $(cat "$W/nix234.stamp" 2>/dev/null) != "$stamp" ]]; then
  rm -rf "$W/nix234"
  cp -a "$SRC" "$W/nix234"
  echo "$stamp" >"$W/nix234.stamp"
fi

PIDS=()
cleanup() {
  local p
  for p in "${PIDS[@]}"; do kill "$p" 2>/dev/null || true; done
  wait 2>/dev/null || true
  for p in /sys/fs/cgroup/cpuacct/casnix-narfrom-*; do
    [[ -d $p ]] && rmdir "$p" 2>/dev/null || true
  done
}
trap cleanup EXIT

wait_sock() { # SOCKET PID
  local i
  for ((i = 0; i < 600; i++)); do
    kill -0 "$2" 2>/dev/null || die "daemon for $1 exited"
    if [[ -S $1 ]] && "$PROTOBENCH" nars -socket "$1" -paths <(head -1 "$W/paths") >/dev/null 2>&1; then return; fi
    sleep 0.1
  done
  die "no answer on $1"
}

# The daemons, started once; each keeps its socket in $RUN.
declare -A SOCK PID
rm -f "$RUN"/*.sock
NIX_DAEMON_SOCKET_PATH=$RUN/nix28.sock nix-daemon --store "local?root=$SRC" "${nixo[@]}" >"$RUN/nix28.log" 2>&1 &
PID[nix28]=$!
SOCK[nix28]=$RUN/nix28.sock
mkdir -p "$RUN/sid"
# Nix 2.34 inside the sid root: its /nix is the corpus copy, its /tmp holds the socket.
in_sid "$W/nix234/nix" "$RUN/sid" 'exec env NIX_DAEMON_SOCKET_PATH=/tmp/nix234.sock nix-daemon --option build-users-group "" \
    --option substituters "" --option experimental-features nix-command' >"$RUN/nix234.log" 2>&1 &
PID[nix234]=$!
SOCK[nix234]=$RUN/sid/nix234.sock
for form in fast repacked; do
  prof=()
  [[ $PROFILE == 1 ]] && prof=(--cpu-profile "$RUN/casnix-$form.prof")
  # --repack-quiet 0: the fast form stays the fast form while it is measured.
  "$CASNIX" --data-dir "$W/casnix-$form" "${prof[@]}" --log-level warn serve --socket "$RUN/casnix-$form.sock" \
    --repack-quiet 0 >"$RUN/casnix-$form.log" 2>&1 &
  PID[casnix-$form]=$!
  SOCK[casnix-$form]=$RUN/casnix-$form.sock
done
PIDS=("${PID[@]}")
for d in "${!SOCK[@]}"; do wait_sock "${SOCK[$d]}" "${PID[$d]}"; done
v=$(unshare -m --propagation private bash -c 'mount -t proc proc "$1/proc" && chroot "$1" nix-daemon --version' v "$SID_ROOT" 2>/dev/null || true)
[[ $v == *2.3[4-9]* ]] || die "the sid root's nix-daemon is not 2.34 or newer: $v"
NIX234=$v
NIX28=$(nix-daemon --version)

# Each daemon runs in its own cpuacct cgroup (v1, as this machine mounts it), which counts the
# CPU of the processes it forks too (nix-daemon serves each connection in a child it does not wait
# for, so /proc's cutime would miss it).
CG=/sys/fs/cgroup/cpuacct
[[ -d $CG ]] || die "no cpuacct cgroup at $CG"
for d in "${!PID[@]}"; do
  mkdir -p "$CG/casnix-narfrom-$d"
  echo "${PID[$d]}" >"$CG/casnix-narfrom-$d/cgroup.procs"
done
# cpu DAEMON: the CPU seconds of the daemon's cgroup so far.
cpu() { awk '{ print $1 / 1e9 }' "$CG/casnix-narfrom-$1/cpuacct.usage"; }

DAEMONS=(nix234 casnix-fast nix28 casnix-repacked)
: >"$W/raw"
log "checking every NAR against its NarHash (and warming each daemon)"
for d in "${DAEMONS[@]}"; do
  "$PROTOBENCH" nars -check -socket "${SOCK[$d]}" -paths "$W/paths" >"$RUN/$d.check" || die "$d: NAR check failed"
done
load_before=$(cut -d' ' -f1-3 /proc/loadavg)
for ((r = 1; r <= RUNS; r++)); do
  order=("${DAEMONS[@]}")
  ((r % 2)) || order=(casnix-repacked nix28 casnix-fast nix234)
  for d in "${order[@]}"; do
    c0=$(cpu "$d")
    out=$("$PROTOBENCH" nars -socket "${SOCK[$d]}" -paths "$W/paths") || die "$d: $out"
    c1=$(cpu "$d")
    mbps=$(sed 's/.*mbps=\([0-9.]*\).*/\1/' <<<"$out")
    pps=$(sed 's/.*pps=\([0-9.]*\).*/\1/' <<<"$out")
    bytes=$(sed 's/.*bytes=\([0-9]*\).*/\1/' <<<"$out")
    secs=$(sed 's/.*seconds=\([0-9.]*\).*/\1/' <<<"$out")
    cpugb=$(awk -v a="$c0" -v b="$c1" -v n="$bytes" 'BEGIN { printf "%.2f", (b - a) / (n / 1e9) }')
    printf '%s:mbps:%d %s\n%s:pps:%d %s\n%s:cpugb:%d %s\n%s:secs:%d %s\n' "$d" "$r" "$mbps" "$d" "$r" "$pps" "$d" "$r" "$cpugb" "$d" "$r" "$secs" >>"$W/raw"
    log "run $r $d: $out cpu_s_per_GB=$cpugb"
  done
done
load_after=$(cut -d' ' -f1-3 /proc/loadavg)
bytes=$(sed 's/.*bytes=\([0-9]*\).*/\1/' "$RUN/nix28.check")

med() { grep "^$1:$2:" "$W/raw" | cut -d' ' -f2 | median; }
row() { # DAEMON LABEL
  local m p c
  m=$(med "$1" mbps)
  p=$(med "$1" pps)
  c=$(med "$1" cpugb)
  printf '| %s | %s | %s | %s | %s | %s |\n' "$2" "$m" "$p" "$c" \
    "$(awk -v a="$m" -v b="$(med nix234 mbps)" 'BEGIN { printf "%.2f×", a / b }')" \
    "$(awk -v a="$m" -v b="$(med nix28 mbps)" 'BEGIN { printf "%.2f×", a / b }')"
}
{
  echo "<!-- bench/narfrom.sh: begin (rewritten by every narfrom.sh run) -->"
  echo "## NarFromPath of a closure, one path after another (\`bench/narfrom.sh\`)"
  echo
  echo "$npaths output paths of the $CORPUS corpus ($((bytes / 1000000)) MB of NAR), references first, each NAR"
  echo "streamed by NarFromPath on one connection into /dev/null (\`protobench nars\`), as \`nix copy --from"
  echo "ssh-ng://\` fetches a closure. Each daemon was checked (every NAR hashed against its NarHash) and"
  echo "warmed by one pass first; then $RUNS timed passes each, alternating the daemons. Medians. CPU: the"
  echo "daemon process's user+sys seconds per GB sent. casnix serve runs at its default settings"
  echo "(\`--repack-quiet 0\` only keeps the fast form from being repacked while it is measured)."
  echo
  echo "- date: $(date -u '+%Y-%m-%d %H:%M UTC'), commit $COMMIT, CPU: $(lscpu | sed -n 's/^Model name: *//p' | head -1), $(nproc) cores"
  echo "- load average (1/5/15 min) before: $load_before; after: $load_after"
  echo "- anchors: $NIX234 (sid root), $NIX28 (host)"
  echo
  echo "| daemon | MB/s | paths/s | daemon CPU s per GB | vs Nix 2.34 | vs Nix 2.8 |"
  echo "|---|---|---|---|---|---|"
  row nix234 "nix-daemon 2.34"
  row nix28 "nix-daemon 2.8"
  row casnix-fast "casnix serve, as imported (fast form)"
  row casnix-repacked "casnix serve, after \`casnix repack\`"
  echo
  echo "Target (issue 14): casnix ≥ 1.0× nix-daemon 2.34."
  echo
  echo "<details><summary>raw per-run values</summary>"
  echo
  echo '```'
  sort "$W/raw"
  echo '```'
  echo
  echo "</details>"
  echo "<!-- bench/narfrom.sh: end -->"
} >"$W/section.md"
cat "$W/section.md"
merge_section narfrom.sh "$W/section.md" "$RESULTS"
