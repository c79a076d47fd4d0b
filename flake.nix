{
  description = "trt-diff: build NVIDIA TensorRT engines from diffusion models and small LLMs, and run them";

  # flake.lock is not committed yet: the machines this repository is developed on cannot reach GitHub.
  # On a machine with network, run `nix flake lock` once and commit flake.lock (README.md, "Nix").
  inputs = {
    # CUDA 13 (cudaPackages_13) and TensorRT 11 live in recent nixpkgs only: follow nixos-unstable.
    nixpkgs.url = "github:NixOS/nixpkgs/nixos-unstable";
    # The Rust toolchain comes from rust-overlay, not from nixpkgs' rustc: nixpkgs carries one rustc per
    # revision, so pinning rustc 1.95 through nixpkgs would pin the whole package set (and with it CUDA and
    # TensorRT) to an old revision. rust-overlay gives the exact release on any nixpkgs.
    rust-overlay = {
      url = "github:oxalica/rust-overlay";
      inputs.nixpkgs.follows = "nixpkgs";
    };
  };

  outputs =
    {
      self,
      nixpkgs,
      rust-overlay,
    }:
    let
      # TensorRT exists for Linux only; DGX Spark (GB10) is aarch64-linux.
      systems = [
        "x86_64-linux"
        "aarch64-linux"
      ];
      # Output names are computed without touching nixpkgs (scripts/check-flake.nix evaluates them with
      # stand-in inputs, since CI cannot fetch nixpkgs).
      forAllSystems =
        f:
        builtins.listToAttrs (
          map (system: {
            name = system;
            value = f system;
          }) systems
        );

      # The Rust release this project is developed with (CI machines have rustup's 1.95.0). A
      # rust-toolchain.toml at the top level, if one is added, takes precedence.
      rustVersion = "1.95.0";

      # TensorRT-RTX 1.7 builder and ONNX parser: NVIDIA's PyPI wheel (the same pin as scripts/setup.sh),
      # fetched by hash. Proprietary (unfree), but downloadable without a login, and its builder runs
      # without a GPU, so every shell, the package and the checks get it.
      trtRtxVersion = "1.7.1.116";
      trtRtxWheels = {
        x86_64-linux = {
          url = "https://files.pythonhosted.org/packages/95/ba/cd44f655337d9ba9fe035c50b8baa70ce7a505db09cb7bde2a094370778e/tensorrt_rtx_cu13_libs-1.7.1.116-py3-none-manylinux_2_28_x86_64.whl";
          hash = "sha256-4/1F/tABJA1jME53otQAYxm4OZlCN8spS2561yrKq80=";
        };
        aarch64-linux = {
          url = "https://files.pythonhosted.org/packages/54/ec/9fcdef80283dd4cf09ed6f4b5992193486c0babc4507d1515958a0b07a45/tensorrt_rtx_cu13_libs-1.7.1.116-py3-none-manylinux_2_35_aarch64.whl";
          hash = "sha256-7ItsuVqOph4x1UTbxQOdNSGbMRmZ+SxRijiJqq50NZw=";
        };
      };

      # TensorRT headers (TensorRT-RTX 1.7 and TensorRT 11.4, Apache-2.0) from the trtx-sys crate's source
      # package, the same one scripts/setup.sh uses: a fixed-output fetch of the .crate tarball, pinned by
      # the sha256 that crates.io's index records. Only its TensorRT-Headers folder is used (build.rs reads
      # it through TRTX_HEADERS_DIR); the crate itself is never built.
      trtxSysCrate = {
        version = "0.9.1+rtx1.7";
        urls = [
          "https://static.crates.io/crates/trtx-sys/trtx-sys-0.9.1%2Brtx1.7.crate"
          "https://crates.io/api/v1/crates/trtx-sys/0.9.1%2Brtx1.7/download"
        ];
        hash = "sha256-VIDuBWKSlR2qG8dFMhYtbLdRkPCR5F19l8DDVpFq4XE=";
      };

      # Environment contract (tests/flake_env.rs checks it against build.rs and src/): the shells export
      # every variable that build.rs and the code under src/ read, except the ones listed here:
      #   not-exported: TRT_DIFF_LOG  (a `tracing` log filter: the user's choice; set, it overrides -v/-vv)
      #   not-exported: TRT_DIFF_API_KEY  (`serve --api-key` from the environment: a secret, the user's own)
      #   not-exported: TRT_DIFF_MODEL_CACHE  (where `--engine MODEL.gguf` bundles are cached: the user's choice)
      #   not-exported: XDG_CACHE_HOME  (the user's cache folder, read for that default)
      #   not-exported: TRT_DIFF_CUDA_FUSION  (`none` or some of attention,gelu,rmsnorm: which graph fusions ONNX Runtime CUDA gets, a comparison switch)
      #   not-exported: TRT_DIFF_ORT_PROFILE  (a folder for ONNX Runtime's per-node profiles: a diagnosis switch)
      #   not-exported: TRT_DIFF_CUDA_LLM_GRAPH  (`tensorrt` runs an LLM bundle's TensorRT graph on ONNX Runtime CUDA instead of its CUDA graph: a comparison switch)
      #   not-exported: TRT_DIFF_CUDA_GRAPHS  (`0` runs LLM decode steps on ONNX Runtime CUDA without CUDA graphs: a comparison switch)
      #   not-exported: TRT_DIFF_NO_REPACK  (set, the CPU decoder multiplies GGUF blocks in the file's layout instead of repacking Q8_0/Q5_0/Q4_0 rows: a comparison switch, as llama.cpp's --no-repack)

      perSystem =
        system:
        let
          pkgs = import nixpkgs {
            inherit system;
            overlays = [ rust-overlay.overlays.default ];
            # NVIDIA's libraries (CUDA, TensorRT, TensorRT-RTX) are unfree; nothing else here is.
            config.allowUnfree = true;
          };
          inherit (pkgs) lib;

          rustToolchain =
            if builtins.pathExists ./rust-toolchain.toml then
              pkgs.rust-bin.fromRustupToolchainFile ./rust-toolchain.toml
            else
              pkgs.rust-bin.stable.${rustVersion}.default.override {
                extensions = [
                  "rust-src"
                  "clippy"
                  "rustfmt"
                ];
              };
          rustPlatform = pkgs.makeRustPlatform {
            cargo = rustToolchain;
            rustc = rustToolchain;
          };

          trtx-headers =
            pkgs.runCommand "trtx-sys-${trtxSysCrate.version}-tensorrt-headers"
              {
                src = pkgs.fetchurl {
                  name = "trtx-sys-${trtxSysCrate.version}.tar.gz";
                  inherit (trtxSysCrate) urls hash;
                };
              }
              ''
                mkdir unpacked
                tar -xzf "$src" -C unpacked --strip-components=1
                test -f unpacked/TensorRT-Headers/TRT-RTX-1.7/NvInfer.h
                test -f unpacked/TensorRT-Headers/TRT-Enterprise-11.4/NvInfer.h
                mkdir -p $out
                cp -r unpacked/TensorRT-Headers/. $out/
              '';

          # TensorRT-RTX laid out like an SDK: lib/ from the wheel, include/ from the headers above.
          tensorrt-rtx = pkgs.stdenv.mkDerivation {
            pname = "tensorrt-rtx";
            version = trtRtxVersion;
            src = pkgs.fetchurl trtRtxWheels.${system};
            nativeBuildInputs = [
              pkgs.unzip
              pkgs.autoPatchelfHook
            ];
            buildInputs = [ pkgs.stdenv.cc.cc.lib ];
            unpackPhase = ''
              runHook preUnpack
              unzip -q "$src"
              runHook postUnpack
            '';
            installPhase = ''
              runHook preInstall
              mkdir -p $out/lib $out/include $out/share/licenses/tensorrt-rtx
              cp tensorrt_rtx_libs/libtensorrt_rtx.so.1 tensorrt_rtx_libs/libtensorrt_onnxparser_rtx.so.1 $out/lib/
              ln -s libtensorrt_rtx.so.1 $out/lib/libtensorrt_rtx.so
              ln -s libtensorrt_onnxparser_rtx.so.1 $out/lib/libtensorrt_onnxparser_rtx.so
              cp -r ${trtx-headers}/TRT-RTX-1.7/. $out/include/
              cp -r tensorrt_rtx_cu13_libs-*.dist-info/licenses/. $out/share/licenses/tensorrt-rtx/ || true
              runHook postInstall
            '';
            dontStrip = true;
            meta = {
              description = "NVIDIA TensorRT-RTX builder, runtime and ONNX parser (from the PyPI wheel)";
              homepage = "https://developer.nvidia.com/tensorrt-rtx";
              license = lib.licenses.unfree;
              sourceProvenance = [ lib.sourceTypes.binaryNativeCode ];
              platforms = systems;
            };
          };

          # Python for the tests' reference scripts (tests/py): the packages scripts/setup.sh pip-installs.
          python = pkgs.python3.withPackages (ps: [
            ps.onnx
            ps.onnxruntime
            ps.ml-dtypes
            ps.numpy
            ps.openai # tests/server_openai.rs (the official client against a real server)
          ]);
          # ONNX Runtime for the CPU backend (loaded with dlopen).
          ortLib = "${lib.getLib pkgs.onnxruntime}/lib/libonnxruntime.so";

          # The layout scripts/setup.sh builds in .cache/, built by nix instead (read-only: nothing writes
          # there). TRT_DIFF_CACHE points at it, so build.rs, the binary and the tests find everything.
          trtDiffCache = pkgs.runCommand "trt-diff-cache" { } ''
            mkdir -p $out/venv/bin $out/lib
            ln -s ${python}/bin/python $out/venv/bin/python
            ln -s ${python}/bin/python3 $out/venv/bin/python3
            ln -s ${ortLib} $out/lib/libonnxruntime.so
            ln -s ${tensorrt-rtx}/lib/libtensorrt_rtx.so.1 $out/lib/libtensorrt_rtx.so.1
            ln -s ${tensorrt-rtx}/lib/libtensorrt_onnxparser_rtx.so.1 $out/lib/libtensorrt_onnxparser_rtx.so.1
            ln -s ${trtx-headers} $out/trt-headers
          '';

          # CUDA 13: nixpkgs' cudaPackages_13 (an alias of the newest 13.x set, e.g. cudaPackages_13_2);
          # older revisions only have cudaPackages_13_0.
          cudaPackages = pkgs.cudaPackages_13 or pkgs.cudaPackages_13_0;
          # cudatoolkit is the merged toolkit (nvcc, cudart, nvrtc, cublas, headers): one CUDA_PATH.
          cudaToolkit = cudaPackages.cudatoolkit;

          # TensorRT 11 from nixpkgs (cudaPackages_13.tensorrt). Its archive is not redistributable: where
          # nixpkgs uses requireFile for it, it must be downloaded by hand and added to the store.
          tryOrNull =
            e:
            let
              r = builtins.tryEval e;
            in
            if r.success then r.value else null;
          tensorrt11 = tryOrNull (cudaPackages.tensorrt or null);
          tensorrt11Src = if tensorrt11 == null then null else tryOrNull (tensorrt11.src or null);
          tensorrt11Root =
            if tensorrt11 == null then
              throw "trt-diff: this nixpkgs has no cudaPackages_13.tensorrt (TensorRT 11); use devShells.cuda (TensorRT-RTX)"
            else
              pkgs.symlinkJoin {
                name = "tensorrt-${tensorrt11.version}-root";
                paths = map (o: tensorrt11.${o}) tensorrt11.outputs;
              };
          # Shell code that says where TensorRT 11 stands, without making the shell depend on its archive.
          tensorrt11Notice =
            if tensorrt11Src == null then
              ''
                echo "trt-diff: this nixpkgs has no cudaPackages_13.tensorrt; this shell has TensorRT-RTX ${trtRtxVersion} only." >&2
              ''
            else
              let
                archive = tensorrt11Src.name;
                storePath = builtins.unsafeDiscardStringContext tensorrt11Src.outPath;
                manual = !(tensorrt11Src ? urls);
              in
              if !manual then
                ''
                  echo "trt-diff: TensorRT ${tensorrt11.version} (TensorRT 11) downloads by itself: \`nix develop .#cuda-trt11\` adds it." >&2
                ''
              else
                let
                  message = lib.concatStringsSep "\n" [
                    "trt-diff: this shell has TensorRT-RTX ${trtRtxVersion} (RTX 30/40/50, DGX Spark GB10, A100)."
                    "TensorRT 11 (H100/H200/B200) comes from nixpkgs' cudaPackages_13.tensorrt ${tensorrt11.version},"
                    "whose archive NVIDIA does not let nix download. To add it:"
                    "  1. download (NVIDIA Developer Program login) from https://developer.nvidia.com/tensorrt"
                    "     the TAR package for Linux ${system}, CUDA ${cudaPackages.cudaMajorMinorVersion or "13"}, named exactly"
                    "       ${archive}"
                    "     (hash ${tensorrt11Src.outputHash or "see nixpkgs"})"
                    "  2. add it to the Nix store, either way:"
                    "       nix-store --add-fixed sha256 ${archive}"
                    "       nix-prefetch-url --type sha256 file:///absolute/path/to/${archive}"
                    "  3. nix develop .#cuda-trt11"
                  ];
                in
                ''
                  if [ -e ${storePath} ]; then
                    echo "trt-diff: the TensorRT ${tensorrt11.version} archive is in the Nix store: \`nix develop .#cuda-trt11\` adds TensorRT 11 to this shell." >&2
                  else
                    printf '%s\n' ${lib.escapeShellArg message} >&2
                  fi
                '';

          # Shell code putting the NVIDIA driver (libcuda) and the TensorRT/CUDA libraries on
          # LD_LIBRARY_PATH: /run/opengl-driver/lib on NixOS; elsewhere (e.g. DGX OS, Ubuntu) the host's
          # driver libraries only, linked into a private folder so that no other host library leaks in.
          driverHook = extraLibDirs: ''
            trt_diff_driver=/run/opengl-driver/lib
            if [ ! -e /run/opengl-driver/lib/libcuda.so.1 ]; then
              for d in /usr/lib/x86_64-linux-gnu /usr/lib/aarch64-linux-gnu /usr/lib64 /usr/lib/wsl/lib; do
                if [ -e "$d/libcuda.so.1" ]; then
                  trt_diff_host="''${XDG_RUNTIME_DIR:-/tmp}/trt-diff-host-driver-$(id -u)"
                  mkdir -p "$trt_diff_host"
                  ln -sf "$d"/libcuda.so* "$d"/libnvidia-*.so* "$trt_diff_host"/ 2>/dev/null || true
                  trt_diff_driver="$trt_diff_driver:$trt_diff_host"
                  echo "trt-diff: using the host's NVIDIA driver from $d (linked into $trt_diff_host)" >&2
                  break
                fi
              done
            fi
            export LD_LIBRARY_PATH="$trt_diff_driver:${lib.concatStringsSep ":" extraLibDirs}''${LD_LIBRARY_PATH:+:$LD_LIBRARY_PATH}"
            unset trt_diff_driver trt_diff_host
          '';

          # What every shell, the package build and the checks set (names: build.rs and src/).
          commonEnv = {
            TRT_DIFF_CACHE = "${trtDiffCache}";
            TRTX_HEADERS_DIR = "${trtx-headers}";
            TRT_LIB_DIR = "${tensorrt-rtx}/lib";
            ORT_DYLIB_PATH = ortLib;
          };
          # The CUDA shells: an SDK in TENSORRT_ROOT (TensorRT-RTX, or TensorRT 11 in cuda-trt11), CUDA 13.
          cudaEnv = sdk: {
            TENSORRT_ROOT = "${sdk}";
            TENSORRT_INCLUDE_DIR = "${sdk}/include";
            TRT_LIB_DIR = "${sdk}/lib";
            CUDA_PATH = "${cudaToolkit}";
            CUDA_HOME = "${cudaToolkit}";
          };

          # mkShell brings the C++17 compiler (stdenv's gcc) that cxx-build uses.
          devPackages = [
            rustToolchain
            pkgs.cargo-nextest
            pkgs.cmake
            pkgs.pkg-config
            python
            pkgs.onnxruntime
            tensorrt-rtx
          ];
          banner = name: ''
            echo "trt-diff ${name} shell: rustc ${rustVersion}, TensorRT-RTX ${trtRtxVersion}, ONNX Runtime ${pkgs.onnxruntime.version}; cargo build / cargo test work as is (no scripts/setup.sh needed)." >&2
          '';

          cudaShell =
            {
              name,
              sdk,
              notice,
            }:
            pkgs.mkShell (
              {
                packages = devPackages ++ [ cudaToolkit ];
                shellHook =
                  driverHook [
                    "${sdk}/lib"
                    "${tensorrt-rtx}/lib"
                    "${cudaToolkit}/lib"
                  ]
                  + banner name
                  + notice;
              }
              // commonEnv
              // cudaEnv sdk
            );

          src = lib.cleanSourceWith {
            src = lib.cleanSource ./.;
            filter =
              path: type:
              !(builtins.elem (baseNameOf path) [
                ".cache"
                "target"
                "result"
              ]);
          };
          cargoToml = builtins.fromTOML (builtins.readFile ./Cargo.toml);

          # The C++ bridge needs TensorRT headers only (TRTX_HEADERS_DIR); TensorRT itself is loaded with
          # dlopen at run time, so the package builds without any NVIDIA library.
          mkTrtDiff =
            args:
            rustPlatform.buildRustPackage (
              {
                pname = "trt-diff";
                version = cargoToml.package.version;
                inherit src;
                cargoLock.lockFile = ./Cargo.lock;
                nativeBuildInputs = [ pkgs.makeWrapper ];
                doCheck = false;
                meta = {
                  description = cargoToml.package.description;
                  license = lib.licenses.asl20;
                  mainProgram = "trt-diff";
                  platforms = systems;
                };
              }
              // commonEnv
              // args
            );

          trt-diff = mkTrtDiff {
            # `nix run` works out of the box: TensorRT-RTX and ONNX Runtime by default (the variables can
            # still be overridden), the NixOS driver path for cudarc. TensorRT 11 is found through
            # TENSORRT_ROOT / LD_LIBRARY_PATH / --trt-lib-dir as usual.
            postInstall = ''
              wrapProgram $out/bin/trt-diff \
                --set-default TRT_LIB_DIR ${tensorrt-rtx}/lib \
                --set-default ORT_DYLIB_PATH ${ortLib} \
                --suffix LD_LIBRARY_PATH : /run/opengl-driver/lib
            '';
          };
        in
        {
          devShells = {
            default = pkgs.mkShell (
              {
                packages = devPackages;
                shellHook = banner "default";
              }
              // commonEnv
            );
            cuda = cudaShell {
              name = "cuda";
              sdk = tensorrt-rtx;
              notice = tensorrt11Notice;
            };
            # Fails with nixpkgs' requireFile message (what to download, how to add it) while the
            # TensorRT 11 archive is missing from the store.
            cuda-trt11 = cudaShell {
              name = "cuda-trt11";
              sdk = tensorrt11Root;
              notice = "";
            };
          };

          packages = {
            default = trt-diff;
            inherit trt-diff tensorrt-rtx trtx-headers;
          };

          apps.default = {
            type = "app";
            program = "${trt-diff}/bin/trt-diff";
            meta.description = "trt-diff command line";
          };

          checks = {
            build = trt-diff;
            # All of `cargo test`, with the real TensorRT-RTX builder (it runs on the CPU), ONNX Runtime and
            # the Python reference tools. Skipped by nature: anything needing a GPU (the sandbox has no
            # driver; no test executes an engine) and the set-up script (nix provides the cache instead).
            tests = mkTrtDiff {
              pname = "trt-diff-tests";
              doCheck = true;
              nativeCheckInputs = [ python ];
              preCheck = ''
                export HOME=$TMPDIR
              '';
            };
            clippy = mkTrtDiff {
              pname = "trt-diff-clippy";
              buildPhase = ''
                cargo clippy --all-targets --offline -- -D warnings
              '';
              installPhase = ''
                touch $out
              '';
            };
            fmt = pkgs.runCommand "trt-diff-fmt" { nativeBuildInputs = [ rustToolchain ]; } ''
              # rustfmt over every file (what `cargo fmt --check` does, without cargo resolving dependencies).
              cd ${src}
              find . -name '*.rs' -print0 | xargs -0 rustfmt --edition ${cargoToml.package.edition} --check
              touch $out
            '';
          };
        };

      bySystem = forAllSystems perSystem;
      collect = attr: builtins.mapAttrs (_: outputs: outputs.${attr}) bySystem;
    in
    {
      devShells = collect "devShells";
      packages = collect "packages";
      apps = collect "apps";
      checks = collect "checks";
    };
}
