"""The edge apps send a result when something changes, and nothing when nothing does."""

from __future__ import annotations

from cumulo.edge.app import LineApp, ShelfApp
from cumulo.edge.scenes import EMPTY, LineScene, ShelfScene, product_labels


def _truth_app(scene: ShelfScene) -> ShelfApp:
    return ShelfApp(list(scene.planogram), product_labels(), confirm=2, summary_every=0)


def test_a_still_shelf_sends_nothing() -> None:
    scene = ShelfScene(seed=3, change_every=0)
    app = _truth_app(scene)
    assert [app.update(scene.next().slots) for _ in range(50)] == [[]] * 50


def test_slot_empty_is_sent_once_when_the_generator_empties_a_slot() -> None:
    scene = ShelfScene(seed=3, change_every=0)
    app = _truth_app(scene)
    app.update(scene.next().slots)
    scene.set_slot(4, EMPTY)
    sent = [r for _ in range(10) for r in app.update(scene.next().slots)]
    assert [r.body["text"] for r in sent] == ["slot 4 empty"]
    assert sent[0].body["type"] == "slot_empty" and not sent[0].summary


def test_wrong_product_and_restock_are_events() -> None:
    scene = ShelfScene(seed=5, change_every=0)
    app = _truth_app(scene)
    wrong = next(p for p in range(1, 6) if p != scene.planogram[7])
    scene.set_slot(7, wrong)
    sent = [r for _ in range(3) for r in app.update(scene.next().slots)]
    assert [r.body["text"] for r in sent] == ["wrong product in slot 7"]
    assert sent[0].body["seen"] == product_labels()[wrong]
    scene.set_slot(7, scene.planogram[7])
    sent = [r for _ in range(3) for r in app.update(scene.next().slots)]
    assert [(r.body["text"], r.body["was"]) for r in sent] == [("slot 7 ok", "wrong")]


def test_one_misread_frame_sends_nothing() -> None:
    scene = ShelfScene(seed=3, change_every=0)
    app = _truth_app(scene)
    flicker = list(scene.planogram)
    flicker[2] = EMPTY
    assert app.update(flicker) == []
    assert app.update(scene.planogram) == []
    assert app.update(scene.planogram) == []


def test_summaries_come_periodically_and_say_what_is_wrong() -> None:
    scene = ShelfScene(seed=3, change_every=0)
    app = ShelfApp(list(scene.planogram), product_labels(), confirm=1, summary_every=5)
    scene.set_slot(0, EMPTY)
    results = [r for _ in range(10) for r in app.update(scene.next().slots)]
    summaries = [r for r in results if r.summary]
    assert len(summaries) == 2
    assert summaries[-1].body["empty"] == [0] and summaries[-1].body["frames"] == 10


def test_line_stopped_and_running_follow_the_belt() -> None:
    scene = LineScene(seed=1)
    app = LineApp(confirm=3, summary_every=0)
    texts = []
    for i in range(60):
        if i == 20:
            scene.set_running(False)
        if i == 40:
            scene.set_running(True)
        texts += [r.body["text"] for r in app.update(scene.next().image)]
    assert texts == ["line running", "line stopped", "line running"]
