"""PyTorch SDPA decode at the shapes of benches/attention.rs, timed with CUDA events on the same machine.

Writes {"B8_L131072": {"cudnn": ms, "flash": ms, "efficient": ms, "math": ms}, ...} (ms per call; a backend
that refuses a shape is left out). Usage: python3 sdpa_decode.py OUT.json [quick]
"""
import json
import math
import os
import sys

import torch
import torch.nn.functional as F
from torch.nn.attention import SDPBackend, sdpa_kernel

HQ, HKV, D = 32, 8, 128
# SDPA_BATCHES=1,8 limits the grid (the full one is 1, 8, 32).
BATCHES = [int(x) for x in os.environ.get("SDPA_BATCHES", "1,8,32").split(",")]


def main():
    out_path = sys.argv[1]
    quick = len(sys.argv) > 2 and sys.argv[2] == "quick"
    shapes = [(1, 1024), (2, 4096)] if quick else [(b, l) for b in BATCHES for l in (4096, 8192, 16384, 32768, 131072)]
    backends = {
        "cudnn": SDPBackend.CUDNN_ATTENTION,
        "flash": SDPBackend.FLASH_ATTENTION,
        "efficient": SDPBackend.EFFICIENT_ATTENTION,
        "math": SDPBackend.MATH,
    }
    res = {}
    dev = "cuda"
    for b, l in shapes:
        kv_bytes = 2 * b * HKV * l * D * 2
        copies = max(1, min(64, math.ceil((512 << 20) / kv_bytes)))
        q = torch.randn(b, HQ, 1, D, device=dev, dtype=torch.bfloat16)
        kvs = [(torch.randn(b, HKV, l, D, device=dev, dtype=torch.bfloat16),
                torch.randn(b, HKV, l, D, device=dev, dtype=torch.bfloat16)) for _ in range(copies)]
        entry = {}
        for name, be in backends.items():
            if name == "math" and kv_bytes > (1 << 30):
                continue  # the math path materialises the full score matrix: too slow to matter here
            try:
                with sdpa_kernel(be):
                    for i in range(3):
                        k, v = kvs[i % copies]
                        F.scaled_dot_product_attention(q, k, v, enable_gqa=True)
                    torch.cuda.synchronize()
                    reps = max(10, min(200, int(2e-2 / (kv_bytes / 4e12))))
                    times = []
                    for _ in range(5):
                        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
                        start.record()
                        for i in range(reps):
                            k, v = kvs[i % copies]
                            F.scaled_dot_product_attention(q, k, v, enable_gqa=True)
                        end.record()
                        torch.cuda.synchronize()
                        times.append(start.elapsed_time(end) / reps)
                    times.sort()
                    entry[name] = times[len(times) // 2]
            except RuntimeError as e:
                print(f"B{b}_L{l} {name}: refused ({str(e).splitlines()[0][:80]})", file=sys.stderr)
        res[f"B{b}_L{l}"] = entry
        print(f"B{b}_L{l}: " + ", ".join(f"{k} {v * 1e3:.1f} us" for k, v in entry.items()), file=sys.stderr)
        del kvs
        torch.cuda.empty_cache()
    with open(out_path, "w") as f:
        json.dump(res, f, indent=1)


if __name__ == "__main__":
    main()
