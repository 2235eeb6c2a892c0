#!/usr/bin/env bash
# Replica lag under a nix copy of a corpus (issue 16): a primary `casnix serve --packs
# s3://…` and a read replica `casnix serve --replica-of s3://…` on a real SeaweedFS S3 server
# on loopback; host Nix copies the corpus's output paths into the primary while both data
# dirs are polled (`casnix path-info --all`, every POLL seconds); a path's lag is the time
# from when the primary showed it to when the replica did. Reported: median, 95th percentile
# and largest lag over all paths, and how long after the copy returned the last path was on
# the replica. Settings of the defaults unless given: UPLOAD_WITHIN (10s), DB_SYNC (1s),
# FOLLOW (1s), DURABILITY (local; bucket: the primary acknowledges a write once it is in the
# bucket, so a path shows on the replica about one follow interval after it is acknowledged).
# SECTION names the RESULTS.md section (default replica-lag.sh, replica-lag.sh-bucket for
# DURABILITY=bucket).
#
#   bench/replica-lag.sh                      # defaults, RUNS=1
#   UPLOAD_WITHIN=1s RUNS=3 bench/replica-lag.sh
#   DURABILITY=bucket RUNS=3 bench/replica-lag.sh
set -euo pipefail

BENCH_DIR=${BENCH_DIR:-/var/tmp/casnix-bench}
RUNS=${RUNS:-1}
CORPUS=${CORPUS:-releases}
POLL=${POLL:-0.5}
UPLOAD_WITHIN=${UPLOAD_WITHIN:-10s}
DB_SYNC=${DB_SYNC:-1s}
FOLLOW=${FOLLOW:-1s}
DURABILITY=${DURABILITY:-local}
SECTION=${SECTION:-replica-lag.sh$([[ $DURABILITY == local ]] || echo "-$DURABILITY")}
HERE=$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)
BENCH=replica-lag
# shellcheck source=bench/lib.sh
. "$HERE/lib.sh"
REPO=$(cd "$HERE/.." && pwd)
RESULTS=${RESULTS:-$HERE/RESULTS.md}
SRC=$BENCH_DIR/corpora/$CORPUS
W=$BENCH_DIR/replica-lag
CASNIX=$BENCH_DIR/bin/casnix-lag
nixo=(--option experimental-features nix-command --option build-users-group '' --option substituters '')

[[ -f $SRC/nix/var/nix/db/db.sqlite ]] || die "no corpus at $SRC: run bench/build-corpora.sh first"
mkdir -p "$BENCH_DIR/bin"
(cd "$REPO" && CGO_ENABLED=0 go build -o "$CASNIX" .) || die "go build failed"
COMMIT=$(cd "$REPO" && git rev-parse --short HEAD 2>/dev/null || echo unknown)
mapfile -t outs < <(ls "$SRC/nix/store" | grep -v '\.drv$' | sed 's|^|/nix/store/|')

PIDS=()
cleanup() {
  local p
  for p in "${PIDS[@]}"; do kill "$p" 2>/dev/null || true; done
  wait 2>/dev/null || true
}
trap cleanup EXIT

# poll DATADIR OUT STOPFILE: appends "unix-time name" for every path the data dir shows
# that it did not show before, until STOPFILE exists.
poll() {
  local dir=$1 out=$2 stop=$3 seen=$2.seen
  : >"$seen"
  while [[ ! -e $stop ]]; do
    "$CASNIX" --data-dir "$dir" --log-level error path-info --all 2>/dev/null | awk '{ print $1 }' | sort >"$seen.now" || true
    comm -13 "$seen" "$seen.now" | awk -v t="$(now)" '{ print t, $1 }' >>"$out"
    mv "$seen.now" "$seen"
    sleep "$POLL"
  done
}

