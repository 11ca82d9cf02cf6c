"""Code update by beam search over the fully connected MRF of one layer (docs/quantization.md step 4).

Rows are independent. For slot (group j, codebook m) every hypothesis of every row tries all K codewords, and
the best `beam_size` hypotheses per row survive. Scoring is incremental: we keep P = R·H (R = W − Ŵ, the
residual) per hypothesis, so a candidate's objective change costs O(g) per codeword,

    score(c) = s²·cᵀH_jj c − 2s·c·D,   D = P[:, j] + s·H_jj c_old   (the residual with this slot removed, times H),

and after a choice P is updated with a rank-g product (O(out·g·in)) instead of being recomputed. Hypotheses that
become identical (they differed only in the slot being revisited) are de-duplicated with 64-bit hashes of
their codes, so a wide beam really holds `beam_size` distinct hypotheses. With beam_size=1 this is greedy
coordinate descent and never increases the objective.
"""

from __future__ import annotations

import torch

from ..nn import decode_weight


def search_order(num_groups: int, num_codebooks: int, generator: torch.Generator) -> list[tuple[int, int]]:
    """A fresh random order per round: input groups shuffled, codebooks shuffled within each group."""
    order = []
    for j in torch.randperm(num_groups, generator=generator).tolist():
        for m in torch.randperm(num_codebooks, generator=generator).tolist():
            order.append((j, m))
    return order


