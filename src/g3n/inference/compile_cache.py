"""Where torch.compile keeps what it built, so the one-off compile of the decode step is paid once
per machine, not once per process.

PyTorch's own caches do the work: inductor's FX graph cache (with the Triton kernels bundled in),
AOTAutograd's cache and the autotuning results. Their keys hold the torch version (a hash of its
sources), the GPU, the Triton and CUDA versions, every input's dtype, shape and stride, and the
compile settings, so another torch, GPU, dtype or model shape never reuses a wrong entry. A new
process still traces the step with dynamo and loads the cached code (seconds, not the compile's
tens of seconds). torch reads the cache's place only from TORCHINDUCTOR_CACHE_DIR (no setting),
so `use` sets it, before the first compile of the process.
"""

from __future__ import annotations

import os
from pathlib import Path

import torch

_chosen: Path | None = None


def default_dir() -> Path:
    """$XDG_CACHE_HOME/g3n/torch-compile (~/.cache/g3n/torch-compile)."""
    base = os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache"
    return Path(base) / "g3n" / "torch-compile"


def use(directory: str | Path | None = None) -> Path:
    """Keep torch's compile caches in `directory` (default: default_dir()) from now on; the first
    call of the process decides (torch remembers the place once it has compiled)."""
    global _chosen
    if _chosen is None:
        path = Path(directory or default_dir()).expanduser().resolve()
        path.mkdir(parents=True, exist_ok=True)
        os.environ["TORCHINDUCTOR_CACHE_DIR"] = str(path)  # torch has written its default here: assign
        os.environ.setdefault("TRITON_CACHE_DIR", str(path / "triton"))
        import torch._functorch.config
        import torch._inductor.config

        torch._inductor.config.fx_graph_cache = True
        torch._inductor.config.autotune_local_cache = True
        torch._functorch.config.enable_autograd_cache = True  # off by default before torch 2.6
        _chosen = path
    return _chosen


def hits() -> tuple[int, int]:
    """(FX graph cache hits, misses) so far in this process."""
    counters = torch._dynamo.utils.counters["inductor"]
    return counters["fxgraph_cache_hit"], counters["fxgraph_cache_miss"]
