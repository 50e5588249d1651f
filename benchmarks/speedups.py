"""Speed-up of bf16 autocast (--amp) and torch.compile (--compile) on the training step of a recipe's model,
measured in one run on the same batch.

    python benchmarks/speedups.py --config recipes/flowers32.json --device cpu
    python benchmarks/speedups.py --config recipes/flowers32.json --device cuda --compile

Each variant (float32, bf16 autocast, and with --compile their compiled twins) trains its own copy of the
model, in the memory format training uses, on the same random batch; the variants take turns for --rounds
rounds and the best round counts, which damps interference from other processes. Warm-up (and compilation)
happens before timing and its duration is reported separately. The last line printed is one JSON object with
float32_img_s and bf16_img_s.
"""

import argparse
import json
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from vae.device import DEVICES, pick_device  # noqa: E402
from vae.losses import ELBOLoss  # noqa: E402
from vae.training import make_optimizer, memory_format, step_loss  # noqa: E402
from vae.vae import build_model  # noqa: E402
from vae_training import parse_args  # noqa: E402


def make_step(config, device, compile_model, amp):
    torch.manual_seed(0)
    fmt = memory_format(config, device)
    model = build_model(config).to(device, memory_format=fmt)
    optimizer = make_optimizer(model, config)
    forward = torch.compile(model) if compile_model else model
    loss_fn = ELBOLoss(config.beta, model.likelihood, config.free_bits)

    def step(x):
        x = x.contiguous(memory_format=fmt)
        total = step_loss(forward, x, loss_fn, amp)[2]
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
    parser.add_argument("--config", default="", help="a recipe's settings file (default: the tutorial's model)")
    parser.add_argument("--device", default="auto", choices=DEVICES)
    parser.add_argument("--batch-size", type=int, default=0, help="images per step (0: the recipe's)")
    parser.add_argument("--steps", type=int, default=20, help="timed steps per variant and round")
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--compile", action="store_true", help="also measure torch.compile'd variants")
    args = parser.parse_args(argv)
    config = parse_args(["--config", args.config] if args.config else [])[0]
    device = pick_device(args.device)
    batch_size = args.batch_size or config.batch_size
    x = torch.rand(batch_size, 3, config.resolution, config.resolution, device=device)

    variants = {"float32": (False, False), "bf16": (False, True)}
    if args.compile:
        variants.update({"compile_float32": (True, False), "compile_bf16": (True, True)})
    steps, warmup_seconds = {}, {}
    for name, (compile_model, amp) in variants.items():
        steps[name] = make_step(config, device, compile_model, amp)
        started = time.perf_counter()
        for _ in range(3):
            steps[name](x)
        synchronize(device)
        warmup_seconds[name] = time.perf_counter() - started
    best = {name: 0.0 for name in variants}
    for _ in range(args.rounds):
        for name in variants:
            best[name] = max(best[name], images_per_second(steps[name], x, args.steps, device))

    print(f"{device}, {args.config or 'seed defaults'}: {config.arch} model, {config.resolution}x{config.resolution}, "
          f"batch {batch_size}, best of {args.rounds} rounds of {args.steps} steps")
    print(f"{'variant':<16} {'img/s':>10} {'vs float32':>11} {'warm-up s':>10}")
    for name in variants:
        print(f"{name:<16} {best[name]:>10.0f} {best[name] / best['float32']:>10.2f}x {warmup_seconds[name]:>10.1f}")
    result = {"device": str(device), "config": args.config or None, "torch": str(torch.__version__),
              "batch_size": batch_size, **{f"{n}_img_s": round(v, 1) for n, v in best.items()},
              **{f"{n}_speedup": round(best[n] / best["float32"], 3) for n in variants if n != "float32"}}
    print(json.dumps(result))


if __name__ == "__main__":
    main()
