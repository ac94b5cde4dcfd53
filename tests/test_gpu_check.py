"""scripts/gpu-check.sh: one line per GPU path, and on a machine without a GPU nothing but SKIP and exit 0."""

from __future__ import annotations

import re
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT / "scripts"))
from gpu_check import PATHS  # noqa: E402  (a script, not a package)

LINE = re.compile(r"(PASS|FAIL|SKIP) ([a-z0-9-]+)[ :(]")


def run_check(*args: str, timeout: float) -> tuple[int, list[tuple[str, str, str]]]:
    done = subprocess.run([str(ROOT / "scripts" / "gpu-check.sh"), *args], capture_output=True, text=True,
                          timeout=timeout, env={"PATH": str(Path(sys.executable).parent) + ":/usr/bin:/bin",
                                                "PYTHON": sys.executable, "HOME": str(Path.home())})
    lines = [line for line in done.stdout.splitlines() if not line.startswith("(details in")]
    parsed = []
    for line in lines:
        match = LINE.match(line)
        assert match, f"not a PASS/FAIL/SKIP line: {line!r}\n{done.stdout}\n{done.stderr}"
        parsed.append((match.group(1), match.group(2), line))
    assert [name for _, name, _ in parsed] == [name for name, _ in PATHS], done.stdout
    return done.returncode, parsed


def test_without_a_gpu_every_path_says_skip_and_the_check_exits_0():
    import torch

    if torch.cuda.is_available():
        pytest.skip("this machine has a GPU: the check runs for real there")
    status, lines = run_check(timeout=120)
    assert status == 0
    assert all(verdict == "SKIP" and "no CUDA GPU" in line for verdict, _, line in lines), lines


@pytest.mark.slow
@pytest.mark.timeout(300)
def test_on_the_cpu_each_path_that_can_run_there_passes_and_the_rest_skip():
    status, lines = run_check("--device", "cpu", timeout=280)
    assert status == 0, lines
    verdicts = {name: verdict for verdict, name, _ in lines}
    assert set(verdicts.values()) <= {"PASS", "SKIP"}, lines
    # Half precision and both fine-tunes run on a CPU too; only bitsandbytes and a second GPU need the GPU.
    needs_gpu = {"chat-8bit", "chat-4bit", "chat-two-gpu-memory-map", "text-finetune-qlora"}
    assert {name for name, verdict in verdicts.items() if verdict == "SKIP"} <= needs_gpu, lines
