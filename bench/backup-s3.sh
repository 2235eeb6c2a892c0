#!/usr/bin/env bash
# Backup to a bucket: `casnix backup s3://…` and `casnix restore s3://…` against the directory
# backup and restore of the same data dir, and against `aws s3 cp --recursive` of its files
# (the anchor for moving the same bytes to and from the same server), on a real SeaweedFS S3
# server on loopback (the weed binary tests/nixtest builds: WEED=/path, else
# ~/.cache/casnix-test/weed-*). In each of $RUNS rounds, in this order: casnix backup DIR,
# casnix backup s3:// (a fresh prefix: everything uploaded), the same again (nothing new:
# snapshot, one listing, the database), aws s3 cp up; casnix restore DIR, casnix restore
# s3://, aws s3 cp down. Restores use --quick (both verify the same way; the full NAR check
# would dominate both). Medians; CPU = user + system seconds of the command.
#
#   bench/backup-s3.sh          # 256 MiB of generated NARs in a fresh data dir
#   SRC=/path/to/data RUNS=3 bench/backup-s3.sh
set -Eeuo pipefail

BENCH_DIR=${BENCH_DIR:-/var/tmp/casnix-bench}
RUNS=${RUNS:-3}
HERE=$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)
REPO=$(cd "$HERE/.." && pwd)
RESULTS=${RESULTS:-$HERE/RESULTS.md}
# shellcheck source=bench/lib.sh
. "$HERE/lib.sh"
W=$BENCH_DIR/backup-s3
CASNIX=${CASNIX:-$W/casnix}
SRC=${SRC:-$W/data}
RUN=$W/run
log() { printf '%s backup-s3: %s\n' "$(date +%T)" "$*" >&2; }
die() { log "$*"; exit 1; }
trap 'log "failed at line $LINENO: $BASH_COMMAND"' ERR

command -v aws >/dev/null || die "no aws CLI (the anchor)"
mkdir -p "$W"
rm -rf "$RUN"
mkdir -p "$RUN"
if [[ $CASNIX == "$W/casnix" ]]; then
  (cd "$REPO" && CGO_ENABLED=0 go build -o "$W/casnix" .)
fi
COMMIT=$(cd "$REPO" && git rev-parse --short HEAD 2>/dev/null || echo unknown)

if [[ ! -f $SRC/casnix.db ]]; then
  rm -rf "$SRC"
  log "importing 8 generated 32 MiB NARs into $SRC"
  for i in $(seq 0 7); do
    d=$W/gen/f$i
    mkdir -p "$d"
    gen_mib 32 $((i * 32)) >"$d/data"
    nix-store --dump "$d" | "$CASNIX" -d "$SRC" import --nar - \
      --path "/nix/store/$(printf '%032d' "$i" | tr 0-9 a-j | tr e k)-backup-s3-bench-$i" >/dev/null
    rm -rf "$d"
  done
fi

PIDS=()
cleanup() {
  local p
  for p in "${PIDS[@]}"; do kill "$p" 2>/dev/null || true; done
  wait 2>/dev/null || true
  rm -rf "$RUN"
}
trap cleanup EXIT

start_weed "$RUN/weed"
PIDS+=("$WEED_PID")
export AWS_DEFAULT_REGION=us-east-1 AWS_CONFIG_FILE=/dev/null AWS_SHARED_CREDENTIALS_FILE=/dev/null # for aws s3 cp
log "S3 server on $ENDPOINT"
url() { echo "s3://bench/$1?endpoint=$ENDPOINT&region=us-east-1"; }

