"""The TAEHV family: tiny autoencoders for video models' latents (and the image models that use them)."""
from taesd.video.fast import make_fast
from taesd.video.loading import load
from taesd.video.model import TAEHV, VideoStream
from taesd.video.weights import identify_video, load_taehv, read_state_dict

__all__ = ["TAEHV", "VideoStream", "identify_video", "load", "load_taehv", "make_fast", "read_state_dict"]
