# One store path per Debian package of a staged release (see build-corpora.sh).
#
#   graph      : JSON file { "<pkg>": { "name": "<pkg>-<version>", "deps": [ "<pkg>", ... ] } },
#                deps already acyclic (build-corpora.sh breaks dpkg's dependency cycles)
#   stagingDir : directory holding one sub-directory per package with the files dpkg says it owns;
#                it is outside the store, so it must be in extra-sandbox-paths
#   generation : changes every output path (a mass rebuild) while file contents stay the same
#
# Each output is a copy of the package's files plus what makes a Nix package look like one:
# references to its dependencies (nix-support/propagated-build-inputs), its own $out path in a
# setup hook, and script shebangs rewritten to the store path of a dependency that provides the
# interpreter (a light patchShebangs), so those few files change with every generation.
{ graph, stagingDir, generation ? 0 }:
let
  g = builtins.fromJSON (builtins.readFile graph);
  mk = pkg: info: builtins.derivation {
    inherit (info) name;
    system = builtins.currentSystem;
    builder = "/bin/busybox";
    args = [ "sh" "-e" ./corpus-builder.sh ];
    src = "${toString stagingDir}/${pkg}";
    deps = map (d: pkgs.${d}) info.deps;
    generation = toString generation;
  };
  pkgs = builtins.mapAttrs mk g;
in builtins.attrValues pkgs
