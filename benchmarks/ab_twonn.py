"""Time `two_nn` of whichever surgery is importable on saved arrays, for A/B runs across code versions.

    python benchmarks/ab_twonn.py --save DIR          # writes DIR/linear.npy, DIR/curved.npy (bench_twonn's data)
    PYTHONPATH=<tree> python benchmarks/ab_twonn.py DIR/linear.npy DIR/curved.npy   # one process per version

Run from outside the checkout so that the tree on PYTHONPATH is the one imported; alternate the versions over
several rounds (this machine's speed drifts) and compare medians. Prints, per array, the median of 3 runs in
seconds and the estimate.
"""
import statistics
import sys
import time
import warnings
from pathlib import Path

import numpy as np
import torch

if sys.argv[1:2] == ["--save"]:
    out, rng, (n, d) = Path(sys.argv[2]), np.random.default_rng(0), (4000, 2048)
    out.mkdir(parents=True, exist_ok=True)
    X = rng.normal(size=(n, 12)) @ rng.normal(size=(12, d))
    np.save(out / "linear.npy", X + 0.01 * X.std() * rng.normal(size=X.shape))
    rng = np.random.default_rng(0)
    np.save(out / "curved.npy", np.cos(rng.normal(size=(n, 12)) @ rng.normal(size=(12, d)) + rng.uniform(0, 6.3, d)))
    sys.exit()

from surgery.intrinsic import two_nn  # noqa: E402

warnings.simplefilter("ignore")
for name in sys.argv[1:]:
    X = torch.from_numpy(np.load(name))
    times = []
    for _ in range(3):
        t = time.perf_counter()
        r = two_nn(X, device="cpu", bootstrap=1)
        times.append(time.perf_counter() - t)
    print(f"{Path(name).stem}: {statistics.median(times):.4f} s, ID {r.dimension:.8f}")
