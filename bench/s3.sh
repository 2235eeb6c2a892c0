#!/usr/bin/env bash
# Packs on S3 (`--packs s3://…`) against local packs, on a real SeaweedFS S3 server on loopback
# (the weed binary tests/nixtest builds: WEED=/path, else ~/.cache/casnix-test/weed-*).
# Corpus: every output path of the releases corpus (bench/build-corpora.sh), references first.
#
#  1. write: `nix copy --to unix://…` (host Nix) of the corpus into an empty `casnix serve` with
#     local packs and into one with --packs (alternating, RUNS each); for the S3 one also the time
#     from the copy's end until /metrics shows nothing left to upload; and into one with
#     --packs and `serve --durability bucket` (each write acknowledged once in the bucket).
#  2. NarFromPath of every path in a row (bench/cmd/protobench nars) from: local packs; the S3
#     data dir with no local pack file and an empty cache (cold: every block from the bucket);
#     the same serve again (warm: from the cache). RUNS alternating rounds; S3 GETs and bytes
#     per GB served from /metrics. Local packs get one untimed pass first (page cache warm, as
#     the S3 cache's blocks are after the cold pass).
#  3. FUSE: the 30 largest files read with cat through a fresh `casnix mount`: local packs, S3
#     with an empty cache (cold), S3 again (warm cache, fresh mount).
#  "until all uploaded" includes serve's default --upload-within of 10 s for the last pack.
#
#   bench/s3.sh            # RUNS=3
#   RUNS=1 bench/s3.sh     # a quick run
set -euo pipefail

BENCH_DIR=${BENCH_DIR:-/var/tmp/casnix-bench}
RUNS=${RUNS:-3}
CORPUS=${CORPUS:-releases}
HERE=$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)
# shellcheck source=bench/lib.sh
. "$HERE/lib.sh"
REPO=$(cd "$HERE/.." && pwd)
RESULTS=${RESULTS:-$HERE/RESULTS.md}
SRC=$BENCH_DIR/corpora/$CORPUS
W=$BENCH_DIR/s3
RUN=$W/run
CASNIX=${CASNIX:-$BENCH_DIR/bin/casnix-s3}
PROTOBENCH=$BENCH_DIR/bin/protobench
nixo=(--option experimental-features nix-command --option build-users-group '' --option substituters '')

log() { printf '%s s3: %s\n' "$(date +%T)" "$*" >&2; }
die() {
  log "error: $*"
  exit 1
}

[[ -f $SRC/nix/var/nix/db/db.sqlite ]] || die "no corpus at $SRC: run bench/build-corpora.sh first"
rm -rf "$RUN"
mkdir -p "$W" "$RUN" "$BENCH_DIR/bin"
(cd "$REPO" && CGO_ENABLED=0 go build -o "$CASNIX" .) || die "go build failed"
(cd "$REPO" && CGO_ENABLED=0 go build -o "$PROTOBENCH" ./bench/cmd/protobench) || die "protobench build failed"
COMMIT=$(cd "$REPO" && git rev-parse --short HEAD 2>/dev/null || echo unknown)

mapfile -t outs < <(ls "$SRC/nix/store" | grep -v '\.drv$' | sed 's|^|/nix/store/|')
nix-store --store "local?root=$SRC" "${nixo[@]}" -qR "${outs[@]}" | grep -v '\.drv$' >"$W/paths"
npaths=$(wc -l <"$W/paths")
log "corpus $CORPUS: $npaths paths"

PIDS=()
cleanup() {
  local p
  for p in "${PIDS[@]}"; do kill "$p" 2>/dev/null || true; done
  wait 2>/dev/null || true
}
trap cleanup EXIT

# The S3 server: SeaweedFS on free ports, test credentials.
start_weed "$RUN/weed"
PIDS+=("$WEED_PID")
log "S3 server on $ENDPOINT"

metric() { curl -sf "http://$1/metrics" | awk -v n="$2" '$1 == n { print $2 }'; }
serve() { # NAME DATADIR HTTPPORT [ARGS…]: start casnix serve, wait for its socket
  local name=$1 dir=$2 hp=$3
  shift 3
  rm -f "$RUN/$name.sock"
  "$CASNIX" --data-dir "$dir" --log-level warn "$@" serve --socket "$RUN/$name.sock" --repack-quiet 0 \
    --http "127.0.0.1:$hp" "${SERVE_EXTRA[@]}" >>"$RUN/$name.log" 2>&1 &
  SPID=$!
  PIDS+=("$SPID")
  for ((i = 0; i < 600; i++)); do
    [[ -S $RUN/$name.sock ]] && curl -sf "http://127.0.0.1:$hp/metrics" >/dev/null && return
    sleep 0.1
  done
  die "$name did not start"
}
stop() { kill "$1" && wait "$1" 2>/dev/null || true; }
wait_uploaded() { # HTTPADDR: until a fresh round leaves no upload queued
  local r0 r q
  r0=$(metric "$1" casnix_packs_upload_rounds_total)
  while :; do
    r=$(metric "$1" casnix_packs_upload_rounds_total)
    q=$(metric "$1" casnix_packs_upload_queue)
    [[ $q == 0 ]] && awk -v r="$r" -v r0="$r0" 'BEGIN { exit !(r >= r0 + 2) }' && return
    sleep 0.2
  done
}

