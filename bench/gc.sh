#!/usr/bin/env bash
# Garbage-collection benchmark: `casnix gc` deleting about half of a corpus, next to Nix's own
# `nix-store --gc` deleting the same paths from a copy of the source Nix store (the anchor),
# median of $RUNS. Prints a markdown table and merges it, as the "GC" section, into
# bench/RESULTS.md (between its markers).
#
#   bench/gc.sh                  # releases corpus (bench/build-corpora.sh), or a store it builds
#   RUNS=1 bench/gc.sh           # a quick run
#   CORPUS=/path/root bench/gc.sh
#
# Roots: store paths in the order of the SHA-256 of their names (a fixed shuffle) are made roots
# until their closure holds half of the corpus's NAR bytes; everything else is garbage.
# Figures:
#   wall time      `casnix gc` (mark, sweep, pack compaction, fsyncs) / `nix-store --gc`
#   reclaimed      du -sB1 of the data dir before minus after
#   exclusive      what the garbage occupied: du of the full data dir minus du of a data dir
#                  into which only the live closure was imported (measured in this run), and
#                  casnix gc's own estimate
# Without the corpus (no $CORPUS/nix/store), a smaller store is built from /usr/share: one
# `nix-store --add` path per entry.
set -Eeuo pipefail

BENCH_DIR=${BENCH_DIR:-/var/tmp/casnix-bench}
RUNS=${RUNS:-3}
MIN_DEADS=${MIN_DEADS:-0.25 0.01} # casnix gc --min-dead values measured (0.25 is the default)
HERE=$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)
# shellcheck source=bench/lib.sh
. "$HERE/lib.sh"
REPO=$(cd "$HERE/.." && pwd)
RESULTS=${RESULTS:-$HERE/RESULTS.md}
CORPUS=${CORPUS:-$BENCH_DIR/corpora/releases}
W=$BENCH_DIR/gc
CASNIX=${CASNIX:-}
log() { printf '%s gc: %s\n' "$(date +%T)" "$*" >&2; }
trap 'log "failed at line $LINENO: $BASH_COMMAND"' ERR
mkdir -p "$W"

if [[ -z $CASNIX ]]; then
  (cd "$REPO" && CGO_ENABLED=0 go build -o "$W/casnix" .)
  CASNIX=$W/casnix
fi

if [[ ! -d $CORPUS/nix/store ]]; then
  CORPUS=$W/usr-share-store
  if [[ ! -f $CORPUS/.built ]]; then
    log "no corpus: building $CORPUS from /usr/share"
    rm -rf "$CORPUS"
    nix-store --store "$CORPUS" --init 2>/dev/null || true
    mapfile -t entries < <(find /usr/share -mindepth 1 -maxdepth 1 -regex '.*/[a-zA-Z0-9+_?=-][a-zA-Z0-9+._?=-]*' | sort)
    nix-store --store "$CORPUS" --add "${entries[@]}" >/dev/null
    touch "$CORPUS/.built"
  fi
fi
DB=$CORPUS/nix/var/nix/db/db.sqlite

# Roots and the live closure, from the source store's database.
python3 - "$DB" "$W/roots.txt" "$W/live.txt" "$W/dead.txt" <<'PY'
import hashlib, sqlite3, sys
db = sqlite3.connect(f"file:{sys.argv[1]}?mode=ro", uri=True)
size, refs = {}, {}
for i, p, n in db.execute("SELECT id, path, narSize FROM ValidPaths"):
    size[p] = n; refs[p] = []
names = {i: p for i, p in db.execute("SELECT id, path FROM ValidPaths")}
for a, b in db.execute("SELECT referrer, reference FROM Refs"):
    refs[names[a]].append(names[b])
total = sum(size.values())
live, roots = set(), []
for p in sorted(size, key=lambda p: hashlib.sha256(p.encode()).digest()):
    if sum(size[q] for q in live) >= total / 2:
        break
    if p in live:
        continue
    roots.append(p)
    stack = [p]
    while stack:
        q = stack.pop()
        if q not in live:
            live.add(q); stack.extend(refs[q])
