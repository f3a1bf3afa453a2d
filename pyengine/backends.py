"""Run-time settings of pyengine's CPU kernels, in the spirit of ``torch.backends``.

``pyengine.backends.cpu``:

- ``capability``: the instruction set whose kernels run, ``"avx512"``, ``"avx2"`` or
  ``"default"`` (baseline code). One build carries all three; at import it is the best the CPU
  supports, capped by the environment variable ``PYENGINE_CPU_CAPABILITY``. Setting a lower one
  runs the same ops on the other kernels (tests compare them on one machine).
- ``best_capability`` (read only) and ``capabilities``: what this CPU can run.
- ``lstm_path``: the float LSTM's recurrence on the CPU, ``"auto"`` (by size), ``"fused"`` (the
  whole time loop in one threaded region, where it applies) or ``"gemm"`` (a library GEMM per
  step). Initially ``PYENGINE_LSTM_PATH``, or ``"auto"``.
- ``recent_blocks``: whether the CPU kernels take their outputs from an allocator that hands
  back the block freed last (still in cache) rather than ATen's (initially true unless
  ``PYENGINE_RECENT_BLOCKS=0``; switch it off for memory checkers).
- ``gemm``: the library of the CPU kernels' float32 GEMMs (LSTM, losses, distillation),
  ``"auto"``, ``"aten"`` (ATen's mm, MKL in torch's x86 wheels) or ``"onednn"`` (oneDNN's
  matmul, also in torch). MKL takes slower code paths on AMD processors (oneDNN measured
  2.0-2.4x faster on an AMD EPYC), so ``"auto"`` is oneDNN on non-Intel x86 processors and
  ATen on Intel ones. Initially ``PYENGINE_CPU_GEMM``, or ``"auto"``. ``gemm_runs_on`` (read
  only) says which one the GEMMs use now: ``"aten"`` also where this torch's oneDNN wrapper
  takes no float32 (``onednn_available``).

``pyengine.backends.cuda``:

- ``lstm_recurrence``: how the LSTM's GPU path runs the time loop of a layer without
  projection, ``"step"`` (a Triton launch a step, driven from Python) or ``"persistent"`` (all
  steps in one launch, programs meeting at a grid barrier each step; see
  pyengine.kernels.lstm_persistent). Initially ``PYENGINE_LSTM_RECURRENCE``, or ``"step"``:
  the persistent kernels are checked under the Triton interpreter and compiled for sm_80/sm_90,
  but not yet measured on a GPU.

Settings hold for the whole process and are read by the kernels at each call, never from the
environment again. ``with pyengine.backends.cpu.flags(capability="avx2"): ...`` sets and
restores them.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator

from pyengine import (
    _C,
    _extension,  # noqa: F401  (loads the native library first)
)

CAPABILITIES = ("default", "avx2", "avx512")
LSTM_PATHS = ("auto", "fused", "gemm")
GEMM_LIBRARIES = ("auto", "aten", "onednn")


class _CpuBackend:
    """pyengine.backends.cpu: see the module docstring."""

    @property
    def capability(self) -> str:
        return _C.cpu_capability()

    @capability.setter
    def capability(self, name: str) -> None:
        if name not in CAPABILITIES:
            raise ValueError(f"capability must be one of {CAPABILITIES}, got {name!r}")
        _C.set_cpu_capability(name)

    @property
    def best_capability(self) -> str:
        return _C.best_cpu_capability()

    @property
    def capabilities(self) -> tuple[str, ...]:
        """Every capability this CPU runs, lowest first."""
        return CAPABILITIES[: CAPABILITIES.index(self.best_capability) + 1]

    @property
    def lstm_path(self) -> str:
        return _C.lstm_path()

    @lstm_path.setter
    def lstm_path(self, name: str) -> None:
        if name not in LSTM_PATHS:
            raise ValueError(f"lstm_path must be one of {LSTM_PATHS}, got {name!r}")
        _C.set_lstm_path(name)

    @property
    def recent_blocks(self) -> bool:
        return _C.recent_blocks()

    @recent_blocks.setter
    def recent_blocks(self, enabled: bool) -> None:
        _C.set_recent_blocks(bool(enabled))

    @property
    def gemm(self) -> str:
        return _C.gemm_library()

    @gemm.setter
    def gemm(self, name: str) -> None:
        if name not in GEMM_LIBRARIES:
            raise ValueError(f"gemm must be one of {GEMM_LIBRARIES}, got {name!r}")
        if name == "onednn" and not self.onednn_available:
            raise ValueError("gemm='onednn': this torch's oneDNN matmul takes no float32 GEMMs "
                             "on this CPU; use 'aten' or 'auto'")
        _C.set_gemm_library(name)

    @property
    def gemm_runs_on(self) -> str:
        """The library the float32 GEMMs run on now: "onednn" or "aten"."""
        return _C.gemm_runs_on()

    @property
    def onednn_available(self) -> bool:
        return _C.onednn_gemm_available()

    @contextlib.contextmanager
    def flags(self, capability: str | None = None, lstm_path: str | None = None,
              recent_blocks: bool | None = None, gemm: str | None = None) -> Iterator[None]:
        """Set the given settings for the body of a with-block, then restore them."""
        saved = (self.capability, self.lstm_path, self.recent_blocks, self.gemm)
        try:
            if capability is not None:
                self.capability = capability
            if lstm_path is not None:
                self.lstm_path = lstm_path
            if recent_blocks is not None:
                self.recent_blocks = recent_blocks
            if gemm is not None:
                self.gemm = gemm
            yield
        finally:
            _C.set_cpu_capability(saved[0])
            _C.set_lstm_path(saved[1])
            _C.set_recent_blocks(saved[2])
            _C.set_gemm_library(saved[3])

    def __repr__(self) -> str:
        return (f"pyengine.backends.cpu(capability={self.capability!r}, "
                f"best_capability={self.best_capability!r}, lstm_path={self.lstm_path!r}, "
                f"recent_blocks={self.recent_blocks!r}, gemm={self.gemm!r}, "
                f"gemm_runs_on={self.gemm_runs_on!r})")


cpu = _CpuBackend()


def _lstm_recurrence_module():
    # Imported on use: it imports triton, which a CPU-only session need not load.
    from pyengine.kernels import lstm_persistent

    return lstm_persistent


class _CudaBackend:
    """pyengine.backends.cuda: see the module docstring."""

    @property
    def lstm_recurrence(self) -> str:
        return _lstm_recurrence_module().recurrence

    @lstm_recurrence.setter
    def lstm_recurrence(self, name: str) -> None:
        module = _lstm_recurrence_module()
        if name not in module.RECURRENCES:
            raise ValueError(f"lstm_recurrence must be one of {module.RECURRENCES}, got {name!r}")
        module.recurrence = name

    @contextlib.contextmanager
    def flags(self, lstm_recurrence: str | None = None) -> Iterator[None]:
        """Set the given settings for the body of a with-block, then restore them."""
        saved = self.lstm_recurrence
        try:
            if lstm_recurrence is not None:
                self.lstm_recurrence = lstm_recurrence
            yield
        finally:
            _lstm_recurrence_module().recurrence = saved

    def __repr__(self) -> str:
        return f"pyengine.backends.cuda(lstm_recurrence={self.lstm_recurrence!r})"


cuda = _CudaBackend()
