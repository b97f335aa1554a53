"""tests/cuda/gpu_check.sh, the prepared GPU verification (run on a GPU machine, never in CI),
kept from rotting on a CPU: its op driver runs here on CPU, and its stage handling is tried."""
import os
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
SCRIPT = ROOT / "tests" / "cuda" / "gpu_check.sh"


def test_exercise_ops_passes_on_cpu():
    """The calls compute-sanitizer drives on a GPU: every op and CPU kernel variant against the
    reference, the bad-value paths included."""
    out = subprocess.run([sys.executable, str(ROOT / "tests" / "cuda" / "exercise_ops.py"),
                          "--device", "cpu"], capture_output=True, text=True, timeout=300)
    assert out.returncode == 0 and "all calls ok" in out.stdout, out.stdout[-3000:] + out.stderr[-3000:]
    assert out.stdout.count("ok   knn_search ") >= 36  # 3 dtypes x 3 metrics x 4 CPU plans


def _run(tmp_path, *stages):
    env = dict(os.environ, OUT=str(tmp_path))
    return subprocess.run(["bash", str(SCRIPT), *stages], capture_output=True, text=True,
                          env=env, timeout=60)


def test_gpu_check_refuses_an_unknown_stage(tmp_path):
    out = _run(tmp_path, "nope")
    assert out.returncode == 2 and "unknown stage 'nope'" in out.stderr


def test_gpu_check_skips_what_needs_the_failed_build(tmp_path):
    (tmp_path / "summary.txt").write_text("build: ok (80 s)\nbuild: FAILED (exit 1) (9 s)\n")
    out = _run(tmp_path, "sanitize", "bench")
    assert out.returncode == 0, out.stderr
    assert (tmp_path / "summary.txt").read_text().endswith(
        "sanitize: skipped (the build failed)\nbench: skipped (the build failed)\n")
