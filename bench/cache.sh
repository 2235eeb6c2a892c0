#!/usr/bin/env bash
# Binary cache benchmarks: `casnix export` against `nix copy --to file://…?compression=zstd`
# (Nix 2.34 from the sid root, and Nix 2.8 on the host, from the real Nix store holding the
# same paths), and NAR downloads from
# `casnix serve --http` against a static file server serving the cache nix copy wrote.
# Median of $RUNS, each figure next to its anchor from the same run; prints a markdown table
# and writes it between the bench/cache.sh markers of bench/RESULTS.md.
#
#   bench/cache.sh            # needs bench/build-corpora.sh's corpus (CORPUS=releases)
#   RUNS=1 bench/cache.sh     # a quick run
#   CASNIX=/path/to/casnix bench/cache.sh   # measure that binary instead of building this tree's
#
# Figures:
#   export    wall time of `casnix export --to file://D --all --compression zstd` (level 3,
#             fsyncs every file) vs `nix copy --store ROOT --to file://D?compression=zstd --all`
#             (zstd's default level 3), both from warm page caches into an empty directory;
#             Nix 2.34 runs in the sid root (SID_ROOT) on its own copy of the corpus. Each with
#             its CPU seconds (user+sys) per GB of NAR.
#   http N    MB/s of NAR (10^6 bytes) for cachebench get with N clients fetching every path
#             (narinfo, NAR file, zstd decompression, SHA-256 check against NarHash, like a
#             Nix substitution) from: the static file server (cachebench serve, sendfile)
#             over nix copy's cache; casnix serve --http --http-cache DIR cold (cache emptied:
#             NARs rendered and zstd-compressed on the fly, level 1, and cached) and warm (the
#             same downloads again, sent from the cache files); casnix serve --http
#             --http-compression none (rendered, uncompressed, no cache). Each with the
#             server's CPU seconds (user+sys, from /proc) per GB of NAR.
set -Eeuo pipefail

BENCH_DIR=${BENCH_DIR:-/var/tmp/casnix-bench}
RUNS=${RUNS:-3}
CORPUS=${CORPUS:-releases}
HERE=$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)
# shellcheck source=bench/lib.sh
. "$HERE/lib.sh"
REPO=$(cd "$HERE/.." && pwd)
RESULTS=${RESULTS:-$HERE/RESULTS.md}
ROOT=$BENCH_DIR/corpora/$CORPUS
W=$BENCH_DIR/binary-cache
SID_ROOT=${SID_ROOT:-/var/cache/casnix-tests/roots/sid}
BENCH=cache
trap 'log "failed at line $LINENO: $BASH_COMMAND"' ERR
PIDS=()
cleanup() {
  local p
  for p in "${PIDS[@]}"; do kill "$p" 2>/dev/null || true; done
  for p in "${PIDS[@]}"; do wait "$p" 2>/dev/null || true; done
}
trap cleanup EXIT

[[ $(id -u) == 0 ]] || { log "needs root"; exit 1; }
[[ -f $ROOT/nix/var/nix/db/db.sqlite ]] || { log "no corpus at $ROOT: run bench/build-corpora.sh"; exit 1; }
command -v nix >/dev/null || { log "needs nix-bin"; exit 1; }
mkdir -p "$W"
(cd "$REPO" && CGO_ENABLED=0 go build -o "$W/cachebench" ./bench/cmd/cachebench)
if [[ -n ${CASNIX:-} ]]; then
  COMMIT="binary $CASNIX"
else
  (cd "$REPO" && CGO_ENABLED=0 go build -o "$W/casnix" .)
  COMMIT=$(cd "$REPO" && git rev-parse --short HEAD)$(cd "$REPO" && git diff --quiet HEAD -- . ':!bench/RESULTS.md' || echo "+dirty")
  CASNIX=$W/casnix
