"""Seam-exact tiled encode/decode with bounded memory, in three steps:

    receptive   what each layer reads (the margin and alignment a tile needs), from the layer list
    planner     tile size, batch chunk and peak-memory estimate for a pass, within a budget
    runner      running a plan (layer by layer, or ``run_part`` per tile for other backends)
    memory      free host memory (MemAvailable capped by the cgroup) and the allocator under a budget

Tiling asks the model's executor two things only: ``executor.tile_alignment(conv)`` (the block size
a convolution runs in) and ``executor.memory_overhead`` (peak over counted activations).
"""
from taesd.tiling.planner import Pass, Plan, check_options, estimate_peak, memory_overhead, plan, splits
from taesd.tiling.receptive import PartAnalysis, analyse, input_alignment, is_global
from taesd.tiling.runner import choose_plan, pass_of, run, untiled_pixels

__all__ = ["Pass", "PartAnalysis", "Plan", "analyse", "check_options", "choose_plan", "estimate_peak",
           "input_alignment", "is_global", "memory_overhead", "pass_of", "plan", "run", "splits",
           "untiled_pixels"]
