"""One GPU per worker: claim a GPU index with an exclusive file lock and pin the process to it.

Workers on one machine (replicas of the compose service, or plain processes) share
`gpu_lock_dir`; each takes the lock file of a free GPU and sets CUDA_VISIBLE_DEVICES before Keras
loads. The operating system drops a file lock when its process ends, SIGKILL and OOM-kill
included, so a dead worker never keeps its GPU. With more workers than GPUs the extra ones either
wait for a GPU to free up (`gpu_wait`) or share one: each GPU has numbered slots, slot 0 is the
exclusive claim, and sharers fill slot 1 of every GPU before slot 2, so they spread evenly.
"""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
import time
from collections.abc import Callable
from pathlib import Path
from types import TracebackType

from filelock import FileLock, Timeout

from search.errors import ConfigError
from search.settings import Settings

MAX_SHARERS = 64  # slots per GPU in share mode: far more than any GPU can hold workers
WAIT_LOG_EVERY_S = 60.0


def visible_gpus(gpus: str) -> list[str]:
    """GPU indices to choose from: the `gpus` setting ("0,1,2,3"), else one per line of
    `nvidia-smi -L`, else none (CPU only)."""
    named = [g.strip() for g in gpus.split(",") if g.strip()]
    if named:
        return named
    smi = shutil.which("nvidia-smi")
    if smi is None:
        return []
    try:
        out = subprocess.run([smi, "-L"], capture_output=True, text=True, timeout=30, check=True)
    except (OSError, subprocess.SubprocessError):
        return []  # a driver that does not answer: no usable GPU
    return [str(i) for i, line in enumerate(out.stdout.splitlines()) if line.startswith("GPU ")]


def lock_path(lock_dir: Path, gpu: str, slot: int) -> Path:
    return Path(lock_dir) / f"gpu{gpu}.slot{slot}.lock"


class GpuClaim:
    """A held claim on one GPU (or on none, for CPU-only machines). Use as a context manager:
    entering claims and pins, leaving releases and restores CUDA_VISIBLE_DEVICES."""

    def __init__(
        self,
        settings: Settings,
        *,
        stop: Callable[[], bool] = lambda: False,
        log: Callable[[str], None] = lambda msg: print(msg, file=sys.stderr, flush=True),
        poll_s: float = 1.0,
    ) -> None:
        self.gpus = visible_gpus(settings.gpus)
        self.lock_dir = Path(settings.gpu_lock_dir)
        self.wait = settings.gpu_wait
        self.stop, self.log, self.poll_s = stop, log, poll_s
        self.gpu: str | None = None
        self.slot: int | None = None
        self._lock: FileLock | None = None
        self._previous_env: str | None = None

    @property
    def exclusive(self) -> bool:
        return self.slot == 0

    def acquire(self) -> bool:
        """Claim a GPU and pin this process to it. False only when a stop was requested while
        waiting for one. Without GPUs there is nothing to claim: True, and nothing pinned."""
        if not self.gpus:
            return True
        try:
            self.lock_dir.mkdir(parents=True, exist_ok=True)
        except OSError as exc:
            raise ConfigError(
                f"cannot create the GPU lock folder {self.lock_dir} ({exc.strerror}): set "
                "SEARCH_GPU_LOCK_DIR to a writable local folder shared by this machine's workers"
            ) from None
        slots = range(1) if self.wait else range(MAX_SHARERS)
        waited_since = time.monotonic()
        last_log = -WAIT_LOG_EVERY_S
        while True:
            for slot in slots:
                for gpu in self.gpus:
                    if self._try(gpu, slot):
                        self._pin()
                        return True
            if not self.wait:
                raise ConfigError(
                    f"all {MAX_SHARERS} slots of GPUs {','.join(self.gpus)} are taken: "
                    f"check {self.lock_dir} or run fewer workers"
                )
            waited = time.monotonic() - waited_since
            if waited - last_log >= WAIT_LOG_EVERY_S:
                last_log = waited
                self.log(
                    f"gpu: all {len(self.gpus)} GPUs ({','.join(self.gpus)}) are claimed; "
                    f"waiting for one to free up ({waited:.0f}s so far)"
                )
            if self.stop():
                return False
            time.sleep(self.poll_s)

    def _try(self, gpu: str, slot: int) -> bool:
        lock = FileLock(
            str(lock_path(self.lock_dir, gpu, slot)),
            timeout=0,
            fallback_to_soft=False,  # a soft lock would survive SIGKILL and block the GPU
        )
        try:
            lock.acquire()
        except Timeout:
            return False
        except OSError as exc:
            raise ConfigError(
                f"cannot lock {lock.lock_file} ({exc.strerror or exc}): SEARCH_GPU_LOCK_DIR "
                "must be a local folder that supports file locks"
            ) from None
        self.gpu, self.slot, self._lock = gpu, slot, lock
        return True

    def _pin(self) -> None:
        assert self.gpu is not None
        if "tensorflow" in sys.modules or "torch" in sys.modules or "jax" in sys.modules:
            self.log("gpu: a backend was imported before the GPU claim; pinning may not apply")
        self._previous_env = os.environ.get("CUDA_VISIBLE_DEVICES")
        os.environ["CUDA_VISIBLE_DEVICES"] = self.gpu
        how = "exclusive" if self.exclusive else f"shared, slot {self.slot}"
        self.log(f"gpu: claimed GPU {self.gpu} ({how}); CUDA_VISIBLE_DEVICES={self.gpu}")

    def release(self) -> None:
        if self._lock is None:
            return
        self._lock.release()
        self._lock = None
        if self._previous_env is None:
            os.environ.pop("CUDA_VISIBLE_DEVICES", None)
        else:
            os.environ["CUDA_VISIBLE_DEVICES"] = self._previous_env
        self.log(f"gpu: released GPU {self.gpu}")

    def __enter__(self) -> GpuClaim:
        self.acquire()
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.release()
