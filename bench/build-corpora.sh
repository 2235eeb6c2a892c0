#!/usr/bin/env bash
# Builds the benchmark corpora as real Nix stores (see bench/README.md).
#
#   bench/build-corpora.sh [all|roots|stage|releases|generations|verify|summary]...
#
# Layout under $BENCH_DIR (default /var/tmp/casnix-bench):
#   cache/debs/                 .debs kept by debootstrap --cache-dir
#   roots/<release>/            debootstrap --variant=minbase roots plus $PACKAGES
#   staging/<release>/<pkg>/    the files dpkg says <pkg> owns (directory symlinks resolved)
#   staging/<release>/graph.json  package -> name, acyclic deps (input of corpus.nix)
#   corpora/releases/           ROOT/nix/store + ROOT/nix/var/nix/db/db.sqlite: every package
#                               of every release, one store path each
#   corpora/generations/        $GENERATIONS mass rebuilds of $GEN_RELEASE: every store path
#                               changes, file contents (nearly) do not
# Every step is idempotent: finished roots and stagings are kept, nix-build skips valid paths.
set -Eeuo pipefail

BENCH_DIR=${BENCH_DIR:-/var/tmp/casnix-bench}
RELEASES=${RELEASES:-bookworm trixie sid}
GEN_RELEASE=${GEN_RELEASE:-bookworm}
GENERATIONS=${GENERATIONS:-5}
PACKAGES=${PACKAGES:-python3,perl,git,gcc,g++,make,curl,openssh-client,vim-tiny,less,file,xz-utils,zstd,ca-certificates}
NIX_JOBS=${NIX_JOBS:-2}
HERE=$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)

log() { printf '%s build-corpora: %s\n' "$(date +%T)" "$*" >&2; }
trap 'log "failed at line $LINENO: $BASH_COMMAND"' ERR
die() {
  log "error: $*"
  exit 1
}

mirror() {
  if [[ -n ${MIRROR:-} ]]; then
    echo "$MIRROR"
    return
  fi
  local m
  m=$(awk '$1 == "URIs:" && $2 ~ /\/debian\/?$/ { print $2; exit }' /etc/apt/sources.list.d/debian.sources 2>/dev/null || true)
  echo "${m:-http://deb.debian.org/debian}"
}

