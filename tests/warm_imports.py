"""What the fork server of `children` imports once, so that a child forked from it starts at once: dit-lens,
its command lines, and the modules that building and loading a tiny pipeline pull in lazily (diffusers'
pipeline classes, transformers' text encoders, nnsight). Nothing here starts a thread (a fork copies only
the forking thread), and no pipeline is kept."""

import importlib

for _name in ("dit_lens", "dit_lens.apps.cli", "dit_lens.model.fingerprint", "dit_lens.study.cli",
              "dit_lens.training.trainer"):
    importlib.import_module(_name)

from dit_lens import load  # noqa: E402
from dit_lens.testing import PixArtSpec, build_pixart

load(build_pixart(PixArtSpec(num_layers=1, num_heads=1, head_dim=8, sample_size=4, patch_size=2)))
