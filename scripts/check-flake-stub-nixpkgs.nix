# A stand-in for nixpkgs, used by scripts/check-flake.nix: `import nixpkgs { ... }` gives a package set whose
# mkShell and buildRustPackage return their arguments, so that the checker can see which variables the
# shells and the package set without building anything. Anything else the flake touches is missing here, and
# the checker only looks at attribute names, which flake.nix computes without it.
_: {
  mkShell = args: args;
  makeRustPlatform = _: {
    buildRustPackage = args: args;
  };
}
