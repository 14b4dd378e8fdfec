#!/usr/bin/env bash
# Writes docker/constraints.txt: every package `pip install ".[vllm]"` puts into a fresh Python 3.12 venv on
# linux x86_64 (glibc 2.39, Ubuntu 24.04's), pinned. pip's resolver runs in report mode: nothing is installed.
# Run from the repository root: `bash docker/lock.sh` (PYTHON=/path/to/python3.12 if `python3.12` is not on PATH).
set -euo pipefail

cd "$(dirname "$0")/.."
PYTHON="${PYTHON:-python3.12}"
if ! "$PYTHON" -V > /dev/null 2>&1 && [ "$PYTHON" = python3.12 ]; then
    # pyenv's shim for a version that is installed but not selected
    for p in "$(pyenv root 2> /dev/null || echo "$HOME/.pyenv")"/versions/3.12*/bin/python3.12; do [ -x "$p" ] && PYTHON="$p"; done
fi
PIP_VERSION=26.3
# The image's glibc (Ubuntu 24.04: 2.39). pip takes a --platform tag literally, so list every manylinux tag it accepts.
GLIBC_MINOR=39

"$PYTHON" -c 'import sys; assert sys.version_info[:2] == (3, 12), f"need Python 3.12 (markers are evaluated with it), got {sys.version}"'

work="$(mktemp -d)"
trap 'rm -rf "$work"' EXIT
"$PYTHON" -m venv "$work/venv"
PIP_CONFIG_FILE=/dev/null "$work/venv/bin/python" -m pip install --quiet "pip==$PIP_VERSION"

platforms=()
for ((m = GLIBC_MINOR; m >= 17; m--)); do platforms+=(--platform "manylinux_2_${m}_x86_64"); done
platforms+=(--platform manylinux2014_x86_64 --platform manylinux_2_12_x86_64 --platform manylinux2010_x86_64
    --platform manylinux_2_5_x86_64 --platform manylinux1_x86_64 --platform linux_x86_64)

# No pip config files, local wheel folders or constraints of this machine: the image sees none of them.
env -u PIP_FIND_LINKS -u PIP_EXTRA_INDEX_URL -u PIP_CONSTRAINT -u PIP_NO_BINARY -u PIP_ONLY_BINARY PIP_CONFIG_FILE=/dev/null \
    "$work/venv/bin/python" -m pip install --dry-run --ignore-installed --quiet --report "$work/report.json" \
    --python-version 3.12 --implementation cp --abi cp312 --abi abi3 --abi none "${platforms[@]}" \
    --only-binary=:all: --target "$work/target" ".[vllm]"

"$work/venv/bin/python" - "$work/report.json" docker/constraints.txt <<'EOF'
import json, re, sys

report, out = sys.argv[1:]
pins = {}
for item in json.load(open(report))["install"]:
    meta = item["metadata"]
    name = re.sub(r"[-_.]+", "-", meta["name"]).lower()
    if name == "trd-lightning":
        continue
    url = item["download_info"]["url"]
    if not url.endswith(".whl"):
        sys.exit(f"{name} {meta['version']} resolved to a non-wheel: {url}")
    pins[name] = meta["version"]
with open(out, "w") as f:
    f.write('# Every package `pip install ".[vllm]"` installs into a fresh Python 3.12 venv on linux x86_64 (glibc 2.39), pinned.\n')
    f.write("# Regenerate from the repository root: bash docker/lock.sh (pip's resolver in --dry-run --report mode, wheels only).\n")
    f.write('# Use: pip install -c docker/constraints.txt ".[vllm]"\n')
    f.writelines(f"{n}=={v}\n" for n, v in sorted(pins.items()))
print(f"{out}: {len(pins)} pins")
EOF
