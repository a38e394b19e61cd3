"""The attention maths against a plain softmax over concatenated logits."""

import pytest
import torch

from memory_plugin import attention
from memory_plugin.attention import AttnPart, apply_rope, block_relevance, joint_attention, representative_keys

H, HKV, D = 6, 2, 16


def _reference(parts, scaling):
    logits, values = [], []
    for p in parts:
        k = p.k.repeat_interleave(H // HKV, dim=0)
        lg = p.q @ k.transpose(-1, -2) * scaling
        if p.mask is not None:
            lg = lg.masked_fill(~p.mask, float("-inf"))
        logits.append(lg)
        values.append(p.v.repeat_interleave(H // HKV, dim=0))
    probs = torch.softmax(torch.cat(logits, dim=-1), dim=-1)
    out = probs @ torch.cat(values, dim=-2)
    sizes = [p.k.shape[1] for p in parts]
    return out, list(torch.split(probs, sizes, dim=-1))


def _parts(c, gen):
    q1, q2 = torch.randn(H, c, D, generator=gen), torch.randn(H, c, D, generator=gen)
    n_local, n_far = c + 20, 37
    local_mask = torch.ones(c, n_local, dtype=torch.bool).tril(n_local - c)  # causal, chunk at the end
    far_mask = torch.rand(c, n_far, generator=gen) > 0.3
    return [
        AttnPart(q1, torch.randn(HKV, n_local, D, generator=gen), torch.randn(HKV, n_local, D, generator=gen), local_mask, True),
        AttnPart(q2, torch.randn(HKV, n_far, D, generator=gen), torch.randn(HKV, n_far, D, generator=gen), far_mask, True),
        AttnPart(q2, torch.randn(HKV, 9, D, generator=gen), torch.randn(HKV, 9, D, generator=gen)),
        AttnPart(q2, torch.zeros(HKV, 0, D), torch.zeros(HKV, 0, D), None, True),  # an empty part is allowed
    ]


@pytest.mark.parametrize("c", [1, 3, 40])  # 40 takes the fused CPU flash path, 1 and 3 the explicit one
@pytest.mark.parametrize("rows", [None, "every_third"])
def test_joint_attention_is_one_softmax_over_all_parts(c, rows):
    gen = torch.Generator().manual_seed(c)
    parts = _parts(c, gen)
    mass_rows = torch.arange(0, c, 3) if rows else None
    out, masses = joint_attention(parts, 0.25, mass_rows)
    ref_out, ref_probs = _reference(parts, 0.25)
    torch.testing.assert_close(out, ref_out, atol=1e-5, rtol=1e-4)
    for m, p, part in zip(masses, ref_probs, parts):
        if not part.want_mass:
            assert m is None
            continue
        sel = p if mass_rows is None else p[:, mass_rows]
        torch.testing.assert_close(m, sel.sum(dim=1), atol=1e-5, rtol=1e-4)


BANDS = [
    (None, None),  # all visible
    (None, 0),  # causal
    (-29, 0),  # sliding window of 30
    (-30, 12),  # window shifted right: some keys every row sees, edges on both sides
    (None, -5),  # "older than 5": the first rows see nothing of this part
    (3, None),  # only keys at least 3 ahead
    (-9, 0),  # sliding window narrower than the chunk: needs a mask
    (-2, 1),
]


@pytest.mark.parametrize("band", BANDS, ids=str)
@pytest.mark.parametrize("c", [1, 24])
def test_banded_part_equals_its_mask(band, c):
    gen = torch.Generator().manual_seed(11)
    n = 40
    q = torch.randn(H, c, D, generator=gen)
    k, v = torch.randn(HKV, n, D, generator=gen), torch.randn(HKV, n, D, generator=gen)
    rel = torch.arange(n)[None, :] - torch.arange(c)[:, None]
    lo, hi = band
    mask = (rel >= (lo if lo is not None else -n)) & (rel <= (hi if hi is not None else n))
    sink = AttnPart(q, torch.randn(HKV, 2, D, generator=gen), torch.randn(HKV, 2, D, generator=gen))  # every row sees one key
    banded = joint_attention([AttnPart(q, k, v, band=band, want_mass=True), sink], 0.3, torch.arange(0, c, 5))
    masked = joint_attention([AttnPart(q, k, v, mask=mask, want_mass=True), sink], 0.3, torch.arange(0, c, 5))
    ref_out, ref_probs = _reference([AttnPart(q, k, v, mask=mask), sink], 0.3)
    torch.testing.assert_close(banded[0], ref_out, atol=1e-5, rtol=1e-4)
    torch.testing.assert_close(masked[0], ref_out, atol=1e-5, rtol=1e-4)
    torch.testing.assert_close(banded[1][0], ref_probs[0][:, ::5].sum(dim=1), atol=1e-5, rtol=1e-4)


def test_a_part_takes_a_mask_or_a_band():
    q, k = torch.randn(H, 3, D), torch.randn(HKV, 4, D)
    with pytest.raises(ValueError, match="mask or a band"):
        AttnPart(q, k, k, mask=torch.ones(3, 4, dtype=torch.bool), band=(None, 0))


def test_explicit_path_matches_flash_path(monkeypatch):
    gen = torch.Generator().manual_seed(7)
    parts = _parts(32, gen)
    out_flash, m_flash = joint_attention(parts, 0.3)
    monkeypatch.setattr(attention, "_FLASH_CPU", None)
    out_expl, m_expl = joint_attention(parts, 0.3)
    torch.testing.assert_close(out_flash, out_expl, atol=1e-5, rtol=1e-4)
    torch.testing.assert_close(m_flash[0], m_expl[0], atol=1e-5, rtol=1e-4)


def test_rope_preserves_norm_and_encodes_relative_position():
    gen = torch.Generator().manual_seed(0)
    q, k = torch.randn(1, D, generator=gen), torch.randn(1, D, generator=gen)
    inv = 1.0 / (10000 ** (torch.arange(0, D, 2) / D))

    def table(pos):
        ang = torch.tensor([float(pos)])[:, None] * inv
        emb = torch.cat([ang, ang], dim=-1)
        return emb.cos(), emb.sin()

    def dot(pq, pk):
        return (apply_rope(q, *table(pq)) * apply_rope(k, *table(pk))).sum()

    assert torch.allclose(apply_rope(q, *table(5)).norm(), q.norm(), atol=1e-5)
    assert torch.allclose(dot(10, 3), dot(107, 100), atol=1e-4)
    assert not torch.allclose(dot(10, 3), dot(10, 4), atol=1e-4)


def test_representative_keys_average_the_most_attended_tokens_per_head():
    k = torch.randn(HKV, 8, D)
    mass = torch.rand(H, 8)
    mass[0, [2, 5]] = 10.0  # head 0 (kv head 0) attended tokens 2 and 5 most
    mass[5, [1, 7]] = 10.0  # head 5 (kv head 1) attended tokens 1 and 7 most
    r = representative_keys(k, mass, repr_topk=2)
    assert r.shape == (H, D)
    torch.testing.assert_close(r[0], (k[0, 2] + k[0, 5]) / 2)
    torch.testing.assert_close(r[5], (k[1, 1] + k[1, 7]) / 2)


def test_block_relevance_is_dot_product_summed_over_heads():
    q = torch.randn(H, D)
    reprs = torch.randn(5, H, D)
    expected = torch.stack([(q * reprs[b]).sum() for b in range(5)])
    torch.testing.assert_close(block_relevance(q, reprs), expected)


def test_normalized_relevance_gives_every_head_an_equal_vote():
    g = torch.Generator().manual_seed(3)
    q = torch.randn(H, D, generator=g)
    reprs = torch.randn(6, H, D, generator=g) * 0.01
    reprs[4] += 0.2 * q  # every head mildly prefers block 4 ...
    reprs[1, 0] += 50 * q[0]  # ... but head 0's scores swing 100x wider, towards block 1
    assert int(block_relevance(q, reprs).argmax()) == 1  # InfLLM's sum: head 0 decides
    z = block_relevance(q, reprs, normalize=True)
    assert int(z.argmax()) == 4
    # z-scores per head: the same ranking however each head's scores are scaled
    scaled = q * torch.arange(1, H + 1, dtype=q.dtype)[:, None] ** 3
    torch.testing.assert_close(block_relevance(scaled, reprs, normalize=True), z, atol=1e-4, rtol=1e-4)


def test_normalized_relevance_of_one_block_is_finite():
    assert block_relevance(torch.randn(H, D), torch.randn(1, H, D), normalize=True).tolist() == [0.0]


def test_maxsim_relevance_matches_a_loop_and_ignores_padding():
    from memory_plugin.attention import maxsim_relevance

    g = torch.Generator().manual_seed(0)
    h, t, d, n = 3, 5, 8, 6
    q = torch.randn(h, t, d, generator=g)
    keys = torch.randn(4, h, n, d, generator=g)
    valid = torch.ones(4, n, dtype=torch.bool)
    valid[2, 3:] = False
    keys[2, :, 3:] = 100.0  # padding with huge keys must not count
    expect = torch.tensor(
        [
            sum(max(float(q[hh, tt] @ keys[s, hh, j]) for j in range(n) if valid[s, j]) for hh in range(h) for tt in range(t)) / t
            for s in range(4)
        ]
    )
    torch.testing.assert_close(maxsim_relevance(q, keys, valid), expect, rtol=1e-5, atol=1e-4)
