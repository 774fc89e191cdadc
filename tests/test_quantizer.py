"""Invariants of the stage-1 quantizers on tiny tensors: VectorQuantizer (EMA or loss-learned codebook,
l2-normalised, factorised lookup), FSQ and the k-means used for codebook initialisation."""

from __future__ import annotations

import copy
import math
import warnings

import pytest
import torch
import torch.nn.functional as F

from stage1_vqvae.quantizer import FSQ, VectorQuantizer, kmeans, rotate_onto

K, D, B, H, W = 16, 8, 2, 5, 6  # non-square grid to catch H/W mix-ups

VQ_VARIANTS = [
    dict(ema=True),
    dict(ema=False),
    dict(ema=True, l2_normalize=True),
    dict(ema=False, lookup_dim=4),
    dict(ema=True, lookup_dim=4, l2_normalize=True),
    dict(ema=True, rotation_trick=True),
]
VQ_IDS = ["ema", "loss", "ema-l2", "loss-lookup4", "ema-lookup4-l2", "ema-rotation"]


def features(seed: int = 0, b: int = B, d: int = D, h: int = H, w: int = W) -> torch.Tensor:
    return torch.randn(b, d, h, w, generator=torch.Generator().manual_seed(seed))


def make_vq(**kwargs) -> VectorQuantizer:
    torch.manual_seed(0)
    return VectorQuantizer(codebook_size=kwargs.pop("codebook_size", K), code_dim=kwargs.pop("code_dim", D), **kwargs)


def flat_lookup_space(q: VectorQuantizer, z: torch.Tensor) -> torch.Tensor:
    """What the quantizer compares with its codebook: (B*H*W, lookup_dim)."""
    with torch.no_grad():
        return q._flat(q.in_proj(z))


# ------------------------------------------------------------------------------------- VectorQuantizer
@pytest.mark.parametrize("kwargs", VQ_VARIANTS, ids=VQ_IDS)
def test_vq_codes_are_nearest_and_eval_output_is_lookup(kwargs):
    q = make_vq(**kwargs)
    z = features()
    q.train()
    q(features(seed=1))  # one training step: k-means init, EMA/usage update, restarts
    q.eval()
    out = q(z)
    assert out.codes.shape == (B, H, W) and out.codes.dtype == torch.long
    assert 0 <= int(out.codes.min()) and int(out.codes.max()) < K
    assert out.quantized.shape == z.shape
    # In eval the output is exactly the code vector: decode_codes(codes) sees what the decoder saw.
    assert torch.equal(out.quantized, q.lookup(out.codes))
    # Each code is the nearest codebook entry (squared distance within rounding of the minimum).
    flat = flat_lookup_space(q, z)
    dist = torch.cdist(flat, q.codebook()).pow(2)  # (N, K)
    chosen = dist.gather(1, out.codes.reshape(-1, 1)).squeeze(1)
    assert torch.all(chosen <= dist.min(1).values + 1e-5)


def test_vq_plain_eval_output_is_codebook_rows():
    q = make_vq(kmeans_init=False).eval()
    out = q(features())
    expected = q.embed[out.codes].permute(0, 3, 1, 2)  # (B, H, W, D) -> (B, D, H, W)
    assert torch.equal(out.quantized, expected)


@pytest.mark.parametrize("kwargs", VQ_VARIANTS, ids=VQ_IDS)
def test_vq_gradients_straight_through(kwargs):
    # No k-means init: k-means centroids are the means of their vectors, so the codebook gradient would be ~0.
    q = make_vq(kmeans_init=False, **kwargs).train()
    z = features().requires_grad_(True)
    out = q(z)
    (out.quantized.pow(2).sum() + out.loss).backward()
    assert z.grad is not None and z.grad.abs().sum() > 0
    if not kwargs.get("lookup_dim") and not kwargs.get("l2_normalize") and not kwargs.get("rotation_trick"):
        # Straight-through: d quantized / d z is the identity.
        z2 = z.detach().clone().requires_grad_(True)
        q(z2).quantized.sum().backward()
        assert torch.equal(z2.grad, torch.ones_like(z2))
    if kwargs["ema"]:
        assert not isinstance(q.embed, torch.nn.Parameter)  # EMA codebook: a buffer, no gradient
    else:
        grad = q.embed.grad
        assert grad is not None
        used = torch.bincount(out.codes.flatten(), minlength=K) > 0
        assert grad[used].abs().sum(1).gt(0).all() and grad[~used].abs().sum() == 0


