"""Host memory (RSS) kept per staging transfer, for each way a swap can copy an expert to the device.

  python benchmarks/rss_staging.py --transfers 20000

An expert of switch-base-64's shape (wi [1, 768, 3072], bfloat16) is copied `--transfers` times by:
  pinned row       `jax.device_put` of one pinned-host array (staging="transfer", one array);
  pinned pair      `jax.device_put` of the (wi, wo) pair (what one swap of staging="transfer" copies);
  numpy            `jax.device_put` of a numpy array (staging="pageable", the default);
  jitted gather    the store's `_gather_rows` out of a stacked pinned bank (staging="gather", exact policies).
RSS is read after handing free heap back to the OS (glibc `malloc_trim`), at each quarter of the run,
relative to the start (after 200 warm-up transfers). A figure that keeps growing with the count is
memory the runtime keeps per transfer; one that steps once and stays is a pool filling.
"""

from __future__ import annotations

import argparse
import os
import sys
import time

import numpy as np

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))


def main(argv=None) -> int:
  p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
  p.add_argument("--transfers", type=int, default=20000)
  args = p.parse_args(argv)
  if args.transfers < 4:
    p.error("--transfers must be at least 4")

  import jax
  import ml_dtypes
  from jax.sharding import SingleDeviceSharding

  from soak import rss_bytes
  from swapmoe_jax.serving.store import _gather_rows, host_memory_kind

  mib = 2**20
  dev = jax.devices()[0]
  kind = host_memory_kind(dev)
  if kind is None:
    print(f"error: {dev.platform} has no pinned host memory", file=sys.stderr)
    return 1
  host, on_dev = SingleDeviceSharding(dev, memory_kind=kind), SingleDeviceSharding(dev)
  experts = np.random.default_rng(0).standard_normal((8, 768, 3072), np.float32).astype(ml_dtypes.bfloat16)
  rows = [jax.device_put(experts[e:e + 1], host) for e in range(8)]
  bank = jax.device_put(experts, host)
  cases = {
      "pinned row": lambda i: jax.device_put(rows[i % 8], on_dev),
      "pinned pair": lambda i: jax.device_put((rows[i % 8], rows[(i + 1) % 8]), on_dev),
      "numpy": lambda i: jax.device_put(experts[i % 8:i % 8 + 1], on_dev),
      "jitted gather": lambda i: _gather_rows((bank,), (bank,), jax.device_put(np.array([i % 8], np.int32), on_dev)),
  }
  print(f"{dev.device_kind}, jax {jax.__version__}, {args.transfers} transfers per case", flush=True)
  print(f"{'case':<15}{'RSS growth MiB at each quarter':>34}{'KiB/transfer':>14}{'s':>6}")
  for name, copy in cases.items():
    for i in range(200):
      copy(i)
    jax.block_until_ready(copy(0))
    start, t = rss_bytes(), time.perf_counter()
    marks = []
    for i in range(args.transfers):
      out = copy(i)
      if i % 64 == 0:  # bound the transfers in flight
        jax.block_until_ready(out)
      if (i + 1) % (args.transfers // 4) == 0:
        jax.block_until_ready(out)
        marks.append((rss_bytes() - start) / mib)
    per = 1024 * (marks[-1] - marks[0]) / (args.transfers - args.transfers // 4)
    print(f"{name:<15}{'  '.join(f'{m:7.2f}' for m in marks):>34}{per:>14.2f}{time.perf_counter() - t:>6.1f}",
          flush=True)
  return 0


if __name__ == "__main__":
  sys.exit(main())
