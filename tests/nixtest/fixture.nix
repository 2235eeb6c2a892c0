# The fixture store of casnix's end-to-end tests (see fixture.go). Every builder is the
# static busybox in ./bb (a content-addressed source path), so builds are hermetic.
{ fodFlatSha256, fodFlatSha1, fodRecSha256 }:
let
  system = builtins.currentSystem;
  busybox = "${./bb}/bin/busybox";
  mk = name: script: derivation {
    inherit name system;
    builder = busybox;
    args = [ "sh" "-euc" script ];
  };
in
rec {
  # The builder's source path, so tests can build more with it.
  busybox-src = ./bb;

  # Single-node outputs.
  file = mk "single-file" "echo hello > $out";
  empty-file = mk "empty-file" ": > $out";
  exe = mk "executable-file" ''
    printf '#!/bin/sh\necho hi\n' > $out
    chmod 755 $out
  '';
  empty-dir = mk "empty-dir" "mkdir $out";
  symlink = mk "symlink" "ln -s ${file} $out";
  dangling = mk "dangling-symlink" "ln -s ../does/not/exist $out";
  big-file = mk "big-file" "seq 1 300000 > $out";
  random = mk "random-5m" "head -c 5000000 /dev/urandom > $out";
  random-copy = mk "random-copy" ''
    mkdir $out
    cat ${random} > $out/copy
    cat ${random} ${random} > $out/twice
  '';
  weird-name = mk "name+with=special?chars_.-" "echo weird > $out";

  # A directory with every kind of node and name.
  tree = mk "tree" ''
    mkdir -p $out/a/b/c/d/e/f/g/h/i/j $out/empty-dir $out/empty-nest/inner \
      $out/bin $out/share/data $out/names $out/.config
    echo deep > $out/a/b/c/d/e/f/g/h/i/j/deep.txt
    : > $out/empty-file
    : > $out/bin/empty-exe
    chmod 755 $out/bin/empty-exe
    printf '#!/bin/sh\necho tool\n' > $out/bin/tool
    chmod 755 $out/bin/tool
    ln -s tool $out/bin/tool-link
    ln -s ../.. $out/a/b/up
    ln -s ${file} $out/abs-link
    ln -s /nonexistent/target $out/dangling
    echo hidden > $out/.config/.hidden
    seq 1 200000 > $out/share/data/big.txt
    i=0
    while [ $i -lt 300 ]; do echo $i > $out/share/data/f$i; i=$((i+1)); done
    for n in a A a.b a-b a_b ab b Z 0 '~' 'with space' "$(printf 'uml\303\244ut')" "$(printf '%0200d' 7)"; do
      echo "$n" > "$out/names/$n"
    done
    printf 'a\000b\377\n' > $out/binary
    printf 'no newline' > $out/no-newline
  '';

  # References: a chain, a diamond, a self reference, multiple outputs.
  chain1 = mk "chain-1" "echo one > $out";
  chain2 = mk "chain-2" "mkdir $out; echo ${chain1} > $out/dep";
  chain3 = mk "chain-3" "mkdir $out; echo ${chain2} > $out/dep";
  chain4 = mk "chain-4" "echo ${chain3} > $out";

  diamond-base = mk "diamond-base" "mkdir $out; echo base > $out/base";
  diamond-left = mk "diamond-left" "mkdir $out; ln -s ${diamond-base}/base $out/base-link";
  diamond-right = mk "diamond-right" "mkdir $out; echo ${diamond-base} > $out/ref";
  diamond-top = mk "diamond-top" "mkdir $out; echo ${diamond-left} ${diamond-right} > $out/refs";

  self-ref = mk "self-ref" ''
    mkdir $out
    echo $out > $out/self
    ln -s $out/self $out/self-link
  '';

  multi = derivation {
    name = "multi";
    inherit system;
    builder = busybox;
    outputs = [ "out" "dev" "doc" ];
    args = [ "sh" "-euc" ''
      mkdir $out $dev
      echo lib > $out/lib
      echo $out > $dev/out-path
      echo doc > $doc
    '' ];
  };
  uses-dev = mk "uses-dev" "echo ${multi.dev} > $out";

  # Content-addressed paths made by evaluation and by fixed-output derivations.
  text = builtins.toFile "text-file" "plain text\n";
  text-ref = builtins.toFile "text-with-ref" "busybox is in ${./bb}\n";
  uses-text = mk "uses-text" "cat ${text} > $out; echo ${text} ${text-ref} >> $out";

  fod-flat = derivation {
    name = "fod-flat";
    inherit system;
    builder = busybox;
    args = [ "sh" "-euc" "printf 'fixed output\\n' > $out" ];
    outputHashMode = "flat";
    outputHashAlgo = "sha256";
    outputHash = fodFlatSha256;
  };
  fod-flat-sha1 = derivation {
    name = "fod-flat-sha1";
    inherit system;
    builder = busybox;
    args = [ "sh" "-euc" "printf 'sha1 fixed\\n' > $out" ];
    outputHashMode = "flat";
    outputHashAlgo = "sha1";
    outputHash = fodFlatSha1;
  };
  fod-rec = derivation {
    name = "fod-rec";
    inherit system;
    builder = busybox;
    args = [ "sh" "-euc" ''
      mkdir -p $out/bin
      echo hello > $out/hello
      printf '#!/bin/sh\n' > $out/bin/x
      chmod 755 $out/bin/x
    '' ];
    outputHashMode = "recursive";
    outputHashAlgo = "sha256";
    outputHash = fodRecSha256;
  };
  uses-fod = mk "uses-fod" "mkdir $out; ln -s ${fod-rec}/bin/x $out/x; echo ${fod-flat} > $out/flat";
}