declare -A T
SERVE_EXTRA=()
# 1. write
for ((run = 1; run <= RUNS; run++)); do
  for kind in local s3 s3bucket; do
    dir=$RUN/write-$kind
    rm -rf "$dir"
    hp=$(free_port)
    extra=()
    SERVE_EXTRA=()
    [[ $kind != local ]] && extra=(--packs "s3://bench/write-$kind-$run?endpoint=$ENDPOINT&region=us-east-1")
    [[ $kind == s3bucket ]] && SERVE_EXTRA=(--durability bucket)
    serve "write-$kind" "$dir" "$hp" "${extra[@]}"
    s=$(date +%s.%N)
    nix copy "${nixo[@]}" --no-check-sigs --from "local?root=$SRC" --to "unix://$RUN/write-$kind.sock" "${outs[@]}" 2>>"$RUN/copy.log" || die "nix copy into $kind failed"
    e=$(date +%s.%N)
    T[write-$kind]+="$(awk -v s="$s" -v e="$e" 'BEGIN { print e - s }') "
    if [[ $kind == s3 ]]; then
      wait_uploaded "127.0.0.1:$hp"
      u=$(date +%s.%N)
      T[upload]+="$(awk -v e="$e" -v u="$u" 'BEGIN { print u - e }') "
      T[upbytes]+="$(metric "127.0.0.1:$hp" casnix_s3_sent_bytes_total) "
      T[packs-s3]+="$(metric "127.0.0.1:$hp" casnix_packs_uploaded_total) "
    fi
    if [[ $kind == s3bucket ]]; then
      # Acknowledged means in the bucket (TestServeS3DurableBucket holds it to that).
      T[packs-s3bucket]+="$(metric "127.0.0.1:$hp" casnix_packs_uploaded_total) "
    fi
    stop "$SPID"
    log "write run $run $kind: $(awk -v s="$s" -v e="$e" 'BEGIN { printf "%.2f", e - s }') s"
  done
done

SERVE_EXTRA=()

# 2. NarFromPath: local packs (the last local write), and the S3 data dir's database alone.
LOCAL=$RUN/write-local
S3DIR=$RUN/read-s3
mkdir -p "$S3DIR"
cp "$RUN/write-s3/casnix.db" "$S3DIR/"
[[ -f $RUN/write-s3/casnix.db-wal ]] && cp "$RUN/write-s3/casnix.db-wal" "$S3DIR/"
bytes_total=$(du -sb "$LOCAL/packs" | cut -f1)
for ((run = 1; run <= RUNS; run++)); do
  hp=$(free_port)
  serve read-local "$LOCAL" "$hp"
  # One untimed pass: local packs read from the page cache, as the S3 cache's blocks are
  # after a cold pass.
  "$PROTOBENCH" nars -socket "$RUN/read-local.sock" -paths "$W/paths" >/dev/null || die "local warm-up"
  out=$("$PROTOBENCH" nars -socket "$RUN/read-local.sock" -paths "$W/paths") || die "local: $out"
  T[read-local]+="$(sed -n 's/.*mbps=\([0-9.]*\).*/\1/p' <<<"$out") "
  stop "$SPID"
  rm -rf "$S3DIR/s3cache"
  hp=$(free_port)
  serve read-s3 "$S3DIR" "$hp"
  for temp in cold warm; do
    g0=$(metric "127.0.0.1:$hp" casnix_s3_gets_total)
    b0=$(metric "127.0.0.1:$hp" casnix_s3_received_bytes_total)
    out=$("$PROTOBENCH" nars -socket "$RUN/read-s3.sock" -paths "$W/paths") || die "s3 $temp: $out"
    sent=$(sed -n 's/.*bytes=\([0-9]*\).*/\1/p' <<<"$out")
    T[read-$temp]+="$(sed -n 's/.*mbps=\([0-9.]*\).*/\1/p' <<<"$out") "
    g1=$(metric "127.0.0.1:$hp" casnix_s3_gets_total)
    b1=$(metric "127.0.0.1:$hp" casnix_s3_received_bytes_total)
    T[gets-$temp]+="$(awk -v a="$g0" -v b="$g1" -v s="$sent" 'BEGIN { printf "%.0f", (b - a) / (s / 1e9) }') "
    T[getbytes-$temp]+="$(awk -v a="$b0" -v b="$b1" -v s="$sent" 'BEGIN { printf "%.3f", (b - a) / s }') "
    log "read run $run s3 $temp: $out"
  done
  stop "$SPID"
