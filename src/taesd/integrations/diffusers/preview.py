"""Live previews for diffusers pipelines: a ``callback_on_step_end`` that decodes with TAESD.

    from taesd.integrations.diffusers.preview import PreviewCallback
    preview = PreviewCallback(pipe, every=2, out_dir="previews/")   # taesd.load(...) for the family
    image = pipe(prompt, callback_on_step_end=preview).images[0]
    print(preview.report())                                        # preview cost per step

Every ``every`` steps (and at the last step) the pipeline's latents are converted by the family's
latent contract (unpacked, FLUX.2 unpatchified), decoded by TAESD, resized to ``max_size`` and
handed to ``on_preview`` and/or saved as numbered frames; at the last step an animated WebP/GIF
and a contact sheet are written. A failing preview never breaks the generation: it is logged
once and previews stop (``raise_errors=True`` re-raises instead).
"""
from __future__ import annotations

import logging
import math
import statistics
import time
from dataclasses import dataclass
from pathlib import Path

import torch
from PIL import Image, ImageDraw

from taesd.errors import TaesdError
from taesd.integrations.diffusers.contracts import LatentContract, contract_for, pipeline_to_taesd
from taesd.io.files import atomic_path
from taesd.io.images import tensor_to_pil
from taesd.value_checks import raise_pending

log = logging.getLogger("taesd.integrations.diffusers.preview")


@dataclass
class PreviewFrame:
    step: int                 # 0-based denoising step that just finished
    timestep: float
    latents: torch.Tensor     # what TAESD decoded: N x C x h x w in its convention
    images: torch.Tensor      # N x 3 x H x W in [0, 1], at TAESD's full resolution
    image: Image.Image        # what is shown/saved: the first image or the batch grid, <= max_size
    kind: str                 # "sample" or "x0"
    seconds: float            # what this preview cost (convert + decode + deliver + write)


