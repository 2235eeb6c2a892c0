#!/usr/bin/env bash
# FUSE mount benchmarks: reading through `casnix mount` against the same
# bytes on the native file system, in one run, median of $RUNS.
#
#   bench/fuse.sh            # needs root, /dev/fuse, and bench/build-corpora.sh's releases corpus
#
# Figures (written to bench/RESULTS.md under "FUSE"):
#   seq-cold  dd of a 1 GiB file after drop_caches (and, for casnix, a fresh mount)
#   seq-warm  the same file read once more unmeasured, then timed (page cache warm on both
#             sides: each side's warming read comes right before its timed one, after every
#             drop_caches; the table shows how much of each file was resident, by fincore)
#   cat-all   find DIR -type f | xargs cat, warm, over the releases corpus
#   stat-all  find DIR -exec stat, warm, over the releases corpus
# and the CPU time the mount process spent on seq-cold. Each run first waits
# (up to QUIET_TIMEOUT = 60 s) for other jobs to leave the CPUs below
# QUIET_BUSY = 0.15 busy, and the table notes how busy they were.
set -Eeuo pipefail

BENCH_DIR=${BENCH_DIR:-/var/tmp/casnix-bench}
RUNS=${RUNS:-3}
HERE=$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)
# shellcheck source=bench/lib.sh
. "$HERE/lib.sh"
REPO=$(cd "$HERE/.." && pwd)
RESULTS=${RESULTS:-$HERE/RESULTS.md}
CORPUS=${CORPUS:-$BENCH_DIR/corpora/releases}
W=$BENCH_DIR/fuse
CASNIX=${CASNIX:-$W/casnix}
# BIG_MIB shrinks the big file for a smoke run (BIG_MIB=16 RUNS=1 CORPUS=… RESULTS=/tmp/r.md);
# the figures in RESULTS.md are for 1024. A file of another size gets a store path of its own.
BIG_MIB=${BIG_MIB:-1024}
BIG=/nix/store/0123456789abcdfghijklmnpqrsvwxyz-fuse-bench-1g
[[ $BIG_MIB == 1024 ]] || BIG=/nix/store/0123456789abcdfghijklmnpqrsvwxyz-fuse-bench-${BIG_MIB}m
MNT=$W/mnt
log() { printf '%s fuse: %s\n' "$(date +%T)" "$*" >&2; }
trap 'log "failed at line $LINENO: $BASH_COMMAND"' ERR

[[ $(id -u) == 0 ]] || { log "needs root"; exit 1; }
[[ -d $CORPUS/nix/store ]] || { log "no corpus at $CORPUS: run bench/build-corpora.sh"; exit 1; }
mkdir -p "$W" "$MNT"
if [[ ! -x $CASNIX || $CASNIX == "$W/casnix" ]]; then
  (cd "$REPO" && CGO_ENABLED=0 go build -o "$W/casnix" .)
  CASNIX=$W/casnix
fi

# The 1 GiB file, semi-compressible (text-like), native and as a store path.
if [[ ! -f $W/big/file || $(stat -c %s "$W/big/file") != $((BIG_MIB << 20)) ]]; then
  mkdir -p "$W/big"
  python3 - "$W/big/file" "$BIG_MIB" <<'PY'
import os, random, sys
random.seed(1)
words = [os.urandom(random.randint(2, 10)).hex().encode() for _ in range(20000)]
with open(sys.argv[1], "wb") as f:
    for _ in range(int(sys.argv[2])):
        f.write(b" ".join(random.choice(words) for _ in range(100000))[: 1 << 20])
PY
  rm -f "$W/.imported"
fi
DATA=$W/data
if [[ ! -f $W/.imported || $(cat "$W/.imported") != "$BIG $CORPUS" ]]; then
  rm -rf "$DATA"
  nix-store --dump "$W/big/file" | "$CASNIX" -d "$DATA" import --nar - --path "$BIG"
  "$CASNIX" -d "$DATA" import --from-nix-store "$CORPUS"
  echo "$BIG $CORPUS" >"$W/.imported"
fi

MPID=
mount_casnix() {
  "$CASNIX" -d "$DATA" mount "$MNT" 2>"$W/mount.log" &
  MPID=$!
  for _ in $(seq 200); do
    if [[ -e $MNT/$(basename "$BIG") ]]; then
      RA_KB=$(cat "/sys/class/bdi/$(mountpoint -d "$MNT")/read_ahead_kb")
      return
    fi
    sleep 0.05
  done
  log "mount did not come up"; cat "$W/mount.log" >&2; exit 1
}
umount_casnix() {
  [[ -n $MPID ]] || return 0
  kill -TERM "$MPID"; wait "$MPID" || true; MPID=
}
trap 'umount_casnix' EXIT

