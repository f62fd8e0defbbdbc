#!/usr/bin/env bash
# Build a virtual environment holding the PEER tools of bench/run_scaling.py: scVI (scvi-tools) and Harmony
# (harmonypy), with scanpy for their preprocessing. Their dependencies (lightning, jax/flax, pyro, numpyro, ...)
# clash with ours, so they live apart from the project's venv, as the reference package does (.ref-venv).
#
# Usage: bench/make_peer_env.sh [VENV_DIR]      (default: bench/.peer-venv, git-ignored)
# Env:   PYTHON=python3   interpreter used to create the venv (3.11 known to work)
#        FORCE=1          rebuild even when the venv already imports the pinned versions
#        UNPINNED=1       resolve scvi-tools / harmonypy / scanpy afresh (torch stays pinned) instead of the pins
#
# torch is installed FIRST and pinned (==2.13.0, the local CPU wheel from /opt/wheels when present), and every later
# install runs under a constraints file that pins torch too, so pip can never resolve a CUDA torch.
set -euo pipefail

HERE="$(cd "$(dirname "$0")" && pwd)"
VENV="${1:-$HERE/.peer-venv}"
PYTHON="${PYTHON:-python3}"
TORCH_VERSION="2.13.0"
SCVI_VERSION="1.4.2"  # the newest release for python 3.11 (1.4.3 and later need 3.12)
HARMONY_VERSION="2.1.0"
SCANPY_VERSION="1.11.5"

check_env() {
    [ -x "$VENV/bin/python" ] || return 1
    "$VENV/bin/python" - "$TORCH_VERSION" "$SCVI_VERSION" "$HARMONY_VERSION" "$SCANPY_VERSION" <<'PYEOF' >/dev/null 2>&1
import sys, importlib.metadata as md
import torch, scanpy, anndata, harmonypy, scvi  # noqa: F401  (importable)
assert torch.__version__.split("+")[0] == sys.argv[1], torch.__version__
assert md.version("scvi-tools") == sys.argv[2], md.version("scvi-tools")
assert md.version("harmonypy") == sys.argv[3], md.version("harmonypy")
assert md.version("scanpy") == sys.argv[4], md.version("scanpy")
PYEOF
}

print_versions() {
    "$VENV/bin/python" - <<'PYEOF'
import sys, importlib.metadata as md
print("python", sys.version.split()[0], "at", sys.executable)
for p in ["scvi-tools", "harmonypy", "scanpy", "anndata", "torch", "lightning", "jax", "numpyro", "pyro-ppl", "numpy",
          "scipy", "pandas", "scikit-learn", "h5py"]:
    try:
        print(f"  {p:14s} {md.version(p)}")
    except md.PackageNotFoundError:
        print(f"  {p:14s} (not installed)")
PYEOF
}

if [ "${FORCE:-0}" != "1" ] && check_env; then
    echo "[make_peer_env] $VENV already built and importable; skipping (FORCE=1 to rebuild)"
    print_versions
    exit 0
fi

echo "[make_peer_env] building $VENV with $($PYTHON --version 2>&1)"
[ -d "$VENV" ] && [ "${FORCE:-0}" = "1" ] && rm -rf "$VENV"
"$PYTHON" -m venv "$VENV"
PIP=("$VENV/bin/python" -m pip --disable-pip-version-check)

CONSTRAINTS="$VENV/peer-constraints.txt"
if [ "${UNPINNED:-0}" = "1" ]; then
    echo "torch==$TORCH_VERSION" > "$CONSTRAINTS"
else
    # What pip resolved for these three packages on 2026-11 (python 3.11, torch 2.13.0 CPU), for reproducibility.
    cat > "$CONSTRAINTS" <<'PINS'