done

# 3. FUSE: cat of the corpus's 30 largest files through a fresh `casnix mount` (the kernel's
# cache of a FUSE mount starts empty) of the local data dir, and of the S3 one with an empty
# cache (cold) and again with the cache the cold pass left (warm).
# (awk, not head: head leaving early would kill sort with SIGPIPE under pipefail)
find "$SRC/nix/store" -type f -printf '%s %P\n' | sort -rn | awk 'NR <= 30' >"$W/files.sized"
cut -d' ' -f2- "$W/files.sized" >"$W/files"
fbytes=$(awk '{ s += $1 } END { print s }' "$W/files.sized")
MNT=$RUN/mnt
mkdir -p "$MNT"
fuse_read() { # DATADIR: MB/s of reading the files through a fresh mount
  local dir=$1 mpid s e
  "$CASNIX" --data-dir "$dir" --log-level warn mount "$MNT" >>"$RUN/mount.log" 2>&1 &
  mpid=$!
  for ((i = 0; i < 600; i++)); do
    [[ -e $MNT/$(head -1 "$W/files" | cut -d/ -f1) ]] && break
    sleep 0.05
  done
  s=$(date +%s.%N)
  while read -r f; do cat "$MNT/$f" >/dev/null; done <"$W/files"
  e=$(date +%s.%N)
  kill -TERM "$mpid"
  wait "$mpid" 2>/dev/null || true
  awk -v s="$s" -v e="$e" -v b="$fbytes" 'BEGIN { printf "%.1f", b / 1e6 / (e - s) }'
}
for ((run = 1; run <= RUNS; run++)); do
  T[fuse-local]+="$(fuse_read "$LOCAL") "
  rm -rf "$S3DIR/s3cache"
  T[fuse-cold]+="$(fuse_read "$S3DIR") "
  T[fuse-warm]+="$(fuse_read "$S3DIR") "
  log "fuse run $run: local ${T[fuse-local]}, cold ${T[fuse-cold]}, warm ${T[fuse-warm]}"
done

med() { tr ' ' '\n' <<<"${T[$1]}" | grep . | median; }
load=$(cut -d' ' -f1-3 /proc/loadavg)
sec=$W/section.md
{
  echo "<!-- bench/s3.sh: begin -->"
  echo "## Packs on S3 (bench/s3.sh)"
  echo
  echo "Commit $COMMIT, $(date -u +%F), corpus $CORPUS ($npaths paths, $((bytes_total / 1000000)) MB of local packs), RUNS=$RUNS (medians), load average $load during the run."
  echo "SeaweedFS S3 on loopback (no network latency: a real bucket adds its round trips to every cold block)."
  echo
  echo "| measure | local packs | --packs s3:// |"
  echo "|---|---|---|"
  echo "| nix copy --to of the corpus (s) | $(med write-local) | $(med write-s3) |"
  echo "| then until all uploaded (s) | — | $(med upload) |"
  echo "| nix copy --to with serve --durability bucket (s; acknowledged = in the bucket) | — | $(med write-s3bucket) |"
  echo "| pack objects uploaded by the copy: --durability local / bucket | — | $(med packs-s3) / $(med packs-s3bucket) |"
  echo "| NarFromPath of every path, MB/s | $(med read-local) | cold $(med read-cold), warm $(med read-warm) |"
  echo "| FUSE cat of the 30 largest files ($((fbytes / 1000000)) MB), fresh mount, MB/s | $(med fuse-local) | cold $(med fuse-cold), warm $(med fuse-warm) |"
  echo "| S3 GETs per GB served (NarFromPath) | — | cold $(med gets-cold), warm $(med gets-warm) |"
  echo "| S3 bytes fetched per NAR byte served | — | cold $(med getbytes-cold), warm $(med getbytes-warm) |"
  echo
  echo "Raw: ${!T[*]}"
  for k in "${!T[@]}"; do echo "- $k: ${T[$k]}"; done
  echo "<!-- bench/s3.sh: end -->"
} >"$sec"
cat "$sec"
merge_section s3.sh "$sec" "$RESULTS"
