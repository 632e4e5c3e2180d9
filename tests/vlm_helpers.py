"""Inputs of the VLM stages, shared by the critique, instruct, check and filter tests
(tests/tasks/) and tests/models/test_vlm_client.py: seeded noise images, three prompts, and the rows and
images an instruct or check/filter call takes. Not a test module."""
from __future__ import annotations

import numpy as np
import pyarrow as pa
from PIL import Image

from richpref.common.images import encode_png


def image(seed: int, size=(64, 64)) -> Image.Image:
    rng = np.random.RandomState(seed)
    return Image.fromarray(rng.randint(0, 255, (size[1], size[0], 3), dtype=np.uint8))


PROMPTS = ["a red apple on a wooden table", "two dogs playing near a lake", "a blue car in front of a white house"]


def instruct_input(n=3):
    rows = pa.table({"item_id": [f"i{k}" for k in range(n)], "prompt": PROMPTS[:n],
                     "critique": ["The apple is green.", "Only one dog.", "The car is red."][:n]})
    return rows, [encode_png(image(10 + k)) for k in range(n)]


def filter_input(n=3):
    rows = pa.table({"item_id": [f"f{k}" for k in range(n)], "candidate": pa.array([0] * n, pa.int32())})
    instructions = [["Make the apple red", "Remove the blue cup"], ["Add a second dog"], ["Turn the car blue"]][:n]
    images = {
        "original": [encode_png(image(30 + k)) for k in range(n)],
        "edited": [encode_png(image(40 + k)) for k in range(n)],
        "original_cutout": [encode_png(image(50 + k, (48, 64))) for k in range(n)],
        "edited_cutout": [encode_png(image(60 + k, (48, 64))) for k in range(n)],
    }
    return rows, PROMPTS[:n], instructions, images
