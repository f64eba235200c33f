"""traced_generate, Hook and branch_rows: the nnsight loop shared by capture and every intervention."""

import numpy as np
import pytest
import torch

from dit_lens.trace.runner import Hook, branch_rows, check_seeds, traced_generate




def test_replacing_an_output_matches_a_raw_forward_hook(tiny_lens):
    def halve(step, layer, output):
        return output * 0.5 if layer == 1 else None

    result = traced_generate(tiny_lens, ["a polyp"], [4], num_inference_steps=3, guidance_scale=4.5,
                             hooks=[Hook("attn2", (1, 2), halve)], output_type="np")
    handle = tiny_lens.blocks[1].attn2.register_forward_hook(lambda module, args, out: out * 0.5)
    try:
        reference = tiny_lens.plain("a polyp", seed=4, num_inference_steps=3)
    finally:
        handle.remove()
    np.testing.assert_array_equal(result.images[0], reference)
    untouched = tiny_lens.plain("a polyp", seed=4, num_inference_steps=3)
    assert not np.array_equal(untouched, reference)  # the edit mattered, and was undone


def test_hooks_at_several_sites_run_in_execution_order(tiny_lens):
    seen = []
    hooks = [Hook("ff", (2, 0), lambda t, l, out: seen.append((t, l, "ff"))),
             Hook("attn2", (0, 1), lambda t, l, out: seen.append((t, l, "attn2")), steps=[1]),
             Hook("attn1.weights", (0,), lambda t, l, out: seen.append((t, l, "attn1.weights")))]
    traced_generate(tiny_lens, ["a"], [0], num_inference_steps=2, guidance_scale=4.5, hooks=hooks)
    assert seen == [(0, 0, "attn1.weights"), (0, 0, "ff"), (0, 2, "ff"),
                    (1, 0, "attn1.weights"), (1, 0, "attn2"), (1, 0, "ff"), (1, 1, "attn2"), (1, 2, "ff")]


def test_bad_hooks_are_refused(tiny_lens):
    with pytest.raises(ValueError, match="unknown site 'attn3'"):
        traced_generate(tiny_lens, ["a"], [0], num_inference_steps=1, guidance_scale=4.5,
                        hooks=[Hook("attn3", (0,), lambda *args: None)])
    with pytest.raises(ValueError, match=r"layers \[7\] do not exist"):
        traced_generate(tiny_lens, ["a"], [0], num_inference_steps=1, guidance_scale=4.5,
                        hooks=[Hook("attn2", (7,), lambda *args: None)])
    with pytest.raises(ValueError, match="distinct block indices"):
        Hook("attn2", (), lambda *args: None)


def test_branch_rows_splits_the_guidance_batch():
    rows = torch.arange(4.0).reshape(4, 1)  # runs 0, 1: uncond rows 0, 1; cond rows 2, 3
    assert branch_rows(rows, "cond", 2, True).flatten().tolist() == [2.0, 3.0]
    assert branch_rows(rows, "uncond", 2, True).flatten().tolist() == [0.0, 1.0]
    both = branch_rows(rows, "both", 2, True)  # (batch, 2, 1): [cond, uncond] per run
    assert both[:, :, 0].tolist() == [[2.0, 0.0], [3.0, 1.0]]
    assert branch_rows(rows, "cond", 4, False) is rows
    with pytest.raises(ValueError, match="needs classifier-free guidance"):
        branch_rows(rows, "uncond", 4, False)


def test_seed_checks():
    assert check_seeds(np.arange(3)) == [0, 1, 2]
    with pytest.raises(ValueError, match=r"integers in \[0, 2\*\*63\)"):
        check_seeds([1.5])
