#!/usr/bin/env bash
# Start-up benchmark: the cost of one-shot read commands (`casnix dump`, `casnix path-info`,
# `casnix cat`), one process per store path, next to Nix's own one-shot reads of the same paths
# from a real Nix store holding the same files (the anchor). Prints a markdown table and merges
# it, as the "Start-up" section, into bench/RESULTS.md (between its markers).
#
#   bench/startup.sh                      # build the work tree, measure, report
#   RUNS=1 CALLS=50 bench/startup.sh      # a quick run
#   CASNIX=/path/to/casnix bench/startup.sh
#   BASELINE=/path/to/older/casnix bench/startup.sh   # also time another casnix on a copy of the data dir
#
# The store: $CALLS directories of 3 small files each (random bytes of 1-8 KiB, a text file, a
# symlink), added with `nix-store --store ROOT --add` (Debian's Nix 2.8) and imported into a
# casnix data dir with `casnix import --from-nix-store ROOT`. Every casnix dump is checked against
# nix-store --dump once before anything is timed.
#
# A figure is one loop of $CALLS sequential invocations, one per path, each with its own process
# (stdout to /dev/null), run by a bash under /usr/bin/time: wall ms per call (date before and
# after the loop) and CPU ms per call (user + system of the loop's children, the bash included).
# The "process floor" row is the same loop of /bin/true: what fork + exec from bash costs alone.
# Within a run the commands go in turn, the order reversed every other run; the table shows the
# median of $RUNS runs.
#
# Anchors (a real Nix store reading real files; the chroot store is local?root=ROOT):
#   dump       nix-store --dump ROOT/P  (Nix dumps the file tree; it opens no store for --dump)
#              nix --store ROOT store dump-path P  (opens the store, looks the path up, dumps it)
#   path-info  nix-store --store ROOT --query --hash P   (one path-info lookup in Nix's db.sqlite)
#   cat        nix --store ROOT store cat P/file
# With the sid root of tests/nixenv present (/var/cache/casnix-tests/roots/sid, Nix 2.34), the
# same commands of Nix 2.34 are timed too, run inside that root (chroot in a private mount
# namespace, set up once per loop: a few ms over the whole loop) on its own copy of the store.
set -Eeuo pipefail

BENCH_DIR=${BENCH_DIR:-/var/tmp/casnix-bench}
RUNS=${RUNS:-5}
CALLS=${CALLS:-200}
SID_ROOT=${SID_ROOT:-/var/cache/casnix-tests/roots/sid}
HERE=$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)
# shellcheck source=bench/lib.sh
. "$HERE/lib.sh"
REPO=$(cd "$HERE/.." && pwd)
RESULTS=${RESULTS:-$HERE/RESULTS.md}
W=$BENCH_DIR/startup
CASNIX=${CASNIX:-}
BASELINE=${BASELINE:-}
export NIX_CONFIG="build-users-group =
experimental-features = nix-command"
BENCH=startup
trap 'log "failed at line $LINENO: $BASH_COMMAND"' ERR
mkdir -p "$W"

if [[ -z $CASNIX ]]; then
  log "building casnix from $REPO (work tree)"
  (cd "$REPO" && CGO_ENABLED=0 go build -o "$W/casnix" .)
  CASNIX=$W/casnix
fi

# The Nix store: CALLS paths, made once per CALLS.
ROOT=$W/nixroot
if [[ ! -f $ROOT/.built-$CALLS ]]; then
  log "building a Nix store of $CALLS paths in $ROOT"
  rm -rf "$ROOT" "$W/src" "$W/paths.txt"
  mkdir -p "$W/src"
  for ((i = 0; i < CALLS; i++)); do
    d=$W/src/startup-$(printf '%04d' "$i")
    mkdir -p "$d/share"
    head -c $((1024 + (i * 7919) % 7168)) /dev/urandom >"$d/data.bin"
    printf 'path %d\n%s\n' "$i" "$(head -c 600 /dev/urandom | base64 -w 76)" >"$d/share/README"
    ln -s share/README "$d/link"
  done
  nix-store --store "$ROOT" --init 2>/dev/null || true
  nix-store --store "$ROOT" --add "$W"/src/startup-* >"$W/paths.txt"
  rm -rf "$W/src"
  touch "$ROOT/.built-$CALLS"
