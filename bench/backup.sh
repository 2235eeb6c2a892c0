#!/usr/bin/env bash
# Backup benchmark: `casnix backup` of the bench-corpus data dir against `cp -a` and `tar`
# of the same data dir, in one run, median of $RUNS, page cache warm (one untimed read
# first). Every copy is made durable before its clock stops: casnix fsyncs itself, the
# anchors are followed by `sync FILE...` (fsync of each file they wrote).
#
#   bench/backup.sh                 # needs the corpora of bench/build-corpora.sh, or makes a smaller data dir
#   SRC=/path/to/data bench/backup.sh
#   RUNS=1 bench/backup.sh
#
# Figures (written to bench/RESULTS.md between the bench/backup.sh markers):
#   copy      casnix: snapshot + pack copy + fsync (what it prints as "in Ns"); anchors: wall time
#   total     casnix: also the verify of the copy (--quick: frames and chunk hashes; full: every NAR)
set -Eeuo pipefail

BENCH_DIR=${BENCH_DIR:-/var/tmp/casnix-bench}
RUNS=${RUNS:-3}
HERE=$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)
REPO=$(cd "$HERE/.." && pwd)
RESULTS=${RESULTS:-$HERE/RESULTS.md}
# shellcheck source=bench/lib.sh
. "$HERE/lib.sh"
W=$BENCH_DIR/backup
CASNIX=${CASNIX:-$W/casnix}
SRC=${SRC:-$W/data}
log() { printf '%s backup: %s\n' "$(date +%T)" "$*" >&2; }
trap 'log "failed at line $LINENO: $BASH_COMMAND"' ERR

mkdir -p "$W"
if [[ $CASNIX == "$W/casnix" ]]; then
  (cd "$REPO" && CGO_ENABLED=0 go build -o "$W/casnix" .)
fi

# The data dir: both corpora imported into one, or (no corpora) 512 MiB of generated NARs.
if [[ ! -f $SRC/casnix.db ]]; then
  rm -rf "$SRC"
  corpora=()
  for c in releases generations; do
    [[ -d $BENCH_DIR/corpora/$c/nix/store ]] && corpora+=("$BENCH_DIR/corpora/$c")
  done
  if ((${#corpora[@]})); then
    for c in "${corpora[@]}"; do
      log "importing $c into $SRC"
      "$CASNIX" -d "$SRC" --log-level warn import --from-nix-store "$c" >/dev/null
    done
  else
    log "no corpora under $BENCH_DIR/corpora: importing 8 generated 64 MiB NARs instead"
    for i in $(seq 0 7); do
      d=$W/gen/f$i
      mkdir -p "$d"
      gen_mib 64 $((i * 64)) >"$d/data"
      nix-store --dump "$d" | "$CASNIX" -d "$SRC" import --nar - \
        --path "/nix/store/$(printf '%032d' "$i" | tr 0-9 a-j | tr e k)-backup-bench-$i" >/dev/null
      rm -rf "$d"
    done
  fi
fi

secs() { local s e; s=$(date +%s.%N); "$@" >/dev/null 2>&1; e=$(date +%s.%N); echo "$e - $s" | bc; }
fsync_tree() { find "$1" -type f -exec sync {} +; }
OUT=$W/out
rm -rf "$OUT" "$W"/*.raw

find "$SRC" -type f -exec cat {} + >/dev/null # warm the page cache
SRC_BYTES=$(du -sb "$SRC" | cut -f1)
for i in $(seq "$RUNS"); do
  log "run $i/$RUNS (load $(cut -d' ' -f1-3 /proc/loadavg))"
  for mode in quick full; do
    rm -rf "$OUT"
    flag=()
    [[ $mode == quick ]] && flag=(--quick)
    s=$(date +%s.%N)
    line=$("$CASNIX" -d "$SRC" backup "${flag[@]}" "$OUT")
    e=$(date +%s.%N)
    echo "$line" >&2
    sed -n 's/.* in \([0-9.]*\)s, .*/\1/p' <<<"$line" >>"$W/casnix-copy.raw"
    echo "$e - $s" | bc >>"$W/casnix-$mode-total.raw"
    du -sb "$OUT" | cut -f1 >"$W/casnix-size.raw"
  done
  rm -rf "$OUT"
  secs sh -c "cp -a '$SRC' '$OUT' && find '$OUT' -type f -exec sync {} +" >>"$W/cp.raw"
  du -sb "$OUT" | cut -f1 >"$W/cp-size.raw"
  rm -rf "$OUT"
  secs sh -c "tar -C '$SRC' -cf '$OUT.tar' . && sync '$OUT.tar'" >>"$W/tar.raw"
  stat -c %s "$OUT.tar" >"$W/tar-size.raw"
  rm -f "$OUT.tar"
done
rm -rf "$OUT"

mb() { echo "$1 / 1000000" | bc -l; }
row() { # name size seconds [note]
  printf '| %s | %.1f | %.2f | %.1f | %s |\n' "$1" "$(mb "$2")" "$3" "$(echo "$2 / $3 / 1000000" | bc -l)" "$4"
}
cs=$(cat "$W/casnix-size.raw")
{
  echo "<!-- bench/backup.sh: begin (rewritten by every backup.sh run) -->"
  echo "## Backup ($(date -u +%F), $(lscpu | sed -n 's/^Model name: *//p'), $(nproc) cores, load $(cut -d' ' -f1-3 /proc/loadavg), commit $(git -C "$REPO" rev-parse --short HEAD))"
  echo
  echo "Median of $RUNS runs, page cache warm, every copy fsynced. Data dir $SRC: $(mb "$SRC_BYTES" | xargs printf '%.1f') MB,"
  echo "$("$CASNIX" -d "$SRC" info --json | sed -n 's/.*"paths":\([0-9]*\).*/\1/p') store paths. MB/s = size of the copy / time."
  echo
  echo "| copy | size (MB) | seconds | MB/s | note |"
  echo "|---|---|---|---|---|"
  row "casnix backup: copy" "$cs" "$(median <"$W/casnix-copy.raw")" "snapshot + packs up to the last committed frame + fsync"
  row "casnix backup --quick: total" "$cs" "$(median <"$W/casnix-quick-total.raw")" "+ verify: db check, every frame CRC and chunk hash"
  row "casnix backup: total" "$cs" "$(median <"$W/casnix-full-total.raw")" "+ verify: also every NAR re-rendered and hashed"
  row "cp -a (anchor)" "$(cat "$W/cp-size.raw")" "$(median <"$W/cp.raw")" "not consistent while casnix writes"
  row "tar -cf (anchor)" "$(cat "$W/tar-size.raw")" "$(median <"$W/tar.raw")" "not consistent while casnix writes"
  echo "<!-- bench/backup.sh: end -->"
} | tee "$W/table.md"
merge_section backup.sh "$W/table.md" "$RESULTS"
