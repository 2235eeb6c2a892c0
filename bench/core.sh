#!/usr/bin/env bash
# Core-store benchmarks: casnix against zstd -3, xz -6 and casync on the corpora that
# bench/build-corpora.sh builds (import, render, repack into the space-optimal form, render
# again), plus peak memory of importing one big NAR. Prints a markdown table and writes it,
# with the machine and the commit, into bench/RESULTS.md.
# See bench/README.md for what each figure means and what is timed.
#
#   bench/core.sh [all|prepare|run|report]
#     prepare: NARs, xz/casync anchors, big NAR (no casnix needed)
#     report:  rewrite the table and RESULTS.md from the last run's raw values
#   CORPORA=none runs only the big-NAR test.
#   CORPORA=generations RUNS=1 BIG_NAR=0 bench/core.sh
#   SPACE_ANCHORS=0 skips the xz -6 and casync anchors when they are not cached yet (xz -6 of
#     the generations NARs alone takes about 30 min); their rows then say "not measured".
set -Eeuo pipefail

BENCH_DIR=${BENCH_DIR:-/var/tmp/casnix-bench}
CORPORA=${CORPORA:-releases generations}
RUNS=${RUNS:-3}
BIG_NAR=${BIG_NAR:-1}   # 0: skip the big-NAR memory test
BIG_GIB=${BIG_GIB:-4}   # size of the big NAR's tree
SPACE_ANCHORS=${SPACE_ANCHORS:-1} # 0: do not compute missing xz/casync anchors (a quick check)
HERE=$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)
# shellcheck source=bench/lib.sh
. "$HERE/lib.sh"
REPO=$(cd "$HERE/.." && pwd)
CASNIX=${CASNIX:-}      # a prebuilt binary; default: build casnix into $BENCH_DIR/core/casnix
BUILD_FROM=${BUILD_FROM:-head} # head: the last commit of $REPO; worktree: the work tree as it is
RESULTS=${RESULTS:-$HERE/RESULTS.md}
WORK=$BENCH_DIR/core    # this script's own binary, sources, data dirs, logs and raw values
QUIET_BUSY=${QUIET_BUSY:-0.15}     # wait before each timed step until other CPU use is below this
QUIET_TIMEOUT=${QUIET_TIMEOUT:-300} # ... but at most this many seconds
BIG_PATH=/nix/store/0123456789abcdfghijklmnpqrsvwxyz-casnix-bench-big

log() { printf '%s core: %s\n' "$(date +%T)" "$*" >&2; }
trap 'log "failed at line $LINENO: $BASH_COMMAND"' ERR
die() {
  log "error: $*"
  exit 1
}

nixq=(--option experimental-features nix-command --option build-users-group '')

