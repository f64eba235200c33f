import pytest

from dit_lens.model.sites import FAMILIES, site_module


def test_site_paths_resolve_to_the_block_modules(tiny_lens):
    family = FAMILIES["PixArtTransformer2DModel"]
    block = tiny_lens.pipeline.transformer.transformer_blocks[2]
    assert site_module(tiny_lens.pipeline, family, "attn2", 2) is block.attn2
    assert site_module(tiny_lens.pipeline, family, "attn1", 2) is block.attn1
    assert site_module(tiny_lens.pipeline, family, "ff", 2) is block.ff
    assert site_module(tiny_lens.pipeline, family, "block", 2) is block


def test_unknown_site_names_the_choices():
    with pytest.raises(ValueError, match="choose one of"):
        FAMILIES["PixArtTransformer2DModel"].site_path("attn3", 0)
