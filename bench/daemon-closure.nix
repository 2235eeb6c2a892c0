# A closure of width * depth + 1 store paths for bench/daemon.sh: `depth` layers of `width`
# small derivations; node (l, c) references nodes (l-1, c) and (l-1, (c+1) mod width), and the
# top path references every node of the last layer, so its runtime closure is every node (after
# `width` layers each node reaches every column of every earlier layer).
#
# Each node looks like a tiny package: a script whose shebang points into a dependency, a
# nix-support/propagated-build-inputs file naming its dependencies, and about 4 KiB of text.
# The builder is busybox-static (`/bin/busybox`, reachable through extra-sandbox-paths), which
# runs its applets without PATH.
{ width ? 10, depth ? 100 }:
let
  script = ''
    set -eu
    mkdir -p "$out/bin" "$out/nix-support" "$out/share/doc/$name"
    : >"$out/nix-support/propagated-build-inputs"
    first=
    for d in $deps; do
      echo "$d" >>"$out/nix-support/propagated-build-inputs"
      [ -n "$first" ] || first=$d
    done
    printf '#!%s\necho %s\n' "''${first:-/bin}/bin/sh" "$out" >"$out/bin/$name"
    chmod +x "$out/bin/$name"
    seq 1 160 | sed "s/^/$name line /" >"$out/share/doc/$name/README"
  '';
  mk = name: deps: builtins.derivation {
    inherit name deps;
    system = builtins.currentSystem;
    builder = "/bin/busybox";
    args = [ "sh" "-c" script ];
  };
  node = l: c: mk "casnix-bench-node-${toString l}-${toString c}" (
    if l == 0 then [ ] else [
      (builtins.elemAt (builtins.elemAt layers (l - 1)) c)
      (builtins.elemAt (builtins.elemAt layers (l - 1)) (c + 1 - width * ((c + 1) / width)))
    ]);
  layers = builtins.genList (l: builtins.genList (c: node l c) width) depth;
in
mk "casnix-bench-closure" (builtins.elemAt layers (depth - 1))
