# shellcheck shell=bash
# Shell functions shared by the bench scripts (sourced, not run).

# gen_mib COUNT FIRST-UNIT: COUNT MiB of semi-compressible data on stdout.
# Each MiB: 384 KiB random, 384 KiB base64 of random, 256 KiB of zero-padded
# decimal numbers (unique, very compressible); zstd -3 gets about 1.4x and
# no chunk repeats.
gen_mib() {
  local u
  for ((u = $2; u < $2 + $1; u++)); do
    head -c 393216 /dev/urandom
    head -c 294912 /dev/urandom | base64 -w 0
    seq -f '%015.0f' $((u * 16384)) $((u * 16384 + 16383))
  done
}

# merge_section SCRIPT SECTION RESULTS: put the markdown file SECTION into RESULTS between
# the markers "<!-- bench/SCRIPT: begin" and "<!-- bench/SCRIPT: end -->" (replacing what
# was there), or append it, so every bench script owns one section of RESULTS.md.
merge_section() {
  local script=$1 section=$2 results=$3 tmp=$3.tmp
  if [[ -f $results ]] && grep -q "^<!-- bench/$script: begin" "$results"; then
    awk -v f="$section" -v b="<!-- bench/$script: begin" -v e="<!-- bench/$script: end" '
      index($0, b) == 1 { while ((getline l < f) > 0) print l; skip = 1; next }
      index($0, e) == 1 { skip = 0; next }
      !skip { print }' "$results" >"$tmp"
  else
    { [[ -f $results ]] && cat "$results" && echo; cat "$section"; } >"$tmp"
  fi
  mv "$tmp" "$results"
}

# median: the median of the numbers on stdin, one per line.
median() { sort -g | awk '{ v[NR] = $1 } END { if (NR % 2) print v[(NR + 1) / 2]; else print (v[NR / 2] + v[NR / 2 + 1]) / 2 }'; }

# cpu_busy: the fraction of all cores busy over one second, every process counted (run it while
# the benchmark's own processes are idle, to see whether other work shares the machine).
cpu_busy() {
  local a b
  a=$(awk '/^cpu / { print $2 + $3 + $4 + $7 + $8 + $9, $5 + $6; exit }' /proc/stat)
  sleep 1
  b=$(awk '/^cpu / { print $2 + $3 + $4 + $7 + $8 + $9, $5 + $6; exit }' /proc/stat)
  awk -v a="$a" -v b="$b" 'BEGIN { split(a, x, " "); split(b, y, " ");
    busy = y[1] - x[1]; idle = y[2] - x[2]; printf "%.2f\n", (busy + idle) ? busy / (busy + idle) : 0 }'
}
