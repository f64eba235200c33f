"""attention_maps (dit_lens.readouts.attention_maps) and the word -> token mapping (dit_lens.model.tokens)."""

import io

import numpy as np
import pytest

from dit_lens import load
from dit_lens.testing import build_pixart
from dit_lens.readouts.attention_maps import attention_maps
from dit_lens.trace.capture import capture
from dit_lens.model.tokens import find_words, token_spans, word_tokens
from test_attention import raw_weights

T = 3


def test_maps_are_head_means_summed_over_each_words_tokens(tiny_lens):
    prompts, seeds = ["a red polyp", "a polyp, red and raised"], [0, 5]
    maps = attention_maps(tiny_lens, prompts, seeds=seeds, words=["polyp", "red"], num_inference_steps=T,
                          batch_size=3, progress=False)
    attention = maps["attention"]
    assert attention.dims == ("prompt", "seed", "step", "layer", "word", "row", "col")
    assert attention.shape == (2, 2, T, 3, 2, 4, 4)
    assert maps.n_tokens.values.tolist() == [[5, 3], [5, 3]]
    assert maps.attrs["word_tokens"]["a polyp, red and raised"] == {"polyp": [2, 3, 4, 5, 6],
                                                                               "red": [9, 10, 11]}
    for p, prompt in enumerate(prompts):
        tokens = {"polyp": [6, 7, 8, 9, 10], "red": [2, 3, 4]} if p == 0 else {"polyp": [2, 3, 4, 5, 6],
                                                                           "red": [9, 10, 11]}
        for seed in seeds:
            reference = raw_weights(tiny_lens, [prompt], [seed], T)  # (rows, heads, q, k): uncond, cond
            for (step, layer), w in reference.items():
                head_mean = w[1].mean(0).numpy()  # (queries, keys) of the conditional row
                for word, columns in tokens.items():
                    want = head_mean[:, columns].sum(-1).reshape(4, 4)
                    got = attention.sel(prompt=prompt, seed=seed, step=step, layer=layer, word=word).values
                    np.testing.assert_allclose(got, want, atol=2e-6)
    image = tiny_lens.plain(prompts[1], seed=5, num_inference_steps=T)
    np.testing.assert_allclose(maps["image"].sel(prompt=prompts[1], seed=5).values, image, atol=1e-5)
    assert not np.allclose(attention.sel(word="polyp").values, attention.sel(word="red").values)


def test_maps_agree_with_captured_weights_and_partition_the_prompt(tiny_lens, tmp_path):
    prompt = "an endoscopic image of polyps"
    words = ["an", "endoscopic", "image", "of", "polyps"]
    maps = attention_maps(tiny_lens, prompt, seeds=[2], words=words, num_inference_steps=T, batch_size=1,
                          progress=False)
    heads = capture(tiny_lens, prompt, seeds=[2], num_inference_steps=T, site="attn2.weights", reduce="heads",
                    batch_size=1, store=tmp_path / "heads.zarr")["attn2.weights"].isel(prompt=0, seed=0)
    assert heads.dims == ("step", "layer", "query", "key") and heads.shape == (T, 3, 16, 120)
    found = word_tokens(tiny_lens, prompt, words)
    for word in words:
        summed = heads.isel(key=list(found[word])).sum("key").values.reshape(T, 3, 4, 4)
        np.testing.assert_allclose(maps["attention"].sel(word=word).values[0, 0], summed, atol=1e-6)
    # the words, the four spaces between them and EOS are every unmasked key: together weight 1 per query
    spaces = [i for i, ch in enumerate(prompt) if ch == " "]
    total = maps["attention"].sum("word").values[0, 0] + heads.isel(key=spaces + [len(prompt)]).sum("key").values.reshape(
        T, 3, 4, 4)
    np.testing.assert_allclose(total, 1.0, atol=1e-5)
    mean = capture(tiny_lens, prompt, seeds=[2], num_inference_steps=T, site="attn2.weights", batch_size=1,
                   store=tmp_path / "mean.zarr")["attn2.weights"].isel(prompt=0, seed=0)
    assert mean.dims == ("step", "layer", "key")
    np.testing.assert_allclose(mean.values, heads.mean("query").values, atol=1e-6)