need_tools() {
  local missing=()
  command -v debootstrap >/dev/null || missing+=(debootstrap)
  command -v nix-build >/dev/null || missing+=(nix-bin)
  [[ -x /bin/busybox ]] || missing+=(busybox-static)
  command -v tsort >/dev/null || missing+=(coreutils)
  if ((${#missing[@]})); then
    log "installing ${missing[*]}"
    apt-get install -y -q "${missing[@]}" >&2 || {
      apt-get update -q >&2
      apt-get install -y -q "${missing[@]}" >&2
    }
  fi
}

nix_opts=(
  --option build-users-group ''
  --option substituters ''
  --option sandbox true
  --option max-jobs "$NIX_JOBS"
  --option cores 1
  --option experimental-features nix-command
)

# --- 1. debootstrap roots ------------------------------------------------------------------

make_root() {
  local rel=$1 dir=$BENCH_DIR/roots/$1
  if [[ -f $dir/.casnix-bench-done ]]; then
    return
  fi
  rm -rf "$dir.tmp"
  mkdir -p "$BENCH_DIR/cache/debs" "$BENCH_DIR/roots"
  log "debootstrap $rel (minbase + $PACKAGES)"
  debootstrap --variant=minbase --cache-dir="$BENCH_DIR/cache/debs" --include="$PACKAGES" \
    "$rel" "$dir.tmp" "$(mirror)" >"$BENCH_DIR/roots/$rel.log" 2>&1 ||
    die "debootstrap $rel failed, see $BENCH_DIR/roots/$rel.log"
  echo "$PACKAGES" >"$dir.tmp/.casnix-bench-done"
  rm -rf "$dir"
  mv "$dir.tmp" "$dir"
}

# --- 2. staging: one directory per package + dependency graph --------------------------------

# Prints the non-directory entries of one dpkg file list as paths relative to the root with
# directory symlinks (merged /usr: /bin -> usr/bin) resolved, so that tar never extracts a file
# through a symlink.
canonical_files() {
  local root=$1 list=$2 p full d c
  declare -A canon=()
  while IFS= read -r p; do
    [[ $p == /* && $p != /. ]] || continue
    full=$root$p
    if [[ -L $full ]]; then
      [[ -d $full ]] && continue # symlink to a directory: skip
    elif [[ ! -f $full ]]; then
      continue # directory, or listed but gone
    fi
    d=${p%/*}
    if [[ -z ${canon[$d]+x} ]]; then
      c=$(realpath -e -- "$root$d" 2>/dev/null || true)
      if [[ $c == "$root" ]]; then
        c=
      elif [[ $c == "$root"/* ]]; then
        c=${c#"$root"}
      else
        c=$d
      fi
      canon[$d]=$c
    fi
    printf '%s\n' "${canon[$d]#/}${canon[$d]:+/}${p##*/}"
  done <"$list" | LC_ALL=C sort -u
}

stage_release() {
  local rel=$1 root out pkg list n=0
  root=$(realpath "$BENCH_DIR/roots/$rel")
  out=$BENCH_DIR/staging/$rel
  if [[ -f $out/graph.json ]]; then
    return
  fi
  log "staging $rel"
  rm -rf "$out.tmp"
  mkdir -p "$out.tmp/.lists"
  dpkg-query --admindir="$root/var/lib/dpkg" -W \
    -f='${db:Status-Abbrev}\t${Package}\t${Version}\t${Provides}\t${Pre-Depends}, ${Depends}\n' |
    awk -F'\t' '$1 ~ /^ii/' | cut -f2- >"$out.tmp/.packages"
  while IFS=$'\t' read -r pkg _; do
    list=$root/var/lib/dpkg/info/$pkg.list
    [[ -f $list ]] || list=$root/var/lib/dpkg/info/$pkg:amd64.list
    mkdir -p "$out.tmp/$pkg"
    if [[ -f $list ]]; then
      canonical_files "$root" "$list" >"$out.tmp/.lists/$pkg"
      tar -C "$root" --no-recursion -cf - -T "$out.tmp/.lists/$pkg" | tar -C "$out.tmp/$pkg" -xf -
    else
      : >"$out.tmp/.lists/$pkg"
    fi
    n=$((n + 1))
  done <"$out.tmp/.packages"
  make_graph "$out.tmp" >"$out.tmp/graph.json.tmp"
  mv "$out.tmp/graph.json.tmp" "$out.tmp/graph.json"
  rm -rf "$out"
  mv "$out.tmp" "$out"
  log "staged $rel: $n packages, $(du -sh "$out" | cut -f1)"
}

# graph.json from .packages (Package, Version, Provides, Depends). A dependency is the first
# installed (or provided) alternative. Packages with programs also depend on the interpreter
# packages (bash, dash, perl-base, python3-minimal) so that shebangs can point at them. dpkg
# allows dependency cycles, Nix does not: edges against a topological order (tsort) are dropped.
make_graph() {
  local dir=$1
  local -a withbin=()
  local f
  for f in "$dir"/.lists/*; do
    if grep -qE '^(usr/)?s?bin/' "$f"; then
      withbin+=("${f##*/}")
    fi
  done
  printf '%s\n' "${withbin[@]}" >"$dir/.withbin"
  awk -F'\t' -v withbin="$dir/.withbin" '
    function trim(s) { gsub(/^[ \t]+|[ \t]+$/, "", s); return s }
    function bare(s) { s = trim(s); sub(/[ \t]*\(.*$/, "", s); sub(/:.*$/, "", s); return s }
    FILENAME == withbin { hasbin[$0] = 1; next }
    {
      pkg[$1] = $2; provides[$1] = $3; depends[$1] = $4; order[++n] = $1
    }
    END {
      for (i = 1; i <= n; i++) {
        p = order[i]; k = split(provides[p], a, ",")
        for (j = 1; j <= k; j++) { v = bare(a[j]); if (v != "" && !(v in prov)) prov[v] = p }
      }
      for (i = 1; i <= n; i++) {
        p = order[i]; k = split(depends[p], a, ","); print p, p
        for (j = 1; j <= k; j++) {
          m = split(a[j], alt, "|"); t = ""
          for (l = 1; l <= m; l++) {
            v = bare(alt[l]); t = ""
            if (v in pkg) t = v; else if (v in prov) t = prov[v]
            if (t != "") break
          }
          if (t != "" && t != p) print t, p
        }
        if (p in hasbin) {
          split("bash dash perl-base python3-minimal", ip, " ")
          for (j in ip) if ((ip[j] in pkg) && ip[j] != p) print ip[j], p
        }
      }
    }' "$dir/.withbin" "$dir/.packages" | LC_ALL=C sort -u >"$dir/.edges"
  { tsort "$dir/.edges" 2>/dev/null || true; } >"$dir/.order"
  awk -v pkgs="$dir/.packages" -v order="$dir/.order" '
    BEGIN {
      FS = "\t"
      while ((getline l < pkgs) > 0) {
        split(l, f, "\t"); ver[f[1]] = f[2]; names[++n] = f[1]
      }
      FS = " "
      while ((getline l < order) > 0) pos[l] = ++o
    }
    $1 != $2 && pos[$1] < pos[$2] { deps[$2] = deps[$2] (deps[$2] == "" ? "" : ", ") "\"" $1 "\"" }
    END {
      print "{"
      for (i = 1; i <= n; i++) {
        p = names[i]; nm = p "-" ver[p]; gsub(/[^A-Za-z0-9+._?=-]/, "_", nm)
        printf "  \"%s\": { \"name\": \"%s\", \"deps\": [%s] }%s\n", p, nm, deps[p], (i < n ? "," : "")
      }
      print "}"
    }' "$dir/.edges"
}

# --- 3. Nix stores -------------------------------------------------------------------------

build_paths() { # store-root release generation
  local store=$1 rel=$2 gen=$3
  mkdir -p "$store"
  nix-build --store "$store" "${nix_opts[@]}" \
    --option extra-sandbox-paths "/bin/busybox $BENCH_DIR/staging" \
    --argstr graph "$BENCH_DIR/staging/$rel/graph.json" \
    --argstr stagingDir "$BENCH_DIR/staging/$rel" \
    --arg generation "$gen" \
    --no-out-link --quiet "$HERE/corpus.nix" >/dev/null
}

build_releases() {
  local rel
  for rel in $RELEASES; do
    log "releases corpus: building $rel"
    build_paths "$BENCH_DIR/corpora/releases" "$rel" 0
  done
}

build_generations() {
  local g
  for ((g = 1; g <= GENERATIONS; g++)); do
    log "generations corpus: building generation $g of $GEN_RELEASE"
    build_paths "$BENCH_DIR/corpora/generations" "$GEN_RELEASE" "$g"
  done
}

summary() {
  local c store
  for c in releases generations; do
    store=$BENCH_DIR/corpora/$c
    [[ -f $store/nix/var/nix/db/db.sqlite ]] || continue
    nix path-info --store "$store" "${nix_opts[@]}" --all -s 2>/dev/null |
      awk -v c="$c" '{ n++; s += $2 } END { printf "%s: %d valid paths, %.0f MiB of NAR\n", c, n, s / 1048576 }'
  done
}

verify() {
  local c log
  for c in releases generations; do
    log "nix-store --verify --check-contents on $c"
    log=$BENCH_DIR/corpora/$c.verify.log
    nix-store --store "$BENCH_DIR/corpora/$c" "${nix_opts[@]}" --verify --check-contents >"$log" 2>&1 ||
      die "nix-store --verify failed on $c: $(grep -v nixbld "$log" | tail -5)"
  done
}

main() {
  local steps=("$@") s rel
  ((${#steps[@]})) || steps=(all)
  need_tools
  for s in "${steps[@]}"; do
    case $s in
      all | roots) for rel in $RELEASES $GEN_RELEASE; do make_root "$rel"; done ;;&
      all | stage) for rel in $RELEASES $GEN_RELEASE; do stage_release "$rel"; done ;;&
      all | releases) build_releases ;;&
      all | generations) build_generations ;;&
      all | verify) verify ;;&
      all | summary) summary ;;
      roots | stage | releases | generations | verify) ;;
      *) die "unknown step $s" ;;
    esac
  done
}

main "$@"
