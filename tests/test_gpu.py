"""One GPU per worker: claims are distinct, extra workers wait or share, and the operating
system frees the claim of a worker killed with SIGKILL. Claims are real file locks held by real
processes; on this CPU-only machine the GPU indices come from the `gpus` setting."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
from pathlib import Path

import pytest

from search.gpu import GpuClaim, visible_gpus
from search.settings import Settings

HOLDER = """
import sys, time
from search.gpu import GpuClaim
from search.settings import Settings
claim = GpuClaim(Settings.load(), log=lambda msg: None)
assert claim.acquire()
import os
print(claim.gpu, os.environ["CUDA_VISIBLE_DEVICES"], flush=True)
time.sleep(600)
"""


def settings(lock_dir: Path, gpus: str = "0,1", wait: bool = True) -> Settings:
    return Settings(gpus=gpus, gpu_lock_dir=lock_dir, gpu_wait=wait)


def start_holder(lock_dir: Path, gpus: str = "0,1") -> tuple[subprocess.Popen[str], str]:
    env = dict(os.environ, SEARCH_GPUS=gpus, SEARCH_GPU_LOCK_DIR=str(lock_dir))
    proc = subprocess.Popen(
        [sys.executable, "-c", HOLDER], env=env, stdout=subprocess.PIPE, text=True
    )
    assert proc.stdout is not None
    gpu, pinned = proc.stdout.readline().split()
    assert gpu == pinned  # the process is pinned to the GPU it claimed
    return proc, gpu


def test_workers_claim_distinct_gpus_and_sigkill_frees_the_claim(tmp_path: Path) -> None:
    first, gpu_a = start_holder(tmp_path)
    second, gpu_b = start_holder(tmp_path)
    try:
        assert {gpu_a, gpu_b} == {"0", "1"}
        # All GPUs are claimed: a waiting worker gets none (it gives up here only because a
        # stop is requested while it waits).
        assert GpuClaim(settings(tmp_path), stop=lambda: True, poll_s=0.01).acquire() is False

        first.send_signal(signal.SIGKILL)
        first.wait(timeout=30)

        with GpuClaim(settings(tmp_path), log=lambda msg: None) as claim:
            assert claim.gpu == gpu_a and claim.exclusive
            assert os.environ["CUDA_VISIBLE_DEVICES"] == gpu_a
        assert os.environ.get("CUDA_VISIBLE_DEVICES") != gpu_a  # restored on release
    finally:
        for proc in (first, second):
            proc.kill()
            proc.wait(timeout=30)


def test_extra_workers_share_gpus_evenly_when_told_not_to_wait(tmp_path: Path) -> None:
    claims = [GpuClaim(settings(tmp_path, wait=False), log=lambda msg: None) for _ in range(5)]
    try:
        for claim in claims:
            assert claim.acquire()
        assert [(c.gpu, c.slot) for c in claims] == [
            ("0", 0), ("1", 0), ("0", 1), ("1", 1), ("0", 2)
        ]  # fmt: skip
        claims[1].release()  # GPU 1's exclusive worker ends: the next one gets GPU 1 alone
        again = GpuClaim(settings(tmp_path, wait=False), log=lambda msg: None)
        assert again.acquire() and (again.gpu, again.slot) == ("1", 0)
        again.release()
    finally:
        for claim in claims:
            claim.release()


def test_gpu_count_comes_from_nvidia_smi_when_not_named(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    smi = tmp_path / "bin" / "nvidia-smi"
    smi.parent.mkdir()
    smi.write_text(
        "#!/bin/sh\n"
        "echo 'GPU 0: NVIDIA H100 80GB HBM3 (UUID: GPU-a)'\n"
        "echo 'GPU 1: NVIDIA H100 80GB HBM3 (UUID: GPU-b)'\n"
    )
    smi.chmod(0o755)
    monkeypatch.setenv("PATH", f"{smi.parent}{os.pathsep}{os.environ['PATH']}")
    assert visible_gpus("") == ["0", "1"]
    assert visible_gpus("2, 3") == ["2", "3"]  # the setting wins


def test_no_gpu_means_no_claim_and_no_pinning(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("PATH", str(tmp_path))  # no nvidia-smi anywhere
    monkeypatch.delenv("CUDA_VISIBLE_DEVICES", raising=False)
    with GpuClaim(settings(tmp_path / "locks", gpus=""), log=lambda msg: None) as claim:
        assert claim.gpu is None
        assert "CUDA_VISIBLE_DEVICES" not in os.environ
    assert not (tmp_path / "locks").exists()


def test_worker_command_imports_no_backend_before_its_gpu_claim() -> None:
    """`search worker` claims the GPU inside run_worker; Keras (and TensorFlow) must not be
    loaded by then, or CUDA_VISIBLE_DEVICES could come too late."""
    code = (
        "import sys; import search.cli, search.worker, search.gpu; "
        "print(sorted(m for m in ('keras', 'tensorflow', 'torch', 'jax') if m in sys.modules))"
    )
    out = subprocess.run(
        [sys.executable, "-c", code], capture_output=True, text=True, timeout=120, check=True
    )
    assert out.stdout.strip() == "[]"