class PreviewCallback:
    """A diffusers ``callback_on_step_end`` that shows what is being generated.

    pipe: the pipeline (recommended at construction: it lets the callback see the scheduler's
      predicted clean image and the transformer's position ids from the first step on).
    taesd: a loaded TAESD decoder (default: the pipeline's own ``TaesdVAE`` when it has one, else
      ``taesd.load`` of the pipeline family's variant).
    every: preview every N steps (the last step is always previewed).
    batch: "first" (the first image) or "all" (the whole batch as a grid).
    max_size: longest side of a preview frame in pixels (None: TAESD's full size).
    show: "sample" (the current noisy latent) or "x0" (the predicted clean image, where the
      scheduler exposes it; FlowMatch schedulers: x_t - sigma * v; otherwise falls back to sample).
    on_preview: called with a ``PreviewFrame`` for every preview.
    out_dir: where to write frame_NNN_step_SSS.png, the animation and contact_sheet.png.
    animation: "webp", "gif" or None.
    height, width: the image size the pipeline is called with (only needed for packed FLUX
      latents of non-square images when the callback cannot see the position ids).
    """

    tensor_inputs = ["latents"]

    def __init__(self, pipe=None, taesd=None, *, variant: str | None = None, every: int = 1,
                 batch: str = "first", max_size: int | None = 512, show: str = "sample",
                 on_preview=None, out_dir=None, animation: str | None = "webp",
                 contact_sheet: bool = True, raise_errors: bool = False,
                 height: int | None = None, width: int | None = None):
        if every < 1:
            raise TaesdError(f"every must be 1 or more steps, not {every}")
        if batch not in ("first", "all"):
            raise TaesdError(f"batch must be 'first' or 'all', not {batch!r}")
        if show not in ("sample", "x0"):
            raise TaesdError(f"show must be 'sample' or 'x0', not {show!r}")
        if animation not in (None, "webp", "gif"):
            raise TaesdError(f"animation must be 'webp', 'gif' or None, not {animation!r}")
        if on_preview is None and out_dir is None:
            raise TaesdError("previews go nowhere: pass on_preview=FUNCTION and/or out_dir=FOLDER")
        self.taesd, self.variant = taesd, variant
        self.every, self.batch, self.max_size, self.show = every, batch, max_size, show
        self.on_preview, self.animation, self.contact_sheet = on_preview, animation, contact_sheet
        self.out_dir = Path(out_dir) if out_dir is not None else None
        self.raise_errors, self.height, self.width = raise_errors, height, width
        self.contract: LatentContract | None = None
        self.frames: list[PreviewFrame] = []
        self.seconds: list[float] = []          # cost of every preview
        self.decode_seconds: list[float] = []   # of which TAESD's decode
        self.disabled = False
        self.error: BaseException | None = None
        self._pipe = None
        self._hooks: list = []
        self._x0: torch.Tensor | None = None
        self._ids: torch.Tensor | None = None
        self._warned_x0 = False
        self._warned_variant = False
        self._last_step = -1
        self._finished = False
        if pipe is not None:
            self.attach(pipe)

    # ------------------------------------------------------------ hooks into the pipeline

    def attach(self, pipe) -> None:
        """Watch ``pipe``: its scheduler's x0 prediction and its transformer's position ids."""
        if self._pipe is pipe:
            return
        self.detach()
        self._pipe = pipe
        self.contract = contract_for(pipe, self.variant)
        scheduler = getattr(pipe, "scheduler", None)
        if scheduler is not None and hasattr(scheduler, "step"):
            original = scheduler.step

            def step(*args, **kwargs):
                out = original(*args, **kwargs)
                self._x0 = _predicted_x0(scheduler, out, args, kwargs)
                return out

            had_own = "step" in vars(scheduler)
            scheduler.step = step
            self._hooks.append(lambda: _restore(scheduler, "step", original, had_own))
        transformer = getattr(pipe, "transformer", None)
        if isinstance(transformer, torch.nn.Module):
            def grab_ids(module, args, kwargs):
                ids = kwargs.get("img_ids")
                if isinstance(ids, torch.Tensor):
                    self._ids = ids.detach()

            handle = transformer.register_forward_pre_hook(grab_ids, with_kwargs=True)
            self._hooks.append(handle.remove)

    def detach(self) -> None:
        """Undo ``attach``: the pipeline is left exactly as it was."""
        for undo in reversed(self._hooks):
            undo()
        self._hooks.clear()
        self._pipe = None

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.finish()
        self.detach()

    # ------------------------------------------------------------ the callback

    def __call__(self, pipe, step: int, timestep, callback_kwargs: dict) -> dict:
        if step <= self._last_step:  # the pipeline was called again: a new run
            self._start_new_run()
        self._last_step = step
        if self.disabled:
            return {}
        total = getattr(pipe, "_num_timesteps", None) or getattr(pipe, "num_timesteps", None)
        last = total is not None and step == int(total) - 1
        if (step + 1) % self.every == 0 or last:
            try:
                self.attach(pipe)
                self._preview(step, timestep, callback_kwargs["latents"])
                if last:
                    self.finish()
            except Exception as e:
                if self.raise_errors:
                    raise
                self.disabled, self.error = True, e
                log.warning("taesd preview failed at step %d, previews are off from now on: %s",
                            step, e, exc_info=True)
        return {}

    def _start_new_run(self) -> None:
        self.frames, self.seconds, self.decode_seconds = [], [], []
        self._finished, self._x0 = False, None

    def _model(self, device):
        vae = getattr(self._pipe, "vae", None)   # the pipeline's TaesdVAE, with its executor
        own = vae.running_model() if hasattr(vae, "running_model") else None
        own_variant = getattr(getattr(own, "variant", None), "name", None)
        if self.taesd is None and own_variant == self.contract.variant:
            self.taesd = own
        if self.taesd is None:
            from taesd.loader import load
            self.taesd = load(self.contract.variant, parts="decoder", device=device)
        elif self.taesd.variant.name != self.contract.variant and not self._warned_variant:
            self._warned_variant = True  # e.g. taesd3 on FLUX.1: same channels, wrong colours
            log.warning("previewing %s latents with %s; load %s for faithful previews",
                        self.contract.family, self.taesd.variant.name, self.contract.variant)
        return self.taesd

    def _preview(self, step: int, timestep, latents: torch.Tensor) -> None:
        start = time.perf_counter()
        kind = "sample"
        if self.show == "x0":
            if self._x0 is not None and self._x0.shape == latents.shape:
                latents, kind = self._x0, "x0"
            elif not self._warned_x0:
                self._warned_x0 = True
                log.warning("the scheduler exposes no predicted clean image; previewing the sample")
        if self.batch == "first":
            latents = latents[:1]
        z = pipeline_to_taesd(latents.detach().float(), self.contract, self.height, self.width, self._ids)
        model = self._model(z.device)
        t0 = time.perf_counter()
        images = model.decode(z).float().cpu()
        raise_pending()   # .cpu() has synced: a bad latent's verdict (queued on a GPU) is free to read
        self.decode_seconds.append(time.perf_counter() - t0)
        image = _fit(_grid_image(images), self.max_size)
        frame = PreviewFrame(step, float(timestep), z, images, image, kind, 0.0)
        if self.out_dir is not None:
            path = self.out_dir / f"frame_{len(self.frames):03d}_step_{step:03d}.png"
            with atomic_path(path) as tmp:
                image.save(tmp, format="PNG")
        if self.on_preview is not None:
            self.on_preview(frame)
        frame.seconds = time.perf_counter() - start
        self.seconds.append(frame.seconds)
        self.frames.append(frame)

    # ------------------------------------------------------------ after the last step

    def finish(self) -> list[Path]:
        """Write the animation and contact sheet (done at the last step; safe to call again)."""
        if self._finished or not self.frames:
            return []
        self._finished = True
        log.info(self.report())
        if self.out_dir is None:
            return []
        written = []
        images = [f.image.convert("RGB") for f in self.frames]
        if self.animation is not None:
            path = self.out_dir / f"preview.{self.animation}"
            with atomic_path(path) as tmp:
                images[0].save(tmp, format=self.animation.upper(), save_all=True,
                               append_images=images[1:], duration=200, loop=0,
                               **({"lossless": True} if self.animation == "webp" else {}))
            written.append(path)
        if self.contact_sheet:
            path = self.out_dir / "contact_sheet.png"
            with atomic_path(path) as tmp:
                contact_sheet(images, [f"step {f.step}" for f in self.frames]).save(tmp, format="PNG")
            written.append(path)
        return written

    def cost(self) -> dict:
        """What previews cost: count, median and mean seconds per preview, median TAESD decode."""
        if not self.seconds:
            return {"previews": 0}
        return {"previews": len(self.seconds), "median_s": statistics.median(self.seconds),
                "mean_s": statistics.fmean(self.seconds),
                "decode_median_s": statistics.median(self.decode_seconds),
                "total_s": sum(self.seconds)}

    def report(self) -> str:
        c = self.cost()
        if not c["previews"]:
            return "no previews were made" + (f" (previews failed: {self.error})" if self.error else "")
        return (f"{c['previews']} previews, {c['median_s'] * 1000:.1f} ms each (median; TAESD decode "
                f"{c['decode_median_s'] * 1000:.1f} ms), {c['total_s']:.2f} s in all")


