"""What the GPU FP8 backends share: is the package importable, and is there an FP8-capable GPU."""

from __future__ import annotations

from collections.abc import Callable

import torch

MIN_CAPABILITY = (8, 9)  # FP8 tensor cores: Ada, Hopper, Blackwell


def fp8_gpu_available(precision: str, import_backend: Callable[[], object], install: str) -> tuple[bool, str]:
    """(True, "") when ``import_backend`` works and a CUDA GPU with FP8 is visible, else why not."""
    try:
        import_backend()
    except ImportError as e:
        return False, str(e)
    if not torch.cuda.is_available():
        return False, f"precision {precision!r} needs a CUDA GPU and none is visible; {install}"
    cap = torch.cuda.get_device_capability()
    if cap < MIN_CAPABILITY:
        return False, (f"precision {precision!r} needs compute capability >= 8.9 (Ada/Hopper/Blackwell); "
                       f"this GPU has {cap[0]}.{cap[1]}")
    return True, ""
