"""Training-step speed of the shipped recipe's model against the models before it, in one run.

    python benchmarks/step_speed.py
    python benchmarks/step_speed.py --seconds 3 --rounds 5 --no-hog

For each model: its parameters, the FLOPs of one training step per image (forward and backward, counted by
torch.utils.flop_counter), and its training steps per second as images/s (Adam, batch 64, the loss in float32) at
1 thread and at all cores, in float32 and under bf16 autocast. The achieved rate (GFLOP/s) is given as a share of
what a large float32 matmul reaches on the same threads, the ceiling the convolutions' GEMMs aim at. Every
measurement is taken idle and beside a CPU hog (a process spinning on one core), as a shared machine is.

Models:
  tutorial      the tutorial's defaults (32x32, latent 10, fixed-sigma Gaussian)
  resnet        the residual model of the recipe before space-to-depth: width 32, one block per stage, stages at
                32, 16 and 8 px, latent 8x8x8, logistic (trained in float32)
  recipe        recipes/flowers32.json: space-to-depth stem, stages at 16 and 8 px of 48 and 64 channels with 1 and
                3 blocks, the same latent and likelihood (trained under bf16 autocast)

Rounds alternate between the models, and the median of --rounds rounds is reported, which damps interference from
other processes. The last line printed is one JSON object.
"""

import argparse
import dataclasses
import json
import multiprocessing
import sys
import time
from pathlib import Path

import torch
from torch.utils.flop_counter import FlopCounterMode

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from vae.config import TrainConfig  # noqa: E402
from vae.losses import ELBOLoss  # noqa: E402
from vae.threads import available_cores  # noqa: E402
from vae.training import Optimization, amp_in_effect, step_loss, training_step_probe  # noqa: E402
from vae.vae import build_model  # noqa: E402
from vae_training import parse_args  # noqa: E402

RECIPE = Path(__file__).resolve().parent.parent / "recipes" / "flowers32.json"


def model_configs():
    recipe = parse_args(["--config", str(RECIPE)])[0]
    resnet = dataclasses.replace(recipe, space_to_depth=False, stage_channels=None, stage_blocks=None, amp=False)
    return {"tutorial": TrainConfig(), "resnet": resnet, "recipe": recipe}


def step_flops(config, x):
    """FLOPs per image of one forward and backward pass."""
    model = build_model(config)
    work = training_step_probe(model, x, dataclasses.replace(config, amp=False))
    with FlopCounterMode(display=False) as counter:
        work()
    return counter.get_total_flops() / len(x)


def make_step(config, x, amp):
    """A full training step (forward, loss, backward, Adam, EMA) of a fresh model: what vae_training.py runs."""
    torch.manual_seed(0)
    model = build_model(config)
    optimization = Optimization(model, dataclasses.replace(config, amp=amp), steps_per_epoch=1000)
    loss_fn = ELBOLoss(config.beta, model.likelihood)
    x = x.contiguous(memory_format=optimization.input_format)

    def step():
        optimization.step(model, step_loss(model, x, loss_fn, amp)[2])
    return step


def images_per_second(step, batch_size, seconds):
    step()  # warm-up
    count, start = 0, time.perf_counter()
    while time.perf_counter() - start < seconds:
        step()
        count += 1
    return count * batch_size / (time.perf_counter() - start)


def matmul_gflops(seconds, size=2048, dtype=torch.float32):
    a, b = torch.randn(size, size, dtype=dtype), torch.randn(size, size, dtype=dtype)
    a @ b
    count, start = 0, time.perf_counter()
    while time.perf_counter() - start < seconds:
        a @ b
        count += 1
    return 2 * size ** 3 * count / (time.perf_counter() - start) / 1e9


def spin(stop):
    while not stop.is_set():
        pass


