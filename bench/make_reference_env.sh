#!/usr/bin/env bash
# Build a virtual environment holding the ORIGINAL SCALEX package (scalex==1.0.4) for side-by-side checks.
#
# Usage: bench/make_reference_env.sh [VENV_DIR]      (default: bench/.ref-venv, git-ignored)
# Env:   PYTHON=python3   interpreter used to create the venv (3.11 known to work)
#        FORCE=1          rebuild even when the venv already imports scalex 1.0.4
#
# torch is installed FIRST and pinned (==2.13.0, a local CPU wheel from /opt/wheels when present), and every
# later install runs under a constraints file that pins torch too, so pip can never resolve a CUDA torch.
# Pins: ../../shared/reference-requirements.txt when it exists (relative to this script), else the copy embedded
# below (numpy<2, zarr<3, pynndescent<0.7 are the ones that matter: scalex 1.0.4 uses np.Inf).
set -euo pipefail

HERE="$(cd "$(dirname "$0")" && pwd)"
VENV="${1:-$HERE/.ref-venv}"
PYTHON="${PYTHON:-python3}"
TORCH_VERSION="2.13.0"
SCALEX_VERSION="1.0.4"
SHARED_REQ="$HERE/../../shared/reference-requirements.txt"

check_env() {
    [ -x "$VENV/bin/python" ] || return 1
    "$VENV/bin/python" - "$TORCH_VERSION" "$SCALEX_VERSION" <<'EOF' >/dev/null 2>&1
import sys, importlib.metadata as md
import numpy, torch, scanpy, anndata, scalex  # noqa: F401  (importable)
from scalex import SCALEX  # noqa: F401
assert torch.__version__.split("+")[0] == sys.argv[1], torch.__version__
assert md.version("scalex") == sys.argv[2]
assert int(numpy.__version__.split(".")[0]) < 2, numpy.__version__
EOF
}

print_versions() {
    "$VENV/bin/python" - <<'EOF'
import sys, importlib.metadata as md
print("python", sys.version.split()[0], "at", sys.executable)
for p in ["scalex", "torch", "numpy", "scipy", "scanpy", "anndata", "pandas", "scikit-learn", "h5py", "zarr",
          "pynndescent", "umap-learn", "numba", "leidenalg"]:
    try:
        print(f"  {p:14s} {md.version(p)}")
    except md.PackageNotFoundError:
        print(f"  {p:14s} (not installed)")
EOF
}

if [ "${FORCE:-0}" != "1" ] && check_env; then
    echo "[make_reference_env] $VENV already built and importable; skipping (FORCE=1 to rebuild)"
    print_versions
    exit 0
fi

echo "[make_reference_env] building $VENV with $($PYTHON --version 2>&1)"
[ -d "$VENV" ] && [ "${FORCE:-0}" = "1" ] && rm -rf "$VENV"
"$PYTHON" -m venv "$VENV"
PIP=("$VENV/bin/python" -m pip --disable-pip-version-check)

# Constraints file: the shared pins if present, else the embedded copy.
CONSTRAINTS="$VENV/reference-constraints.txt"
if [ -f "$SHARED_REQ" ]; then
    echo "[make_reference_env] constraints: $SHARED_REQ"
    cp "$SHARED_REQ" "$CONSTRAINTS"
else
    echo "[make_reference_env] constraints: embedded copy (shared file not found)"
    cat > "$CONSTRAINTS" <<'EOF'
anndata==0.12.19
array-api-compat==1.16.0
asciitree==1.0.0
cloudpickle==3.1.2
contourpy==1.3.3
cycler==0.12.1
Deprecated==1.3.1
donfig==0.8.1.post1
fasteners==0.20
filelock==4.2.12
fonttools==4.68.0
formulaic==1.2.2
fsspec==2026.9.0
google-crc32c==1.9.0
h5py==3.16.0
igraph==1.0.0
interface_meta==2.0.1
Jinja2==3.1.6
joblib==1.6.0
kiwisolver==1.5.1
legacy-api-wrap==1.5
leidenalg==0.12.0
llvmlite==0.50.0
MarkupSafe==3.0.4
matplotlib==3.11.2
mpmath==1.3.0
narwhals==2.29.0
natsort==8.4.0
networkx==3.6.1
numba==0.68.1
numcodecs==0.15.2
numpy==1.26.4
packaging==26.3
pandas==2.3.3
patsy==1.0.3
pillow==13.0.0
pynndescent==0.6.0
pyparsing==3.3.3
python-dateutil==4.0.0
pytz==2026.6
PyYAML==6.0.3
scalex==1.0.4
scanpy==1.11.5
scikit-learn==1.9.1
scipy==1.17.1
scverse-misc==0.0.3
seaborn==0.13.2
session-info2==0.4.1
statsmodels==0.15.0
sympy==1.14.0
texttable==1.7.2
threadpoolctl==3.8.0
torch==2.13.0
tqdm==4.70.1
typing_extensions==4.16.0
tzdata==2026.6
umap-learn==0.5.12
wrapt==2.5.2
zarr==2.18.7
EOF
fi
# Whatever the pins say, torch must stay the CPU build pinned here and numpy/zarr/pynndescent below their majors.
grep -qi '^torch==' "$CONSTRAINTS" || echo "torch==$TORCH_VERSION" >> "$CONSTRAINTS"
grep -qi '^numpy' "$CONSTRAINTS" || echo "numpy<2" >> "$CONSTRAINTS"
grep -qi '^zarr' "$CONSTRAINTS" || echo "zarr<3" >> "$CONSTRAINTS"
grep -qi '^pynndescent' "$CONSTRAINTS" || echo "pynndescent<0.7" >> "$CONSTRAINTS"

# 1. torch first: the local CPU wheel when there is one (no CUDA download), else the pinned version.
TORCH_WHEEL="$(ls /opt/wheels/torch-${TORCH_VERSION}+cpu-*.whl 2>/dev/null | head -n1 || true)"
if [ -n "$TORCH_WHEEL" ]; then
    echo "[make_reference_env] torch from $TORCH_WHEEL"
    "${PIP[@]}" install -c "$CONSTRAINTS" "$TORCH_WHEEL"
else
    "${PIP[@]}" install -c "$CONSTRAINTS" "torch==$TORCH_VERSION"
fi

# 2. the reference package and its dependencies, all under the constraints (torch pinned, numpy<2, ...).
"${PIP[@]}" install -c "$CONSTRAINTS" "scalex==$SCALEX_VERSION"

if ! check_env; then
    echo "[make_reference_env] ERROR: $VENV does not import scalex $SCALEX_VERSION with torch $TORCH_VERSION and numpy<2" >&2
    "$VENV/bin/python" -c "import scalex, torch, numpy; print(torch.__version__, numpy.__version__)" || true
    exit 1
fi
"${PIP[@]}" freeze > "$VENV/freeze.txt"
echo "[make_reference_env] done; full freeze in $VENV/freeze.txt"
print_versions
