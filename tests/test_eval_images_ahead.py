"""`evaluate` reads the next batch's images on a thread while the current one generates: same
images, same order, same noise, and a failing image fails its own batch."""

from __future__ import annotations

import threading

import numpy as np
import pytest
from PIL import Image

from earlyexit.evaluation.common import EvalSettings, add_noise
from earlyexit.evaluation.evaluate import images_ahead


class Sample:
    def __init__(self, index, broken=False):
        self.index, self.broken, self.loaded_on = index, broken, None

    def load_image(self):
        self.loaded_on = threading.current_thread().name
        if self.broken:
            raise OSError(f"image {self.index} is truncated")
        return Image.fromarray(np.full((4, 4, 3), self.index, dtype=np.uint8))


def test_batches_hold_the_images_direct_loading_gives_in_order():
    samples = [Sample(i) for i in range(7)]
    settings = EvalSettings(batch_size=3, noise=0.2, seed=5)
    batches = list(images_ahead(samples, settings))
    assert [(start, [s.index for s in batch]) for start, batch, _ in batches] == [(0, [0, 1, 2]), (3, [3, 4, 5]),
                                                                                   (6, [6])]
    for start, batch, images in batches:
        direct = [add_noise(s.load_image(), 0.2, 5 * 1_000_003 + start + i) for i, s in enumerate(batch)]
        assert [np.asarray(a).tolist() for a in images] == [np.asarray(b).tolist() for b in direct]
    assert list(images_ahead([], settings)) == []


def test_images_are_read_on_the_thread_and_a_broken_one_fails_its_batch():
    samples = [Sample(0), Sample(1), Sample(2, broken=True)]
    seen = []
    with pytest.raises(OSError, match="image 2 is truncated"):
        for start, batch, _ in images_ahead(samples, EvalSettings(batch_size=2)):
            seen.append(start)
    assert seen == [0]  # the first batch was handed over before the second one failed
    assert samples[1].loaded_on.startswith("images")
