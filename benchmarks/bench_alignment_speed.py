"""Time permutation alignment of one pair of Mixtral-sized experts (hidden 4096, intermediate 14336).

Runs the library path used by the merging methods (`align_groups`: unit features from the family spec, score
matrix, assignment solver, in-place permutation) on a two-expert fused Mixtral layer in bfloat16:

- `planted`: expert B is a hidden-unit permutation of A plus Gaussian noise (`--noise` relative to the weights),
  the situation of experts upcycled from one dense FFN (Mixtral); reports how many units were matched back.
- `independent`: A and B drawn independently, the solver's worst case (nothing to recover).

Prints wall time and process CPU time (all threads); on a shared machine the wall time of the slower solver
phases is inflated by other load, CPU time / threads is what the pair takes on dedicated cores.

    python benchmarks/bench_alignment_speed.py                 # both cases, defaults (sketch auto, solver auto)
    python benchmarks/bench_alignment_speed.py --sketch none   # exact float32 score matrix (5 TFLOP)
"""

from __future__ import annotations

import argparse
import time

import torch
from torch import nn

from hf_moeprune.families import family_for_model_type
from hf_moeprune.methods.merging import align_groups, num_units
from hf_moeprune.methods.merging.alignment import expert_parameter
from hf_moeprune.moe_layers import MoELayer


def mixtral_pair(hidden: int, intermediate: int, case: str, noise: float, seed: int):
    generator = torch.Generator().manual_seed(seed)
    scale = hidden**-0.5
    gate_up = torch.randn(2, 2 * intermediate, hidden, generator=generator) * scale
    down = torch.randn(2, hidden, intermediate, generator=generator) * scale
    block = nn.Module()
    block.gate = nn.Linear(hidden, 2, bias=False)
    block.experts = nn.Module()
    block.experts.gate_up_proj = nn.Parameter(gate_up.bfloat16(), requires_grad=False)
    block.experts.down_proj = nn.Parameter(down.bfloat16(), requires_grad=False)
    del gate_up, down
    layer = MoELayer(path="model.layers.0.mlp", block=block, spec=family_for_model_type("mixtral"))
    perm = None
    if case == "planted":
        perm = torch.randperm(intermediate, generator=generator)
        with torch.no_grad():
            for tensor in layer.expert_tensor_specs():
                a = expert_parameter(layer, tensor, 0)
                expert_parameter(layer, tensor, 1).copy_(
                    a + noise * scale * torch.randn(a.shape, generator=generator)
                )
            from hf_moeprune.methods.merging import permute_expert_units

            permute_expert_units(layer, 1, perm)
    return layer, perm


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description="Time the alignment of one Mixtral-sized expert pair.")
    parser.add_argument("--hidden", type=int, default=4096)
    parser.add_argument("--intermediate", type=int, default=14336)
    parser.add_argument(
        "--cases", nargs="+", default=["planted", "independent"], choices=["planted", "independent"]
    )
    parser.add_argument(
        "--noise", type=float, default=0.5, help="Noise std relative to the weights' std (planted)."
    )
    parser.add_argument("--sketch", default="auto", help="'auto', 'none' or a CountSketch width.")
    parser.add_argument("--solver", default="auto", choices=["auto", "lapjv", "scipy"])
    parser.add_argument("--threads", type=int, default=2)
    args = parser.parse_args(argv)
    torch.set_num_threads(args.threads)
    sketch = None if args.sketch == "none" else (args.sketch if args.sketch == "auto" else int(args.sketch))
    for case in args.cases:
        layer, perm = mixtral_pair(args.hidden, args.intermediate, case, args.noise, seed=0)
        wall, cpu = time.perf_counter(), time.process_time()
        (report,) = align_groups(layer, [[0, 1]], mode="weights", sketch_dim=sketch, solver=args.solver)
        wall, cpu = time.perf_counter() - wall, time.process_time() - cpu
        line = (
            f"{case}: hidden {args.hidden}, intermediate {num_units(layer)}, sketch {args.sketch}, solver {args.solver}: "
            f"wall {wall:.1f} s, CPU {cpu:.1f} s ({cpu / args.threads:.1f} s per thread), "
            f"matched score {report.score_after:.4g} (identity order {report.score_before:.4g})"
        )
        if perm is not None:
            a = torch.cat([t[0].float().flatten() for t in layer.expert_tensors().values()])
            b = torch.cat([t[1].float().flatten() for t in layer.expert_tensors().values()])
            line += f", relative distance B-A after alignment {((a - b).norm() / a.norm()).item():.3f} (noise floor {args.noise:.3f})"
        print(line, flush=True)
        del layer


if __name__ == "__main__":
    main()
