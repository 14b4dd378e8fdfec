"""The Docker image, checked without a Docker engine (there is none here): its CUDA base matches the CUDA of the
pinned torch wheel, every Python package is pinned by one lock, and the build's known traps are avoided."""

from __future__ import annotations

import re
import subprocess
import sys
import zipfile

import pytest

from tests.conftest import ROOT

DOCKERFILE = (ROOT / "docker" / "Dockerfile").read_text()
LOCK = ROOT / "docker" / "constraints.txt"


def base_cuda_major() -> int:
    image = re.search(r"^FROM\s+nvidia/cuda:(\d+)\.\d+(?:\.\d+)?-\S+", DOCKERFILE, re.M)
    assert image, "docker/Dockerfile must build FROM an nvidia/cuda:<major>.<minor>... image"
    return int(image.group(1))


def pins() -> dict[str, str]:
    lines = [line for line in LOCK.read_text().splitlines() if line and not line.startswith("#")]
    return dict(line.split("==", 1) for line in lines)


def cuda_majors(requirements: list[str]) -> set[int]:
    """The CUDA majors a wheel's requirements name: ``cuda-toolkit==13.0.3`` and ``nvidia-*-cu13`` packages."""
    majors = set()
    for requirement in requirements:
        toolkit = re.match(r"cuda-toolkit\b[^=<>~]*==\s*(\d+)\.", requirement)
        suffix = re.match(r"nvidia-[a-z0-9-]+-cu(\d+)\b", requirement)
        majors |= {int(m.group(1)) for m in (toolkit, suffix) if m}
    return majors


def test_every_package_of_the_image_is_pinned_and_the_install_uses_the_lock():
    pinned = pins()
    assert {"vllm", "torch", "transformers", "lightning", "jsonargparse", "peft"} <= set(pinned)
    assert all(re.fullmatch(r"[a-z0-9-]+", name) and re.fullmatch(r"[0-9][0-9a-z.+]*", version) for name, version in pinned.items())
    installs = re.findall(r"pip install [^\n\\]*", DOCKERFILE)
    assert installs and all("-c docker/constraints.txt" in line for line in installs)


def test_the_base_image_cuda_major_is_the_pinned_torch_wheels_by_the_lock():
    toolkit = pins().get("cuda-toolkit")
    assert toolkit, "the lock pins torch's cuda-toolkit"
    assert int(toolkit.split(".")[0]) == base_cuda_major()


def test_the_known_build_traps_are_avoided():
    assert re.search(r"userdel --remove ubuntu", DOCKERFILE)  # Ubuntu 24.04 images hold uid 1000 already
    assert "vllm download-kernels" in DOCKERFILE  # no kernel compilation (no nvcc) or download at start-up
    last_run = re.findall(r"^RUN .*$", DOCKERFILE, re.M)[-1]
    assert "trd --help" in last_run and "import vllm" in last_run


@pytest.mark.slow
def test_the_base_image_cuda_major_is_the_pinned_torch_wheels_by_its_own_metadata(tmp_path):
    """The same check against the torch wheel itself: ``pip download --no-deps`` of the pinned version for the image's
    Python and platform, and the CUDA majors its requirements name."""
    command = [sys.executable, "-m", "pip", "download", "--no-deps", "--quiet", "--only-binary=:all:", "--python-version", "3.12",
               "--platform", "manylinux_2_28_x86_64", "-d", str(tmp_path), f"torch=={pins()['torch']}"]
    subprocess.run(command, check=True, env={"PIP_CONFIG_FILE": "/dev/null", "PATH": "/usr/bin:/bin"}, timeout=900)
    wheel = next(tmp_path.glob("torch-*.whl"))
    with zipfile.ZipFile(wheel) as archive:
        metadata = archive.read(next(n for n in archive.namelist() if n.endswith(".dist-info/METADATA"))).decode()
    requirements = [line.removeprefix("Requires-Dist:").strip() for line in metadata.splitlines() if line.startswith("Requires-Dist:")]
    linux = [r for r in requirements if "platform_system" not in r or "Linux" in r]
    assert cuda_majors(linux) == {base_cuda_major()}, sorted(r for r in linux if "cu" in r)


def test_cuda_majors_reads_both_spellings():
    assert cuda_majors(["cuda-toolkit[cublas,cudart]==13.0.3; platform_system == 'Linux'", "nvidia-cudnn-cu13==9.13.0.50",
                        "filelock"]) == {13}
    assert cuda_majors(["nvidia-nccl-cu12==2.27.3"]) == {12}
