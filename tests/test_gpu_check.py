"""``benchmarks/gpu_check.py --cpu``: the prepared GPU check runs its whole code path on tiny models here, so its
first GPU run is not its first run."""

from __future__ import annotations

import re
import subprocess
import sys

import pytest

from tests.conftest import ROOT


@pytest.mark.slow
def test_the_gpu_check_passes_on_cpu_with_one_table():
    run = subprocess.run([sys.executable, str(ROOT / "benchmarks" / "gpu_check.py"), "--cpu"], capture_output=True, text=True,
                         timeout=600, cwd=ROOT)
    assert run.returncode == 0, run.stdout[-3000:] + run.stderr[-3000:]
    table = run.stdout[run.stdout.index("gpu_check on CPU"):].splitlines()
    rows = dict(re.split(r"\s{2,}", line, maxsplit=2)[:2] for line in table[1:-1])  # name, status, figure
    assert table[-1] == f"gpu_check: {len(rows)} checks, none failed"
    assert [name for name, status in rows.items() if status == "pass"] == [
        "TRD steps: bf16 compute, fp32 LoRA, HF engine", "OPD steps: bf16 compute, fp32 LoRA, HF engine",
        "packed vs padded micro-batch (reference attention), fwd+bwd", "fused vs dense JSD(0.5), V=151,936, T=128, fwd+bwd",
        "FSDP2, one process (ModelParallelStrategy): a step, then export", "streaming vs synchronous TRD step: loss and gradients"]
    assert {rows["fused vs liger-kernel fused linear JSD(0.5)"], rows["TRD peak memory vs the memory plan"],
            rows["OPD peak memory vs the memory plan"]} == {"skip"}