def test_steps_layers_and_labels(tiny_lens):
    maps = attention_maps(tiny_lens, ["a polyp"], seeds=[1], words=["polyp"], num_inference_steps=4,
                          layers=[2, 0], steps=[3, 1], progress=False)
    assert maps.step.values.tolist() == [1, 3] and maps.layer.values.tolist() == [0, 2]
    everything = attention_maps(tiny_lens, ["a polyp"], seeds=[1], words=["polyp"], num_inference_steps=4,
                                progress=False)
    np.testing.assert_allclose(maps["attention"].values, everything["attention"].sel(step=[1, 3], layer=[0, 2]).values)
    np.testing.assert_array_equal(maps.timestep.values, everything.timestep.sel(step=[1, 3]).values)
    assert maps.attrs["num_inference_steps"] == 4 and maps.attrs["site"] == "attn2.weights"
    assert maps.attrs["model_fingerprint"] == tiny_lens.fingerprint
    default = attention_maps(tiny_lens, ["a polyp"], seeds=[1], num_inference_steps=2, progress=False)
    assert default.word.values.tolist() == ["a", "polyp"]
    unguided = attention_maps(tiny_lens, "a polyp", seeds=[1], words=["polyp"], num_inference_steps=2,
                              guidance_scale=1.0, progress=False)  # one branch: its rows are the maps
    reference = raw_weights(tiny_lens, ["a polyp"], [1], 2, guidance=1.0)[(1, 2)]
    assert reference.shape[0] == 1
    np.testing.assert_allclose(unguided["attention"].sel(step=1, layer=2, word="polyp").values[0, 0],
                               reference[0].mean(0).numpy()[:, 2:7].sum(-1).reshape(4, 4), atol=2e-6)


def test_word_tokens_follow_the_byte_level_tokenizer(tiny_lens):
    tokenizer = tiny_lens.pipeline.tokenizer
    found = word_tokens(tiny_lens, "An Endoscopic image of POLYPS", ["polyps", "Endoscopic", "image of"])
    assert found == {"polyps": tuple(range(23, 29)), "Endoscopic": tuple(range(3, 13)),
                     "image of": tuple(range(14, 22))}
    text = "café polyp, café"  # é is two bytes: every later token shifts by one per é
    ids = tokenizer(text).input_ids
    found = find_words(tokenizer, text, ["café", "polyp"])
    assert found["polyp"] == (6, 7, 8, 9, 10)
    assert tokenizer.decode([ids[i] for i in found["polyp"]]) == "polyp"
    assert found["café"] == (0, 1, 2, 3, 4, 13, 14, 15, 16, 17)  # both occurrences count
    assert tokenizer.decode([ids[i] for i in found["café"][:5]]) == "café"
    spans = token_spans(tokenizer, text)
    assert spans[-1] is None and spans[3] == spans[4] == (3, 4)  # EOS; the two bytes of é


def sentencepiece_t5():
    """A real SentencePiece unigram model trained here, wrapped as transformers' T5Tokenizer."""
    spm = pytest.importorskip("sentencepiece")
    from transformers import T5Tokenizer

    corpus = ["an endoscopic image of polyps", "an endoscopic image of normal cecum", "dyed lifted polyps",
              "ulcerative colitis and esophagitis", "a colonoscopy photograph of polyps"] * 20
    model = io.BytesIO()
    spm.SentencePieceTrainer.train(sentence_iterator=iter(corpus), model_writer=model, vocab_size=60,
                                   model_type="unigram", hard_vocab_limit=False, minloglevel=2)
    processor = spm.SentencePieceProcessor(model_proto=model.getvalue())
    pieces = [(processor.id_to_piece(i), processor.get_score(i)) for i in range(processor.get_piece_size())]
    vocab = [("<pad>", 0.0), ("</s>", 0.0), ("<unk>", 0.0)] + [p for p in pieces if p[0] not in ("<unk>", "<s>", "</s>")]
    return T5Tokenizer(vocab=vocab, extra_ids=0), processor