need_tools() {
  local missing=()
  command -v zstd >/dev/null || missing+=(zstd)
  command -v xz >/dev/null || missing+=(xz-utils)
  command -v casync >/dev/null || missing+=(casync)
  command -v nix-store >/dev/null || missing+=(nix-bin)
  [[ -x /usr/bin/time ]] || missing+=(time)
  if ((${#missing[@]})); then
    log "installing ${missing[*]}"
    apt-get install -y -q "${missing[@]}" >&2 || {
      apt-get update -q >&2
      apt-get install -y -q "${missing[@]}" >&2
    }
  fi
}

COMMIT="unknown (prebuilt CASNIX)"
RUN_DATE=

build_casnix() {
  if [[ -n $CASNIX ]]; then
    [[ -x $CASNIX ]] || die "CASNIX=$CASNIX is not executable"
    return
  fi
  CASNIX=$WORK/casnix
  mkdir -p "$WORK"
  local src=$REPO
  if [[ $BUILD_FROM == head ]] && git -C "$REPO" rev-parse -q --verify HEAD >/dev/null; then
    # the committed tree only, so the figures belong to the commit they name
    COMMIT=$(git -C "$REPO" rev-parse --short HEAD)
    src=$WORK/src
    rm -rf "$src"
    mkdir -p "$src"
    git -C "$REPO" archive HEAD | tar -x -C "$src"
  else
    COMMIT=$(git -C "$REPO" rev-parse --short HEAD 2>/dev/null || echo "no commit yet")
    [[ -z $(git -C "$REPO" status --porcelain --untracked-files=no 2>/dev/null) ]] ||
      COMMIT="$COMMIT + uncommitted changes of the work tree"
  fi
  log "building casnix $COMMIT"
  (cd "$src" && CGO_ENABLED=0 go build -o "$CASNIX" .) || die "go build failed"
}

# --- measurement helpers -------------------------------------------------------------------

declare -A M=() # "<corpus>:<figure>:<run>" -> value

# timed OUT CMD...: runs CMD under /usr/bin/time; OUT gets "seconds maxrss_kib". Returns CMD's status.
timed() {
  local out=$1
  shift
  /usr/bin/time -f '%e %M' -o "$out" "$@"
}

secs() { awk '{ print $1 }' "$1"; }
rss() { awk '{ print $2 }' "$1"; }


# wait_quiet KEY: waits (up to QUIET_TIMEOUT) until other processes leave the CPUs alone, so
# that a timed step does not share them; records the busy fraction it started with under KEY.
wait_quiet() {
  local k=$1 busy waited=0
  busy=$(cpu_busy)
  while awk -v b="$busy" -v l="$QUIET_BUSY" 'BEGIN { exit !(b > l) }' && ((waited < QUIET_TIMEOUT)); do
    ((waited % 60)) || log "CPUs $busy busy with other work: waiting (up to $((QUIET_TIMEOUT - waited)) s more)"
    sleep 4
    waited=$((waited + 5))
    busy=$(cpu_busy)
  done
  M[$k]=$busy
}

# median_run KEY-PREFIX: the run whose value is the median (lower median for even counts).
median_run() {
  local k=$1 r
  for ((r = 1; r <= RUNS; r++)); do
    # (if, not &&: a missing last run must not fail the pipeline under pipefail)
    if [[ -n ${M[$k:$r]:-} ]]; then printf '%s %s\n' "${M[$k:$r]}" "$r"; fi
  done | sort -g | awk '{ v[NR] = $2 } END { if (NR) print v[int((NR + 1) / 2)] }'
}

# (%.0f, not %d: mawk's %d stops at 2^31 - 1)
sum_sizes() { awk '{ s += $1 } END { printf "%.0f\n", s }'; }

du_bytes() { du -sB1 "$@" | awk '{ s += $1 } END { printf "%.0f\n", s }'; }

# --- corpus preparation --------------------------------------------------------------------

# NARs of every valid path, dumped once with nix-store --dump (cached while the path set is
# unchanged). Writes $BENCH_DIR/nars/<corpus>/{paths,filelist,.done}.
prepare_nars() {
  local c=$1 root=$BENCH_DIR/corpora/$1 dir=$BENCH_DIR/nars/$1 p
  [[ -f $root/nix/var/nix/db/db.sqlite ]] || die "no corpus $c under $root: run bench/build-corpora.sh"
  mkdir -p "$WORK"
  nix path-info --store "$root" "${nixq[@]}" --all 2>/dev/null | LC_ALL=C sort >"$WORK/$c.paths"
  if [[ -f $dir/.done ]] && cmp -s "$WORK/$c.paths" "$dir/paths"; then
    return
  fi
  log "$c: dumping $(wc -l <"$WORK/$c.paths") NARs"
  rm -rf "$dir"
  mkdir -p "$dir"
  while IFS= read -r p; do
    nix-store --dump "$root$p" >"$dir/${p##*/}.nar"
    printf '%s\n' "$dir/${p##*/}.nar" >>"$dir/filelist"
  done <"$WORK/$c.paths"
  cp "$WORK/$c.paths" "$dir/paths"
  touch "$dir/.done"
}

# Space anchors that do not change between runs (xz -6, casync), cached per path set.
space_anchors() {
  local c=$1 root=$BENCH_DIR/corpora/$1 dir=$BENCH_DIR/nars/$1 cache key p s t
  cache=$BENCH_DIR/anchors/$c.env
  key=$(sha256sum <"$dir/paths" | cut -c1-16)
  if [[ -f $cache ]] && grep -qx "key=$key" "$cache"; then
    return
  fi
  mkdir -p "$BENCH_DIR/anchors"
  log "$c: xz -6 -T1 of every NAR (slow, once)"
  t=$WORK/$c.xz.time
  s=$(timed "$t" xz -6 -T1 -c -q --files="$dir/filelist" | wc -c)
  {
    echo "key=$key"
    echo "xz_bytes=$s"
    echo "xz_secs=$(secs "$t")"
  } >"$cache.tmp"
  log "$c: casync make --compression=zstd of every path into one store (once)"
  rm -rf "$WORK/casync-$c"
  mkdir -p "$WORK/casync-$c/index"
  local start end
  start=$(date +%s.%N)
  while IFS= read -r p; do
    if [[ -d $root$p ]]; then
      casync make --compression=zstd --store="$WORK/casync-$c/store" \
        "$WORK/casync-$c/index/${p##*/}.caidx" "$root$p" >/dev/null
    else
      casync make --compression=zstd --store="$WORK/casync-$c/store" \
        "$WORK/casync-$c/index/${p##*/}.caibx" "$root$p" >/dev/null
    fi
  done <"$dir/paths"
  end=$(date +%s.%N)
  {
    echo "casync_store_bytes=$(du_bytes "$WORK/casync-$c/store")"
    echo "casync_index_bytes=$(du_bytes "$WORK/casync-$c/index")"
    echo "casync_secs=$(awk -v a="$start" -v b="$end" 'BEGIN { printf "%.2f", b - a }')"
  } >>"$cache.tmp"
  mv "$cache.tmp" "$cache"
  rm -rf "$WORK/casync-$c"
}

smallest_path() {
  local c=$1
  find "$BENCH_DIR/nars/$c" -name '*.nar' -printf '%s %f\n' |
    awk 'NR == 1 || $1 < min { min = $1; f = $2 } END { sub(/\.nar$/, "", f); print "/nix/store/" f }'
}

# --- one run over one corpus ---------------------------------------------------------------

run_corpus() {
  local c=$1 r=$2 root=$BENCH_DIR/corpora/$1 nars=$BENCH_DIR/nars/$1
  local d=$WORK/casnix-$c t=$WORK/$c.time s start end p n
  rm -rf "$d"
  sync
  wait_quiet "$c:busy_before_zstd:$r"

  # anchor: zstd -3 -T1 over the pre-dumped NAR files, one frame per NAR, one process
  s=$(timed "$t" zstd -3 -T1 -q -c --filelist "$nars/filelist" | wc -c)
  M[$c:zstd_bytes:$r]=$s
  M[$c:zstd_secs:$r]=$(secs "$t")
  sync
  wait_quiet "$c:busy_before_import:$r"

  # casnix import --from-nix-store of the whole corpus into an empty data dir
  if timed "$t" "$CASNIX" --data-dir "$d" import --from-nix-store "$root" >"$WORK/$c.import.log" 2>&1; then
    M[$c:import_secs:$r]=$(secs "$t")
    M[$c:import_rss:$r]=$(rss "$t")
    M[$c:casnix_bytes:$r]=$(du_bytes "$d")
  else
    log "$c run $r: casnix import failed: $(tail -3 "$WORK/$c.import.log" | tr '\n' ' ')"
    return
  fi
  if ((r == 1)); then
    "$CASNIX" --data-dir "$d" info >"$WORK/$c.info" 2>&1 || true
    "$CASNIX" --data-dir "$d" info --json >"$WORK/$c.info.json" 2>&1 || true
  fi

  # render: casnix dump of every path to /dev/null (one process per path)
  wait_quiet "$c:busy_before_dump:$r"
  render_all "$c" "$r" "$d" dump
  # process start-up share of that loop: 20 dumps of the smallest path
  p=$(smallest_path "$c")
  start=$(date +%s.%N)
  for ((n = 0; n < 20; n++)); do
    "$CASNIX" --data-dir "$d" dump "$p" >/dev/null 2>&1 || true
  done
  end=$(date +%s.%N)
  M[$c:dump_start_secs:$r]=$(awk -v a="$start" -v b="$end" 'BEGIN { printf "%.4f", (b - a) / 20 }')
  if ((r == 1)); then sample_check "$c" "$d" dump; fi

  # repack: rewrite the fast-form packs of the import into the space-optimal form (best zstd
  # level, 16 MiB frames, chunks in package-name order) and remove the old packs. Timed: the
  # whole process, fsyncs included. The data dir is then measured like after the import.
  sync
  if ((r == 1)); then rm -f "$WORK/$c.info.repacked"; fi
  wait_quiet "$c:busy_before_repack:$r"
  if timed "$t" "$CASNIX" --data-dir "$d" repack --json >"$WORK/$c.repack.json" 2>"$WORK/$c.repack.log"; then
    M[$c:repack_secs:$r]=$(secs "$t")
    M[$c:repack_rss:$r]=$(rss "$t")
    M[$c:repack_bytes:$r]=$(du_bytes "$d")
    repack_fields "$c" "$r" "$WORK/$c.repack.json"
  else
    M[$c:repack_failed:$r]=1
    log "$c run $r: casnix repack failed: $(tail -3 "$WORK/$c.repack.log" | tr '\n' ' ')"
    rm -rf "$d"
    return
  fi
  if ((r == 1)); then
    "$CASNIX" --data-dir "$d" info >"$WORK/$c.info.repacked" 2>&1 || true
  fi

  # render again, now from the repacked packs
  wait_quiet "$c:busy_before_repacked_dump:$r"
  render_all "$c" "$r" "$d" repacked_dump
  if ((r == 1)); then sample_check "$c" "$d" repacked_dump; fi
  rm -rf "$d"
}

# render_all C R D KEY: casnix dump of every path of corpus C from data dir D to /dev/null, one
# process per path, timed as a whole (start-up included); records KEY_secs and KEY_fails.
render_all() {
  local c=$1 r=$2 d=$3 k=$4 nars=$BENCH_DIR/nars/$1 start end p fails=0
  start=$(date +%s.%N)
  while IFS= read -r p; do
    "$CASNIX" --data-dir "$d" dump "$p" >/dev/null 2>>"$WORK/$c.$k.log" || fails=$((fails + 1))
  done <"$nars/paths"
  end=$(date +%s.%N)
  M[$c:${k}_secs:$r]=$(awk -v a="$start" -v b="$end" 'BEGIN { printf "%.2f", b - a }')
  M[$c:${k}_fails:$r]=$fails
  ((fails == 0)) || log "$c run $r: $fails dumps failed ($k), see $WORK/$c.$k.log"
}

# sample_check C D KEY: correctness sample, every 25th path's dump from data dir D must be
# byte-identical to nix-store --dump; records KEY_mismatch for run 1.
sample_check() {
  local c=$1 d=$2 k=$3 nars=$BENCH_DIR/nars/$1 n=0 bad=0 p
  while IFS= read -r p; do
    n=$((n + 1))
    ((n % 25 == 1)) || continue
    "$CASNIX" --data-dir "$d" dump "$p" 2>/dev/null | cmp -s - "$nars/${p##*/}.nar" || {
      bad=$((bad + 1))
      log "$c ($k): dump of $p differs from nix-store --dump"
    }
  done <"$nars/paths"
  M[$c:${k}_mismatch:1]=$bad
}

# repack_fields C R FILE: every top-level number of repack --json's object (seconds,
# bytesBefore, bytesAfter, framesWritten, chunksMoved, ...) as C:repack_json_<name>:R, for
# the raw values; the table itself uses /usr/bin/time and du, like the import's rows.
repack_fields() {
  local c=$1 r=$2 f=$3 k v
  while IFS=' ' read -r k v; do
    M[$c:repack_json_$k:$r]=$v
  done < <(python3 -c '
import json, sys
o = json.load(open(sys.argv[1]))
for k, v in sorted(o.items()):
    if isinstance(v, (int, float)) and not isinstance(v, bool) and k.isalnum():
        print(k, v)' "$f" 2>/dev/null || log "$c run $r: repack --json printed no JSON object: $(head -c 200 "$f")")
}

# --- big NAR -------------------------------------------------------------------------------

# A tree of $BIG_GIB GiB: one file of half the size (one blob of many chunks) plus 64 MiB files,
# made by gen_mib (bench/lib.sh).
prepare_big() {
  local dir=$BENCH_DIR/big total half n i
  if [[ -f $dir/.done-$BIG_GIB ]]; then
    return
  fi
  log "generating a $BIG_GIB GiB tree and its NAR under $dir"
  rm -rf "$dir"
  mkdir -p "$dir/tree/data"
  total=$((BIG_GIB * 1024))
  half=$((total / 2))
  gen_mib "$half" 0 >"$dir/tree/data/big-blob"
  n=$(((total - half) / 64))
  for ((i = 0; i < n; i++)); do
    gen_mib 64 $((half + i * 64)) >"$dir/tree/data/part-$i"
  done
  printf '#!/bin/sh\necho %s\n' "$BIG_PATH" >"$dir/tree/run"
  chmod +x "$dir/tree/run"
  nix-store --dump "$dir/tree" >"$dir/big.nar"
  sha256sum <"$dir/big.nar" | cut -d' ' -f1 >"$dir/big.nar.sha256"
  rm -rf "$dir/tree"
  touch "$dir/.done-$BIG_GIB"
}

run_big() {
  local r=$1 nar=$BENCH_DIR/big/big.nar d=$WORK/casnix-big t=$WORK/big.time s
  rm -rf "$d"
  sync
  wait_quiet "big:busy_before_zstd:$r"
  s=$(timed "$t" zstd -3 -T1 -q -c "$nar" | wc -c)
  M[big:zstd_bytes:$r]=$s
  M[big:zstd_secs:$r]=$(secs "$t")
  sync
  wait_quiet "big:busy_before_import:$r"
  if timed "$t" "$CASNIX" --data-dir "$d" import --nar "$nar" --path "$BIG_PATH" >"$WORK/big.import.log" 2>&1; then
    M[big:import_secs:$r]=$(secs "$t")
    M[big:import_rss:$r]=$(rss "$t")
    M[big:casnix_bytes:$r]=$(du_bytes "$d")
  else
    log "big NAR run $r: casnix import --nar failed: $(tail -3 "$WORK/big.import.log" | tr '\n' ' ')"
    return
  fi
  wait_quiet "big:busy_before_dump:$r"
  if timed "$t" "$CASNIX" --data-dir "$d" dump "$BIG_PATH" >/dev/null 2>"$WORK/big.dump.log"; then
    M[big:dump_secs:$r]=$(secs "$t")
    M[big:dump_rss:$r]=$(rss "$t")
  else
    log "big NAR run $r: casnix dump failed: $(tail -3 "$WORK/big.dump.log" | tr '\n' ' ')"
  fi
  if ((r == 1)); then
    s=$("$CASNIX" --data-dir "$d" dump "$BIG_PATH" 2>/dev/null | sha256sum | cut -d' ' -f1)
    if [[ $s == "$(cat "$BENCH_DIR/big/big.nar.sha256")" ]]; then
      M[big:dump_mismatch:1]=0
    else
      M[big:dump_mismatch:1]=1
      log "big NAR: dump differs from the imported NAR"
    fi
  fi
  rm -rf "$d"
}

# --- report --------------------------------------------------------------------------------

mib() { awk -v b="$1" 'BEGIN { printf "%.1f MiB", b / 1048576 }'; }
mib_kib() { awk -v k="$1" 'BEGIN { printf "%.1f MiB", k / 1024 }'; }
mbps() { awk -v b="$1" -v s="$2" 'BEGIN { if (s > 0) printf "%.1f MB/s", b / 1e6 / s; else print "n/a" }'; }
ratio() { awk -v a="$1" -v b="$2" 'BEGIN { if (b > 0) printf "%.3f", a / b; else print "n/a" }'; }
# verdict RATIO OP LIMIT
verdict() {
  awk -v x="$1" -v op="$2" -v l="$3" 'BEGIN {
    if (x == "n/a") { print "n/a"; exit }
    ok = (op == "<=") ? (x + 0 <= l + 0) : (op == "<") ? (x + 0 < l + 0) : (x + 0 >= l + 0)
    print ok ? "yes" : "**no**" }'
}
row() { printf '| %s | %s | %s | %s | %s | %s | %s |\n' "$@"; }
# anchor_mib BYTES: an anchor's size, or "not measured" for an anchor that was not computed
anchor_mib() { if [[ ${1:-0} -gt 0 ]]; then mib "$1"; else echo "not measured"; fi; }
fail_row() { row "$1" "$2" "FAILED" "$3" "" "$4" "**no**"; }

report() {
  local c r nar_bytes npaths repack_target
  local -a lines=()
  lines+=("| corpus | figure | casnix | anchor | ratio | target | met |")
  lines+=("|---|---|---|---|---|---|---|")
  for c in $CORPORA; do
    nar_bytes=$(sum_sizes < <(find "$BENCH_DIR/nars/$c" -name '*.nar' -printf '%s\n'))
    npaths=$(wc -l <"$BENCH_DIR/nars/$c/paths")
    # shellcheck disable=SC2034 # set by the sourced file, some only for the raw values
    local key='' xz_bytes=0 xz_secs=0 casync_store_bytes=0 casync_index_bytes=0 casync_secs=0
    # (absent when the run had SPACE_ANCHORS=0 and nothing was cached)
    # shellcheck disable=SC1090
    if [[ -f $BENCH_DIR/anchors/$c.env ]]; then source "$BENCH_DIR/anchors/$c.env"; fi
    # the space target belongs to the space-optimal (repacked) form; the fast form of the
    # import is shown without one
    repack_target=0.8
    [[ $c == generations ]] && repack_target=0.25
    local casync_bytes=$((casync_store_bytes + casync_index_bytes))
    lines+=("| **$c** | $npaths paths, NAR | $(mib "$nar_bytes") | | | | |")
    r=$(median_run "$c:casnix_bytes")
    if [[ -n $r ]]; then
      local cb=${M[$c:casnix_bytes:$r]} zb=${M[$c:zstd_bytes:$r]} x
      x=$(ratio "$cb" "$zb")
      lines+=("$(row "$c" "space after import (fast form) vs zstd -3 per NAR" "$(mib "$cb")" "$(mib "$zb")" "$x" "" "")")
      x=$(ratio "$cb" "$xz_bytes")
      lines+=("$(row "$c" "space after import vs xz -6 per NAR" "$(mib "$cb")" "$(anchor_mib "$xz_bytes")" "$x" "" "")")
      x=$(ratio "$cb" "$casync_bytes")
      lines+=("$(row "$c" "space after import vs casync (zstd, store+indexes)" "$(mib "$cb")" "$(anchor_mib "$casync_bytes")" "$x" "< 1" "$(verdict "$x" "<" 1)")")
    else
      lines+=("$(fail_row "$c" "space after import" "$(mib "${M[$c:zstd_bytes:1]:-0}") (zstd -3)" "")")
    fi
    r=$(median_run "$c:repack_bytes")
    if [[ -n $r ]]; then
      local rb=${M[$c:repack_bytes:$r]} zb=${M[$c:zstd_bytes:$r]} x
      x=$(ratio "$rb" "$zb")
      lines+=("$(row "$c" "space after repack vs zstd -3 per NAR" "$(mib "$rb")" "$(mib "$zb")" "$x" "<= $repack_target" "$(verdict "$x" "<=" "$repack_target")")")
      x=$(ratio "$rb" "$xz_bytes")
      lines+=("$(row "$c" "space after repack vs xz -6 per NAR" "$(mib "$rb")" "$(anchor_mib "$xz_bytes")" "$x" "" "")")
    elif [[ -n $(median_run "$c:repack_failed") ]]; then
      lines+=("$(fail_row "$c" "space after repack vs zstd -3 per NAR" "$(mib "${M[$c:zstd_bytes:1]:-0}")" "<= $repack_target")")
    fi # (no repack rows at all for raw values of a run made before core.sh ran repack)
    r=$(median_run "$c:import_secs")
    if [[ -n $r ]]; then
      local is=${M[$c:import_secs:$r]} zs=${M[$c:zstd_secs:$r]} ib ab x
      ib=$(mbps "$nar_bytes" "$is")
      ab=$(mbps "$nar_bytes" "$zs")
      x=$(ratio "$zs" "$is")
      lines+=("$(row "$c" "ingest (import --from-nix-store)" "$ib" "$ab (zstd -3 -T1)" "$x" ">= 1" "$(verdict "$x" ">=" 1)")")
    else
      lines+=("$(fail_row "$c" "ingest" "" ">= 1")")
    fi
    r=$(median_run "$c:dump_secs")
    if [[ -n $r ]]; then
      local ds=${M[$c:dump_secs:$r]} is=${M[$c:import_secs:$r]} x
      x=$(ratio "$is" "$ds")
      lines+=("$(row "$c" "render (dump every path)" "$(mbps "$nar_bytes" "$ds")" "$(mbps "$nar_bytes" "$is") (ingest, same run)" "$x" ">= 2" "$(verdict "$x" ">=" 2)")")
      local st=${M[$c:dump_start_secs:$r]}
      ds=$(awk -v d="$ds" -v s="$st" -v n="$npaths" 'BEGIN { printf "%.2f", d - n * s }')
      x=$(ratio "$is" "$ds")
      lines+=("$(row "$c" "render without process start-up ($npaths x $(awk -v s="$st" 'BEGIN { printf "%.1f", s * 1000 }') ms)" "$(mbps "$nar_bytes" "$ds")" "$(mbps "$nar_bytes" "$is") (ingest, same run)" "$x" "" "")")
      if [[ ${M[$c:dump_fails:$r]} != 0 || ${M[$c:dump_mismatch:1]:-0} != 0 ]]; then
        lines+=("$(row "$c" "render errors" "${M[$c:dump_fails:$r]} failed, ${M[$c:dump_mismatch:1]:-?} of sample differ" "0" "" "0" "**no**")")
      fi
    fi
    r=$(median_run "$c:repack_secs")
    if [[ -n $r ]]; then
      local rs=${M[$c:repack_secs:$r]} is=${M[$c:import_secs:$r]}
      lines+=("$(row "$c" "repack time (repack --json)" "$rs s ($(mbps "$nar_bytes" "$rs") of NAR)" "$is s (ingest, same run)" "" "" "")")
    elif [[ -n $(median_run "$c:repack_failed") ]]; then
      lines+=("$(fail_row "$c" "repack time" "" "")")
    fi
    r=$(median_run "$c:repacked_dump_secs")
    if [[ -n $r ]]; then
      local ds=${M[$c:repacked_dump_secs:$r]} is=${M[$c:import_secs:$r]} x
      x=$(ratio "$is" "$ds")
      lines+=("$(row "$c" "render after repack (dump every path)" "$(mbps "$nar_bytes" "$ds")" "$(mbps "$nar_bytes" "$is") (ingest, same run)" "$x" ">= 2" "$(verdict "$x" ">=" 2)")")
      if [[ ${M[$c:repacked_dump_fails:$r]} != 0 || ${M[$c:repacked_dump_mismatch:1]:-0} != 0 ]]; then
        lines+=("$(row "$c" "render errors after repack" "${M[$c:repacked_dump_fails:$r]} failed, ${M[$c:repacked_dump_mismatch:1]:-?} of sample differ" "0" "" "0" "**no**")")
      fi
    elif [[ -n $(median_run "$c:repack_secs") ]]; then
      lines+=("$(fail_row "$c" "render after repack" "" ">= 2")")
    fi
    r=$(median_run "$c:import_rss")
    if [[ -n $r ]]; then
      lines+=("$(row "$c" "peak RSS, whole-corpus import" "$(mib_kib "${M[$c:import_rss:$r]}")" "" "" "" "")")
    fi
    r=$(median_run "$c:repack_rss")
    if [[ -n $r ]]; then
      lines+=("$(row "$c" "peak RSS, repack" "$(mib_kib "${M[$c:repack_rss:$r]}")" "" "" "" "")")
    fi
  done
  if ((BIG_NAR)); then
    local nb
    nb=$(stat -c %s "$BENCH_DIR/big/big.nar")
    lines+=("| **big NAR** | 1 path, NAR | $(mib "$nb") | | | | |")
    r=$(median_run "big:import_rss")
    if [[ -n $r ]]; then
      # No anchor here: 100 MiB is a fixed target, not something measured in this run.
      local kib=${M[big:import_rss:$r]} x
      x=$(ratio "$kib" $((100 * 1024)))
      lines+=("$(row "big NAR" "peak RSS, import --nar" "$(mib_kib "$kib")" "" "" "<= 100.0 MiB (fixed target)" "$(verdict "$x" "<=" 1)")")
      r=$(median_run "big:import_secs")
      local is=${M[big:import_secs:$r]} zs=${M[big:zstd_secs:$r]}
      x=$(ratio "$zs" "$is")
      lines+=("$(row "big NAR" "ingest (import --nar)" "$(mbps "$nb" "$is")" "$(mbps "$nb" "$zs") (zstd -3 -T1)" "$x" "" "")")
      lines+=("$(row "big NAR" "space vs zstd -3" "$(mib "${M[big:casnix_bytes:$r]}")" "$(mib "${M[big:zstd_bytes:$r]}")" "$(ratio "${M[big:casnix_bytes:$r]}" "${M[big:zstd_bytes:$r]}")" "" "")")
      r=$(median_run "big:dump_rss")
      if [[ -n $r ]]; then
        lines+=("$(row "big NAR" "render (dump)" "$(mbps "$nb" "${M[big:dump_secs:$r]}")" "$(mbps "$nb" "${M[big:import_secs:$r]}") (ingest, same run)" "$(ratio "${M[big:import_secs:$r]}" "${M[big:dump_secs:$r]}")" "" "")")
        lines+=("$(row "big NAR" "peak RSS, dump" "$(mib_kib "${M[big:dump_rss:$r]}")" "" "" "" "")")
      fi
      [[ ${M[big:dump_mismatch:1]:-0} == 0 ]] ||
        lines+=("$(row "big NAR" "render errors" "dump differs from NAR" "" "" "" "**no**")")
    else
      lines+=("$(fail_row "big NAR" "peak RSS, import --nar" "" "<= 100.0 MiB (fixed target)")")
    fi
  fi
  printf '%s\n' "${lines[@]}"
}

raw_runs() {
  local k
  for k in "${!M[@]}"; do
    printf '%s %s\n' "$k" "${M[$k]}"
  done | LC_ALL=C sort
}

# The core section of $RESULTS, between markers, so that other bench scripts' sections stay.
core_section() {
  local table=$1 cpu c
  cpu=$(lscpu | awk -F: '/^Model name/ { gsub(/^[ \t]+/, "", $2); print $2; exit }')
  echo "<!-- bench/core.sh: begin -->"
  echo "## Core store (\`bench/core.sh\`)"
  echo
  echo "See bench/README.md (\"Core benchmark\") for what each figure means and what is timed."
  echo
  echo "- date: $RUN_DATE"
  echo "- CPU: ${cpu:-unknown}, $(nproc) cores, $(awk '/MemTotal/ { printf "%.0f GiB", $2 / 1048576 }' /proc/meminfo) RAM"
  echo "- commit: $COMMIT; $(go version 2>/dev/null | cut -d' ' -f3-4)"
  echo "- anchors: $(zstd --version | head -1 | tr -d '*' | sed 's/^ *//; s/ *$//'); $(xz --version | head -1); casync $(casync --version 2>/dev/null | head -1 | awk '{print $NF}')"
  echo "- runs: $RUNS; each figure is the median run, shown with its anchor from the same run"
  echo "- MB/s = 10^6 bytes of NAR per second of wall-clock time"
  echo "- $(contention)"
  echo
  echo "$table"
  echo
  echo "<details><summary>raw per-run values (seconds, bytes, KiB of RSS, busy fraction of the CPUs before a step)</summary>"
  echo
  echo '```'
  raw_runs
  for c in $CORPORA; do
    [[ -f $BENCH_DIR/anchors/$c.env ]] && sed "s/^/$c: /" "$BENCH_DIR/anchors/$c.env"
    [[ -f $WORK/$c.info ]] && sed "s/^/$c casnix info: /" "$WORK/$c.info"
    [[ -f $WORK/$c.info.repacked ]] && sed "s/^/$c casnix info after repack: /" "$WORK/$c.info.repacked"
  done
  echo '```'
  echo
  echo "</details>"
  echo "<!-- bench/core.sh: end -->"
}

write_results() {
  local sec=$WORK/results-section.md tmp=$RESULTS.tmp
  core_section "$1" >"$sec"
  if [[ -f $RESULTS ]] && grep -q '^<!-- bench/core.sh: begin' "$RESULTS"; then
    awk -v sec="$sec" '
      /^<!-- bench\/core.sh: begin/ { while ((getline l < sec) > 0) print l; skip = 1; next }
      /^<!-- bench\/core.sh: end/ { skip = 0; next }
      !skip { print }' "$RESULTS" >"$tmp"
  else
    {
      echo "# casnix benchmark results"
      echo
      cat "$sec"
      if [[ -f $RESULTS ]]; then
        # keep other scripts' sections; drop an old core table written without markers
        awk '/^<!-- bench\// { keep = 1 } keep { print }' "$RESULTS" | sed '1s/^/\n/'
      fi
    } >"$tmp"
  fi
  mv "$tmp" "$RESULTS"
}

contention() {
  local k n=0 busy=0
  for k in "${!M[@]}"; do
    [[ $k == *:busy_before_* ]] || continue
    n=$((n + 1))
    if awk -v b="${M[$k]}" -v l="$QUIET_BUSY" 'BEGIN { exit !(b > l) }'; then busy=$((busy + 1)); fi
  done
  echo "contention: $busy of $n timed steps started while other processes kept the CPUs more than $QUIET_BUSY busy (waited up to $QUIET_TIMEOUT s for them; \`busy_before_*\` below)"
}

save_runs() {
  {
    printf 'meta:commit %s\nmeta:date %s\nmeta:runs %s\nmeta:corpora %s\nmeta:big %s\n' \
      "$COMMIT" "$RUN_DATE" "$RUNS" "$CORPORA" "$BIG_NAR"
    raw_runs
  } >"$WORK/last-run.txt"
}

load_runs() {
  local k v
  [[ -f $WORK/last-run.txt ]] || die "no $WORK/last-run.txt: run core.sh first"
  while IFS=' ' read -r k v; do
    case $k in
      meta:commit) COMMIT=$v ;;
      meta:date) RUN_DATE=$v ;;
      meta:runs) RUNS=$v ;;
      meta:corpora) CORPORA=$v ;;
      meta:big) BIG_NAR=$v ;;
      *) M[$k]=$v ;;
    esac
  done <"$WORK/last-run.txt"
}

