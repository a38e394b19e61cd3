"""Memory vectors: the optimisation loop on a tiny model, save/load, refusal with another model."""

import pytest
import torch

from memory_plugin import testing
from memory_plugin import vectors as mv
from memory_plugin.vectors import (
    FAST_RECIPE,
    PAPER_RECIPE,
    MemoryVectors,
    ModelMismatchError,
    Recipe,
    anchor_token,
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
    assert greedy_decode(model, v.tensor, 2, anchor=v.anchor) == [17, 42] == decode(model, v)
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
    assert greedy_decode(model, e.tensor, 1, anchor=e.anchor) == easy


def test_batched_and_one_at_a_time_give_each_segment_its_own_vectors(model):
    segs = [[11], [12], [13]]
    out = cram_many(model, segs, n_vectors=1, max_steps=200, recipe=Recipe(batch_size=3))
    assert all(v.exact for v in out)
    assert [greedy_decode(model, v.tensor, 1, anchor=v.anchor) for v in out] == segs


def test_paper_recipe_is_the_papers_settings():
    assert (PAPER_RECIPE.lr, PAPER_RECIPE.betas, PAPER_RECIPE.weight_decay, PAPER_RECIPE.batch_size) == (
        1e-2, (0.9, 0.9), 0.01, 1,
    )  # fmt: skip
    assert (PAPER_RECIPE.bf16, PAPER_RECIPE.stop) == (False, "teacher_forced")
    assert (FAST_RECIPE.bf16, FAST_RECIPE.stop) == (None, "greedy") and FAST_RECIPE.batch_size > 1


@pytest.mark.parametrize("amx", [False, True])
def test_bf16_by_default_only_where_the_cpu_makes_it_fast(model, monkeypatch, amx):
    monkeypatch.setattr(torch.cpu, "_is_amx_tile_supported", lambda: amx)
    monkeypatch.setattr(torch.cpu, "_is_avx512_bf16_supported", lambda: False)
    dtypes = set()
    hook = model.model.layers[0].mlp.down_proj.register_forward_hook(lambda m, i, o: dtypes.add(o.dtype))
    try:
        cram(model, [17, 42], n_vectors=2, max_steps=3, verify=False)
    finally:
        hook.remove()
    assert dtypes == ({torch.bfloat16, torch.float32} if amx else {torch.float32})  # float32: the greedy checks
    assert FAST_RECIPE.lr_at(0, 100) < FAST_RECIPE.lr_at(FAST_RECIPE.warmup_steps, 100)
    assert FAST_RECIPE.lr_at(99, 100) < FAST_RECIPE.lr
    assert PAPER_RECIPE.lr_at(0, 100) == PAPER_RECIPE.lr_at(99, 100) == 1e-2


def test_a_segment_stops_at_the_first_greedy_check_that_decodes_it(model):
    r = Recipe(batch_size=2, check_every=7)
    easy, hard = [5], [3, 9, 27, 81, 243, 100, 200, 150]
    e, h = cram_many(model, [easy, hard], n_vectors=1, max_steps=70, recipe=r)
    assert e.exact and e.steps < 70  # stopped early
    assert not h.exact and h.steps == 70


def test_a_segment_is_checked_as_soon_as_teacher_forcing_is_right_not_only_periodically(model, monkeypatch):
    calls = []
    real = mv._decodes_exactly

    def spy(model, vectors, targets, anchor=None):
        calls.append(len(targets))
        return real(model, vectors, targets, anchor)

    monkeypatch.setattr(mv, "_decodes_exactly", spy)
    (v,) = cram_many(model, [[5]], n_vectors=1, max_steps=500, recipe=Recipe(batch_size=1, check_every=1000))
    assert v.exact and v.steps < 500 and calls  # no periodic check before step 500: a candidate check stopped it


def test_the_stopping_rule_is_greedy_decoding_not_teacher_forcing(model, monkeypatch):
    seen = []

    def never(model, vectors, targets, anchor=None):  # decoding disagrees, whatever teacher forcing says
        seen.append(len(targets))
        return torch.zeros(len(targets), dtype=torch.bool)

    monkeypatch.setattr(mv, "_decodes_exactly", never)
    r = Recipe(batch_size=2, check_every=10)
    out = cram_many(model, [[5], [6]], n_vectors=1, max_steps=60, recipe=r)
    assert all(not v.exact and v.steps == 60 for v in out)
    # both live segments, batched, every 10 steps; and checks in between where teacher forcing was
    # right, which did not stop them
    assert seen.count(2) >= 6 and len(seen) > 6

    def always(model, vectors, targets, anchor=None):
        return torch.ones(len(targets), dtype=torch.bool)

    monkeypatch.setattr(mv, "_decodes_exactly", always)
    monkeypatch.setattr(mv, "greedy_decode", lambda m, v, n, anchor=None: [3, 9, 27, 81, 243, 100, 200, 150][:n])
    (v,) = cram_many(model, [[3, 9, 27, 81, 243, 100, 200, 150]], n_vectors=1, max_steps=60, recipe=r)
    assert v.exact and v.steps == 10  # stopped at the first check, far from teacher-forced accuracy 1.0


@pytest.mark.parametrize("anchor", [None, 7])
def test_batched_greedy_check_is_greedy_decoding(model, anchor):
    torch.manual_seed(0)
    vecs = torch.randn(3, 2, model.config.hidden_size) * 0.05
    decoded = [greedy_decode(model, v, 5, anchor=anchor) for v in vecs]
    targets = torch.tensor([decoded[0], decoded[1][:4] + [(decoded[1][4] + 1) % 300], [(decoded[2][0] + 1) % 300] + decoded[2][1:]])
    assert mv._decodes_exactly(model, vecs, targets, anchor).tolist() == [True, False, False]
    short = torch.tensor([decoded[0][:2] + [-100] * 3])  # padding is not checked
    assert mv._decodes_exactly(model, vecs[:1], short, anchor).tolist() == [True]


def test_vectors_are_crammed_and_decoded_after_the_models_start_token(model):
    firsts = []  # what sat at position 0 in every pass that started a sequence with the vectors

    def first(m, args, kw):
        past = kw.get("past_key_values")  # not a cached decoding step, nor anchor_token's one-token probes
        if (past is None or past.get_seq_length() == 0) and kw["inputs_embeds"].shape[1] > 1:
            firsts.append(kw["inputs_embeds"][:, 0].clone())

    hook = model.model.register_forward_pre_hook(first, with_kwargs=True)
    try:
        v = cram(model, [17, 42], n_vectors=2, max_steps=300)
    finally:
        hook.remove()
    start = model.get_input_embeddings().weight[anchor_token(model)]
    c = model.config
    assert v.anchor == anchor_token(model) in {c.bos_token_id, c.eos_token_id, c.pad_token_id, 0}
    assert firsts and all(torch.equal(x, start.expand_as(x)) for x in firsts)  # training, checks, verification
    assert v.exact and decode(model, v) == [17, 42] == greedy_decode(model, v.tensor, 2, anchor=v.anchor)
    assert cram(model, [17, 42], n_vectors=2, max_steps=300, recipe=PAPER_RECIPE).anchor is None


def test_the_bf16_path_runs_the_model_in_bf16_and_its_vectors_decode_exactly_in_float32(model):
    dtypes = set()
    hook = model.model.layers[0].mlp.down_proj.register_forward_hook(lambda m, i, o: dtypes.add(o.dtype))
    try:
        out = cram_many(model, [[17, 42], [8]], n_vectors=2, max_steps=300, recipe=Recipe(bf16=True, batch_size=2))
    finally:
        hook.remove()
    assert torch.bfloat16 in dtypes and model.dtype == torch.float32
    assert all(v.exact and v.tensor.dtype == torch.float32 for v in out)
    assert [greedy_decode(model, v.tensor, v.n_tokens, anchor=v.anchor) for v in out] == [[17, 42], [8]]  # float32


def test_bf16_learns_and_float32_finishes_a_segment_that_is_right_only_in_bf16(model, monkeypatch):
    # The real model's case, forced here: the segment's tokens come out right under bf16 teacher
    # forcing, but the first three float32 greedy checks say it does not decode yet.
    real, checks, checking, trained = mv._decodes_exactly, [], [False], []

    def check(*a, **kw):
        checking[0] = True
        try:
            ok = real(*a, **kw)
        finally:
            checking[0] = False
        checks.append(len(trained))  # training forwards before this check
        return ok & (len(checks) > 3)

    monkeypatch.setattr(mv, "_decodes_exactly", check)
    anchor = anchor_token(model)  # its own forward, not a training step
    monkeypatch.setattr(mv, "anchor_token", lambda m: anchor)
    hook = model.model.layers[0].mlp.down_proj.register_forward_hook(
        lambda m, i, o: None if checking[0] else trained.append(o.dtype)
    )
    try:
        v = cram(model, [17, 42], n_vectors=2, max_steps=300, recipe=Recipe(bf16=True, batch_size=1, check_every=1000))
    finally:
        hook.remove()
    assert v.exact and decode(model, v) == [17, 42]
    assert len(checks) == 4  # the first bf16 "right", then each float32 step that is right, until one decodes
    first = checks[0]
    assert set(trained[:first]) == {torch.bfloat16}  # learning in bf16
    assert trained[first:] and set(trained[first:]) == {torch.float32}  # settled: finished in float32
    assert v.steps == len(trained) - 2  # the last two forwards: cram's verifying decode of the 2 tokens


def test_the_paper_recipe_runs_in_float32_and_stops_on_teacher_forced_accuracy(model):
    dtypes = set()
    hook = model.model.layers[0].mlp.down_proj.register_forward_hook(lambda m, i, o: dtypes.add(o.dtype))
    try:
        v = cram(model, [17, 42], n_vectors=2, max_steps=300, recipe=PAPER_RECIPE)
    finally:
        hook.remove()
    assert dtypes == {torch.float32} and v.exact and v.steps < 300


def test_progressive_lengthening_reaches_the_whole_segment(model):
    v = cram(model, [17, 42], n_vectors=2, max_steps=300, recipe=Recipe(progressive=1, batch_size=1))
    assert v.exact and greedy_decode(model, v.tensor, 2, anchor=v.anchor) == [17, 42]


def test_save_load_round_trip_and_refusal_with_another_model(model, tmp_path):
    v = cram(model, [17, 42], n_vectors=2, max_steps=300)
    v.save(tmp_path / "v.safetensors")
    back = MemoryVectors.load(tmp_path / "v.safetensors")
    assert torch.equal(back.tensor, v.tensor.float()) and (back.n_tokens, back.exact, back.fingerprint, back.anchor) == (
        2, True, v.fingerprint, anchor_token(model),
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
    with pytest.raises(ValueError, match="Recipe.stop"):
        Recipe(stop="loss")
    with pytest.raises(ValueError, match="Recipe.check_every"):
        Recipe(check_every=0)
    with pytest.raises(ValueError, match="Recipe.progressive"):
        Recipe(progressive=-1)
    with pytest.raises(ValueError, match="Recipe.bf16"):
        Recipe(bf16="yes")
    with pytest.raises(ValueError, match="Recipe.anchor"):
        Recipe(anchor=1)
    (tmp_path / "x.safetensors").write_bytes(b"nope")
    with pytest.raises(Exception):
        MemoryVectors.load(tmp_path / "x.safetensors")
