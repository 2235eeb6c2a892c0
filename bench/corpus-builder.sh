# shellcheck shell=sh disable=SC2154
# Builder of corpus.nix, run as `/bin/busybox sh -e corpus-builder.sh` inside Nix's sandbox
# (busybox-static runs its applets without PATH). Inputs: $src (staged package files, outside
# the store, reachable through extra-sandbox-paths), $deps (store paths of dependencies),
# $generation, $out.
set -eu

mkdir -p "$out"
# no -p: setuid bits and group ownership are refused in the sandbox (and Nix drops them)
cp -R "$src"/. "$out"/
# Nix rejects group- or world-writable outputs; sed -i below needs owner-writable directories.
chmod -R u+w,go-w "$out"

mkdir -p "$out/nix-support"
: >"$out/nix-support/propagated-build-inputs"
for d in $deps; do
  echo "$d" >>"$out/nix-support/propagated-build-inputs"
done
cat >"$out/nix-support/setup-hook" <<EOF
# generation $generation
addToSearchPath PATH "$out/usr/bin"
addToSearchPath PATH "$out/usr/sbin"
EOF

# A light patchShebangs: point "#!/usr/bin/perl" and the like at the dependency (or this
# package) that provides the interpreter, as nixpkgs does. Those scripts then embed store paths
# and change with every generation, like patched files do in a real mass rebuild.
for dir in bin sbin usr/bin usr/sbin usr/games; do
  [ -d "$out/$dir" ] || continue
  for f in "$out/$dir"/*; do
    if [ -L "$f" ] || [ ! -f "$f" ]; then continue; fi
    [ "$(head -c 2 "$f")" = '#!' ] || continue
    line=$(head -n 1 "$f")
    interp=${line#'#!'}
    interp=${interp# }
    interp=${interp%% *}
    case $interp in
      /*) ;;
      *) continue ;;
    esac
    base=${interp##*/}
    [ "$base" = env ] && continue
    new=
    for d in "$out" $deps; do
      for sub in usr/bin bin; do
        if [ -e "$d/$sub/$base" ] || [ -L "$d/$sub/$base" ]; then
          new=$d/$sub/$base
          break 2
        fi
      done
    done
    [ -n "$new" ] || continue
    sed -i "1s|$interp|$new|" "$f"
  done
done