secs() { local s e; s=$(date +%s.%N); "$@" >/dev/null 2>&1; e=$(date +%s.%N); echo "$e - $s" | bc; }
# CPU seconds (user + system) the mount process has used so far: next to
# the wall times, which swing with other jobs on a shared machine.
cpu_of() { awk -v hz="$(getconf CLK_TCK)" '{ printf "%.2f\n", ($14 + $15) / hz }' "/proc/$1/stat"; }
# Waits (up to QUIET_TIMEOUT s) until other jobs leave the CPUs below
# QUIET_BUSY busy, and records the busy fraction it started with.
QUIET_BUSY=${QUIET_BUSY:-0.15}
QUIET_TIMEOUT=${QUIET_TIMEOUT:-60}
wait_quiet() {
  local busy waited=0
  busy=$(cpu_busy)
  while awk -v b="$busy" -v l="$QUIET_BUSY" 'BEGIN { exit !(b > l) }' && ((waited < QUIET_TIMEOUT)); do
    sleep 4
    waited=$((waited + 5))
    busy=$(cpu_busy)
  done
  echo "$busy" >>"$W/busy"
}
median() { sort -g | awk '{a[NR]=$1} END {print a[int((NR+1)/2)]}'; }
drop() { sync; echo 3 >/proc/sys/vm/drop_caches; }
# resident FILE: the percentage of FILE in the page cache (fincore), "?" without fincore.
resident() {
  local b
  b=$(fincore -b -n -o RES "$1" 2>/dev/null) || { echo "?"; return; }
  awk -v r="$b" -v s="$(stat -c %s "$1")" 'BEGIN { printf "%.0f", s ? 100 * r / s : 100 }'
}

rm -f "$W"/*.native "$W"/*.casnix "$W"/*.cpu "$W"/busy "$W"/seq-warm-resident.* # an interrupted run's values
for i in $(seq "$RUNS"); do
  log "run $i/$RUNS"
  # cold: caches dropped; casnix also restarted, so its frame cache is empty
  wait_quiet
  drop
  secs dd if="$W/big/file" of=/dev/null bs=1M >>"$W/seq-cold.native"
  umount_casnix; drop; mount_casnix
  c0=$(cpu_of "$MPID")
  secs dd if="$MNT/$(basename "$BIG")" of=/dev/null bs=1M >>"$W/seq-cold.casnix"
  echo "$(cpu_of "$MPID") - $c0" | bc >>"$W/seq-cold.cpu"
  # warm: the drop_caches above also emptied the native file's pages, so each side is read
  # once more, unmeasured, right before its timed read
  for which in native casnix; do
    f=$W/big/file
    [[ $which == casnix ]] && f=$MNT/$(basename "$BIG")
    cat "$f" >/dev/null
    echo "$(resident "$f")" >>"$W/seq-warm-resident.$which"
    secs dd if="$f" of=/dev/null bs=1M >>"$W/seq-warm.$which"
  done
  # whole-corpus walks, warm (one pass to warm, one measured)
  wait_quiet
  for which in native casnix; do
    d=$CORPUS/nix/store
    [[ $which == casnix ]] && d=$MNT
    find "$d" -type f -print0 | xargs -0 cat >/dev/null 2>&1 || true
    secs sh -c "find '$d' -type f -print0 | xargs -0 cat" >>"$W/cat-all.$which"
    find "$d" -exec stat {} + >/dev/null 2>&1 || true
    secs sh -c "find '$d' -exec stat {} +" >>"$W/stat-all.$which"
  done
done
umount_casnix

{
  echo "<!-- bench/fuse.sh: begin (rewritten by every fuse.sh run) -->"
  echo "## FUSE ($(date -u +%F), $(lscpu | sed -n 's/^Model name: *//p'), $(nproc) cores, load $(cut -d' ' -f1-3 /proc/loadavg), commit $(git -C "$REPO" rev-parse --short HEAD))"
  echo
  echo "Median of $RUNS runs, seconds. Big file = $(du -b "$W/big/file" | cut -f1) bytes; corpus = $CORPUS ($(find "$CORPUS/nix/store" -type f | wc -l) files)."
  echo
  echo "| figure | native | casnix mount | native/casnix speed ratio | target |"
  echo "|---|---|---|---|---|"
  for f in seq-cold seq-warm cat-all stat-all; do
    n=$(median <"$W/$f.native"); c=$(median <"$W/$f.casnix")
    case $f in
      seq-cold) tgt="≥ 0.5× native speed" ;; seq-warm) tgt="≥ 0.9× native speed" ;; *) tgt="≤ 2× native time" ;;
    esac
    printf '| %s | %.3f | %.3f | %.2f× | %s |\n' "$f" "$n" "$c" "$(echo "$n / $c" | bc -l)" "$tgt"
  done
  echo
  echo "seq-warm: each side read once, unmeasured, right before its timed read; % of the file in the page cache then (fincore, per run): native $(tr '\n' ' ' <"$W/seq-warm-resident.native"), casnix $(tr '\n' ' ' <"$W/seq-warm-resident.casnix")."
  echo
  echo "seq-cold: the mount process used $(median <"$W/seq-cold.cpu") s of CPU (median) to serve the big file; kernel read-ahead window of the mount: ${RA_KB:-?} KiB. CPUs busy with other work before each timed step (fraction of 2 cores, waited up to ${QUIET_TIMEOUT} s for < $QUIET_BUSY): $(tr '\n' ' ' <"$W/busy")"
  echo "<!-- bench/fuse.sh: end -->"
} | tee "$W/table.md"
rm -f "$W"/*.native "$W"/*.casnix "$W"/*.cpu "$W"/busy "$W"/seq-warm-resident.*
merge_section fuse.sh "$W/table.md" "$RESULTS"
