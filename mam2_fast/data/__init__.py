"""Video data: list files, frame sampling, decoding backends, device augmentation, loader."""
from .config import DataConfig
from .demo import make_demo_dataset
from .loader import PretrainData, build_pretrain_data
from .sampler import ResumableSampler
from .video_list import VideoRecord, read_list_file

__all__ = ["DataConfig", "PretrainData", "ResumableSampler", "VideoRecord", "build_pretrain_data",
           "make_demo_dataset", "read_list_file"]
