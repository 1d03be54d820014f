"""A faster CPU stand-in for transformers' torch_chunk_gated_delta_rule (Qwen3.5 linear attention),
for training the demo fixture (compiler/train.py). The same chunked algorithm, but the
unit-lower-triangular solve (MKL's batched trsm and its backward take ~0.5 s per call on small
64x64 batches on 2 cores) is replaced by the exact inverse of I + L (L strictly lower, so
nilpotent): (I - L)(I + L^2)(I + L^4)...(I + L^(C/2)), a handful of batched matmuls that autograd
differentiates cheaply. A sequence that fits one chunk is not padded."""
from __future__ import annotations

import torch
import torch.nn.functional as F


def _l2norm(x, dim=-1, eps=1e-6):
    return x * torch.rsqrt((x * x).sum(dim=dim, keepdim=True) + eps)


def _unit_lower_inverse(L: torch.Tensor) -> torch.Tensor:
    """(I + L)^-1 for strictly lower-triangular L of size C: L^C = 0, so the product of
    (I + L^(2^j)) with alternating sign on L covers every power below C."""
    c = L.shape[-1]
    eye = torch.eye(c, dtype=L.dtype)
    inv = eye - L
    p = L @ L
    k = 2
    while k < c:
        inv = inv @ (eye + p)
        k *= 2
        if k < c:
            p = p @ p
    return inv


def chunk_gated_delta_rule(query, key, value, g, beta, chunk_size: int = 64, initial_state=None,
                           output_final_state: bool = False, use_qk_l2norm_in_kernel: bool = False, **kwargs):
    initial_dtype = query.dtype
    b, seq, nk, dk = key.shape
    nv, dv = value.shape[-2:]
    if nk != nv:
        query = query.repeat_interleave(nv // nk, dim=2)
        key = key.repeat_interleave(nv // nk, dim=2)
    query, key, value, beta, decay = [x.transpose(1, 2).to(torch.float32, memory_format=torch.contiguous_format)
                                      for x in (query, key, value, beta, g)]
    if use_qk_l2norm_in_kernel:
        query, key = _l2norm(query), _l2norm(key)
    query = query * query.shape[-1] ** -0.5
    # a sequence that fits one chunk is not padded (the inverse below works for any chunk length)
    c = min(seq, chunk_size)
    pad = (c - seq % c) % c
    query, key, value = (F.pad(x, (0, 0, 0, pad)) for x in (query, key, value))
    beta, decay = (F.pad(x, (0, pad)) for x in (beta, decay))
    n_chunks = (seq + pad) // c
    v_beta = value * beta.unsqueeze(-1)
    k_beta = key * beta.unsqueeze(-1)
    query, key, k_beta, v_beta = [x.reshape(x.shape[0], x.shape[1], -1, c, x.shape[-1])
                                  for x in (query, key, k_beta, v_beta)]
    decay = decay.reshape(decay.shape[0], decay.shape[1], -1, c)
    upper = torch.ones(c, c, dtype=torch.bool).triu(1)
    cum = decay.cumsum(dim=3)
    pair = (cum.unsqueeze(4) - cum.unsqueeze(3)).masked_fill(upper, float("-inf")).exp()
    ut = (k_beta @ key.transpose(-1, -2)) * pair
    intra = (query @ key.transpose(-1, -2)) * pair
    decayed_k_beta = k_beta * cum.exp().unsqueeze(-1)
    inv = _unit_lower_inverse(ut.tril(-1))
    new_values, k_cumdecay = inv @ v_beta, inv @ decayed_k_beta
    state = (torch.zeros(b, nv, dk, dv, dtype=torch.float32) if initial_state is None
             else initial_state.to(torch.float32))
    query = query * cum.exp().unsqueeze(-1)
    key = key * (cum[..., -1:] - cum).exp().unsqueeze(-1)
    chunk_decay = cum[..., -1].exp()[..., None, None]
    outs = []
    for i in range(n_chunks):
        v_new = new_values[:, :, i] - k_cumdecay[:, :, i] @ state
        outs.append(query[:, :, i] @ state + intra[:, :, i] @ v_new)
        state = state * chunk_decay[:, :, i] + key[:, :, i].transpose(-1, -2) @ v_new
    out = torch.stack(outs, 2).reshape(b, nv, -1, dv)[:, :, :seq]
    out = out.transpose(1, 2).to(initial_dtype, memory_format=torch.contiguous_format)
    return out, (state if output_final_state else None)


def install():
    """Route transformers' Qwen3.5 linear attention through this function (this process only; the
    forge trains in a process of its own). tests/test_fixture.py checks it against the original."""
    from transformers.models.qwen3_5 import modeling_qwen3_5

    modeling_qwen3_5.torch_chunk_gated_delta_rule = chunk_gated_delta_rule
