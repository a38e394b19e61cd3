"""Memory vectors: the optimisation loop on a tiny model, save/load, refusal with another model."""

import pytest
import torch

from memory_plugin import testing
from memory_plugin.vectors import (
    FAST_RECIPE,
    PAPER_RECIPE,
    MemoryVectors,
    ModelMismatchError,
    Recipe,
    cram,
    cram_many,
    decode,
    greedy_decode,
)


@pytest.fixture(scope="module")
def model():
    # A random model can only be steered by a prefix vector over a token or two (real LMs copy
    # from context, which is what makes long segments crammable); the loop is what is tested here.
    return testing.tiny_llama(300, seed=4)


def test_a_short_segment_becomes_exact_and_decodes_back(model):
    v = cram(model, [17, 42], n_vectors=2, max_steps=300)
    assert v.exact and v.n_tokens == 2 and 0 < v.steps < 300
    assert greedy_decode(model, v.tensor, 2) == [17, 42] == decode(model, v)
    assert v.tensor.shape == (2, model.config.hidden_size)


def test_cramming_leaves_the_models_weights_and_their_gradients_alone(model):
    before = {n: p.detach().clone() for n, p in model.named_parameters()}
    cram(model, [5, 9, 11], n_vectors=1, max_steps=5)
    for n, p in model.named_parameters():
        assert p.grad is None, n
        assert torch.equal(p, before[n]), n


def test_exact_means_greedy_decoding_was_checked(model, monkeypatch):
    import memory_plugin.vectors as mv

    monkeypatch.setattr(mv, "greedy_decode", lambda *a, **k: [0, 0])  # pretend decoding disagrees
    assert not cram(model, [17, 42], n_vectors=2, max_steps=300).exact


def test_converged_segments_freeze_while_others_keep_training(model):
    easy, hard = [5], [3, 9, 27, 81, 243, 100, 200, 150]
    out = cram_many(model, [hard, easy], n_vectors=1, max_steps=60, recipe=Recipe(batch_size=2))
    e, h = out[1], out[0]
    assert e.exact and e.steps < 60 and not h.exact and h.steps == 60
    # the frozen vectors are the ones that converged: they still decode exactly after the others trained on
    assert greedy_decode(model, e.tensor, 1) == easy


def test_batched_and_one_at_a_time_give_each_segment_its_own_vectors(model):
    segs = [[11], [12], [13]]
    out = cram_many(model, segs, n_vectors=1, max_steps=200, recipe=Recipe(batch_size=3))
    assert all(v.exact for v in out)
    assert [greedy_decode(model, v.tensor, 1) for v in out] == segs


def test_paper_recipe_is_the_papers_settings():
    assert (PAPER_RECIPE.lr, PAPER_RECIPE.betas, PAPER_RECIPE.weight_decay, PAPER_RECIPE.batch_size) == (
        1e-2, (0.9, 0.9), 0.01, 1,
    )  # fmt: skip
    assert FAST_RECIPE.lr_at(0, 100) < FAST_RECIPE.lr_at(FAST_RECIPE.warmup_steps, 100)
    assert FAST_RECIPE.lr_at(99, 100) < FAST_RECIPE.lr
    assert PAPER_RECIPE.lr_at(0, 100) == PAPER_RECIPE.lr_at(99, 100) == 1e-2


def test_save_load_round_trip_and_refusal_with_another_model(model, tmp_path):
    v = cram(model, [17, 42], n_vectors=2, max_steps=300)
    v.save(tmp_path / "v.safetensors")
    back = MemoryVectors.load(tmp_path / "v.safetensors")
    assert torch.equal(back.tensor, v.tensor.float()) and (back.n_tokens, back.exact, back.fingerprint) == (
        2, True, v.fingerprint,
    )  # fmt: skip
    assert decode(model, back) == [17, 42]
    other = testing.tiny_llama(300, seed=5)
    with pytest.raises(ModelMismatchError, match="another model"):
        decode(other, back)


def test_bad_arguments(model, tmp_path):
    with pytest.raises(ValueError, match="n_vectors"):
        cram(model, [1, 2], n_vectors=0)
    with pytest.raises(ValueError, match="segment 0"):
        cram(model, [])
    with pytest.raises(ValueError, match="max_steps"):
        cram(model, [1], max_steps=0)
    (tmp_path / "x.safetensors").write_bytes(b"nope")
    with pytest.raises(Exception):
        MemoryVectors.load(tmp_path / "x.safetensors")
