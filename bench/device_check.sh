#!/usr/bin/env bash
# GPU first contact in one command (see bench/README.md, "Device check").
#
#   bash bench/device_check.sh --fetch-wheels        # HERE (pip works): the wheels the device image lacks -> bench/.device-wheels/
#   bash bench/device_check.sh [--phases a,b] [--scaling-cells N] [--timeout-scale X]   # ON THE DEVICE (no network)
#   bash bench/device_check.sh --dry-run             # anywhere: every phase on the CPU at tiny size (CI runs this)
#
# On the device it installs the carried wheels offline into /tmp/scalex-dc/site (pip --no-index --no-deps --target,
# on PYTHONPATH: the image's torch / triton / numpy stay in use), builds scalex-scale itself into the same folder
# (no network: --no-build-isolation, setuptools from the image; a symlinked source tree if that fails), then runs
# bench/device_check.py, whose every phase is bounded by `timeout`. Results go to $OUT as they are measured.
set -uo pipefail
cd "$(dirname "$0")/.."
REPO=$(pwd)
WHEELS="$REPO/bench/.device-wheels"
PY=${PYTHON:-python3}
# The device image lacks these (KINDS.md); the rest of their dependencies is on it. Pinned: tested here with
# numpy 2.x / Python 3.12; numcodecs and google-crc32c are compiled (cp312 manylinux wheels).
PINS=(
  zarr==3.1.6 donfig==0.8.1.post1 google-crc32c==1.9.0 numcodecs==0.16.6
  dask==2026.8.0 partd==1.4.2 locket==1.0.0
  anndata==0.12.19 array-api-compat==1.16.0 legacy-api-wrap==1.5 natsort==8.4.0 scverse-misc==0.0.3 session-info2==0.4.1
  pynndescent==0.7.0
)

fetch_wheels() {
  mkdir -p "$WHEELS"
  local plat=(--platform manylinux_2_28_x86_64 --platform manylinux_2_27_x86_64 --platform manylinux_2_17_x86_64
              --platform manylinux2014_x86_64 --platform manylinux1_x86_64 --platform manylinux_2_24_x86_64
              --platform manylinux_2_31_x86_64 --platform manylinux_2_34_x86_64)
  $PY -m pip download --quiet --no-deps --only-binary=:all: --python-version 3.12 --implementation cp "${plat[@]}" \
      -d "$WHEELS" "${PINS[@]}" || { echo "pip download failed" >&2; return 1; }
  (git rev-parse HEAD 2>/dev/null && git status --porcelain --untracked-files=no | grep -q . && echo dirty) \
      | paste -sd' ' > "$WHEELS/commit.txt"
  printf '%s\n' "${PINS[@]}" > "$WHEELS/pins.txt"
  $PY "$REPO/bench/device_wheels.py" check "$WHEELS" || return 1
  du -sh "$WHEELS"
}

install_on_device() {
  # -> exports PYTHONPATH with the wheels and scalex-scale; writes the install log
  local site=/tmp/scalex-dc/site log=/tmp/scalex-dc/install.log
  mkdir -p /tmp/scalex-dc && : > "$log"
  export SCALEX_DC_INSTALL_REPORT=$log
  if ls "$WHEELS"/*.whl >/dev/null 2>&1; then
    $PY -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target "$site" "$WHEELS"/*.whl \
        >>"$log" 2>&1 && echo "wheels installed into $site" | tee -a "$log" || echo "WHEEL INSTALL FAILED (see $log)" | tee -a "$log"
  else
    echo "no wheels in $WHEELS (run bash bench/device_check.sh --fetch-wheels here and carry bench/.device-wheels)" | tee -a "$log"
  fi
  if $PY -m pip install -q --no-index --no-deps --no-build-isolation --no-compile --target "$site/pkg" "$REPO" >>"$log" 2>&1; then
    echo "scalex-scale built into $site/pkg" | tee -a "$log"
  else  # a source tree of symlinks: scalex_scale/* plus scalex_scale/kernels -> kernels/
    echo "pip could not build scalex-scale offline; using a symlinked source tree" | tee -a "$log"
    rm -rf "$site/pkg" && mkdir -p "$site/pkg/scalex_scale"
    for f in "$REPO"/scalex_scale/*; do ln -s "$f" "$site/pkg/scalex_scale/$(basename "$f")"; done
    ln -s "$REPO/kernels" "$site/pkg/scalex_scale/kernels"
  fi
  # the repository first: the tests and benchmarks import the package from the working tree when pip built it
  export PYTHONPATH="$site/pkg:$site${PYTHONPATH:+:$PYTHONPATH}"
  $PY - <<'EOF' 2>&1 | tee -a "$log"
import importlib
for name in ("torch", "triton", "numpy", "zarr", "numcodecs", "dask", "anndata", "pynndescent", "scalex_scale.store", "scalex_scale.kernels"):
    try:
        m = importlib.import_module(name)
        print(f"import {name}: ok {getattr(m, '__version__', '')} {getattr(m, '__file__', '')}")
    except Exception as exc:  # noqa: BLE001
        print(f"import {name}: FAILED {type(exc).__name__}: {exc}")
EOF
}

MODE=device
ARGS=()
for a in "$@"; do
  case "$a" in
    --fetch-wheels) MODE=fetch ;;
    --dry-run) MODE=dry; ARGS+=("$a") ;;
    *) ARGS+=("$a") ;;
  esac
done

case "$MODE" in
  fetch) fetch_wheels ;;
  dry) exec $PY bench/device_check.py run "${ARGS[@]}" ;;
  device)
    # PYTHONSAFEPATH: no `python -m ...` (pytest, torchrun's workers) may put the repository root on sys.path, where
    # the bare scalex_scale/ folder (without kernels/, which is installed as scalex_scale.kernels) would shadow the
    # package built into /tmp/scalex-dc/site/pkg. The bench scripts add their own folder to sys.path themselves.
    export PYTHONUNBUFFERED=1 PYTHONSAFEPATH=1 OMP_NUM_THREADS=${OMP_NUM_THREADS:-8}
    [ -n "${OUT:-}" ] || export OUT="$REPO/bench/_work/device_check"
    mkdir -p "$OUT"
    install_on_device
    # the whole run is bounded too (the phases' limits sum to ~525 s; this is the backstop)
    timeout -k 10 "${SCALEX_DC_TOTAL_S:-560}" $PY bench/device_check.py run --out "$OUT" "${ARGS[@]}"
    ;;
esac
