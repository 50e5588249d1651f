"""Speed-up of --compile and --amp on the training step, measured in one run on the same batches.

    python benchmarks/speedups.py                      # auto device; --amp is measured on CUDA only
    python benchmarks/speedups.py --resolution 64 --batch-size 256

Each variant (eager float32, torch.compile, bf16 autocast, both) trains its own copy of the model on the same
random batch; the variants take turns for --rounds rounds and the best round counts, which damps interference
from other processes. Compilation happens before timing and its duration is reported separately. The last line
printed is one JSON object.
"""

import argparse
import json
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from vae.losses import ELBOLoss  # noqa: E402
from vae.training import pick_device  # noqa: E402
from vae.vae import VAE  # noqa: E402


def make_step(device, resolution, compile_model, amp):
    torch.manual_seed(0)
    model = VAE((resolution, resolution)).to(device)
    optimizer = torch.optim.Adam(model.parameters(), lr=1e-4)
    forward = torch.compile(model) if compile_model else model
    loss_fn = ELBOLoss(0.1)

    def step(x):
        with torch.autocast(device.type, dtype=torch.bfloat16, enabled=amp):
            outputs = forward(x)
        total = loss_fn(x, *(t.float() for t in outputs))[3]
        optimizer.zero_grad(set_to_none=True)
        total.backward()
        optimizer.step()
        return total
    return step


def synchronize(device):
    if device.type == "cuda":
        torch.cuda.synchronize()


def images_per_second(step, x, steps, device):
    synchronize(device)
    started = time.perf_counter()
    for _ in range(steps):
        step(x)
    synchronize(device)
    return steps * len(x) / (time.perf_counter() - started)


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                     formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    parser.add_argument("--device", default="auto", choices=("auto", "cpu", "cuda", "mps"))
    parser.add_argument("--resolution", type=int, default=32)
    parser.add_argument("--batch-size", type=int, default=64)
    parser.add_argument("--steps", type=int, default=50, help="timed steps per variant and round")
    parser.add_argument("--rounds", type=int, default=3)
    args = parser.parse_args(argv)
    device = pick_device(args.device)
    x = torch.rand(args.batch_size, 3, args.resolution, args.resolution, device=device)

    variants = {"eager": (False, False), "compile": (True, False)}
    if device.type == "cuda":
        variants.update({"amp": (False, True), "compile+amp": (True, True)})
    steps, compile_seconds = {}, {}
    for name, (compile_model, amp) in variants.items():
        steps[name] = make_step(device, args.resolution, compile_model, amp)
        started = time.perf_counter()
        for _ in range(3):  # compilation and warm-up
            steps[name](x)
        synchronize(device)
        compile_seconds[name] = time.perf_counter() - started
    best = {name: 0.0 for name in variants}
    for _ in range(args.rounds):
        for name in variants:
            best[name] = max(best[name], images_per_second(steps[name], x, args.steps, device))

    print(f"{device}, {args.resolution}x{args.resolution}, batch {args.batch_size}, best of {args.rounds} rounds")
    print(f"{'variant':<12} {'img/s':>10} {'speed-up':>9} {'warm-up s':>10}")
    for name in variants:
        print(f"{name:<12} {best[name]:>10.0f} {best[name] / best['eager']:>8.2f}x {compile_seconds[name]:>10.1f}")
    result = {"device": str(device), "torch": str(torch.__version__), **{f"{n}_img_s": round(v, 1) for n, v in best.items()},
              **{f"{n}_speedup": round(best[n] / best["eager"], 3) for n in variants if n != "eager"},
              "compile_warmup_s": round(compile_seconds["compile"], 1)}
    print(json.dumps(result))


if __name__ == "__main__":
    main()