def test_vq_loss_is_beta_times_commitment_for_ema():
    z = features()
    q1 = make_vq(kmeans_init=False, restart_threshold=0.0, beta=0.25)
    q2 = copy.deepcopy(q1)
    q2.beta = 1.0
    for mode in ("eval", "train"):
        a, b = getattr(copy.deepcopy(q1), mode)()(z), getattr(copy.deepcopy(q2), mode)()(z)
        assert torch.equal(a.codes, b.codes)
        torch.testing.assert_close(a.loss, 0.25 * a.commitment)
        torch.testing.assert_close(b.loss, 4 * a.loss)
    out = q1.eval()(z)
    e = q1.embed[out.codes].permute(0, 3, 1, 2)
    torch.testing.assert_close(out.commitment, F.mse_loss(z, e))


def test_vq_beta_weights_only_the_encoder_side_without_ema():
    """Codebook loss ||sg(z) - e||^2 pulls the codebook; beta * ||z - sg(e)||^2 pulls the encoder output."""
    z = features()
    base = make_vq(ema=False, kmeans_init=False, restart_threshold=0.0, beta=0.25).eval()
    grads = {}
    for beta in (0.25, 1.0):
        q = copy.deepcopy(base)
        q.beta = beta
        zz = z.clone().requires_grad_(True)
        out = q(zz)
        out.loss.backward()
        e = q.embed.detach()[out.codes].permute(0, 3, 1, 2)
        torch.testing.assert_close(out.loss, beta * F.mse_loss(z, e) + F.mse_loss(e, z))
        grads[beta] = (zz.grad, q.embed.grad)
    torch.testing.assert_close(grads[0.25][0], 0.25 * grads[1.0][0])  # encoder side scales with beta
    torch.testing.assert_close(grads[0.25][1], grads[1.0][1])  # codebook side does not


def test_ema_step_moves_used_codes_toward_their_means():
    decay = 0.5
    q = make_vq(code_dim=4, codebook_size=8, decay=decay, kmeans_init=False, restart_threshold=0.0)
    z = features(d=4, h=3, w=3) * 0.5
    embed0, size0, sum0 = q.embed.clone(), q.cluster_size.clone(), q.embed_sum.clone()
    q.train()
    codes = q(z).codes.flatten()
    flat = z.permute(0, 2, 3, 1).reshape(-1, 4)
    counts = torch.bincount(codes, minlength=8).float()
    sums = torch.zeros(8, 4).index_add_(0, codes, flat)
    torch.testing.assert_close(q.cluster_size, decay * size0 + (1 - decay) * counts)
    torch.testing.assert_close(q.embed_sum, decay * sum0 + (1 - decay) * sums)
    used = counts > 0
    assert used.sum() >= 2 and (~used).sum() >= 1  # the data exercise both branches
    means = sums[used] / counts[used, None]
    before = (embed0[used] - means).norm(dim=1)
    after = (q.embed[used] - means).norm(dim=1)
    assert torch.all(after < before)
    # Unused codes only decay: the same direction (a positive multiple of the old vector).
    cos = F.cosine_similarity(q.embed[~used], embed0[~used], dim=1)
    torch.testing.assert_close(cos, torch.ones_like(cos))


def clustered_features(centers: torch.Tensor, per_cluster: int = 16, seed: int = 0) -> torch.Tensor:
    """(1, D, n, per_cluster) features whose vectors sit in tight clusters around `centers` (n, D)."""
    g = torch.Generator().manual_seed(seed)
    x = centers[:, None, :] + 0.05 * torch.randn(len(centers), per_cluster, centers.shape[1], generator=g)
    return x.permute(2, 0, 1)[None]


@pytest.mark.parametrize("ema", [True, False])
def test_kmeans_init_on_first_training_batch_only(ema):
    centers = torch.tensor([[4.0, 0.0], [-4.0, 0.0], [0.0, 4.0], [0.0, -4.0]])
    z = clustered_features(centers)
    q = make_vq(code_dim=2, codebook_size=8, ema=ema, kmeans_init=True, restart_threshold=0.0)
    embed0 = q.embed.detach().clone()
    q.eval()(z)
    assert not bool(q.initialized) and torch.equal(q.embed, embed0)  # eval never initialises
    q.train()(z)
    assert bool(q.initialized) and not torch.equal(q.embed, embed0)
    d = torch.cdist(q.embed.detach(), centers)  # (codes, centers)
    assert torch.all(d.min(1).values < 0.5)  # every code sits in a cluster
    assert torch.all(d.min(0).values < 0.5)  # every cluster has a code
    q._kmeans_init = lambda flat: pytest.fail("k-means ran again on a later batch")
    q.train()(z)
    assert torch.all(torch.cdist(q.embed.detach(), centers).min(1).values < 0.5)  # still in the clusters


