"""Helpers shared by the test modules (not a test module). Fixtures live in conftest.py.

  * fuzz_settings: hypothesis settings for one property, under the profile conftest.py loads;
  * tiny_model_config: the tiny Llama model section the training tests use;
  * FigureRecorder, read_png, check_png_figure, png_pixel: content checks of the PNG figures.
"""
from __future__ import annotations

import os

import numpy as np
from hypothesis import settings

# Which hypothesis profile conftest.py loads: "default" (the normal suite) or "long" (a long campaign).
HYPOTHESIS_PROFILE_ENV = "BSHADOW_HYPOTHESIS_PROFILE"
# Under the long profile each property runs this many times its default number of examples.
LONG_FACTOR = 15


def hypothesis_profile() -> str:
    return os.environ.get(HYPOTHESIS_PROFILE_ENV, "default")


def fuzz_settings(max_examples: int, *, derandomize: bool = False, **kwargs) -> settings:
    """Settings for one property test.

    Default profile: `max_examples` cases, derandomized if asked (so the suite repeats exactly).
    Long profile: LONG_FACTOR x `max_examples` cases from fresh random seeds, no example database
    (the profile's derandomize=False, database=None). Other kwargs (phases, suppress_health_check)
    apply under both. deadline=None comes from the profiles.
    """
    if hypothesis_profile() == "long":
        return settings(max_examples=max_examples * LONG_FACTOR, **kwargs)
    return settings(max_examples=max_examples, derandomize=derandomize, **kwargs)


# The tiny model section of the training tests' configs (bshadow_jax.models.LlamaConfig fields).
TINY_MODEL = {"vocab_size": 64, "hidden_size": 32, "intermediate_size": 64, "num_hidden_layers": 2,
              "num_attention_heads": 4, "num_key_value_heads": 2, "max_position_embeddings": 64}


def tiny_model_config(*, without: tuple[str, ...] = (), **overrides) -> dict:
    """A fresh copy of TINY_MODEL with `overrides` applied and the keys in `without` left out
    (so that the library default applies), e.g. tiny_model_config(vocab_size=61, num_hidden_layers=1)."""
    if set(without) - set(TINY_MODEL):
        raise KeyError(f"not a TINY_MODEL key: {sorted(set(without) - set(TINY_MODEL))}")
    model = {k: v for k, v in TINY_MODEL.items() if k not in without}
    model.update(overrides)
    return model


# ---------------------------------------------------------------- figures

class FigureRecorder:
    """Records every matplotlib Figure that is saved while active, with the bytes it wrote, so a test can
    find the Figure behind a PNG file (report code saves to a buffer, then writes the file atomically)."""

    def __init__(self):
        self.saved: list[tuple[object, bytes, dict]] = []

    def __enter__(self):
        from matplotlib.figure import Figure

        self._orig = orig = Figure.savefig
        saved = self.saved

        def savefig(fig, fname, *args, **kwargs):
            orig(fig, fname, *args, **kwargs)
            data = fname.getvalue() if hasattr(fname, "getvalue") else open(fname, "rb").read()
            saved.append((fig, data, kwargs))

        Figure.savefig = savefig
        return self

    def __exit__(self, *exc):
        from matplotlib.figure import Figure

        Figure.savefig = self._orig

    def figure_for(self, path):
        """(Figure, savefig kwargs) whose saved bytes are the file at `path`."""
        data = open(path, "rb").read()
        hits = [(fig, kw) for fig, d, kw in self.saved if d == data]
        assert hits, f"{path}: no recorded figure wrote these bytes"
        return hits[-1]


def read_png(path):
    """The decoded PNG as float RGB (H, W, 3) in [0, 1]; fails unless the file is a PNG image."""
    import matplotlib.image

    with open(path, "rb") as f:
        assert f.read(8) == b"\x89PNG\r\n\x1a\n", f"{path}: not a PNG"
    img = matplotlib.image.imread(path)
    assert img.ndim == 3 and img.shape[2] in (3, 4), img.shape
    return img[..., :3]


def _saved_box(fig, kwargs):
    """(x0, y1, width, height) in inches of the figure area that savefig(**kwargs) wrote."""
    import matplotlib
    from matplotlib.backends.backend_agg import FigureCanvasAgg

    w_in, h_in = fig.get_size_inches()
    if kwargs.get("bbox_inches") != "tight":
        return 0.0, h_in, w_in, h_in
    canvas = fig.canvas if hasattr(fig.canvas, "get_renderer") else FigureCanvasAgg(fig)  # closed: a bare canvas
    dpi = fig.dpi
    fig.set_dpi(kwargs.get("dpi", dpi))  # text extents as savefig measured them
    try:
        box = fig.get_tightbbox(canvas.get_renderer()).padded(
            kwargs.get("pad_inches", matplotlib.rcParams["savefig.pad_inches"]))
    finally:
        fig.set_dpi(dpi)
    return box.x0, box.y1, box.width, box.height


def check_png_figure(path, fig, kwargs):
    """The PNG at `path` is `fig` as saved: its pixel size is the figure's configured size at the saved dpi
    (cropped to the tight bounding box when saved with bbox_inches="tight"), and it is not one flat colour.
    Returns the image."""
    img = read_png(path)
    dpi = kwargs.get("dpi", fig.dpi)
    _, _, w_in, h_in = _saved_box(fig, kwargs)
    want = (h_in * dpi, w_in * dpi)
    assert abs(img.shape[0] - want[0]) <= 3 and abs(img.shape[1] - want[1]) <= 3, (path, img.shape[:2], want)
    colours = np.unique((img * 255).round().astype(np.uint8).reshape(-1, 3), axis=0)
    assert len(colours) > 20 and img.std() > 0.05, (path, len(colours), img.std())
    return img


def png_pixel(fig, kwargs, ax, x, y) -> tuple[int, int]:
    """(row, col) in the PNG that savefig(**kwargs) wrote of the data point (x, y) of `ax`."""
    dpi = kwargs.get("dpi", fig.dpi)
    x0, y1, _, _ = _saved_box(fig, kwargs)
    w_in, h_in = fig.get_size_inches()
    fx, fy = fig.transFigure.inverted().transform(ax.transData.transform((x, y)))
    return int(round((y1 - fy * h_in) * dpi)), int(round((fx * w_in - x0) * dpi))