absl-py==2.5.1
aiohappyeyeballs==2.7.1
aiohttp==3.14.5
aiosignal==1.4.0
anndata==0.12.19
array-api-compat==1.16.0
attrs==26.1.0
cloudpickle==3.1.3
contourpy==1.3.3
cycler==0.12.1
docrep==0.3.2
donfig==0.8.1.post1
filelock==4.3.1
fonttools==4.68.0
formulaic==1.2.2
frozenlist==1.8.0
fsspec==2026.9.0
google-crc32c==1.9.0
grpcio==1.85.3
h5py==3.16.0
harmonypy==2.1.0
idna==3.20
interface_meta==2.0.1
Jinja2==3.1.6
joblib==1.6.0
kiwisolver==1.5.1
legacy-api-wrap==1.5
lightning-utilities==0.15.3
lightning==2.6.6
llvmlite==0.50.0
markdown-it-py==4.3.0
Markdown==3.11.3
MarkupSafe==3.0.4
matplotlib==3.11.2
mdurl==0.1.2
ml_collections==1.1.0
mpmath==1.3.0
mudata==0.3.10
multidict==7.2.1
narwhals==2.29.0
natsort==8.4.0
networkx==3.6.1
numba==0.68.1
numcodecs==0.16.6
numpy==2.4.6
opt_einsum==3.4.0
packaging==26.4
pandas==2.3.3
patsy==1.0.3
pillow==13.0.0
propcache==0.5.4
protobuf==7.36.2
Pygments==2.21.0
pynndescent==0.7.0
pyparsing==3.3.3
pyro-api==0.1.2
pyro-ppl==1.9.2
python-dateutil==4.0.0
pytorch-lightning==2.6.6
pytz==2026.6
PyYAML==6.0.4
rich==15.0.0
scanpy==1.11.5
scikit-learn==1.9.1
scikit-misc==0.5.3
scipy==1.17.1
scverse-misc==0.0.3
scvi-tools==1.4.2
seaborn==0.13.2
session-info2==0.4.1
six==1.17.0
sparse==0.19.3
statsmodels==0.15.0
sympy==1.14.0
tensorboard-data-server==0.7.2
tensorboard==2.21.0
threadpoolctl==3.8.0
torch==2.13.0
torchmetrics==1.9.0
tqdm==4.70.1
typing_extensions==4.16.0
tzdata==2026.6
umap-learn==0.5.12
Werkzeug==3.1.9
wrapt==2.5.2
xarray==2026.9.0
yarl==1.25.1
zarr==3.1.6
PINS
fi
grep -qi '^torch==' "$CONSTRAINTS" || echo "torch==$TORCH_VERSION" >> "$CONSTRAINTS"

# 1. torch first: the local CPU wheel when there is one (no CUDA download), else the pinned version.
TORCH_WHEEL="$(ls /opt/wheels/torch-${TORCH_VERSION}+cpu-*.whl 2>/dev/null | head -n1 || true)"
if [ -n "$TORCH_WHEEL" ]; then
    echo "[make_peer_env] torch from $TORCH_WHEEL"
    "${PIP[@]}" install -c "$CONSTRAINTS" "$TORCH_WHEEL"
else
    "${PIP[@]}" install -c "$CONSTRAINTS" "torch==$TORCH_VERSION"
fi

# 2. the peers and scanpy, all under the constraints (torch pinned).
"${PIP[@]}" install -c "$CONSTRAINTS" "scvi-tools==$SCVI_VERSION" "harmonypy==$HARMONY_VERSION" "scanpy==$SCANPY_VERSION"

if ! check_env; then
    echo "[make_peer_env] ERROR: $VENV does not import scvi-tools $SCVI_VERSION, harmonypy $HARMONY_VERSION, scanpy $SCANPY_VERSION with torch $TORCH_VERSION" >&2
    "$VENV/bin/python" -c "import torch, scvi, harmonypy, scanpy; print(torch.__version__)" || true
    exit 1
fi
"${PIP[@]}" freeze > "$VENV/freeze.txt"
echo "[make_peer_env] done; full freeze in $VENV/freeze.txt"
print_versions