open(sys.argv[2], "w").write("".join(r + "\n" for r in roots))
open(sys.argv[3], "w").write("".join(p + "\n" for p in sorted(live)))
open(sys.argv[4], "w").write("".join(p + "\n" for p in sorted(set(size) - live)))
print(f"{len(size)} paths, {total} NAR bytes; {len(roots)} roots keep {len(live)} paths, "
      f"{sum(size[q] for q in live)} NAR bytes", file=sys.stderr)
PY
NPATHS=$(sqlite3 "file:$DB?mode=ro" "SELECT COUNT(*) FROM ValidPaths")
NDEAD=$(wc -l <"$W/dead.txt")
DEADNAR=$(python3 -c "
import sqlite3,sys
db=sqlite3.connect('file:$DB?mode=ro',uri=True)
dead=set(open('$W/dead.txt').read().split())
print(sum(n for p,n in db.execute('SELECT path,narSize FROM ValidPaths') if p in dead))")

# The full data dir, imported once per corpus state.
stamp="$NPATHS $(stat -c %Y "$DB") $(git -C "$REPO" rev-parse HEAD)"
if [[ ! -f $W/base.stamp || $(cat "$W/base.stamp") != "$stamp" ]]; then
  log "importing $CORPUS"
  rm -rf "$W/base" "$W/base.stamp"
  "$CASNIX" -d "$W/base" import --from-nix-store "$CORPUS" 2>"$W/base.import.log"
  echo "$stamp" >"$W/base.stamp"
fi
# The anchor of the space figures: the live closure alone.
log "importing the live closure alone"
rm -rf "$W/liveonly"
xargs -a "$W/live.txt" "$CASNIX" -d "$W/liveonly" import --from-nix-store "$CORPUS" 2>"$W/liveonly.import.log"
FULL=$(du -sB1 "$W/base" | cut -f1)
LIVEONLY=$(du -sB1 "$W/liveonly" | cut -f1)
rm -rf "$W/liveonly"

# timed OUT CMD…: run CMD with stdout to OUT (stderr to OUT.log), print its wall seconds
timed() { local out=$1 s e; shift; s=$(date +%s.%N); "$@" >"$out" 2>"$out.log"; e=$(date +%s.%N); echo "$e - $s" | bc; }
median() { sort -g | awk '{a[NR]=$1} END {print a[int((NR+1)/2)]}'; }
mib() { echo "scale=1; $1 / 1048576" | bc; }
rm -f "$W"/raw.*
for i in $(seq "$RUNS"); do
  log "run $i/$RUNS"
  echo "$(cut -d' ' -f1 /proc/loadavg)" >>"$W/raw.load"
  for md in $MIN_DEADS; do
    # casnix: a copy of the full data dir, roots as gcroots symlinks.
    rm -rf "$W/work"
    cp -a "$W/base" "$W/work"
    mkdir -p "$W/work/gcroots"
    while read -r p; do ln -s "$p" "$W/work/gcroots/$(basename "$p")"; done <"$W/roots.txt"
    sync
    before=$(du -sB1 "$W/work" | cut -f1)
    t=$(timed "$W/gc.json" "$CASNIX" -d "$W/work" gc --json --min-dead "$md")
    after=$(du -sB1 "$W/work" | cut -f1)
    echo "$t" >>"$W/raw.casnix_secs.$md"
    echo $((before - after)) >>"$W/raw.reclaimed.$md"
    for k in exclusiveBytes lockSeconds deadLeft; do
      python3 -c "import json; print(json.load(open('$W/gc.json'))['$k'])" >>"$W/raw.$k.$md"
    done
    n=$(python3 -c "import json; print(len(json.load(open('$W/gc.json'))['paths']))")
    [[ $n == "$NDEAD" ]] || { log "casnix gc deleted $n paths, expected $NDEAD"; exit 1; }
    if [[ $i == 1 ]]; then
      log "verify after gc --min-dead $md"
      "$CASNIX" -d "$W/work" verify 2>"$W/verify.log"
      # every 10th live path dumps byte-identical to the source
      awk 'NR % 10 == 1' "$W/live.txt" | while read -r p; do
        a=$("$CASNIX" -d "$W/work" dump "$p" | sha256sum)
        b=$(nix-store --dump "$CORPUS$p" | sha256sum)
        [[ $a == "$b" ]] || { log "dump of $p differs after gc"; exit 1; }
      done
    fi
  done
  # Nix: a copy of the source store, the same roots, nix-store --gc.
  rm -rf "$W/nixwork"
  cp -a "$CORPUS" "$W/nixwork"
  mkdir -p "$W/nixwork/nix/var/nix/gcroots/bench"
  while read -r p; do ln -s "$p" "$W/nixwork/nix/var/nix/gcroots/bench/$(basename "$p")"; done <"$W/roots.txt"
  sync
  nbefore=$(du -sB1 "$W/nixwork" | cut -f1)
  t=$(timed "$W/nixgc.out" nix-store --store "$W/nixwork" --option keep-derivations false --gc)
  nafter=$(du -sB1 "$W/nixwork" | cut -f1)
  echo "$t" >>"$W/raw.nix_secs"
  echo $((nbefore - nafter)) >>"$W/raw.nix_reclaimed"
  left=$(sqlite3 "file:$W/nixwork/nix/var/nix/db/db.sqlite?mode=ro" "SELECT COUNT(*) FROM ValidPaths")
  [[ $((NPATHS - left)) == "$NDEAD" ]] || { log "nix-store --gc deleted $((NPATHS - left)) paths, expected $NDEAD"; exit 1; }
done
rm -rf "$W/work" "$W/nixwork"

NS=$(median <"$W/raw.nix_secs"); NR=$(median <"$W/raw.nix_reclaimed")
EXCL=$((FULL - LIVEONLY))
{
  echo "<!-- bench/gc.sh: begin (rewritten by every gc.sh run) -->"
  echo "## GC ($(date -u +%F), $(lscpu | sed -n 's/^Model name: *//p'), $(nproc) cores, 1-min load at the runs: $(paste -sd/ "$W/raw.load"), commit $(git -C "$REPO" rev-parse --short HEAD))"
  echo
  echo "Corpus $CORPUS: $NPATHS paths; roots keep $(wc -l <"$W/live.txt") paths, $NDEAD paths ($(mib "$DEADNAR") MiB of NAR) are garbage."
  echo "Median of $RUNS runs. Exclusive stored bytes of the garbage (the space anchor): du of the full data dir ($(mib "$FULL") MiB)"
  echo "minus du of a data dir into which only the live closure was imported ($(mib "$LIVEONLY") MiB) = $(mib "$EXCL") MiB."
  echo "Time anchor: \`nix-store --gc\` (keep-derivations off) of the same garbage from a copy of the source Nix store:"
  printf '%.2f s, reclaiming %s MiB (files as big as their NARs).\n' "$NS" "$(mib "$NR")"
  echo
  echo "| casnix gc | wall time, s | imports held off, s | reclaimed (du), MiB | gc's estimate of the exclusive bytes, MiB | dead bytes left in packs, MiB | reclaimed / exclusive | time vs nix-store --gc |"
  echo "|---|---|---|---|---|---|---|---|"
  for md in $MIN_DEADS; do
    CS=$(median <"$W/raw.casnix_secs.$md"); RC=$(median <"$W/raw.reclaimed.$md")
    printf '| --min-dead %s | %.2f | %.2f | %s | %s | %s | %.3f | %.3f× |\n' "$md" "$CS" "$(median <"$W/raw.lockSeconds.$md")" \
      "$(mib "$RC")" "$(mib "$(median <"$W/raw.exclusiveBytes.$md")")" "$(mib "$(median <"$W/raw.deadLeft.$md")")" \
      "$(echo "$RC / $EXCL" | bc -l)" "$(echo "$CS / $NS" | bc -l)"
  done
  echo "<!-- bench/gc.sh: end -->"
} | tee "$W/table.md"
merge_section gc.sh "$W/table.md" "$RESULTS"