def measure(configs, flops, args, thread_counts):
    """{threads: {"matmul_gflops": ..., name: {"float32_img_s", "bf16_img_s"}}} at each thread count."""
    x = torch.rand(args.batch_size, 3, 32, 32)
    results = {}
    for threads in thread_counts:
        torch.set_num_threads(threads)
        steps = {(name, amp): make_step(config, x, amp) for name, config in configs.items() for amp in (False, True)}
        rates = {key: [] for key in steps}
        matmul = []
        for _ in range(args.rounds):
            matmul.append(matmul_gflops(args.seconds / 2))
            for key, step in steps.items():
                rates[key].append(images_per_second(step, args.batch_size, args.seconds))
        median = lambda values: sorted(values)[len(values) // 2]  # noqa: E731
        entry = {"matmul_gflops": median(matmul)}
        for name in configs:
            float32, bf16 = median(rates[(name, False)]), median(rates[(name, True)])
            entry[name] = {"float32_img_s": float32, "bf16_img_s": bf16,
                           "float32_share_of_matmul": float32 * flops[name] / 1e9 / entry["matmul_gflops"]}
        results[threads] = entry
    return results


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                     formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    parser.add_argument("--batch-size", type=int, default=64)
    parser.add_argument("--seconds", type=float, default=2.0, help="seconds per measurement and round")
    parser.add_argument("--rounds", type=int, default=3, help="rounds; the median is reported")
    parser.add_argument("--hog", action=argparse.BooleanOptionalAction, default=True,
                        help="also measure beside a process spinning on one core")
    args = parser.parse_args(argv)

    configs = model_configs()
    x = torch.rand(args.batch_size, 3, 32, 32)
    flops = {name: step_flops(config, x) for name, config in configs.items()}
    params = {name: sum(p.numel() for p in build_model(config).parameters()) for name, config in configs.items()}
    cores = available_cores()
    thread_counts = sorted({1, cores})
    conditions = {"idle": measure(configs, flops, args, thread_counts)}
    if args.hog:
        stop = multiprocessing.Event()
        hog = multiprocessing.Process(target=spin, args=(stop,), daemon=True)
        hog.start()
        try:
            conditions["beside_a_hog"] = measure(configs, flops, args, thread_counts)
        finally:
            stop.set()
            hog.join()

    recipe_amp = amp_in_effect(configs["recipe"], torch.device("cpu"))  # what the recipe runs on this CPU
    print(f"{'model':<9} {'params':>9} {'GFLOP/img':>9}   " + "   ".join(
        f"{condition} {threads}t fp32 / bf16 img/s" for condition in conditions for threads in thread_counts))
    for name in configs:
        cells = [f"{r[threads][name]['float32_img_s']:6.0f} / {r[threads][name]['bf16_img_s']:6.0f}"
                 for r in conditions.values() for threads in thread_counts]
        print(f"{name:<9} {params[name]:>9,} {flops[name] / 1e9:>9.3f}   " + "   ".join(f"{c:>27}" for c in cells))
    ratios = {}
    for condition, by_threads in conditions.items():
        for threads, entry in by_threads.items():
            recipe = entry["recipe"]["bf16_img_s" if recipe_amp else "float32_img_s"]
            ratios[f"{condition}_{threads}t"] = {
                "recipe_over_resnet": recipe / entry["resnet"]["float32_img_s"],
                "recipe_over_resnet_same_precision":
                    entry["recipe"]["float32_img_s"] / entry["resnet"]["float32_img_s"],
                "matmul_gflops": entry["matmul_gflops"]}
            print(f"{condition}, {threads} thread(s): recipe ({'bf16' if recipe_amp else 'float32'}) / resnet "
                  f"(float32) = {ratios[f'{condition}_{threads}t']['recipe_over_resnet']:.2f}x; in float32 both: "
                  f"{ratios[f'{condition}_{threads}t']['recipe_over_resnet_same_precision']:.2f}x; matmul "
                  f"{entry['matmul_gflops']:.0f} GFLOP/s, resnet at "
                  f"{100 * entry['resnet']['float32_share_of_matmul']:.0f}% of it, recipe at "
                  f"{100 * entry['recipe']['float32_share_of_matmul']:.0f}% (float32)")
    print(json.dumps({"cores": cores, "torch": str(torch.__version__),
                      "native_bf16": bool(getattr(torch.cpu, "_is_avx512_bf16_supported", lambda: False)()),
                      "params": params, "gflop_per_image": {k: v / 1e9 for k, v in flops.items()},
                      "conditions": conditions, "ratios": ratios}))


if __name__ == "__main__":
    main()