lags=() p95s=() maxs=() tails=() copies=()
for ((run = 1; run <= RUNS; run++)); do
  RUN=$W/run$run
  rm -rf "$RUN"
  mkdir -p "$RUN"
  start_weed "$RUN/weed"
  PIDS+=("$WEED_PID")
  URL="s3://bench/lag$run?endpoint=$ENDPOINT&region=us-east-1"
  "$CASNIX" --data-dir "$RUN/primary" --log-level warn --packs "$URL" serve --socket "$RUN/primary.sock" \
    --repack-quiet 0 --upload-within "$UPLOAD_WITHIN" --db-sync-interval "$DB_SYNC" --durability "$DURABILITY" >"$RUN/primary.log" 2>&1 &
  PIDS+=($!)
  for ((i = 0; i < 300; i++)); do [[ -S $RUN/primary.sock ]] && break; sleep 0.1; done
  "$CASNIX" --data-dir "$RUN/replica" --log-level warn serve --socket "$RUN/replica.sock" \
    --replica-of "$URL" --follow-interval "$FOLLOW" >"$RUN/replica.log" 2>&1 &
  PIDS+=($!)
  for ((i = 0; i < 1200; i++)); do [[ -S $RUN/replica.sock ]] && break; sleep 0.1; done
  [[ -S $RUN/replica.sock ]] || die "replica did not start: $(tail -5 "$RUN/replica.log")"
  poll "$RUN/primary" "$RUN/primary.seen-at" "$RUN/stop" &
  PIDS+=($!)
  poll "$RUN/replica" "$RUN/replica.seen-at" "$RUN/stop" &
  PIDS+=($!)
  t0=$(now)
  nix copy "${nixo[@]}" --no-check-sigs --from "local?root=$SRC" --to "unix://$RUN/primary.sock" "${outs[@]}"
  t1=$(now)
  total=$(nix-store --store "local?root=$SRC" "${nixo[@]}" -qR "${outs[@]}" | grep -vc '\.drv$')
  for ((i = 0; i < 3000; i++)); do
    [[ $(wc -l <"$RUN/replica.seen-at") -ge $total ]] && break
    sleep 0.2
  done
  touch "$RUN/stop"
  sleep 1
  [[ $(wc -l <"$RUN/replica.seen-at") -ge $total ]] || die "run $run: the replica shows $(wc -l <"$RUN/replica.seen-at") of $total paths 10 minutes after the copy"
  join -1 2 -2 2 <(sort -k2 "$RUN/primary.seen-at") <(sort -k2 "$RUN/replica.seen-at") |
    awk '{ d = $3 - $2; if (d < 0) d = 0; print d }' | sort -g >"$RUN/lags"
  n=$(wc -l <"$RUN/lags")
  lags+=("$(median <"$RUN/lags")")
  p95s+=("$(awk -v n="$n" 'NR == int(n * 0.95 + 0.5) { print; exit }' "$RUN/lags")")
  maxs+=("$(tail -1 "$RUN/lags")")
  last=$(sort -g "$RUN/replica.seen-at" | tail -1 | awk '{ print $1 }')
  tails+=("$(awk -v a="$last" -v b="$t1" 'BEGIN { printf "%.2f", a - b }')")
  copies+=("$(awk -v a="$t1" -v b="$t0" 'BEGIN { printf "%.2f", a - b }')")
  log "run $run: $n paths; lag median ${lags[-1]} s, p95 ${p95s[-1]} s, max ${maxs[-1]} s; copy ${copies[-1]} s, last path on the replica ${tails[-1]} s after it; load $(cut -d' ' -f1-3 /proc/loadavg)"
  cleanup
  PIDS=()
done

med() { printf '%s\n' "$@" | median; }
{
  echo "<!-- bench/$SECTION: begin (rewritten by every replica-lag.sh run with SECTION=$SECTION) -->"
  echo "## Replica lag under nix copy (bench/replica-lag.sh, primary --durability $DURABILITY)"
  echo
  echo "Commit $COMMIT, $(date -u +%F), corpus $CORPUS ($total paths), RUNS=$RUNS (medians of the runs' figures), load average $(cut -d' ' -f1-3 /proc/loadavg) at the end."
  echo "SeaweedFS S3 on loopback; primary \`--upload-within $UPLOAD_WITHIN --db-sync-interval $DB_SYNC\`, replica \`--follow-interval $FOLLOW\`;"
  echo "host Nix's nix copy --to the primary's socket; both data dirs polled every $POLL s (so each figure is ±$POLL s)."
  echo
  echo "| measure | seconds |"
  echo "|---|---|"
  echo "| nix copy --to the primary | $(med "${copies[@]}") |"
  echo "| lag per path, median | $(med "${lags[@]}") |"
  echo "| lag per path, 95th percentile | $(med "${p95s[@]}") |"
  echo "| lag per path, largest | $(med "${maxs[@]}") |"
  echo "| last path on the replica, after the copy returned | $(med "${tails[@]}") |"
  echo
  echo "Runs: lag median ${lags[*]}; p95 ${p95s[*]}; max ${maxs[*]}; copy ${copies[*]}; tail ${tails[*]}"
  echo "<!-- bench/$SECTION: end -->"
} >"$W/section.md"
merge_section "$SECTION" "$W/section.md" "$RESULTS"
cat "$W/section.md"
