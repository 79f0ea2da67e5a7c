"""The speed benchmark: `python benchmarks/bench_speed.py [taesd bench options]`.

Same as `taesd bench`: every competitor (taesd's default and bf16 modes, the plain published
network, diffusers AutoencoderTiny, ONNX Runtime, the full SD VAE) in its own process, called in
turns; writes benchmarks/RESULTS.md. See docs/performance.md.
"""
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "src"))

from taesd.cli import main  # noqa: E402

if __name__ == "__main__":
    sys.exit(main(["bench", *sys.argv[1:]]))
