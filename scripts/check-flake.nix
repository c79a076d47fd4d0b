# Evaluates what can be evaluated of flake.nix without fetching its inputs (CI cannot reach GitHub):
#
#   nix-instantiate --eval --strict scripts/check-flake.nix
#
# 1. With inputs that throw when used: the output structure (which systems, shells, packages, apps and checks
#    exist) must be computed without nixpkgs.
# 2. With a stub nixpkgs (scripts/check-flake-stub-nixpkgs.nix) whose mkShell and buildRustPackage return their
#    arguments: the shells and the package set the variables the issue asks for.
# What needs the real nixpkgs (the derivations themselves) is checked by `nix flake check` on a machine with
# network; that the variable names match what build.rs and src/ read is checked by tests/flake_env.rs.
let
  flake = import ../flake.nix;
  systems = [
    "aarch64-linux"
    "x86_64-linux"
  ];
  # Output names each system must have (more are fine).
  expected = {
    devShells = [
      "default"
      "cuda"
      "cuda-trt11"
    ];
    packages = [ "default" ];
    apps = [ "default" ];
    checks = [ "tests" ];
  };

  fail = msg: throw "check-flake: ${msg}";
  check = cond: msg: if cond then true else fail msg;
  forbidden =
    name:
    let
      boom = fail "flake.nix used its input `${name}` while computing output names";
    in
    {
      outPath = boom;
      lib = boom;
      legacyPackages = boom;
      overlays = boom;
    };

  self = {
    outPath = toString ./..;
  };
  # 1. Inputs that throw when used: the output names must not need them.
  outputs = flake.outputs {
    inherit self;
    nixpkgs = forbidden "nixpkgs";
    rust-overlay = forbidden "rust-overlay";
  };
  # 2. A stub nixpkgs whose mkShell / buildRustPackage return their arguments: which variables are set.
  stubbed = flake.outputs {
    inherit self;
    nixpkgs = {
      outPath = ./check-flake-stub-nixpkgs.nix;
    };
    rust-overlay = forbidden "rust-overlay";
  };
  # Variables the issue asks for (tests/flake_env.rs checks the names against build.rs and src/).
  expectedEnv = {
    devShells = {
      default = [
        "ORT_DYLIB_PATH"
        "TRT_DIFF_CACHE"
        "TRT_LIB_DIR"
      ];
      cuda = expectedEnv.devShells.default ++ [
        "TENSORRT_ROOT"
        "TENSORRT_INCLUDE_DIR"
        "CUDA_PATH"
      ];
      cuda-trt11 = expectedEnv.devShells.cuda;
    };
    # build.rs reads the TensorRT headers from TRTX_HEADERS_DIR.
    packages.default = [ "TRTX_HEADERS_DIR" ];
    checks.tests = [
      "TRTX_HEADERS_DIR"
      "TRT_DIFF_CACHE"
      "ORT_DYLIB_PATH"
    ];
  };

  sorted = builtins.sort builtins.lessThan;
  has = set: names: builtins.all (n: builtins.hasAttr n set) names;

  headerChecks = [
    (check (flake ? description && builtins.isString flake.description) "flake.nix has no description")
    (check (flake ? inputs && flake.inputs ? nixpkgs && flake.inputs ? rust-overlay)
      "flake.nix must have the inputs nixpkgs and rust-overlay"
    )
    (check (builtins.isString (flake.inputs.nixpkgs.url or null)) "inputs.nixpkgs.url is not a string")
    (check ((flake.inputs.rust-overlay.inputs.nixpkgs.follows or null) == "nixpkgs")
      "rust-overlay must follow the flake's nixpkgs"
    )
    (check (builtins.isFunction flake.outputs) "outputs is not a function")
    (check (
      sorted (builtins.attrNames (builtins.functionArgs flake.outputs))
      == sorted ([ "self" ] ++ builtins.attrNames flake.inputs)
    ) "the arguments of outputs are not exactly self + the inputs")
    (check (has outputs (builtins.attrNames expected))
      "outputs lack one of ${toString (builtins.attrNames expected)}"
    )
  ];

  perKindChecks = builtins.concatMap (
    kind:
    [
      (check (sorted (builtins.attrNames outputs.${kind}) == systems)
        "${kind} must be defined for exactly ${toString systems}"
      )
    ]
    ++ map (
      system:
      check (has outputs.${kind}.${system} expected.${kind})
        "${kind}.${system} lacks one of ${toString expected.${kind}} (has ${toString (builtins.attrNames outputs.${kind}.${system})})"
    ) systems
  ) (builtins.attrNames expected);

  appChecks = map (
    system:
    check (outputs.apps.${system}.default.type == "app") "apps.${system}.default.type is not \"app\""
  ) systems;

  envChecks = builtins.concatMap (
    kind:
    builtins.concatMap (
      name:
      map (
        system:
        let
          value = stubbed.${kind}.${system}.${name};
          missing = builtins.filter (v: !(builtins.hasAttr v value)) expectedEnv.${kind}.${name};
        in
        check (missing == [ ]) "${kind}.${system}.${name} does not set ${toString missing}"
      ) systems
    ) (builtins.attrNames expectedEnv.${kind})
  ) (builtins.attrNames expectedEnv);

  results = headerChecks ++ perKindChecks ++ appChecks ++ envChecks;
in
builtins.deepSeq results "flake.nix ok: ${toString (builtins.length results)} checks; devShells ${
  toString (builtins.attrNames outputs.devShells.x86_64-linux)
}, packages ${toString (builtins.attrNames outputs.packages.x86_64-linux)}, checks ${
  toString (builtins.attrNames outputs.checks.x86_64-linux)
} for ${toString systems}"
