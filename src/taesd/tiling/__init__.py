"""Seam-exact tiled encode/decode with bounded memory, in three steps:

    receptive   what each layer reads (the margin and alignment a tile needs), from the layer list
    plan        tile size, batch chunk and peak-memory estimate for a pass, within a budget
    execute     running a plan (layer by layer, or ``run_part`` per tile for other backends)
    memory      free host memory (MemAvailable capped by the cgroup) and the allocator under a budget

Tiling asks the model's executor two things only: ``executor.tile_alignment(conv)`` (the block size
a convolution runs in) and ``executor.memory_overhead`` (peak over counted activations).
"""
from taesd.tiling.execute import choose_plan, pass_of, run, untiled_pixels
from taesd.tiling.plan import Pass, Plan, estimate_peak, memory_overhead, plan, splits
from taesd.tiling.receptive import PartAnalysis, analyse, input_alignment, is_global

__all__ = ["Pass", "PartAnalysis", "Plan", "analyse", "choose_plan", "estimate_peak", "input_alignment",
           "is_global", "memory_overhead", "pass_of", "plan", "run", "splits", "untiled_pixels"]