prepare() {
  local c
  mkdir -p "$WORK"
  for c in $CORPORA; do
    prepare_nars "$c"
    if ((SPACE_ANCHORS)); then space_anchors "$c"; fi
  done
  if ((BIG_NAR)); then prepare_big; fi
}

main() {
  local c r table started step=${1:-all}
  started=$(date +%s)
  case $step in
    all | prepare | run | report) ;;
    *) die "usage: core.sh [all|prepare|run|report]" ;;
  esac
  [[ $CORPORA != none ]] || CORPORA=
  need_tools
  if [[ $step == prepare ]]; then
    prepare
    return
  fi
  if [[ $step == report ]]; then
    load_runs
  else
    build_casnix
    prepare
    RUN_DATE=$(date -u '+%Y-%m-%d %H:%M UTC')
    for ((r = 1; r <= RUNS; r++)); do
      for c in $CORPORA; do
        log "run $r/$RUNS: $c"
        # warm the page cache for both sides: the store tree and the pre-dumped NARs
        find "$BENCH_DIR/corpora/$c/nix/store" -type f -exec cat {} + >/dev/null
        zstd -q -c -1 -T1 --filelist "$BENCH_DIR/nars/$c/filelist" >/dev/null
        run_corpus "$c" "$r"
      done
      if ((BIG_NAR)); then
        log "run $r/$RUNS: big NAR"
        run_big "$r"
      fi
    done
    save_runs
  fi
  table=$(report)
  printf '%s\n' "$table"
  write_results "$table"
  log "wrote $RESULTS in $(($(date +%s) - started)) s"
}

main "$@"