fi
DATA=$W/data
NIXQ=(--option experimental-features nix-command --option build-users-group '' --option substituters '')
export NIX_CONF_DIR=$W/nixconf NIX_USER_CONF_FILES=$W/nixconf/nix.conf NIX_REMOTE=
mkdir -p "$NIX_CONF_DIR" && : >"$NIX_CONF_DIR/nix.conf"

# The casnix store holding the corpus, imported once.
want_count=$(sqlite3 "$ROOT/nix/var/nix/db/db.sqlite" 'select count(*) from ValidPaths' 2>/dev/null ||
  nix path-info --store "$ROOT" "${NIXQ[@]}" --all | wc -l)
if [[ ! -f $W/data.count || $(cat "$W/data.count") != "$want_count" ]]; then
  rm -rf "$DATA"
  log "importing $ROOT into casnix ($want_count paths)"
  "$CASNIX" --data-dir "$DATA" import --from-nix-store "$ROOT" >&2
  echo "$want_count" >"$W/data.count"
fi

# Nix 2.34 in the sid root, on its own copy of the corpus (a newer Nix may upgrade the
# schema of the database it opens), made once per corpus.
HAVE234=0 NIX234=
if [[ -x $SID_ROOT/usr/bin/nix && -d $SID_ROOT/tmp ]]; then
  if [[ ! -f $W/nixroot234.count || $(cat "$W/nixroot234.count") != "$want_count" ]]; then
    log "copying $ROOT for Nix 2.34"
    rm -rf "$W/nixroot234"
    cp -a "$ROOT" "$W/nixroot234"
    echo "$want_count" >"$W/nixroot234.count"
  fi
  HAVE234=1
