"""Fitting speed of the latent diffusion prior: the flat denoiser of earlier fits against the U-Net, at the
latents of flowers32 (8x8x8) and flowers64 (8x16x16), in one run; and the share of this CPU's matmul rate that
each denoiser's step and the VAE recipe's step reach, in the dtype each runs in as fitted (bf16 where the CPU has
it natively, else float32: emulated bf16 is no measure of the hardware).

    python benchmarks/denoiser_speed.py
    python benchmarks/denoiser_speed.py --seconds 3 --rounds 5 --threads 1 2
    python benchmarks/denoiser_speed.py --threads 1 --compile   # also under torch.compile
    python benchmarks/denoiser_speed.py --threads 2 --batch 512  # a larger batch: fewer, larger operations

For each latent shape and design: parameters, FLOPs of one training step (forward and backward at batch 128, or
--batch, counted by torch.utils.flop_counter) and fitting steps per second (the fit's own loss, Adam step and moving
average, as vae.diffusion_prior fits it), in float32 and, where the CPU has bf16 natively, under bf16 autocast
(elsewhere bf16 is emulated, many times slower, and not timed). A design's own setting (flat: the float32 of
earlier fits; unet: bf16 where this CPU has it natively) gives its "as fitted" rate, and the ratio unet / flat is
of those. Rounds alternate between the designs and the median of --rounds is reported, which
damps interference from other processes. Loss against fitting minutes, and the sample FID that decides the
recipe's step count, are benchmarks/prior_curve.py's. The last line printed is one JSON object.
"""

import argparse
import json
import sys
from pathlib import Path

import torch
from torch.utils.flop_counter import FlopCounterMode

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from benchmarks.step_speed import (images_per_second, make_step, matmul_gflops, model_configs,  # noqa: E402
                                   step_flops)
from vae.denoisers import build_denoiser  # noqa: E402
from vae.device import native_bf16  # noqa: E402
from vae.diffusion_prior import ARCHITECTURE_DEFAULTS, denoising_loss  # noqa: E402
from vae.fitting import make_ema  # noqa: E402
from vae.training import amp_in_effect  # noqa: E402

SHAPES = {"flowers32": (8, 8, 8), "flowers64": (8, 16, 16)}
DESIGNS = {"flat": {"amp": False, "min_snr": False}, "unet": {"amp": True, "min_snr": True}}
BATCH = 128
TORCH_DTYPES = {"float32": torch.float32, "bf16": torch.bfloat16}


def make_fit_step(architecture, shape, amp, min_snr, channels_last=False, compiled=False, batch=BATCH):
    """One step of the prior's fit on random standardised latents: v loss, Adam, moving average; with compiled,
    the network's forward and backward through torch.compile (compiled at once, by three warm-up steps)."""
    torch.manual_seed(0)
    options = {key: value for key, value in ARCHITECTURE_DEFAULTS[architecture].items() if key != "lr"}
    network = build_denoiser(architecture, shape[0], shape[1:], **options)
    memory_format = torch.channels_last if channels_last else torch.contiguous_format
    network = network.to(memory_format=memory_format)
    average = make_ema(network, 0.999)
    optimizer = torch.optim.Adam(network.parameters(), lr=1e-4)
    u0, eps = (torch.randn(batch, *shape).contiguous(memory_format=memory_format) for _ in range(2))

    forward = torch.compile(network, dynamic=False) if compiled else network

    def step():
        loss = denoising_loss(forward, u0, torch.rand(batch), eps, amp, min_snr)
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
        average.update_parameters(network)
    if compiled:
        for _ in range(3):
            step()
    return network, step


def flops_of(network, shape, batch=BATCH):
    with FlopCounterMode(display=False) as counter:
        network(torch.randn(batch, *shape), torch.rand(batch)).sum().backward()
    return counter.get_total_flops()


def format_rate(steps_s):
    return "    -" if steps_s is None else f"{steps_s:5.2f}"


