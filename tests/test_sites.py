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


def test_heads_sites_are_the_input_of_each_softmax_attentions_output_projection(tiny_lens):
    pixart = FAMILIES["PixArtTransformer2DModel"]
    block = tiny_lens.pipeline.transformer.transformer_blocks[2]
    assert site_module(tiny_lens.pipeline, pixart, "attn1.heads", 2) is block.attn1.to_out[0]
    assert site_module(tiny_lens.pipeline, pixart, "attn2.heads", 2) is block.attn2.to_out[0]
    assert pixart.heads_of("attn2.heads") == "attn2" and pixart.heads_of("attn2.weights") is None
    # in a block's order: inside the attention, after its weights, before its output
    assert pixart.order.index("attn2.weights") < pixart.order.index("attn2.heads") < pixart.order.index("attn2")
    sana = FAMILIES["SanaTransformer2DModel"]  # linear self-attention: no softmax heads
    assert "attn2.heads" in sana.sites and "attn1.heads" not in sana.every_site
    sd3 = FAMILIES["SD3Transformer2DModel"]  # joint attention: the image stream's projection
    assert sd3.site_path("attn2.heads", 1) == "transformer.transformer_blocks.1.attn.to_out.0"
    flux = FAMILIES["FluxTransformer2DModel"]
    assert flux.site_path("attn2.heads", 1, split=2) == "transformer.transformer_blocks.1.attn.to_out.0"
    with pytest.raises(ValueError, match=r"block 2 of Flux is one of its single_transformer_blocks.*'attn2.heads' "
                                         r"exists in its transformer_blocks \(blocks 0..1\)"):
        flux.site_path("attn2.heads", 2, split=2)
