"""Seeded synthetic frames with known ground truth: a retail shelf and a counting line.

No retail-shelf data set ships on PyPI, so the scenes are the test data and the training data of the shelf
model. Every frame is a uint8 tensor [3, H, W] and comes with the truth it shows, so tests and benchmarks can
compare what the model and the edge app say with what is really there. The same seed gives the same frames.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch

SLOT = 24  # pixels per shelf slot (square), the crop the shelf model classifies
MARGIN = 4  # shelf edge around and between slots
EMPTY = 0  # slot content: 0 is empty, 1..PRODUCTS a product
PRODUCTS = 5

# One colour and one pattern per product, so a tiny network can tell them apart and so can a person.
_COLOURS = [(200, 40, 40), (40, 160, 60), (40, 70, 200), (220, 190, 40), (150, 60, 170)]
_PATTERNS = ["solid", "hstripes", "vstripes", "checker", "dot"]
_SHELF = (120, 95, 70)  # the brown of an empty shelf


def product_labels() -> list[str]:
    """Class names in the order of the model's outputs: 'empty', then one per product."""
    return ["empty"] + [f"product_{i}" for i in range(1, PRODUCTS + 1)]


def render_slot(content: int, g: torch.Generator) -> torch.Tensor:
    """One slot's pixels [3, SLOT, SLOT]: shelf background, plus a product box with jitter and noise."""
    image = torch.tensor(_SHELF, dtype=torch.float32).view(3, 1, 1).expand(3, SLOT, SLOT).clone()
    if content != EMPTY:
        colour = torch.tensor(_COLOURS[content - 1], dtype=torch.float32).view(3, 1, 1)
        pattern = _PATTERNS[content - 1]
        size = int(torch.randint(16, 21, (1,), generator=g))
        x0 = int(torch.randint(0, SLOT - size + 1, (1,), generator=g))
        y0 = int(torch.randint(0, SLOT - size + 1, (1,), generator=g))
        yy, xx = torch.meshgrid(torch.arange(size), torch.arange(size), indexing="ij")
        mask = {
            "solid": torch.ones(size, size, dtype=torch.bool),
            "hstripes": (yy // 3) % 2 == 0,
            "vstripes": (xx // 3) % 2 == 0,
            "checker": ((yy // 4) + (xx // 4)) % 2 == 0,
            "dot": (yy - size / 2) ** 2 + (xx - size / 2) ** 2 < (size / 3) ** 2,
        }[pattern]
        box = torch.where(mask, colour, colour * 0.35 + 160)
        image[:, y0 : y0 + size, x0 : x0 + size] = box
    image = image * (0.8 + 0.4 * torch.rand(1, generator=g))  # lighting
    image = image + 12 * torch.randn(image.shape, generator=g)  # sensor noise
    return image.clamp(0, 255).to(torch.uint8)


@dataclass
class ShelfFrame:
    image: torch.Tensor  # uint8 [3, H, W]
    slots: list[int]  # the true content of every slot (EMPTY or a product 1..PRODUCTS)
    index: int


@dataclass
class ShelfScene:
    """A shelf of rows x cols slots stocked to a planogram; as frames pass, slots sell out, get restocked, or
    get the wrong product. `change_every` frames (on average) one slot changes; 0 keeps the shelf still."""

    seed: int = 0
    rows: int = 2
    cols: int = 6
    change_every: float = 20.0
    planogram: list[int] = field(init=False)
    slots: list[int] = field(init=False)

    def __post_init__(self) -> None:
        self._g = torch.Generator().manual_seed(self.seed)
        n = self.rows * self.cols
        self.planogram = [int(p) + 1 for p in torch.randint(0, PRODUCTS, (n,), generator=self._g)]
        self.slots = list(self.planogram)
        self._index = 0

    @property
    def size(self) -> tuple[int, int]:
        """(height, width) of a frame."""
        return MARGIN + self.rows * (SLOT + MARGIN), MARGIN + self.cols * (SLOT + MARGIN)

    def slot_box(self, slot: int) -> tuple[int, int]:
        """(y0, x0) of a slot's crop; slots count row by row from the top left."""
        row, col = divmod(slot, self.cols)
        return MARGIN + row * (SLOT + MARGIN), MARGIN + col * (SLOT + MARGIN)

    def set_slot(self, slot: int, content: int) -> None:
        """Put `content` in a slot by hand (tests script a scene this way)."""
        self.slots[slot] = content

    def _change(self) -> None:
        slot = int(torch.randint(0, len(self.slots), (1,), generator=self._g))
        roll = float(torch.rand(1, generator=self._g))
        if self.slots[slot] != self.planogram[slot]:
            self.slots[slot] = self.planogram[slot]  # restocked
        elif roll < 0.75:
            self.slots[slot] = EMPTY  # sold out
        else:
            wrong = [p for p in range(1, PRODUCTS + 1) if p != self.planogram[slot]]
            self.slots[slot] = wrong[int(torch.randint(0, len(wrong), (1,), generator=self._g))]

    def next(self) -> ShelfFrame:
        if (
            self.change_every > 0
            and self._index > 0
            and float(torch.rand(1, generator=self._g)) < 1 / self.change_every
        ):
            self._change()
        height, width = self.size
        image = torch.empty(3, height, width, dtype=torch.uint8)
        image[:] = torch.tensor((90, 70, 50), dtype=torch.uint8).view(3, 1, 1)  # shelf frame
        for slot, content in enumerate(self.slots):
            y0, x0 = self.slot_box(slot)
            image[:, y0 : y0 + SLOT, x0 : x0 + SLOT] = render_slot(content, self._g)
        frame = ShelfFrame(image, list(self.slots), self._index)
        self._index += 1
        return frame


def shelf_crops(image: torch.Tensor, rows: int, cols: int) -> torch.Tensor:
    """The slot crops of a shelf frame, [rows * cols, 3, SLOT, SLOT] uint8, in slot order."""
    crops = []
    for slot in range(rows * cols):
        row, col = divmod(slot, cols)
        y0, x0 = MARGIN + row * (SLOT + MARGIN), MARGIN + col * (SLOT + MARGIN)
        crops.append(image[:, y0 : y0 + SLOT, x0 : x0 + SLOT])
    return torch.stack(crops)


def slot_dataset(seed: int, per_class: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Labelled slot crops for training and evaluation: ([n, 3, SLOT, SLOT] uint8, [n] int64), balanced."""
    g = torch.Generator().manual_seed(seed)
    labels = torch.arange(PRODUCTS + 1).repeat_interleave(per_class)
    labels = labels[torch.randperm(len(labels), generator=g)]
    images = torch.stack([render_slot(int(label), g) for label in labels])
    return images, labels


@dataclass
class LineFrame:
    image: torch.Tensor  # uint8 [3, H, W]
    running: bool
    passed: int  # items that have crossed the counting line so far
    index: int


@dataclass
class LineScene:
    """A conveyor belt seen from above: boxes ride left to right while it runs, and stand while it is stopped.
    `toggle_every` frames (on average) the line stops or starts; 0 keeps it as it is."""

    seed: int = 0
    width: int = 160
    height: int = 48
    speed: int = 6  # pixels per frame while running
    gap: int = 40  # pixels between boxes
    toggle_every: float = 0.0
    running: bool = True

    def __post_init__(self) -> None:
        self._g = torch.Generator().manual_seed(self.seed)
        self._offset = 0
        self._index = 0

    def set_running(self, running: bool) -> None:
        self.running = running

    def next(self) -> LineFrame:
        if (
            self.toggle_every > 0
            and self._index > 0
            and float(torch.rand(1, generator=self._g)) < 1 / self.toggle_every
        ):
            self.running = not self.running
        if self.running and self._index > 0:
            self._offset += self.speed
        image = torch.full((3, self.height, self.width), 60.0)
        image[:, 12:36, :] = 110.0  # the belt
        x = -(self._offset % self.gap)
        while x < self.width:
            left, right = max(x, 0), min(x + 20, self.width)
            if right > left:
                image[:, 16:32, left:right] = torch.tensor((210.0, 150.0, 60.0)).view(3, 1, 1)
            x += self.gap
        image = image + 6 * torch.randn(image.shape, generator=self._g)
        # a box has passed the counting line at the belt's middle once its left edge went by
        passed = max(0, (self._offset + self.width // 2) // self.gap)
        frame = LineFrame(image.clamp(0, 255).to(torch.uint8), self.running, passed, self._index)
        self._index += 1
        return frame
