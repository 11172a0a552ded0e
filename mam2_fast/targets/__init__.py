"""Pre-training targets: appearance tokenizers and motion targets."""
from mam2_fast.targets.tokenizer import Tokenizer, KMeansTokenizer, build_tokenizer  # noqa: F401
from mam2_fast.targets.vqgan import VQGANTokenizer, VQGAN_PRESETS, resize_frames  # noqa: F401
from mam2_fast.targets.dalle import DalleTokenizer  # noqa: F401
from mam2_fast.targets.pixel import PixelTarget, pixel_target  # noqa: F401
from mam2_fast.targets.flow import FlowTarget  # noqa: F401
from mam2_fast.targets.token_cache import TokenCache  # noqa: F401
