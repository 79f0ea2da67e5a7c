"""Try TAESD in a diffusers pipeline with no network and no downloads: a tiny SD 1.5-shaped pipeline
with random weights (tests/pipeline_configs.py builds it from local configs), TAESD as its VAE, a
4-step generation with live previews, then the pipeline saved and loaded back as a user would.
The images are noise (nothing is trained); the plumbing is the real one.

    python scripts/try_pipeline_offline.py -o try-pipeline/
"""
from __future__ import annotations

import argparse
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("-o", "--out", default="try-pipeline",
                   help="folder for previews, the image and the pipeline")
    args = p.parse_args(argv)
    sys.path.insert(0, str(ROOT / "tests"))
    import torch
    from diffusers import DiffusionPipeline

    import pipeline_configs as pc
    import taesd
    from taesd.integrations.diffusers import TaesdVAE
    from taesd.integrations.diffusers.preview import PreviewCallback
    out = Path(args.out)
    pipe = pc.sd15(out / "tokenizer")
    pipe.vae = TaesdVAE.from_taesd(taesd.create("taesd", seed=0))      # random TAESD: no download
    previews = PreviewCallback(pipe, taesd.create("taesd", seed=0), out_dir=out / "previews")
    image = pipe("a lighthouse", num_inference_steps=4, height=pc.SIZE, width=pc.SIZE, output_type="pil",
                 callback_on_step_end=previews, generator=torch.Generator().manual_seed(0)).images[0]
    image.save(out / "image.png")
    pipe.save_pretrained(out / "pipeline")                           # model_index.json: ["taesd", "TaesdVAE"]
    again = DiffusionPipeline.from_pretrained(out / "pipeline")       # loads: taesd is imported
    print(f"previews in {out / 'previews'}, image {out / 'image.png'}, pipeline {out / 'pipeline'} "
          f"(reloaded with vae {type(again.vae).__name__})")
    return 0


if __name__ == "__main__":
    sys.exit(main())