def beam_search(weight: torch.Tensor, hessian: torch.Tensor, codes: torch.Tensor, codebooks: torch.Tensor,
                scales: torch.Tensor, beam_size: int = 1, generator: torch.Generator | None = None,
                order: list[tuple[int, int]] | None = None, max_chunk_elems: int = 1 << 24) -> torch.Tensor:
    """One round over every (input group, codebook) slot. Returns new int64 codes [out, in/g, M].

    weight [out, in]; hessian [in, in]; codes int64 [out, in/g, M]; codebooks [M, K, g] (or [M, K, 1, g]);
    scales [out] (or [out, 1, 1, 1]).
    """
    if beam_size < 1:
        raise ValueError(f"beam_size: expected >= 1, found {beam_size}")
    generator = generator or torch.Generator().manual_seed(0)
    out_features, num_groups, num_codebooks = codes.shape
    codebooks = codebooks.detach().reshape(num_codebooks, codebooks.shape[1], -1).float()
    codebook_size, group = codebooks.shape[1], codebooks.shape[2]
    if order is None:
        order = search_order(num_groups, num_codebooks, generator)
    hash_weights = torch.randint(-(1 << 62), 1 << 62, (num_groups, num_codebooks), generator=generator,
                                 dtype=torch.int64).to(codes.device)
    rows = max(1, max_chunk_elems // (beam_size * codebook_size * 4))
    result = torch.empty_like(codes)
    for start in range(0, out_features, rows):
        sl = slice(start, start + rows)
        result[sl] = _beam_search_rows(weight[sl].float(), hessian.float(), codes[sl], codebooks,
                                       scales.detach().reshape(-1)[sl].float(), beam_size, order, hash_weights)
    return result


def _greedy_rows(weight, hessian, codes, codebooks, scales, order):
    """beam_size=1: greedy coordinate descent with in-place updates (no hypothesis bookkeeping)."""
    num_codebooks, codebook_size, group = codebooks.shape
    codes = codes.clone()
    residual = weight - decode_weight(codes, codebooks.unsqueeze(2), scales)
    p = residual @ hessian  # [rows, in]
    s = scales.unsqueeze(1)
    sq2 = (scales * scales).unsqueeze(1)
    # cᵀH_jj c for every codeword of every (group, codebook): [groups, M, K]
    h_blocks = torch.stack([hessian[j * group:(j + 1) * group, j * group:(j + 1) * group]
                            for j in range(codes.shape[1])])
    quad = torch.einsum("mkg,jgh,mkh->jmk", codebooks, h_blocks, codebooks)
    cb_t = codebooks.transpose(1, 2).contiguous()  # [M, g, K]
    for j, m in order:
        cols = slice(j * group, (j + 1) * group)
        cb = codebooks[m]
        old = codes[:, j, m]
        c_old = cb[old]  # [rows, g]
        d = p[:, cols] + s * (c_old @ h_blocks[j])  # residual without this slot, times H
        score = torch.addmm(sq2 * quad[j, m], s * d, cb_t[m], alpha=-2.0)  # s²cᵀH_jj c − 2s·c·d
        new = score.argmin(-1)
        changed = (new != old).nonzero().squeeze(1)
        if changed.numel() == 0:
            continue
        if 2 * changed.numel() < new.numel():
            # After the first round only ≈ 5–15% of rows change a slot: update P on those rows alone.
            delta = s[changed] * (c_old[changed] - cb[new[changed]])
            p.index_add_(0, changed, delta @ hessian[cols, :])
        else:
            delta = s * (c_old - cb[new])  # zero on unchanged rows
            p.addmm_(delta, hessian[cols, :])
        codes[:, j, m] = new
    return codes


def _beam_search_rows(weight, hessian, codes, codebooks, scales, beam_size, order, hash_weights):
    if beam_size == 1:
        return _greedy_rows(weight, hessian, codes, codebooks, scales, order)
    num_rows = weight.shape[0]
    num_codebooks, codebook_size, group = codebooks.shape
    residual = weight - decode_weight(codes, codebooks.unsqueeze(2), scales)
    hyp_p = (residual @ hessian).unsqueeze(0)  # [beams, rows, in]
    hyp_loss = (hyp_p[0] * residual).sum(-1).unsqueeze(0)  # [beams, rows]
    hyp_codes = codes.unsqueeze(0).clone()  # [beams, rows, groups, M]
    hyp_hash = (codes * hash_weights).sum((-1, -2)).unsqueeze(0)  # wraps mod 2^64, fine for hashing
    row_ids = torch.arange(num_rows, device=codes.device)
    s = scales.view(1, num_rows, 1)
    sq = (scales * scales).view(1, num_rows, 1)
    for j, m in order:
        cols = slice(j * group, (j + 1) * group)
        h_jj = hessian[cols, cols]
        cb = codebooks[m]  # [K, g]
        quad = ((cb @ h_jj) * cb).sum(-1)  # [K]
        old = hyp_codes[:, :, j, m]  # [beams, rows]
        c_old = cb[old]  # [beams, rows, g]
        d = hyp_p[:, :, cols] + s * (c_old @ h_jj)
        score = sq * quad - 2.0 * s * (d @ cb.T)  # [beams, rows, K]
        score_old = score.gather(-1, old.unsqueeze(-1))
        total = (hyp_loss.unsqueeze(-1) - score_old) + score
        beams = total.shape[0]
        if beams > 1:
            # Hypotheses equal outside this slot would propose the same K tuples: keep the first of each.
            key = hyp_hash - old * hash_weights[j, m]
            same = key.unsqueeze(1) == key.unsqueeze(0)  # [b', b, rows]
            earlier = torch.ones(beams, beams, dtype=torch.bool, device=codes.device).triu(1).unsqueeze(-1)  # b' < b
            dup = (same & earlier).any(0)  # [b, rows]
            total = total.masked_fill(dup.unsqueeze(-1), float("inf"))
        flat = total.permute(1, 0, 2).reshape(num_rows, beams * codebook_size)
        keep = min(beam_size, beams * codebook_size)
        vals, idx = flat.topk(keep, dim=-1, largest=False)  # [rows, keep]
        parent, new = (idx // codebook_size).T, (idx % codebook_size).T  # [keep, rows]
        new_loss = vals.T
        hyp_codes = hyp_codes[parent, row_ids]
        hyp_p = hyp_p[parent, row_ids]
        hyp_hash = hyp_hash[parent, row_ids]
        old = old[parent, row_ids]
        # Rank-g update of P = R·H for the changed slot: R[:, cols] += s·(c_old − c_new).
        delta = s * (cb[old] - cb[new])  # [beams, rows, g]
        hyp_p = hyp_p + delta @ hessian[cols, :]
        hyp_codes[:, :, j, m] = new
        hyp_hash = hyp_hash + (new - old) * hash_weights[j, m]
        hyp_loss = new_loss
    best = hyp_loss.argmin(0)
    return hyp_codes[best, row_ids]
