"""The synthetic scenes are seeded (same seed, same frames) and change over time as their truth says."""

from __future__ import annotations

import torch

from cumulo.edge.scenes import EMPTY, ShelfScene, shelf_crops


def test_same_seed_same_frames_other_seed_other_frames() -> None:
    a, b, c = ShelfScene(seed=1), ShelfScene(seed=1), ShelfScene(seed=2)
    for _ in range(5):
        fa, fb, fc = a.next(), b.next(), c.next()
        assert torch.equal(fa.image, fb.image) and fa.slots == fb.slots
        assert not torch.equal(fa.image, fc.image)


def test_shelf_slots_change_over_time_and_crops_follow_the_layout() -> None:
    scene = ShelfScene(seed=0, change_every=5)
    frames = [scene.next() for _ in range(100)]
    assert frames[0].slots == scene.planogram
    assert any(EMPTY in f.slots for f in frames)
    crops = shelf_crops(frames[0].image, scene.rows, scene.cols)
    assert crops.shape == (scene.rows * scene.cols, 3, 24, 24)
    y0, x0 = scene.slot_box(7)
    assert torch.equal(crops[7], frames[0].image[:, y0 : y0 + 24, x0 : x0 + 24])