fi
# sid SCRIPT: run the bash SCRIPT inside the sid root (lib.sh's in_sid), with the corpus copy at
# /tmp and an empty writable /nix.
sid() {
  mkdir -p "$W/sid-nix"
  in_sid "$W/sid-nix" "$W/nixroot234" "$1"
}
if [[ $HAVE234 == 1 ]]; then
  v=$(sid 'nix --version' 2>/dev/null) || v=
  if [[ $v == *2.3[4-9]* ]]; then
    NIX234=${v##* }
  else
    log "no Nix 2.34 in $SID_ROOT ($v): its export anchor is left out"
    HAVE234=0
  fi
fi

now() { date +%s.%N; }
# timed NAME RUN SCRIPT: runs the bash SCRIPT (its stderr sent elsewhere by the script),
# records its wall seconds under NAME:RUN and its CPU seconds (user+sys, every descendant
# included) under NAME_cpu:RUN.
export -f in_sid sid
export W SID_ROOT CASNIX DATA ROOT
timed() {
  local t0 t1 cpu
  t0=$(now)
  cpu=$(/usr/bin/time -f '%U %S' bash -c "$3" 2>&1 >/dev/null | tail -1)
  t1=$(now)
  M[$1:$2]=$(awk -v a="$t0" -v b="$t1" 'BEGIN { printf "%.2f", b - a }')
  M[$1_cpu:$2]=$(awk -v c="$cpu" 'BEGIN { split(c, x, " "); printf "%.2f", x[1] + x[2] }')
}
CLK=$(getconf CLK_TCK)
# proc_cpu PID: the CPU seconds (user+sys) process PID has used so far.
proc_cpu() { awk -v h="$CLK" '{ printf "%.2f\n", ($14 + $15) / h }' "/proc/$1/stat"; }
QUIET_BUSY=${QUIET_BUSY:-0.25}      # wait before each timed step until other CPU use is below this
QUIET_TIMEOUT=${QUIET_TIMEOUT:-60}  # ... but at most this many seconds
# wait_quiet KEY: waits (up to QUIET_TIMEOUT s) until other processes leave the CPUs alone;
# records the busy fraction the step started with under KEY.
wait_quiet() {
  local busy waited=0
  busy=$(cpu_busy)
  while awk -v b="$busy" -v l="$QUIET_BUSY" 'BEGIN { exit !(b > l) }' && ((waited < QUIET_TIMEOUT)); do
    sleep 2
    waited=$((waited + 3))
    busy=$(cpu_busy)
  done
  M[$1]=$busy
}
warm() {
  tar -C "$ROOT/nix/store" -cf - . | cat >/dev/null
  cat "$DATA"/packs/*/*.pack >/dev/null 2>&1 || true
}
median() { sort -g | awk '{ v[NR] = $1 } END { print v[int((NR + 1) / 2)] }'; }
declare -A M

free_port() { python3 -c 'import socket; s = socket.socket(); s.bind(("127.0.0.1", 0)); print(s.getsockname()[1])'; }
wait_port() {
  local i
  for ((i = 0; i < 200; i++)); do
    curl -fsS -o /dev/null "http://127.0.0.1:$1/nix-cache-info" && return 0
    sleep 0.05
  done
  log "nothing serves on port $1"
  return 1
}

for ((r = 1; r <= RUNS; r++)); do
  log "run $r/$RUNS: export"
  rm -rf "$W/exp-casnix" "$W/exp-nix" "$W/nixroot234/exp"
  warm
  sync
  wait_quiet "busy_export_casnix:$r"
  timed export_casnix "$r" '"$CASNIX" --data-dir "$DATA" export --to "file://$W/exp-casnix" --all --compression zstd 2>"$W/export.log"'
  wait_quiet "busy_export_nix:$r"
  t1=$(now)
  timed export_nix "$r" 'nix copy --store "$ROOT" --option experimental-features nix-command --option build-users-group "" --option substituters "" --to "file://$W/exp-nix?compression=zstd" --all 2>"$W/nixcopy.log"'
  sync
  M[export_nix_sync:$r]=$(awk -v a="$t1" -v b="$(now)" 'BEGIN { printf "%.2f", b - a }')
  M[export_casnix_bytes:$r]=$(du -sB1 "$W/exp-casnix" | cut -f1)
  M[export_nix_bytes:$r]=$(du -sB1 "$W/exp-nix" | cut -f1)
  if [[ $HAVE234 == 1 ]]; then
    wait_quiet "busy_export_nix234:$r"
    timed export_nix234 "$r" "sid \"nix copy --store /tmp --option experimental-features nix-command --option build-users-group '' --option substituters '' --to 'file:///tmp/exp?compression=zstd' --all 2>/tmp/nixcopy234.log\""
    M[export_nix234_bytes:$r]=$(du -sB1 "$W/nixroot234/exp" | cut -f1)
  fi
  M[load_export:$r]=$(cut -d' ' -f1-3 /proc/loadavg)
  log "export: casnix ${M[export_casnix:$r]} s (${M[export_casnix_cpu:$r]} s CPU), nix copy 2.8 ${M[export_nix:$r]} s (${M[export_nix_cpu:$r]} s CPU), 2.34 ${M[export_nix234:$r]:-} s (${M[export_nix234_cpu:$r]:-} s CPU)"
done
NAR_BYTES=$(awk '/^NarSize:/ { s += $2 } END { print s }' "$W"/exp-nix/*.narinfo)
NPATHS=$(ls "$W"/exp-nix/*.narinfo | wc -l)

# HTTP: the three servers run side by side; one is measured at a time.
ls "$W"/exp-nix/*.narinfo | xargs -n1 basename | sed 's/\.narinfo$//' >"$W/hashes"
p_static=$(free_port)
"$W/cachebench" serve -dir "$W/exp-nix" -addr "127.0.0.1:$p_static" &
PIDS+=($!)
declare -A SPID
SPID[static]=$!
p_zstd=$(free_port)
rm -rf "$W/http-cache"
"$CASNIX" --data-dir "$DATA" serve --http "127.0.0.1:$p_zstd" --http-only --http-cache "$W/http-cache" --log-level warn &
PIDS+=($!)
SPID[cold]=$! SPID[warm]=$!
wait_port "$p_static"
wait_port "$p_zstd"
p_none=$(free_port)
# A second server on the same data dir: --socket apart, but --http-only needs none.
"$CASNIX" --data-dir "$DATA" serve --http "127.0.0.1:$p_none" --http-only --http-compression none --log-level warn &
PIDS+=($!)
SPID[none]=$!
wait_port "$p_none"
for ((r = 1; r <= RUNS; r++)); do
  for n in 1 16; do
    for s in static:$p_static cold:$p_zstd warm:$p_zstd none:$p_none; do
      name=${s%%:*} port=${s#*:}
      # cold: nothing in --http-cache, every NAR rendered, compressed and cached;
      # warm: the same downloads again, sent from the cache files.
      if [[ $name == cold ]]; then
        mkdir -p "$W/http-cache"
        find "$W/http-cache" -type f -delete
      fi
      wait_quiet "busy_http_${name}_$n:$r"
      c0=$(proc_cpu "${SPID[$name]}")
      out=$("$W/cachebench" get -base "http://127.0.0.1:$port" -hashes "$W/hashes" -clients "$n")
      c1=$(proc_cpu "${SPID[$name]}")
      M[http_${name}_$n:$r]=$(sed 's/.*mbps=//' <<<"$out")
      M[http_${name}_${n}_cpu:$r]=$(awk -v a="$c0" -v b="$c1" 'BEGIN { printf "%.2f", b - a }')
      log "run $r/$RUNS http $name clients=$n: $out, server CPU ${M[http_${name}_${n}_cpu:$r]} s"
    done
  done
  M[load_http:$r]=$(cut -d' ' -f1-3 /proc/loadavg)
done

med() { for ((r = 1; r <= RUNS; r++)); do echo "${M[$1:$r]}"; done | median; }
ratio() { awk -v a="$1" -v b="$2" 'BEGIN { printf "%.2f", a / b }'; }
# pergb NAME: the median CPU seconds of NAME per GB (10^9 bytes) of NAR.
pergb() { awk -v c="$(med "$1")" -v n="$NAR_BYTES" 'BEGIN { printf "%.1f", c / (n / 1e9) }'; }
mib() { med "$1" | awk '{ printf "%.0f", $1 / 1048576 }'; }
ec=$(med export_casnix) en=$(med export_nix)
table="| figure | casnix | anchor | ratio (casnix / anchor) | target |
|---|---|---|---|---|"
if [[ $HAVE234 == 1 ]]; then
  e4=$(med export_nix234)
  table+="
| export $NPATHS paths, $((NAR_BYTES / 1048576)) MiB NAR to a zstd cache: wall s; CPU s (user+sys) per GB of NAR | $ec s, $(pergb export_casnix_cpu) CPU s/GB ($(mib export_casnix_bytes) MiB, synced) | nix copy (Nix $NIX234): $e4 s, $(pergb export_nix234_cpu) CPU s/GB ($(mib export_nix234_bytes) MiB, not synced) | $(ratio "$ec" "$e4")× time, $(ratio "$(med export_casnix_cpu)" "$(med export_nix234_cpu)")× CPU | ≤ 1.0× |"
fi
table+="
| export $NPATHS paths, $((NAR_BYTES / 1048576)) MiB NAR to a zstd cache: wall s; CPU s (user+sys) per GB of NAR | $ec s, $(pergb export_casnix_cpu) CPU s/GB ($(mib export_casnix_bytes) MiB, synced) | nix copy (Nix $(nix --version | awk '{ print $NF }')): $en s, $(pergb export_nix_cpu) CPU s/GB ($(mib export_nix_bytes) MiB, not synced; $(med export_nix_sync) s with a sync after) | $(ratio "$ec" "$en")× time, $(ratio "$(med export_casnix_cpu)" "$(med export_nix_cpu)")× CPU | ≤ 1.0× |"
for n in 1 16; do
  st=$(med "http_static_$n") co=$(med "http_cold_$n") wa=$(med "http_warm_$n") no=$(med "http_none_$n")
  table+="
| HTTP NAR download, $n client(s), zstd, cold (rendered, stored frames sent as they are, the rest compressed on the fly, filling --http-cache): MB/s; server CPU s per GB of NAR | $co, $(pergb "http_cold_${n}_cpu") CPU s/GB | static file server: $st, $(pergb "http_static_${n}_cpu") CPU s/GB | $(ratio "$co" "$st")× | ≥ 0.8× |
| HTTP NAR download, $n client(s), zstd, warm (sent from --http-cache): MB/s; server CPU s per GB | $wa, $(pergb "http_warm_${n}_cpu") CPU s/GB | static file server: $st | $(ratio "$wa" "$st")× | ≥ 0.8× |
| HTTP NAR download, $n client(s), casnix --http-compression none (rendered, uncompressed): MB/s; server CPU s per GB | $no, $(pergb "http_none_${n}_cpu") CPU s/GB | static file server (zstd): $st | $(ratio "$no" "$st")× | — |"
done
echo "$table"

section() {
  local cpu
  cpu=$(lscpu | awk -F: '/^Model name/ { gsub(/^[ \t]+/, "", $2); print $2; exit }')
  echo "<!-- bench/cache.sh: begin (rewritten by every cache.sh run) -->"
  echo "## Binary caches (\`bench/cache.sh\`)"
  echo
  echo "Corpus \`$CORPUS\` ($NPATHS paths). Export: \`casnix export --compression zstd\` (stored zstd frames that are"
  echo "exactly a run of a file's contents copied as they are, the rest at level 3; every file fsynced) vs \`nix copy --to"
  echo "file://…?compression=zstd\` (Nix ${NIX234:-2.34 absent} in the sid root, and Nix $(nix --version | awk '{ print $NF }') on the host; no fsync), wall time"
  echo "and CPU seconds (user+sys, the command and its children) per GB of NAR."
  echo "HTTP: every path fetched like a Nix substitution (narinfo, NAR file, decompress, SHA-256 check) by"
  echo "\`bench/cmd/cachebench get\` with N clients; anchor: a static file server (Go net/http, sendfile)"
  echo "serving the cache nix copy wrote. casnix cold: \`--http-cache\` emptied, each NAR rendered from its"
  echo "chunks, stored zstd frames holding exactly a run of a file's contents sent as they are, the rest compressed"
  echo "with zstd level 1 on the fly, and written to the cache; warm: the same downloads"
  echo "again, sent from the cache files; none: rendered and sent uncompressed (\`--http-compression none\`)."
  echo "Client, servers and compression share the machine's 2 cores. Server CPU: the serving process's user+sys"
  echo "seconds (from /proc) over the downloads, per GB of NAR."
  echo
  echo "- date: $(date -u +%F), commit $COMMIT, CPU: ${cpu:-unknown}, $(nproc) cores"
  echo "- busy: each timed step waited (up to ${QUIET_TIMEOUT} s) for the CPUs to be less than $QUIET_BUSY busy with other work; the busy fraction it started with is in the raw values (busy_*)"
  echo "- runs: $RUNS, median; load average (1/5/15 min) after each run: export $(for ((r = 1; r <= RUNS; r++)); do printf '[%s] ' "${M[load_export:$r]}"; done)· http $(for ((r = 1; r <= RUNS; r++)); do printf '[%s] ' "${M[load_http:$r]}"; done)"
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
  echo "<!-- bench/cache.sh: end -->"
}
sec=$W/section.md
section >"$sec"
merge_section cache.sh "$sec" "$RESULTS"
log "wrote $RESULTS"
