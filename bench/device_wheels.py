#!/usr/bin/env python
"""Check the wheels carried to the device machine: complete (every requirement carried or on the image), one
version each, Python 3.12 / manylinux x86-64, and small enough for the device tool's 64 MiB carry limit.

    python bench/device_wheels.py check bench/.device-wheels

The image's package list (and the versions seen there) are from /work/.library/device/KINDS.md (nvidia-h200,
read 2026-11-17); a requirement on a package of the image is taken as met unless a version seen there violates it.
"""

from __future__ import annotations

import sys
import zipfile
from pathlib import Path

from packaging.markers import default_environment
from packaging.requirements import Requirement
from packaging.utils import canonicalize_name, parse_wheel_filename
from packaging.version import Version

#: Packages on the device image (KINDS.md, "Python packages already there").
IMAGE_PACKAGES = frozenset(canonicalize_name(n) for n in """
absl-py accelerate aiofiles aiohappyeyeballs aiohttp aiosignal annotated-doc anyio attrs botorch build certifi
charset-normalizer chex click cloudpickle cmake colorama contourpy coverage cuda-bindings cuda-core cuda-pathfinder
cuda-toolkit cupy-cuda13x cycler cython diffrax e3nn einops equinox etils execnet filelock flatbuffers flax fonttools
formulaic frozenlist fsspec gpytorch grpcio h11 h5py hf-xet httpcore httpx huggingface-hub humanize hypothesis idna
imageio iniconfig interface-meta jax jax-cuda13-pjrt jax-cuda13-plugin jaxlib jaxtyping jinja2 joblib kiwisolver
lazy-loader lightning lightning-utilities linear-operator lineax llvmlite lxml markdown markdown-it-py markupsafe
matplotlib mdurl meson ml-dtypes mpi4py mpmath msgpack multidict multipledispatch mypy-extensions nanobind narwhals
networkx ninja numba numba-cuda numpy numpyro nvidia-cublas nvidia-cuda-cupti nvidia-cuda-nvrtc nvidia-cuda-runtime
nvidia-cudnn-cu13 nvidia-cufft nvidia-cufile nvidia-curand nvidia-cusolver nvidia-cusparse nvidia-cusparselt-cu13
nvidia-ml-py nvidia-nccl-cu13 nvidia-nvjitlink nvidia-nvshmem-cu13 nvidia-nvtx onnx onnx-ir onnxruntime onnxscript
opencv-python-headless optax opt-einsum opt-einsum-fx optimistix orbax-checkpoint packaging pandas pathspec patsy peft
pillow pip pluggy portalocker prometheus-client propcache protobuf psutil pyarrow pybind11 py-cpuinfo pygments
pyparsing pyproject-hooks pyre-extensions pytest pytest-benchmark pytest-cov pytest-mock pytest-timeout pytest-xdist
python-dateutil pytorch-lightning pyyaml regex requests rich sacrebleu safetensors scikit-build-core scikit-image
scikit-learn scipy seaborn sentencepiece sentence-transformers setuptools shellingham simplejson six sortedcontainers
statsmodels sympy tabulate tensorboard tensorboard-data-server tensorstore threadpoolctl tifffile tiktoken timm
tokenizers toolz torch torchaudio torchdiffeq torch-geometric torchmetrics torchvision tqdm transformers treescope
triton typer typing-extensions typing-inspect urllib3 uvloop wadler-lindig werkzeug wheel wrapt xarray xxhash yarl zipp
""".split())

#: Versions seen on the image (KINDS.md's pip list); requirements on these are checked against them.
IMAGE_VERSIONS = {"numpy": "2.5.2", "torch": "2.11.0", "triton": "3.6.0", "jax": "0.11.2", "safetensors": "0.8.0"}

#: The device tool carries at most 64 MiB in all (working tree included: ~1.5 MB tracked here).
CARRY_LIMIT = 64 * 2**20
TREE_ALLOWANCE = 8 * 2**20


def _environment() -> dict[str, str]:
    env = default_environment()
    env.update({"python_version": "3.12", "python_full_version": "3.12.3", "implementation_name": "cpython",
                "platform_python_implementation": "CPython", "sys_platform": "linux", "platform_system": "Linux",
                "platform_machine": "x86_64", "os_name": "posix", "extra": ""})  # fmt: skip
    return env


def _requirements(wheel: Path) -> list[Requirement]:
    with zipfile.ZipFile(wheel) as z:
        meta = next(n for n in z.namelist() if n.endswith(".dist-info/METADATA"))
        text = z.read(meta).decode("utf-8", "replace")
    reqs = []
    env = _environment()
    for line in text.splitlines():
        if line.startswith("Requires-Dist:"):
            req = Requirement(line.split(":", 1)[1].strip())
            if req.marker is None or req.marker.evaluate(env):
                reqs.append(req)
    return reqs


def _compatible(tags: frozenset) -> bool:
    for tag in tags:
        py_ok = tag.interpreter in ("py3", "cp312") or tag.interpreter.startswith("py3")
        abi_ok = tag.abi in ("none", "abi3", "cp312")
        plat_ok = tag.platform == "any" or (tag.platform.startswith("manylinux") and tag.platform.endswith("x86_64"))
        if py_ok and abi_ok and plat_ok:
            return True
    return False


def check(folder: Path) -> int:
    wheels = sorted(folder.glob("*.whl"))
    if not wheels:
        print(f"no wheels in {folder}", file=sys.stderr)
        return 1
    carried: dict[str, str] = {}
    problems: list[str] = []
    for w in wheels:
        name, version, _, tags = parse_wheel_filename(w.name)
        if name in carried:
            problems.append(f"two versions of {name}: {carried[name]} and {version}")
        carried[name] = str(version)
        if not _compatible(tags):
            problems.append(f"{w.name}: not a CPython 3.12 / manylinux x86-64 wheel")
    for w in wheels:
        for req in _requirements(w):
            name = canonicalize_name(req.name)
            if name in carried:
                if not req.specifier.contains(Version(carried[name]), prereleases=True):
                    problems.append(f"{w.name} needs {req}, carried {name}=={carried[name]}")
            elif name in IMAGE_PACKAGES:
                seen = IMAGE_VERSIONS.get(name)
                if seen and not req.specifier.contains(Version(seen), prereleases=True):
                    problems.append(f"{w.name} needs {req}, the image has {name}=={seen}")
            else:
                problems.append(f"{w.name} needs {req}: neither carried nor on the image")
    size = sum(w.stat().st_size for w in folder.iterdir() if w.is_file())
    print(f"{len(wheels)} wheels, {size / 2**20:.1f} MiB (carry limit {CARRY_LIMIT / 2**20:.0f} MiB with the tree)")
    for w in wheels:
        print(f"  {w.name}  {w.stat().st_size / 2**20:.2f} MiB")
    if size + TREE_ALLOWANCE > CARRY_LIMIT:
        problems.append(f"{size / 2**20:.1f} MiB of wheels + the tree exceed the {CARRY_LIMIT / 2**20:.0f} MiB carry limit")
    for p in problems:
        print("PROBLEM:", p, file=sys.stderr)
    return 1 if problems else 0


def main(argv: list[str]) -> int:
    if len(argv) != 2 or argv[0] != "check":
        print(__doc__, file=sys.stderr)
        return 2
    return check(Path(argv[1]))


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
