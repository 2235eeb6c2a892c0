#!/usr/bin/env bash
# bench/fuzz.sh: fuzz every parser casnix applies to untrusted bytes until each has had
# FUZZ_CPU_MIN CPU-minutes (default 30), measured, not assumed: each target's test binary is
# built once, then run in chunks of FUZZ_CHUNK under /usr/bin/time, summing user+system CPU
# of the fuzzing coordinator and its workers, until the sum reaches the target. Wall time
# depends on the load; CPU time does not.
#
#   bench/fuzz.sh                          # all seven parsers, 30 CPU-minutes each
#   FUZZ_CPU_SEC=20 FUZZ_CHUNK=10s bench/fuzz.sh nar   # one package, a short run
#
# A crasher makes the chunk fail: the script prints it, goes on with the next target and
# exits 1 at the end. Go has written the input
# to <pkg>/testdata/fuzz/<Fuzz...>/; fix the parser and commit that file as a seed (plain
# `go test` then replays it in CI). Figures go to bench/fuzz.log (appended).
set -euo pipefail
cd "$(dirname "$0")/.."
export PATH=$PATH:/usr/local/go/bin

CPU_SEC=${FUZZ_CPU_SEC:-$((${FUZZ_CPU_MIN:-30} * 60))}
CHUNK=${FUZZ_CHUNK:-5m}
PARALLEL=${FUZZ_PARALLEL:-$(nproc)}
LOG=${FUZZ_LOG:-bench/fuzz.log}

# package:target — what each parses:
#   nar          NAR streams (imports, AddToStoreNar, nix copy)
#   binarycache  narinfo files (upstream caches, import --from)
#   castore      castore Directory messages (snix encoding, read back from the database)
#   proto        worker-protocol sessions (every daemon op, as an untrusted client sends it)
#   blobs/pack   pack records (repair re-indexes packs from their own bytes)
#   blobs        zstd frames of raw blocks, decoded without the zstd decoder (the packs' stored frames)
#   store        content-address strings (fixed:…, text:…) from clients and narinfos
TARGETS=(nar:FuzzIngest binarycache:FuzzNarinfo castore:FuzzDecode proto:FuzzSession
	blobs/pack:FuzzReadRecord blobs:FuzzDecodeRawFrame store:FuzzParseCA)
if (($#)); then
	sel=()
	for want in "$@"; do
		for t in "${TARGETS[@]}"; do [[ ${t%%:*} == "$want" ]] && sel+=("$t"); done
	done
	TARGETS=("${sel[@]}")
fi

module=$(go list -m)
gocache=$(go env GOCACHE)
bin=$(mktemp -d)
trap 'rm -rf "$bin"' EXIT
crashed=0

for t in "${TARGETS[@]}"; do
	pkg=${t%%:*} fn=${t#*:}
	go test -c -fuzz "^$fn\$" -o "$bin/$fn.test" "./$pkg" # -fuzz: with coverage guidance
	used=0 runs=0 execs=0
	start=$(date +%s)
	while ((used < CPU_SEC)); do
		out=$(mktemp)
		set +e
		(cd "$pkg" && /usr/bin/time -f '%U %S' -o "$out.cpu" "$bin/$fn.test" -test.run '^$' \
			-test.fuzz "^$fn\$" -test.fuzztime "$CHUNK" -test.parallel "$PARALLEL" \
			-test.fuzzcachedir "$gocache/fuzz/$module/$pkg") >"$out" 2>&1
		rc=$?
		set -e
		read -r u s < <(tail -n 1 "$out.cpu") || true # the last line: time may say the exit status first
		used=$(awk -v a="$used" -v u="${u:-0}" -v s="${s:-0}" 'BEGIN{printf "%d", a+u+s}')
		n=$(grep -o 'execs: [0-9]*' "$out" | tail -1 | awk '{print $2}')
		execs=$((execs + ${n:-0}))
		runs=$((runs + 1))
		if ((rc != 0)) && ! grep -q 'Failing input written to' "$out"; then
			# Go's fuzzing coordinator can fail at the end of a chunk on a loaded
			# machine ("context deadline exceeded") with no failing input: that is
			# no crasher, and the CPU time spent still counts.
			echo "$(date -u +%FT%TZ) $pkg $fn: chunk ended without a failing input: $(grep -v '^fuzz: elapsed' "$out" | tr '\n' ' ' | cut -c1-200)" | tee -a "$LOG"
			rc=0
		fi
		if ((rc != 0)); then
			cat "$out"
			echo "$(date -u +%FT%TZ) $(git rev-parse --short HEAD) $pkg $fn: CRASHER after ${used}s CPU: see $pkg/testdata/fuzz/$fn/" | tee -a "$LOG"
			crashed=1
			continue 2
		fi
		rm -f "$out" "$out.cpu"
	done
	wall=$(($(date +%s) - start))
	line="$(date -u +%FT%TZ) $(git rev-parse --short HEAD) $pkg $fn: ${used}s CPU ($((used / 60)) CPU-min) in ${wall}s wall, $runs chunks, $execs execs, 0 crashers"
	echo "$line" | tee -a "$LOG"
done
exit "$crashed"
