"""A fixed set of real photographs for checking the vision model: scikit-image's bundled images (astronaut,
Chelsea the cat, coffee, rocket, Hubble deep field, a retina, ...), each cut into seeded crops and mirrored.

No ImageNet validation set ships on PyPI; these ship inside the scikit-image wheel (no download at run time).
Several are not ImageNet scenes (textures, text, microscopy), on which the classifier is unsure: agreement is
reported over all of them and over the photos the fp32 model is confident about.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence

import torch

from cumulo.edge.vision import preprocess
from cumulo.errors import InvalidRequest

# Bundled with scikit-image (skimage/data/*): colour photos first, then grey ones (replicated to RGB).
NAMES = (
    "astronaut", "chelsea", "coffee", "rocket", "hubble_deep_field", "immunohistochemistry", "retina",
    "colorwheel", "logo", "camera", "brick", "grass", "gravel", "moon", "page", "text", "horse", "coins",
    "clock", "checkerboard",
)  # fmt: skip


def photo(name: str) -> torch.Tensor:
    """One bundled image as uint8 [h, w, 3]."""
    try:
        from skimage import data
    except ImportError:
        raise InvalidRequest("the photo set needs scikit-image: pip install scikit-image") from None
    image = torch.from_numpy(getattr(data, name)().copy())
    if image.dtype != torch.uint8:  # bool or float images
        image = (image.float() * (255 if image.float().max() <= 1 else 1)).clamp(0, 255).to(torch.uint8)
    if image.dim() == 2:
        image = image[..., None].expand(-1, -1, 3)
    return image[..., :3]


def photo_set(
    crops_per_photo: int = 6,
    seed: int = 0,
    names: Sequence[str] = NAMES,
    load: Callable[[str], torch.Tensor] = photo,
) -> torch.Tensor:
    """[len(names) * crops_per_photo, 3, 224, 224] preprocessed crops (50-100% of each side), every second
    one mirrored; the same seed gives the same set. `load` turns a name into uint8 [h, w, 3] (another photo
    collection: `cumulo.edge.calibrate.calibration_photo`)."""
    g = torch.Generator().manual_seed(seed)
    out = []
    for name in names:
        image = load(name)
        h, w = image.shape[:2]
        for i in range(crops_per_photo):
            f = 0.5 + 0.5 * torch.rand(1, generator=g).item()
            ch, cw = int(h * f), int(w * f)
            top = int(torch.randint(0, h - ch + 1, (1,), generator=g))
            left = int(torch.randint(0, w - cw + 1, (1,), generator=g))
            crop = image[top : top + ch, left : left + cw]
            out.append(preprocess(crop.flip(1) if i % 2 else crop))
    return torch.stack(out)