def test_word_tokens_follow_a_sentencepiece_t5_tokenizer(tiny_spec):
    tokenizer, processor = sentencepiece_t5()
    text = "an endoscopic image of dyed lifted polyps"
    pieces = processor.encode(text, out_type=str)  # sentencepiece's own segmentation
    assert tokenizer.convert_ids_to_tokens(tokenizer(text).input_ids)[:-1] == pieces
    found = find_words(tokenizer, text, ["dyed", "polyps", "image", "lifted polyps"])
    for word, positions in found.items():
        assert "".join(pieces[i] for i in positions).replace("▁", " ").strip() == word
    assert found["lifted polyps"] == tuple(sorted(found["lifted polyps"]))
    # the same tokenizer inside a pipeline: maps come from its pieces
    pipeline = build_pixart(tiny_spec, seed=0)
    pipeline.register_modules(tokenizer=tokenizer)
    lens = load(pipeline)
    maps = attention_maps(lens, "An endoscopic image of polyps", seeds=[0], words=["polyps", "image"],
                          num_inference_steps=2, progress=False)
    positions = word_tokens(lens, "An endoscopic image of polyps", ["polyps", "image"])
    pieces = processor.encode("an endoscopic image of polyps", out_type=str)
    assert [pieces[i] for i in positions["polyps"]] == ["▁polyps"]
    reference = raw_weights(lens, ["An endoscopic image of polyps"], [0], 2)
    for (step, layer), w in reference.items():
        want = w[1].mean(0).numpy()[:, list(positions["image"])].sum(-1).reshape(4, 4)
        got = maps["attention"].sel(step=step, layer=layer, word="image").values[0, 0]
        np.testing.assert_allclose(got, want, atol=2e-6)


@pytest.mark.parametrize(
    "kwargs, message",
    [
        (dict(words=["cecum"]), r"word 'cecum' is not in the prompt 'a polyp'"),
        (dict(words=["poly"]), r"'poly' occurs inside another word"),
        (dict(words=["polyp", "polyp"]), "words has duplicates"),
        (dict(words=[""]), "non-empty strings"),
        (dict(prompts=["a polyp", "normal cecum"], words=None), "the prompts have different words"),
        (dict(prompts=["a polyp", "normal cecum"], words=["polyp"]), r"not in the prompt 'normal cecum'"),
        (dict(prompts=["x" * 130 + " polyp"], words=["polyp"]), "past the 120 tokens"),
        (dict(steps=[3]), r"steps \[3\] out of range.*0\.\.2"),
        (dict(steps=1), r"steps=\[1\]"),
        (dict(layers=[5]), r"attention_maps.layers \[5\] do not exist"),
        (dict(num_inference_steps=0), "num_inference_steps must be a positive integer"),
        (dict(batch_size=0), "batch_size must be a positive integer"),
        (dict(seeds=[]), "seeds is empty"),
    ],
)
def test_bad_arguments_are_clear_errors(tiny_lens, kwargs, message):
    args = dict(prompts=["a polyp"], seeds=[0], words=["polyp"], num_inference_steps=T, progress=False)
    args.update(kwargs)
    with pytest.raises(ValueError, match=message):
        attention_maps(tiny_lens, args.pop("prompts"), **args)


def test_tokenizers_without_offsets_are_refused():
    from transformers import CanineTokenizer  # a pure-Python tokenizer that reports no offsets

    with pytest.raises(ValueError, match="CanineTokenizer reports no token offsets"):
        token_spans(CanineTokenizer(), "a polyp")
