"""Pre-training targets: appearance tokenizers and motion targets."""
from mam2_fast.targets.tokenizer import Tokenizer, KMeansTokenizer, build_tokenizer  # noqa: F401
