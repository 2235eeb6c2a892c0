# Maps each attribute of fixture.nix to its .drv and outputs (or, for a plain
# store path string, to that path).
{ ... }@args:
builtins.mapAttrs
  (name: v:
    if builtins.isAttrs v then {
      drvPath = v.drvPath;
      outputs = builtins.listToAttrs (map (o: { name = o; value = v.${o}.outPath; }) (v.outputs or [ "out" ]));
    } else { path = v; })
  (import ./fixture.nix args)
