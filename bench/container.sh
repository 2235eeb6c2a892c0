#!/usr/bin/env bash
# Container benchmark: the casnix image (Dockerfile, prebuilt binary) against the same binary
# run natively, in one run, median of $RUNS:
#   image size      podman image inspect .Size (anchor: the binary's size)
#   start-up        `podman run -d` (or the native `casnix serve &`) until `casnix ping` on the
#                   socket first gets an answer (handshake + one query)
#   idle RSS        VmRSS of the casnix process 2 s after that first answer
# The data dir is a `casnix backup` of the backup benchmark's data dir (bench/backup.sh
# makes it), so start-up opens a real database.
#
#   bench/container.sh        # needs root and podman (tests/nixenv/install-host-podman.sh installs it)
set -Eeuo pipefail

BENCH_DIR=${BENCH_DIR:-/var/tmp/casnix-bench}
RUNS=${RUNS:-3}
HERE=$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)
REPO=$(cd "$HERE/.." && pwd)
RESULTS=${RESULTS:-$HERE/RESULTS.md}
# shellcheck source=bench/lib.sh
. "$HERE/lib.sh"
W=$BENCH_DIR/container
SRC=${SRC:-$BENCH_DIR/backup/data}
VERSION=bench-$(git -C "$REPO" rev-parse --short HEAD)
IMAGE=localhost/casnix-bench:$VERSION
NAME=casnix-bench-$$
log() { printf '%s container: %s\n' "$(date +%T)" "$*" >&2; }
trap 'log "failed at line $LINENO: $BASH_COMMAND"' ERR

[[ $(id -u) == 0 ]] || { log "needs root"; exit 1; }
sh "$REPO/tests/nixenv/install-host-podman.sh" >&2
# crun refuses hybrid cgroup layouts; limits at or below ours (see tests/container_test.go).
PODMAN=(podman --runtime runc)
NOFILE=$(ulimit -Hn); ((NOFILE > 65536)) && NOFILE=65536
RUNFLAGS=(--ulimit "nofile=$NOFILE:$NOFILE" --ulimit nproc=4096:4096)

rm -rf "$W/ctx" "$W/run" "$W/native-run"
mkdir -p "$W/ctx" "$W/run" "$W/native-run"
(cd "$REPO" && CGO_ENABLED=0 go build -trimpath -ldflags "-s -w -X github.com/casnix/casnix/cli.Version=$VERSION" -o "$W/ctx/casnix" .)
cp -a "$REPO/Dockerfile" "$REPO/contrib" "$W/ctx/"
before=$("${PODMAN[@]}" images -a -q --no-trunc -f dangling=true | sort)
"${PODMAN[@]}" build -q --format docker --build-arg BINARY=prebuilt --build-arg VERSION="$VERSION" -t "$IMAGE" "$W/ctx" >/dev/null
# the build's untagged intermediate stage, removed with the image at the end
STAGES=$(comm -13 <(echo "$before") <("${PODMAN[@]}" images -a -q --no-trunc -f dangling=true | sort))
CASNIX=$W/ctx/casnix

if [[ ! -f $W/data/casnix.db ]]; then
  [[ -f $SRC/casnix.db ]] || { log "no data dir at $SRC: run bench/backup.sh first (or set SRC)"; exit 1; }
  rm -rf "$W/data"
  "$CASNIX" -d "$SRC" backup --quick "$W/data" >&2
fi

cleanup() {
  "${PODMAN[@]}" rm -f -t 0 "$NAME" >/dev/null 2>&1 || true
  [[ -n ${NPID:-} ]] && kill "$NPID" 2>/dev/null || true
}
trap cleanup EXIT

now() { date +%s.%N; }
# wait_ping SOCKET: seconds until casnix ping answers (polled every 10 ms)
wait_ping() {
  for _ in $(seq 3000); do
    "$CASNIX" ping --socket "$1" --timeout 1s >/dev/null 2>&1 && return 0
    sleep 0.01
  done
  log "no answer on $1"; return 1
}
rss_kib() { awk '/^VmRSS/ {print $2}' "/proc/$1/status"; }
rm -f "$W"/*.raw

for i in $(seq "$RUNS"); do
  log "run $i/$RUNS (load $(cut -d' ' -f1-3 /proc/loadavg))"
  s=$(now)
  "${PODMAN[@]}" run -d --name "$NAME" "${RUNFLAGS[@]}" -v "$W/data:/data:U" -v "$W/run:/run/casnix:U" "$IMAGE" >/dev/null
  wait_ping "$W/run/daemon.sock"
  echo "$(now) - $s" | bc >>"$W/start-container.raw"
  sleep 2
  rss_kib "$("${PODMAN[@]}" inspect -f '{{.State.Pid}}' "$NAME")" >>"$W/rss-container.raw"
  "${PODMAN[@]}" rm -f -t 10 "$NAME" >/dev/null

  s=$(now)
  "$CASNIX" -d "$W/data" serve --socket "$W/native-run/daemon.sock" 2>/dev/null &
  NPID=$!
  wait_ping "$W/native-run/daemon.sock"
  echo "$(now) - $s" | bc >>"$W/start-native.raw"
  sleep 2
  rss_kib "$NPID" >>"$W/rss-native.raw"
  kill "$NPID"; wait "$NPID" || true; NPID=
done

isize=$("${PODMAN[@]}" image inspect -f '{{.Size}}' "$IMAGE")
bsize=$(stat -c %s "$CASNIX")
# shellcheck disable=SC2086
"${PODMAN[@]}" rmi -f "$IMAGE" $STAGES >/dev/null
{
  echo "<!-- bench/container.sh: begin (rewritten by every container.sh run) -->"
  echo "## Container image ($(date -u +%F), $(lscpu | sed -n 's/^Model name: *//p'), $(nproc) cores, load $(cut -d' ' -f1-3 /proc/loadavg), commit $(git -C "$REPO" rev-parse --short HEAD), $(podman --version), runc)"
  echo
  echo "Median of $RUNS runs. Data dir: $(du -sm "$W/data" | cut -f1) MiB, $("$CASNIX" -d "$W/data" info --json | sed -n 's/.*"paths":\([0-9]*\).*/\1/p') paths."
  echo "Start-up = from \`podman run -d\` (native: \`casnix serve &\`) to the first answered \`casnix ping\`."
  echo
  echo "| figure | container | native binary (anchor) |"
  echo "|---|---|---|"
  printf '| size | %.1f MB image | %.1f MB binary |\n' "$(echo "$isize / 1000000" | bc -l)" "$(echo "$bsize / 1000000" | bc -l)"
  printf '| start-up to first answer | %.3f s | %.3f s |\n' "$(median <"$W/start-container.raw")" "$(median <"$W/start-native.raw")"
  printf '| idle RSS | %.1f MiB | %.1f MiB |\n' "$(echo "$(median <"$W/rss-container.raw") / 1024" | bc -l)" "$(echo "$(median <"$W/rss-native.raw") / 1024" | bc -l)"
  echo "<!-- bench/container.sh: end -->"
} | tee "$W/table.md"
merge_section container.sh "$W/table.md" "$RESULTS"