@pytest.mark.parametrize("ema", [True, False])
def test_dead_code_restarts_near_an_encoder_output(ema):
    q = make_vq(code_dim=4, codebook_size=8, ema=ema, kmeans_init=False, restart_threshold=1.0)
    dead = 3
    with torch.no_grad():
        q.embed[dead] = 100.0  # far from every input: never chosen
        q.cluster_size.fill_(50.0)
        q.cluster_size[dead] = 0.0
        if ema:
            q.embed_sum.copy_(q.embed * 50.0)
            q.embed_sum[dead] = 0.0
    z = features(d=4, h=3, w=3)
    others = q.embed.detach().clone()
    codes = q.train()(z).codes
    assert not (codes == dead).any()
    flat = z.permute(0, 2, 3, 1).reshape(-1, 4)
    new = q.embed.detach()[dead]
    assert torch.cdist(new[None], flat).min() < 0.1  # re-seeded at (a jittered copy of) an encoder output
    assert q.cluster_size[dead] > q.restart_threshold  # given an average usage, not restarted again at once
    if ema:
        torch.testing.assert_close(q.embed_sum[dead], new * q.cluster_size[dead])
    unused_alive = torch.ones(8, dtype=torch.bool)
    unused_alive[dead] = False
    unused_alive[codes.unique()] = False
    # Codes above the threshold are not restarted (unused ones only decay / keep their value).
    if not ema:
        torch.testing.assert_close(q.embed.detach()[unused_alive], others[unused_alive])
    else:
        cos = F.cosine_similarity(q.embed[unused_alive], others[unused_alive], dim=1)
        torch.testing.assert_close(cos, torch.ones_like(cos))


@pytest.mark.parametrize("kwargs", [dict(ema=True, lookup_dim=4), dict(ema=False, lookup_dim=4), dict(ema=True)])
def test_vq_runs_in_fp32_under_bf16_autocast(kwargs):
    """bf16 distances would flip near-tied codes and corrupt the EMA sums: the quantizer opts out of autocast."""
    q_ref = make_vq(codebook_size=64, **kwargs)
    q_amp = copy.deepcopy(q_ref)
    for step in range(3):
        z = features(seed=step, b=4, h=8, w=8).bfloat16()  # what an autocast encoder hands over
        torch.manual_seed(step)  # k-means init and restarts draw from the global RNG: same draws for both
        ref = q_ref.train()(z.float())
        torch.manual_seed(step)
        with torch.autocast("cpu", dtype=torch.bfloat16):
            amp = q_amp.train()(z)
        assert torch.equal(ref.codes, amp.codes)
        assert amp.quantized.dtype == torch.float32 and amp.loss.dtype == torch.float32
        torch.testing.assert_close(amp.quantized, ref.quantized, rtol=0, atol=0)
    for name, buf in q_amp.named_buffers():
        if buf.is_floating_point():
            assert buf.dtype == torch.float32, name
        assert torch.equal(buf, dict(q_ref.named_buffers())[name]), name
    assert torch.equal(q_amp.embed, q_ref.embed)


# ------------------------------------------------------------------------------------- FSQ
LEVELS = [[8, 5, 5, 5], [3, 4, 2], [2, 2]]


def identity_fsq(levels: list[int]) -> FSQ:
    """An FSQ whose input projection is the identity, so inputs address the bounded space directly."""
    fsq = FSQ(levels, code_dim=len(levels))
    with torch.no_grad():
        fsq.in_proj.weight.copy_(torch.eye(len(levels))[:, :, None, None])
        fsq.in_proj.bias.zero_()
    return fsq.eval()


@pytest.mark.parametrize("levels", LEVELS, ids=str)
def test_fsq_codebook_size_and_digits_round_trip(levels):
    fsq = FSQ(levels, code_dim=D)
    assert fsq.codebook_size == math.prod(levels)
    codes = torch.arange(fsq.codebook_size)
    digits = fsq.codes_to_digits(codes)  # (K, L)
    assert digits.shape == (fsq.codebook_size, len(levels))
    assert torch.all(digits >= 0) and torch.all(digits < torch.tensor(levels))
    assert torch.equal((digits * fsq.basis).sum(-1), codes)  # digits recompose to the code
    assert len(torch.unique(digits, dim=0)) == fsq.codebook_size


