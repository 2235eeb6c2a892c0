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