# timed NAME CMD…: run CMD, append its wall seconds to NAME.wall and user+system CPU seconds to
# NAME.cpu, its stdout to NAME.out.
timed() {
  local name=$1 s e
  shift
  s=$(date +%s.%N)
  /usr/bin/time -f '%U %S' -o "$RUN/time" "$@" >>"$RUN/$name.out" 2>"$RUN/$name.err" || die "$name failed: $(tail -3 "$RUN/$name.err")"
  e=$(date +%s.%N)
  echo "$e - $s" | bc >>"$W/$name.wall"
  awk '{ print $1 + $2 }' "$RUN/time" >>"$W/$name.cpu"
}
rm -f "$W"/*.wall "$W"/*.cpu
find "$SRC" -type f -exec cat {} + >/dev/null # warm the page cache
SRC_BYTES=$(du -sb "$SRC" | cut -f1)
LOAD_START=$(cut -d' ' -f1-3 /proc/loadavg)
for i in $(seq "$RUNS"); do
  log "run $i/$RUNS (load $(cut -d' ' -f1-3 /proc/loadavg))"
  rm -rf "$RUN/dirbk" "$RUN/r1" "$RUN/r2" "$RUN/r3"
  timed dir-backup "$CASNIX" -d "$SRC" --log-level warn backup --quick "$RUN/dirbk"
  timed s3-backup "$CASNIX" -d "$SRC" --log-level warn backup "$(url "run$i")"
  timed s3-backup-again "$CASNIX" -d "$SRC" --log-level warn backup "$(url "run$i")"
  timed aws-up aws --endpoint-url "$ENDPOINT" s3 cp --quiet --recursive "$SRC" "s3://bench/aws$i/"
  timed dir-restore "$CASNIX" -d "$RUN/r1" --log-level warn restore --quick "$RUN/dirbk"
  timed s3-restore "$CASNIX" -d "$RUN/r2" --log-level warn restore --quick "$(url "run$i")"
  timed aws-down aws --endpoint-url "$ENDPOINT" s3 cp --quiet --recursive "s3://bench/aws$i/" "$RUN/r3"
done
tail -n 1 "$RUN/s3-backup.out" "$RUN/s3-backup-again.out" "$RUN/s3-restore.out" >&2

mb() { echo "$1 / 1000000" | bc -l; }
row() { # name seconds-file cpu-file bytes note
  local s c
  s=$(median <"$W/$2.wall")
  c=$(median <"$W/$2.cpu")
  printf '| %s | %.2f | %.2f | %.1f | %s |\n' "$1" "$s" "$c" "$(echo "$3 / $s / 1000000" | bc -l)" "$4"
}
{
  echo "<!-- bench/backup-s3.sh: begin (rewritten by every backup-s3.sh run) -->"
  echo "## Backup to a bucket ($(date -u +%F), $(nproc) cores, commit $COMMIT, load $LOAD_START at the start, $(cut -d' ' -f1-3 /proc/loadavg) at the end)"
  echo
  echo "Data dir: $(mb "$SRC_BYTES" | xargs printf '%.1f') MB (8 generated 32 MiB NARs). SeaweedFS S3 on loopback (no network"
  echo "latency or bandwidth limit). Median of $RUNS rounds, page cache warm; MB/s = data dir size / wall seconds; CPU ="
  echo "user + system seconds of the command (for the S3 rows the weed server's own CPU is not counted)."
  echo
  echo "| what | wall s | CPU s | MB/s | note |"
  echo "|---|---|---|---|---|"
  row "casnix backup DIR --quick" dir-backup "$SRC_BYTES" "copy, fsync, verify (frames, chunk hashes)"
  row "casnix backup s3:// (all new)" s3-backup "$SRC_BYTES" "snapshot, upload, read back, check, manifest"
  row "casnix backup s3:// (nothing new)" s3-backup-again "$SRC_BYTES" "snapshot, one listing, database, check"
  row "aws s3 cp --recursive up (anchor)" aws-up "$SRC_BYTES" "the same files, not consistent while casnix writes"
  row "casnix restore DIR --quick" dir-restore "$SRC_BYTES" "stage, verify, journaled swap"
  row "casnix restore s3:// --quick" s3-restore "$SRC_BYTES" "download to the stage, then the same"
  row "aws s3 cp --recursive down (anchor)" aws-down "$SRC_BYTES" "no verify, no fsync"
  echo
  echo "Wall seconds per round (the machine is shared: the medians hide the spread):"
  for n in dir-backup s3-backup s3-backup-again aws-up dir-restore s3-restore aws-down; do
    echo "- $n: $(xargs printf '%.2f ' <"$W/$n.wall")"
  done
  echo "<!-- bench/backup-s3.sh: end -->"
} | tee "$W/table.md"
merge_section backup-s3.sh "$W/table.md" "$RESULTS"