@pytest.mark.parametrize("levels", LEVELS, ids=str)
def test_fsq_every_code_reachable_and_forward_matches_lookup(levels):
    fsq = identity_fsq(levels)
    n = len(levels)
    # Per channel: sweep a line of inputs and keep one input for each digit it produces.
    line = torch.linspace(-8, 8, 4001)
    sweep = line[None, None, :, None].expand(1, n, -1, 1)  # (1, L, 4001, 1): every channel the same
    digits = fsq.codes_to_digits(fsq(sweep).codes[0, :, 0])  # (4001, L)
    per_channel = []
    for i, level in enumerate(levels):
        found = {int(d): line[j] for j, d in reversed(list(enumerate(digits[:, i])))}
        assert sorted(found) == list(range(level)), f"channel {i} reaches digits {sorted(found)}"
        per_channel.append(torch.stack([found[d] for d in range(level)]))
    # The Cartesian product of per-digit inputs reaches every code exactly once.
    grid = torch.cartesian_prod(*per_channel) if n > 1 else per_channel[0][:, None]  # (K, L)
    z = grid.T[None, :, :, None].contiguous()  # (1, L, K, 1)
    out = fsq(z)
    assert torch.equal(out.codes.flatten().sort().values, torch.arange(fsq.codebook_size))
    assert torch.equal(out.quantized, fsq.lookup(out.codes))


@pytest.mark.parametrize("levels", LEVELS, ids=str)
def test_fsq_codes_in_range_and_quantized_is_lookup(levels):
    torch.manual_seed(0)
    fsq = FSQ(levels, code_dim=D)
    z = 5 * features()
    for mode in ("train", "eval"):
        out = getattr(fsq, mode)()(z)
        assert out.codes.shape == (B, H, W)
        assert 0 <= int(out.codes.min()) and int(out.codes.max()) < fsq.codebook_size
        assert torch.equal(out.quantized, fsq.lookup(out.codes))
        assert out.loss == 0
    z = features().requires_grad_(True)
    fsq.train()(z).quantized.sum().backward()
    assert z.grad.abs().sum() > 0  # straight-through rounding


def test_fsq_rejects_bad_levels():
    with pytest.raises(ValueError, match="levels"):
        FSQ([8, 1], code_dim=D)


# ------------------------------------------------------------------------------------- kmeans
def test_kmeans_recovers_well_separated_clusters():
    centers = torch.tensor([[5.0, 0.0], [-5.0, 0.0], [0.0, 5.0], [0.0, -5.0]])
    g = torch.Generator().manual_seed(0)
    x = (centers[:, None, :] + 0.1 * torch.randn(4, 50, 2, generator=g)).reshape(-1, 2)
    means = x.view(4, 50, 2).mean(1)
    # As the codebook uses it: more centroids than clusters. Every cluster is found, no centroid strays.
    c = kmeans(x, 16, generator=torch.Generator().manual_seed(0))
    assert c.shape == (16, 2)
    d = torch.cdist(c, means)
    assert torch.all(d.min(1).values < 0.3) and torch.all(d.min(0).values < 0.3)
    # A cluster owned by a single centroid ends at the cluster mean.
    owners = d.argmin(1)
    for j in range(4):
        if (owners == j).sum() == 1:
            torch.testing.assert_close(c[owners == j][0], means[j])


def test_kmeans_fewer_points_than_codes_and_determinism():
    x = torch.randn(5, 3, generator=torch.Generator().manual_seed(0))
    c = kmeans(x, 8, generator=torch.Generator().manual_seed(1))
    assert c.shape == (8, 3)
    assert torch.all(torch.cdist(c, x).min(1).values < 1e-5)  # every centroid is one of the points
    again = kmeans(x, 8, generator=torch.Generator().manual_seed(1))
    assert torch.equal(c, again)


def test_restart_threshold_too_small_for_the_batch_warns_at_init():
    """A threshold under 5% of a code's average assignments per batch warns at k-means init, naming the
    value to use; a threshold scaled with the batch does not (the H200's batch-2048 collapse)."""
    z = features(b=8)  # 8*5*6 = 240 vectors, 16 codes: 15 assignments per code on average
    with pytest.warns(UserWarning, match=r"restart_threshold 0.5 is 3.3% .* \(15 at this batch size\).*: 5\)"):
        make_vq(restart_threshold=0.5).train()(z)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        make_vq(restart_threshold=5.0).train()(z)
        make_vq(restart_threshold=0.0).train()(z)  # restarts off: nothing to warn about