def rate(step, seconds):
    """Calls of step() per second."""
    return images_per_second(step, 1, seconds)


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                     formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    parser.add_argument("--seconds", type=float, default=3.0, help="seconds per measurement and round")
    parser.add_argument("--rounds", type=int, default=3, help="rounds; the median is reported")
    parser.add_argument("--threads", type=int, nargs="+", default=[1, 2])
    parser.add_argument("--batch", type=int, default=BATCH, help="latents per fitting step (the fits use 128)")
    parser.add_argument("--compile", action="store_true",
                        help="also time the U-Net as fitted under torch.compile (a minute or two of compilation)")
    args = parser.parse_args(argv)
    bf16 = native_bf16()
    # Without native bf16 the CPU emulates it, many times slower than float32: timing it would measure the
    # emulation (and take most of the run), so only float32 is timed there.
    amps = (False, True) if bf16 else (False,)
    dtypes = ("float32", "bf16") if bf16 else ("float32",)
    median = lambda values: sorted(values)[len(values) // 2]  # noqa: E731

    vae_config = model_configs()["recipe"]
    vae_x = torch.rand(64, 3, 32, 32)
    vae_amp = amp_in_effect(vae_config, torch.device("cpu"))
    vae_flops = step_flops(vae_config, vae_x) * len(vae_x)
    results = {"native_bf16": bf16, "torch": str(torch.__version__), "batch": args.batch, "by_threads": {}}
    for threads in args.threads:
        torch.set_num_threads(threads)
        steps, flops, params = {}, {}, {}
        for shape_name, shape in SHAPES.items():
            for design in DESIGNS:
                for amp in amps:
                    network, steps[(shape_name, design, amp)] = make_fit_step(
                        design, shape, amp, DESIGNS[design]["min_snr"], batch=args.batch)
                flops[(shape_name, design)] = flops_of(network, shape, args.batch)
                params[(shape_name, design)] = sum(p.numel() for p in network.parameters())
            # NHWC layout, a common lever for convolutions on CPUs, here for the U-Net as fitted.
            steps[(shape_name, "unet_channels_last", bf16)] = make_fit_step("unet", shape, bf16, True, True,
                                                                                  batch=args.batch)[1]
            if args.compile:
                steps[(shape_name, "unet_compiled", bf16)] = make_fit_step("unet", shape, bf16, True,
                                                                           compiled=True, batch=args.batch)[1]
        steps[("vae", "recipe", vae_amp)] = make_step(vae_config, vae_x, vae_amp)
        measured = {key: [] for key in steps}
        matmul = {dtype: [] for dtype in dtypes}
        for _ in range(args.rounds):
            for dtype in dtypes:
                matmul[dtype].append(matmul_gflops(args.seconds / 2, dtype=TORCH_DTYPES[dtype]))
            for key, step in steps.items():
                measured[key].append(rate(step, args.seconds))
        peak = {dtype: median(values) for dtype, values in matmul.items()}
        entry = {"matmul_gflops": peak}
        for shape_name in SHAPES:
            row = {}
            for design, settings in DESIGNS.items():
                as_fitted = settings["amp"] and bf16
                float32, bf16_rate = (median(measured[(shape_name, design, amp)]) if amp in amps else None
                                      for amp in (False, True))
                achieved = (bf16_rate if as_fitted else float32) * flops[(shape_name, design)] / 1e9
                dtype = "bf16" if as_fitted else "float32"
                row[design] = {"params": params[(shape_name, design)],
                               "gflop_per_step": flops[(shape_name, design)] / 1e9,
                               "float32_steps_s": float32, "bf16_steps_s": bf16_rate,
                               "as_fitted_steps_s": bf16_rate if as_fitted else float32, "as_fitted_dtype": dtype,
                               "as_fitted_share_of_matmul": achieved / peak[dtype]}
            row["unet_over_flat"] = row["unet"]["as_fitted_steps_s"] / row["flat"]["as_fitted_steps_s"]
            row["unet_channels_last_steps_s"] = median(measured[(shape_name, "unet_channels_last", bf16)])
            if args.compile:
                row["unet_compiled_steps_s"] = median(measured[(shape_name, "unet_compiled", bf16)])
                row["compiled_over_eager"] = row["unet_compiled_steps_s"] / row["unet"]["as_fitted_steps_s"]
            entry[shape_name] = row
        vae_rate = median(measured[("vae", "recipe", vae_amp)])
        vae_dtype = "bf16" if vae_amp else "float32"
        entry["vae_recipe"] = {"amp": vae_amp, "img_s": vae_rate * len(vae_x), "dtype": vae_dtype,
                               "share_of_matmul": vae_rate * vae_flops / 1e9 / peak[vae_dtype]}
        results["by_threads"][threads] = entry
        print(f"{threads} thread(s): matmul {peak['float32']:.0f} GFLOP/s float32, "
              + (f"{peak['bf16']:.0f} bf16" if bf16 else "bf16 not native here (not timed)"))
        for shape_name in SHAPES:
            row = entry[shape_name]
            for design in DESIGNS:
                cell = row[design]
                print(f"  {shape_name} {design:<5} {cell['params']:>9,} params {cell['gflop_per_step']:6.1f} GFLOP/step"
                      f"  float32 {cell['float32_steps_s']:5.2f}  bf16 {format_rate(cell['bf16_steps_s'])} steps/s;"
                      f" as fitted {100 * cell['as_fitted_share_of_matmul']:.0f}% of the {cell['as_fitted_dtype']}"
                      f" matmul rate")
            print(f"  {shape_name}: the U-Net fits {row['unet_over_flat']:.2f}x the flat network's steps per second; "
                  f"in channels_last {row['unet_channels_last_steps_s']:.2f} steps/s")
            if args.compile:
                print(f"  {shape_name}: under torch.compile the U-Net fits {row['unet_compiled_steps_s']:.2f} steps/s, "
                      f"{row['compiled_over_eager']:.2f}x its eager rate")
        print(f"  VAE recipe step ({vae_dtype}): {entry['vae_recipe']['img_s']:.0f} img/s, "
              f"{100 * entry['vae_recipe']['share_of_matmul']:.0f}% of the {vae_dtype} matmul rate")
    print(json.dumps(results))


if __name__ == "__main__":
    main()
