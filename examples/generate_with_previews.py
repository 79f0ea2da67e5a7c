"""Generate with a local diffusers pipeline folder and watch TAESD previews as it denoises.

    python examples/generate_with_previews.py ./stable-diffusion-v1-5 "a cat in a hat" -o out/
    python examples/generate_with_previews.py ./FLUX.2-dev "a lighthouse" --every 2 --x0 --show
    python examples/generate_with_previews.py ./sdxl "a fox" --taesd-vae     # the whole run on TAESD

Writes out/frame_NNN_step_SSS.png, out/preview.webp, out/contact_sheet.png and out/image.png.
TAESD weights come from --weights, else $TAESD_WEIGHTS, else the Hugging Face hub; the variant
is picked from the pipeline's family (its latent contract).
"""
from __future__ import annotations

import argparse
import sys
from pathlib import Path

import torch

import taesd
from taesd.integrations.diffusers.contracts import contract_for
from taesd.integrations.diffusers.preview import PreviewCallback
from taesd.integrations.diffusers.vae import use_taesd_vae


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0],
                                epilog=__doc__.split("\n\n")[1], formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("pipeline", help="a local diffusers pipeline folder (model_index.json inside)")
    p.add_argument("prompt")
    p.add_argument("-o", "--out", default="previews", help="folder for frames, animation and the image")
    p.add_argument("--steps", type=int, default=20)
    p.add_argument("--every", type=int, default=1, help="preview every N steps (the last one always)")
    p.add_argument("--size", type=int, default=None, help="image side in pixels (default: the pipeline's)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--x0", action="store_true", help="preview the predicted clean image, not the noisy sample")
    p.add_argument("--show", action="store_true", help="also show previews live in a matplotlib window")
    p.add_argument("--taesd-vae", action="store_true", help="decode the final image with TAESD too")
    p.add_argument("--weights", help="TAESD weight file or folder")
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--dtype", default="fp32", choices=["fp32", "fp16", "bf16"])
    return p.parse_args(argv)


def live_window():
    """A matplotlib window that shows each preview as it arrives."""
    import matplotlib.pyplot as plt
    plt.ion()
    fig, ax = plt.subplots()
    ax.axis("off")
    shown = {}

    def show(frame):
        if "img" not in shown:
            shown["img"] = ax.imshow(frame.image)
        else:
            shown["img"].set_data(frame.image)
        ax.set_title(f"step {frame.step + 1} ({frame.kind}, {frame.seconds * 1000:.0f} ms)")
        fig.canvas.draw_idle()
        plt.pause(0.001)

    return show


def main(argv=None) -> int:
    from diffusers import DiffusionPipeline
    args = parse_args(argv)
    dtype = {"fp32": torch.float32, "fp16": torch.float16, "bf16": torch.bfloat16}[args.dtype]
    pipe = DiffusionPipeline.from_pretrained(args.pipeline, torch_dtype=dtype, local_files_only=True)
    pipe.to(args.device)
    variant = contract_for(pipe).variant
    model = taesd.load(variant, weights=args.weights, device=args.device, dtype=dtype,
                       parts=("encoder", "decoder") if args.taesd_vae else "decoder")
    print(f"{type(pipe).__name__}: previews with {variant} ({contract_for(pipe).describe()})")
    if args.taesd_vae:
        use_taesd_vae(pipe, model)

    def report(frame):
        print(f"step {frame.step + 1}/{args.steps}: preview in {frame.seconds * 1000:.0f} ms")

    on_preview = report
    if args.show:
        window = live_window()
        on_preview = lambda frame: (report(frame), window(frame))  # noqa: E731

    size = {"height": args.size, "width": args.size} if args.size else {}
    generator = torch.Generator(args.device).manual_seed(args.seed)
    with PreviewCallback(pipe, model, every=args.every, show="x0" if args.x0 else "sample",
                         out_dir=args.out, on_preview=on_preview, **size) as preview:
        image = pipe(args.prompt, num_inference_steps=args.steps, generator=generator,
                     callback_on_step_end=preview, **size).images[0]
    out = Path(args.out) / "image.png"
    image.save(out)
    print(f"{preview.report()}\nwrote {out}, {Path(args.out) / 'preview.webp'}, "
          f"{Path(args.out) / 'contact_sheet.png'}")
    return 0


if __name__ == "__main__":
    try:
        sys.exit(main())
    except taesd.TaesdError as e:
        sys.exit(f"error: {e}")