# ------------------------------------------------------------------------------------- rotation trick
def test_rotate_onto_value_is_target_and_gradient_is_scaled_rotation():
    g = torch.Generator().manual_seed(3)
    z = torch.randn(5, 6, generator=g, dtype=torch.float64).requires_grad_(True)
    e = torch.randn(5, 6, generator=g, dtype=torch.float64)
    out = rotate_onto(z, e)
    assert torch.allclose(out, e, atol=1e-12)  # the forward value is the code vector
    upstream = torch.randn(5, 6, generator=g, dtype=torch.float64)
    (out * upstream).sum().backward()
    for i in range(5):
        # The explicit matrix: R = I - 2 r r^T + 2 v u^T, an orthogonal map with R u = v.
        u, v = z[i].detach() / z[i].detach().norm(), e[i] / e[i].norm()
        r = (u + v) / (u + v).norm()
        rot = torch.eye(6, dtype=torch.float64) - 2 * torch.outer(r, r) + 2 * torch.outer(v, u)
        assert torch.allclose(rot @ rot.T, torch.eye(6, dtype=torch.float64), atol=1e-12)
        assert torch.allclose(rot @ u, v, atol=1e-12)
        scale = e[i].norm() / z[i].detach().norm()
        assert torch.allclose(z.grad[i], scale * rot.T @ upstream[i], atol=1e-12)


def test_rotation_trick_changes_the_encoder_gradient_not_the_output():
    z = features()
    outs, grads = [], []
    for rotation in (False, True):
        q = make_vq(kmeans_init=False, rotation_trick=rotation).train()
        zz = z.clone().requires_grad_(True)
        out = q(zz)
        (out.quantized.pow(2).sum()).backward()
        outs.append(out.quantized.detach())
        grads.append(zz.grad)
    assert torch.allclose(outs[0], outs[1], atol=1e-6)  # same code vectors forward
    # The straight-through gradient of sum(q^2) is 2e; the rotated one has e's length scaled by |e|/|z|.
    assert torch.allclose(grads[0], 2 * outs[0])
    assert not torch.allclose(grads[0], grads[1], atol=1e-3)
    ratio = grads[1].norm(dim=1) / grads[0].norm(dim=1)  # per position, a rotation keeps the norm
    assert torch.allclose(ratio, outs[0].norm(dim=1) / z.norm(dim=1), rtol=1e-4)


# ------------------------------------------------------------------------------------- a model cast as a whole
CAST_VARIANTS = [dict(quantizer="vq"), dict(quantizer="vq", lookup_dim=4), dict(quantizer="fsq", fsq_levels=[5, 5, 4])]


@pytest.mark.parametrize("kwargs", CAST_VARIANTS, ids=["vq", "vq-lookup4", "fsq"])
def test_a_model_cast_to_bf16_encodes_and_decodes_like_fp32(kwargs):
    """`vqvae.to(torch.bfloat16)` (inference in half the memory) failed in the quantizer's fp32 conv; now the
    quantizer follows the model's dtype in and out and still compares distances in fp32."""
    from stage1_vqvae.model import VQModel

    torch.manual_seed(0)
    net = VQModel(in_channels=3, image_size=16, width=16, res_blocks=1, res_width=8, downsample=4, code_dim=8,
                  codebook_size=32, kmeans_init=False, **kwargs).eval()  # fmt: skip
    images = torch.rand(8, 3, 16, 16, generator=torch.Generator().manual_seed(1)) * 2 - 1
    codes32 = net.encode_to_codes(images)
    recon32 = net.decode_codes(codes32)
    net.to(torch.bfloat16)
    codes16 = net.encode_to_codes(images)  # fp32 images are cast to the model's dtype
    assert codes16.shape == codes32.shape and codes16.dtype == torch.long
    assert (codes16 == codes32).float().mean() >= 0.8  # the encoder in bf16 moves a few near-ties
    recon16 = net.decode_codes(codes32)  # the same codes: only bf16 rounding differs
    assert recon16.dtype == torch.bfloat16 and recon16.shape == recon32.shape
    assert float((recon16.float() - recon32).abs().max()) < 0.1
    net.float()  # and back: the fp32 model gives its fp32 results again
    assert torch.equal(net.encode_to_codes(images), codes32)
