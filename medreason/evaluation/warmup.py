"""The decode kernels compiled by a helper process while the evaluate job starts up.

Triton compiles a kernel the first time it is launched with a new specialisation, and a fresh
machine or container has an empty cache (``~/.triton/cache``,
or ``TRITON_CACHE_DIR``), so the first decode step of a job paid for all three decode kernels (the
attention's two and the fused rotary's) while the GPU waited: the first batch of the MedQA
benchmark took ~5 s longer than its steps and prefill account for (bench/RESULTS.md, fifth
round; a second job on the same machine, its cache filled, ~2.6 s). ``start`` runs ``python -m medreason.evaluation.warmup`` beside the job as soon as the
model's shapes are known: it launches each kernel once on a one-row problem of the model's
head counts, head size, rotary size and dtype, which gives the launches of the job the same
specialisation (every stride a multiple of 16, the same constants), and Triton writes the
binaries to its cache, where the job's own first launch finds them. The job never waits for the
helper: if it gets to a kernel first, it compiles it itself, as before.
"""

from __future__ import annotations

import json
import logging
import os
import subprocess
import sys
from typing import Any

log = logging.getLogger(__name__)


def kernel_shapes(config: dict[str, Any]) -> dict[str, int]:
    """Heads, key/value heads, head size and rotary size of a model's config.json (a Phi: the
    rotary size is ``partial_rotary_factor`` of the head; other models: the whole head)."""
    heads = int(config["num_attention_heads"])
    head_dim = int(config.get("head_dim") or config["hidden_size"] // heads)
    factor = config.get("partial_rotary_factor")
    if factor is None:
        factor = (config.get("rope_parameters") or {}).get("partial_rotary_factor", 1.0)
    return {"heads": heads, "kv_heads": int(config.get("num_key_value_heads") or heads), "head_dim": head_dim,
            "rotary": int(head_dim * float(factor))}


def warm(shapes: dict[str, int], dtype_name: str, device: str) -> None:
    """Launch the decode kernels once on a one-row problem of ``shapes``."""
    import torch

    from medreason.evaluation.decode_attention import decode_attention
    from medreason.evaluation.decode_rotary import rotary_cache_write

    dtype = getattr(torch, dtype_name)
    heads, kv, dim, rot = shapes["heads"], shapes["kv_heads"], shapes["head_dim"], shapes["rotary"]
    length = 256  # a multiple of the cache bucket: the job's cache strides divide like these
    cache_k, cache_v = (torch.zeros(1, kv, length, dim, dtype=dtype, device=device) for _ in range(2))
    q, k, v = (torch.zeros(1, 1, n * dim, dtype=dtype, device=device) for n in (heads, kv, kv))
    cos, sin = torch.ones(1, 1, rot, dtype=dtype, device=device), torch.zeros(1, 1, rot, dtype=dtype, device=device)
    start, end = torch.zeros(1, dtype=torch.int32, device=device), torch.tensor([3], dtype=torch.int32, device=device)
    query = rotary_cache_write(q, k, v, cos, sin, cache_k, cache_v, end, heads, kv, dim, rot)
    decode_attention(query, cache_k, cache_v, start, end, dim**-0.5)
    if device == "cuda":
        torch.cuda.synchronize()


def start(model_dir: str, dtype: Any) -> subprocess.Popen[bytes] | None:
    """The helper process for the model in ``model_dir`` (its config.json), or None where the
    shapes cannot be read. Its output is discarded: whatever it fails on, the job compiles the
    kernels itself (the stage logs the helper's exit status)."""
    try:
        with open(os.path.join(model_dir, "config.json"), encoding="utf-8") as fh:
            shapes = kernel_shapes(json.load(fh))
    except (OSError, ValueError, KeyError, TypeError) as exc:
        log.debug("decode kernels not warmed up ahead (%s)", exc)
        return None
    name = str(dtype).replace("torch.", "")
    return subprocess.Popen([sys.executable, "-m", "medreason.evaluation.warmup", json.dumps(shapes), name],
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)


def main(argv: list[str]) -> int:
    shapes, dtype_name = json.loads(argv[0]), argv[1]
    warm(shapes, dtype_name, "cuda")
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
