"""Shared fixtures: tiny, seeded, genuine PixArt pipelines built in code (never at import time)."""

import pytest
import torch

from dit_lens.model.builders import PixArtSpec, build_pixart


@pytest.fixture
def tiny_spec() -> PixArtSpec:
    return PixArtSpec(num_layers=3, num_heads=2, head_dim=8, sample_size=8, patch_size=2)


@pytest.fixture
def tiny_pipeline(tiny_spec):
    return build_pixart(tiny_spec, seed=0)


@pytest.fixture
def tiny_lens(tiny_pipeline):
    from dit_lens import load

    return load(tiny_pipeline)


@pytest.fixture(autouse=True)
def one_torch_thread():
    """Tiny models run fastest on one thread, and far faster when other jobs share the CPU."""
    previous = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(previous)


@pytest.fixture(autouse=True, scope="session")
def own_cache(tmp_path_factory):
    """Captures made by the tests go to a cache of this session, not the checkout's cache/."""
    import os

    if "DIT_LENS_CACHE" in os.environ:
        yield
        return
    os.environ["DIT_LENS_CACHE"] = str(tmp_path_factory.mktemp("cache"))
    yield
    os.environ.pop("DIT_LENS_CACHE", None)


@pytest.fixture(autouse=True)
def close_figures():
    """Figures a test made are closed after it (matplotlib warns past 20 open ones)."""
    yield
    import sys

    if "matplotlib.pyplot" in sys.modules:
        sys.modules["matplotlib.pyplot"].close("all")