# ---------------------------------------------------------------- helpers

def _restore(obj, name: str, original, had_own: bool) -> None:
    # The wrapper was set on the instance; removing it brings back the class's method.
    if had_own:
        setattr(obj, name, original)
    else:
        delattr(obj, name)


def _predicted_x0(scheduler, out, args, kwargs) -> "torch.Tensor | None":
    """The scheduler's prediction of the clean latent for the step just taken, where it has one."""
    x0 = getattr(out, "pred_original_sample", None)
    if x0 is None and isinstance(out, tuple) and len(out) > 1 and isinstance(out[1], torch.Tensor):
        x0 = out[1]
    if x0 is None and type(scheduler).__name__.startswith("FlowMatch"):
        # Flow matching: x_t = (1 - sigma) x0 + sigma noise and the model predicts v = noise - x0.
        model_output = kwargs.get("model_output", args[0] if args else None)
        sample = kwargs.get("sample", args[2] if len(args) > 2 else None)
        index = getattr(scheduler, "step_index", None)
        if model_output is not None and sample is not None and index:
            sigma = scheduler.sigmas[index - 1].to(sample.device, sample.dtype)
            x0 = sample - sigma * model_output
    return x0.detach() if isinstance(x0, torch.Tensor) else None


def _grid_image(images: torch.Tensor) -> Image.Image:
    """One image, or a batch laid out as a near-square grid."""
    if images.shape[0] == 1:
        return tensor_to_pil(images[0])
    return contact_sheet([tensor_to_pil(x) for x in images])


def _fit(image: Image.Image, max_size: int | None) -> Image.Image:
    if max_size is None or max(image.size) <= max_size:
        return image
    s = max_size / max(image.size)
    return image.resize((max(1, round(image.width * s)), max(1, round(image.height * s))), Image.BILINEAR)


def contact_sheet(images: list[Image.Image], labels: list[str] | None = None) -> Image.Image:
    """Images in a near-square grid (row by row), each with an optional label in its corner."""
    cols = math.ceil(math.sqrt(len(images)))
    rows = math.ceil(len(images) / cols)
    w, h = max(i.width for i in images), max(i.height for i in images)
    sheet = Image.new("RGB", (cols * w, rows * h), "black")
    for k, img in enumerate(images):
        tile = img.convert("RGB")  # a copy: the label is drawn on it, clipped to the tile
        if labels:
            draw = ImageDraw.Draw(tile)
            draw.rectangle((0, 0, 6 * len(labels[k]) + 4, 12), fill="black")
            draw.text((2, 1), labels[k], fill="white")
        sheet.paste(tile, ((k % cols) * w, (k // cols) * h))
    return sheet