fi
mapfile -t PATHS <"$W/paths.txt"
[[ ${#PATHS[@]} == "$CALLS" ]] || { log "$W/paths.txt has ${#PATHS[@]} paths, want $CALLS"; exit 1; }

# The casnix data dir, imported afresh every run of the script (the binary may have changed).
DATA=$W/data
rm -rf "$DATA" "$W/data-baseline"
log "importing into $DATA"
"$CASNIX" -d "$DATA" import --from-nix-store "$ROOT" 2>"$W/import.log"
if [[ -n $BASELINE ]]; then
  "$BASELINE" -d "$W/data-baseline" import --from-nix-store "$ROOT" 2>"$W/import-baseline.log"
fi
log "checking every dump against nix-store --dump"
for p in "${PATHS[@]}"; do
  a=$("$CASNIX" -d "$DATA" dump "$p" | sha256sum)
  b=$(nix-store --dump "$ROOT$p" | sha256sum)
  [[ $a == "$b" ]] || { log "casnix dump of $p differs from nix-store --dump"; exit 1; }
done

# Nix 2.34 in the sid root, on its own copy of the store (a newer Nix may upgrade the schema).
HAVE234=0
if [[ -x $SID_ROOT/usr/bin/nix-store && -d $SID_ROOT/tmp ]]; then
  rm -rf "$W/nixroot234"
  cp -a "$ROOT" "$W/nixroot234"
  HAVE234=1
fi
# sid SCRIPT: run the bash SCRIPT inside the sid root (lib.sh's in_sid), with the store copy at
# /tmp and an empty writable /nix.
sid() {
  mkdir -p "$W/sid-nix"
  in_sid "$W/sid-nix" "$W/nixroot234" "$1"
}
if [[ $HAVE234 == 1 ]]; then
  v=$(sid 'nix-store --version' 2>/dev/null) || v=
  if [[ $v == *2.3[4-9]* ]]; then
    NIX234=$v
    p=${PATHS[0]}
    a=$(sid "nix-store --dump /tmp$p" | sha256sum)
    b=$("$CASNIX" -d "$DATA" dump "$p" | sha256sum)
    [[ $a == "$b" ]] || { log "Nix 2.34's dump of $p differs from casnix's"; exit 1; }
  else
    log "no Nix 2.34 in $SID_ROOT ($v): its rows are left out"
    HAVE234=0
  fi
fi

# The figures: name, then the command per path (%s = store path; %f = a file in it).
FILE=share/README
declare -A CMD
ORDER=(floor casnix-dump nix-dump nix-dumppath casnix-pathinfo nix-pathinfo casnix-cat nix-cat)
CMD[floor]="/bin/true %s"
CMD[casnix-dump]="$CASNIX -d $DATA dump %s"
CMD[nix-dump]="nix-store --dump $ROOT%s"
CMD[nix-dumppath]="nix --store $ROOT store dump-path %s"
CMD[casnix-pathinfo]="$CASNIX -d $DATA path-info %s"
CMD[nix-pathinfo]="nix-store --store $ROOT --query --hash %s"
CMD[casnix-cat]="$CASNIX -d $DATA cat %s/$FILE"
CMD[nix-cat]="nix --store $ROOT store cat %s/$FILE"
if [[ -n $BASELINE ]]; then
  ORDER+=(base-dump base-pathinfo base-cat)
  CMD[base-dump]="$BASELINE -d $W/data-baseline dump %s"
  CMD[base-pathinfo]="$BASELINE -d $W/data-baseline path-info %s"
  CMD[base-cat]="$BASELINE -d $W/data-baseline cat %s/$FILE"
fi
if [[ $HAVE234 == 1 ]]; then
  ORDER+=(nix234-dump nix234-dumppath nix234-pathinfo nix234-cat)
  CMD[nix234-dump]="nix-store --dump /tmp%s"
  CMD[nix234-dumppath]="nix --store /tmp store dump-path %s"
  CMD[nix234-pathinfo]="nix-store --store /tmp --query --hash %s"
  CMD[nix234-cat]="nix --store /tmp store cat %s/$FILE"
fi

# loop_script NAME: a bash script running NAME's command once per path.
loop_script() {
  local t=${CMD[$1]} p c
  for p in "${PATHS[@]}"; do
    c=${t//%s/$p}
    printf '%s >/dev/null 2>&1 </dev/null\n' "$c"
  done
}
# measure NAME: run NAME's loop, append "wall-ms-per-call cpu-ms-per-call" to raw.NAME.
measure() {
  local name=$1 script=$W/loop.$1.sh s e cpu
  [[ -f $script ]] || loop_script "$name" >"$script"
  if [[ $name == nix234-* ]]; then
    cp "$script" "$W/nixroot234/loop.sh"
    s=$(date +%s%N)
    cpu=$(/usr/bin/time -f '%U %S' bash -c "$(declare -f in_sid sid); SID_ROOT=$SID_ROOT W=$W sid 'bash /tmp/loop.sh'" 2>&1 >/dev/null | tail -1)
  else
    s=$(date +%s%N)
    cpu=$(/usr/bin/time -f '%U %S' bash "$script" 2>&1 >/dev/null | tail -1)
  fi
  e=$(date +%s%N)
  awk -v w=$((e - s)) -v c="$cpu" -v n="$CALLS" 'BEGIN { split(c, x, " ");
    printf "%.3f %.3f\n", w / 1e6 / n, (x[1] + x[2]) * 1000 / n }' >>"$W/raw.$name"
}

rm -f "$W"/raw.* "$W"/loop.*.sh
log "warming up"
for name in "${ORDER[@]}"; do measure "$name"; done
rm -f "$W"/raw.*
for ((r = 1; r <= RUNS; r++)); do
  uptime >>"$W/raw.load"
  log "run $r/$RUNS ($(cut -d' ' -f1-3 /proc/loadavg))"
  seq=("${ORDER[@]}")
  if ((r % 2 == 0)); then
    mapfile -t seq < <(printf '%s\n' "${ORDER[@]}" | tac)
  fi
  for name in "${seq[@]}"; do measure "$name"; done
done
uptime >>"$W/raw.load"
rm -f "$W"/loop.*.sh "$W/nixroot234/loop.sh"

med() { cut -d' ' -f"$2" "$W/raw.$1" | median; }
row() { # row LABEL NAME [ANCHOR]
  local wall cpu
  wall=$(med "$2" 1); cpu=$(med "$2" 2)
  if [[ -n ${3:-} ]]; then
    printf '| %s | %.2f | %.2f | %.2f× | %.2f× |\n' "$1" "$wall" "$cpu" \
      "$(echo "$wall / $(med "$3" 1)" | bc -l)" "$(echo "$cpu / $(med "$3" 2)" | bc -l)"
  else
    printf '| %s | %.2f | %.2f | | |\n' "$1" "$wall" "$cpu"
  fi
}
LOADS=$(awk '{ print $(NF-2) }' "$W/raw.load" | tr -d , | paste -sd/)
{
  echo "<!-- bench/startup.sh: begin (rewritten by every startup.sh run) -->"
  echo "## Start-up of one-shot reads ($(date -u +%F), $(lscpu | sed -n 's/^Model name: *//p'), $(nproc) cores, 1-min load before/between/after the runs: $LOADS, commit $(git -C "$REPO" rev-parse --short HEAD)$(git -C "$REPO" diff --quiet HEAD -- . ':!bench/RESULTS.md' || echo '+work tree'))"
  echo
  echo "\`bench/startup.sh\`: $CALLS store paths of 3 small files each (about $(($(du -sb "$ROOT/nix/store" | cut -f1) / CALLS / 1024)) KiB per path on disk),"
  echo "one process per path per figure, run one after another by a bash loop; median of $RUNS runs of the"
  echo "whole loop, per call. CPU = user + system of the loop's children (the bash included). Ratios are"
  echo "casnix / the Nix 2.8 row below it (lower is better). Anchors: \`nix-store --dump ROOT/P\` (no store"
  echo "opened: Nix dumps the file tree), \`nix --store ROOT store dump-path P\` (store opened, path looked up),"
  echo "\`nix-store --store ROOT --query --hash P\`, \`nix --store ROOT store cat P/FILE\` ($(nix-store --version))."
  [[ $HAVE234 == 1 ]] && echo "Nix 2.34 rows: the same commands inside tests/nixenv's sid root ($NIX234), on a copy of the store."
  [[ -n $BASELINE ]] && echo "Baseline rows: $BASELINE (casnix $("$BASELINE" version | cut -d' ' -f2)) on its own import of the same paths."
  echo
  echo "| command (per call) | wall ms | CPU ms | wall vs Nix 2.8 | CPU vs Nix 2.8 |"
  echo "|---|---|---|---|---|"
  row "process floor: \`/bin/true\`" floor
  row "\`casnix dump P\`" casnix-dump nix-dump
  [[ -n $BASELINE ]] && row "\`casnix dump P\` (baseline)" base-dump nix-dump
  row "\`nix-store --dump ROOT/P\` (2.8)" nix-dump
  [[ $HAVE234 == 1 ]] && row "\`nix-store --dump ROOT/P\` (2.34)" nix234-dump nix-dump
  row "\`nix store dump-path P\` (2.8)" nix-dumppath
  [[ $HAVE234 == 1 ]] && row "\`nix store dump-path P\` (2.34)" nix234-dumppath nix-dumppath
  row "\`casnix path-info P\`" casnix-pathinfo nix-pathinfo
  [[ -n $BASELINE ]] && row "\`casnix path-info P\` (baseline)" base-pathinfo nix-pathinfo
  row "\`nix-store -q --hash P\` (2.8)" nix-pathinfo
  [[ $HAVE234 == 1 ]] && row "\`nix-store -q --hash P\` (2.34)" nix234-pathinfo nix-pathinfo
  row "\`casnix cat P/$FILE\`" casnix-cat nix-cat
  [[ -n $BASELINE ]] && row "\`casnix cat P/$FILE\` (baseline)" base-cat nix-cat
  row "\`nix store cat P/$FILE\` (2.8)" nix-cat
  [[ $HAVE234 == 1 ]] && row "\`nix store cat P/$FILE\` (2.34)" nix234-cat nix-cat
  echo "<!-- bench/startup.sh: end -->"
} | tee "$W/table.md"
merge_section startup.sh "$W/table.md" "$RESULTS"
