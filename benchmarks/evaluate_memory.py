"""Peak memory of `evaluate` as the number of importance samples K grows, in one run.

    python benchmarks/evaluate_memory.py
    python benchmarks/evaluate_memory.py --small 2 --large 3000

Each K is evaluated in a fresh process (a process's peak resident memory only grows), on 64 random images with a
small VAE whose latent has 512 dimensions, as the shipped model's 8x8x8 has. The noise is drawn and decoded
DECODE_CHUNK_IMAGES images at a time, so the peak should not grow with K beyond the first chunk. The last line
printed is one JSON object, with the ratio of the two peaks.
"""

import argparse
import json
import resource
import subprocess
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]


def measure(iw_samples):
    """(peak resident MB of this process, seconds) of one evaluate() at K = iw_samples."""
    import torch

    sys.path.insert(0, str(REPO))
    from datasets.batches import ImageBatches
    from vae.evaluation import evaluate
    from vae.vae import VAE

    torch.set_num_threads(1)
    torch.manual_seed(0)
    model = VAE((32, 32), latent_size=512, channels=[8, 8]).eval()
    images = torch.randint(0, 256, (64, 3, 32, 32), dtype=torch.uint8)
    started = time.perf_counter()
    evaluate(model, ImageBatches(images, 64, "cpu", shuffle=False), iw_samples=iw_samples,
             generator=torch.Generator().manual_seed(0))
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024, time.perf_counter() - started


def main():
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--small", type=int, default=64, help="the smaller K (one decoded chunk)")
    parser.add_argument("--large", type=int, default=1000, help="the larger K")
    parser.add_argument("--child", type=int, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.child:
        print(json.dumps(dict(zip(("peak_mb", "seconds"), measure(args.child)))))
        return
    results = {}
    for k in (args.small, args.large):
        output = subprocess.run([sys.executable, __file__, "--child", str(k)], capture_output=True, text=True,
                                check=True).stdout
        results[k] = json.loads(output.strip().splitlines()[-1])
        print(f"K={k}: peak resident {results[k]['peak_mb']:.0f} MB, {results[k]['seconds']:.1f} s")
    ratio = results[args.large]["peak_mb"] / results[args.small]["peak_mb"]
    print(f"peak at K={args.large} / peak at K={args.small}: {ratio:.2f}")
    print(json.dumps({"small": args.small, "large": args.large, "peak_mb": {str(k): v["peak_mb"]
                                                                            for k, v in results.items()},
                      "ratio": ratio}))


if __name__ == "__main__":
    main()
