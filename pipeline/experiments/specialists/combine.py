"""Combining generalist and specialists at test time (paper section 5, steps 3 and 4); the report.

For each test case, specialists whose classes meet the generalist's top-n classes are active
(:func:`active_specialists`); the full distribution q minimises
``KL(p_g ‖ q) + Σ_active KL(p_m ‖ q_m)`` (q_m = q collapsed onto S_m + dustbin), found by batched
gradient descent (Adam) on q's logits starting from log p_g (:func:`combine_distributions`).
:func:`evaluate_combination` measures one setting (accuracy, per class, and the paper's Table 4
view: the gain by the number of active specialists covering the correct class), and
:func:`evaluation_report` renders a result as Markdown.
"""

from __future__ import annotations

import math

import numpy as np
import torch

from pipeline.checkpoints import LoadedModel
from pipeline.ensemble import combine_members
from pipeline.experiments.specialists.specialist import collapse_log_probs
from pipeline.metrics import classification_metrics, predict_logits


def active_specialists(log_pg: torch.Tensor, groups: list[list[int]], top_n: int) -> torch.Tensor:
    """Which specialists are active: their classes meet the generalist's ``top_n`` classes.
    (N, C) -> (N, K) bool."""
    top = log_pg.topk(min(top_n, log_pg.shape[1]), dim=1).indices  # (N, n)
    member = torch.zeros(len(groups), log_pg.shape[1], dtype=torch.bool)
    for k, g in enumerate(groups):
        member[k, g] = True
    return member[:, top].any(dim=2).T  # (K, N, n) -> (N, K)


def _kl_rows(log_p: torch.Tensor, log_q: torch.Tensor) -> torch.Tensor:
    """Row-wise KL(p ‖ q) from log-probabilities, 0·log 0 = 0. (B, C), (B, C) -> (B,)."""
    p = log_p.exp()
    return torch.where(p > 0, p * (log_p - log_q), torch.zeros_like(p)).sum(dim=1)


def combination_objective(
    z: torch.Tensor,
    log_pg: torch.Tensor,
    log_ps: list[torch.Tensor],
    groups: list[list[int]],
    active: torch.Tensor,
) -> torch.Tensor:
    """``KL(p_g ‖ q) + Σ_m active_m · KL(p_m ‖ q_m)`` per row, with q = softmax(z).

    Args:
        z: (N, C) logits of q. log_pg: (N, C) generalist log-probabilities.
        log_ps: per specialist m, (N, |S_m| + 1) log-probabilities (last column = dustbin).
        groups: per specialist, its classes S_m. active: (N, K) bool.

    Returns:
        (N,) objective values.
    """
    log_q = torch.log_softmax(z, dim=1)
    total = _kl_rows(log_pg, log_q)
    for m, (lp, g) in enumerate(zip(log_ps, groups, strict=True)):
        total = total + active[:, m].to(z.dtype) * _kl_rows(lp, collapse_log_probs(log_q, g))
    return total


def combine_distributions(
    log_pg: torch.Tensor,
    log_ps: list[torch.Tensor],
    groups: list[list[int]],
    active: torch.Tensor,
    steps: int = 300,
    lr: float = 0.1,
) -> torch.Tensor:
    """The full distribution q minimising the combination objective, for every row at once.

    Gradient descent (Adam, learning rate decayed to 0 on a cosine) on q's logits from ``log p_g``.
    Rows are independent (the objective is a sum over rows and Adam's steps are per element), so one
    batch optimises each row as if alone. A row with no active specialist keeps q = p_g exactly (the
    optimum of KL(p_g ‖ q) alone).

    Args:
        log_pg: (N, C) generalist log-probabilities. log_ps, groups, active: as in
            :func:`combination_objective`.
        steps: gradient steps. lr: Adam's initial step size (in logit units).

    Returns:
        (N, C) log q.
    """
    out = torch.log_softmax(log_pg.detach().double(), dim=1)
    # Only rows with an active specialist are optimised: for the others q = p_g is the exact
    # optimum, and Adam, which rescales every gradient to about its step size, would turn
    # rounding-level gradients into real steps.
    rows = active.to(torch.bool).any(dim=1)
    if steps == 0 or not bool(rows.any()):
        return out.float()
    lpg = out[rows]
    lps = [lp.detach().double()[rows] for lp in log_ps]
    act = active.to(torch.bool)[rows]
    z = lpg.clone().requires_grad_(True)
    opt = torch.optim.Adam([z], lr=lr)
    # Decaying to 0 lets Adam settle instead of circling the optimum at its step size.
    sched = torch.optim.lr_scheduler.CosineAnnealingLR(opt, T_max=steps)
    for _ in range(steps):
        opt.zero_grad(set_to_none=True)
        combination_objective(z, lpg, lps, groups, act).sum().backward()
        opt.step()
        sched.step()
    out[rows] = torch.log_softmax(z.detach(), dim=1)
    return out.float()


# --------------------------------------------------------------------------------------- evaluation
def table4(gen_correct: np.ndarray, comb_correct: np.ndarray, covering: np.ndarray) -> list[dict]:
    """Accuracy gain by the number of active specialists covering the correct class (the paper's
    Table 4).

    Args:
        gen_correct, comb_correct: (N,) bool. covering: (N,) int.
    """
    rows = []
    for n in sorted(set(covering.tolist())):
        sel = covering == n
        g, c = int(gen_correct[sel].sum()), int(comb_correct[sel].sum())
        rows.append(
            {
                "covering": int(n),
                "cases": int(sel.sum()),
                "generalist_correct": g,
                "combined_correct": c,
                "gain": c - g,
                "relative_gain": (c - g) / g if g else float("nan"),
            }
        )
    return rows


def evaluate_combination(
    log_pg: torch.Tensor,
    spec_logits: list[torch.Tensor],
    corrections: list[float],
    groups: list[list[int]],
    labels: torch.Tensor,
    top_n: int,
    steps: int,
    lr: float,
    corrected: bool = True,
) -> dict:
    """Combine and measure one setting: accuracy, per class, Table 4, within-group specialist
    accuracy.

    Args:
        log_pg: (N, C). spec_logits: per specialist (N, m+1) logits *including* its dustbin
            correction.
        corrections: the dustbin correction each includes (subtracted when ``corrected`` is False).
        labels: (N,) int64.
    """
    c = log_pg.shape[1]
    log_ps = []
    for lg, corr in zip(spec_logits, corrections, strict=True):
        lg = lg.clone()
        if not corrected:
            lg[:, -1] -= corr
        log_ps.append(torch.log_softmax(lg, dim=1))
    active = active_specialists(log_pg, groups, top_n)
    log_q = combine_distributions(log_pg, log_ps, groups, active, steps, lr)
    gen = classification_metrics(log_pg, labels, c)
    comb = classification_metrics(log_q, labels, c)
    y = labels.numpy()
    member = np.zeros((len(groups), c), dtype=bool)
    for k, g in enumerate(groups):
        member[k, g] = True
    covering = (active.numpy() & member[:, y].T).sum(axis=1)
    gen_ok = log_pg.argmax(1).numpy() == y
    comb_ok = log_q.argmax(1).numpy() == y
    within = []
    for k, g in enumerate(groups):
        sel = np.isin(y, g)
        spec_pred = np.asarray(g)[log_ps[k][sel, :-1].argmax(1).numpy()]
        gen_pred = np.asarray(g)[log_pg[sel][:, g].argmax(1).numpy()]
        within.append(
            {
                "classes": g,
                "cases": int(sel.sum()),
                "specialist_within_accuracy": float((spec_pred == y[sel]).mean()),
                "generalist_within_accuracy": float((gen_pred == y[sel]).mean()),
                "active_share": float(active[torch.from_numpy(sel), k].float().mean()),
            }
        )
    return {
        "top_n": top_n,
        "dustbin_corrected": corrected,
        "generalist": gen,
        "combined": comb,
        "active_per_case": float(active.float().sum(1).mean()),
        "table4": table4(gen_ok, comb_ok, covering),
        "within_group": within,
        "changed": {
            "fixed": int((~gen_ok & comb_ok).sum()),
            "broken": int((gen_ok & ~comb_ok).sum()),
        },
    }


def evaluation_report(result: dict, class_names: list[str]) -> str:
    """Markdown: generalist vs combined, per class, Table 4, specialists within their groups,
    sensitivity."""
    main = result["main"]
    g, c = main["generalist"], main["combined"]
    lines = [
        f"# Specialists on {result['dataset']}",
        "",
        f"Generalist: {result['generalist']}. {len(result['groups'])} specialist(s); "
        f"a specialist is active when its classes meet the generalist's top {main['top_n']}; "
        f"combination by {result['kl_steps']} Adam steps on q's logits; "
        f"dustbin correction {'on' if main['dustbin_corrected'] else 'off'}.",
        "",
        "| model | errors | accuracy | NLL | ECE |",
        "|---|---|---|---|---|",
        f"| generalist | {g['errors']} | {g['accuracy']:.2%} | {g['nll']:.4f} | {g['ece']:.4f} |",
        f"| generalist + specialists | {c['errors']} | {c['accuracy']:.2%} | {c['nll']:.4f} | "
        f"{c['ece']:.4f} |",
        "",
        f"Changed predictions: {main['changed']['fixed']} errors fixed, "
        f"{main['changed']['broken']} correct predictions broken "
        f"({net_change(g['errors'], c['errors'])}); "
        f"{main['active_per_case']:.2f} active specialists per test case on average.",
        "",
        "## Specialists",
        "",
        "| specialist | classes | dustbin correction | training rows | test cases in its classes | "
        "active on them | within-group accuracy: generalist → specialist |",
        "|---|---|---|---|---|---|---|",
    ]
    for k, (rec, w) in enumerate(zip(result["specialists"], main["within_group"], strict=True)):
        lines.append(
            f"| {k} | {', '.join(rec['class_names'])} | {rec['dustbin_correction_applied']:+.3f} | "
            f"{rec['sampling']['rows']} | {w['cases']} | {w['active_share']:.1%} | "
            f"{w['generalist_within_accuracy']:.2%} → {w['specialist_within_accuracy']:.2%} |"
        )
    lines += [
        "",
        "## Per class (test errors)",
        "",
        "| class | cases | generalist | combined | change |",
        "|---|---|---|---|---|",
    ]
    for i, name in enumerate(class_names):
        ge, ce = g["per_class_errors"][i], c["per_class_errors"][i]
        lines.append(f"| {name} | {g['per_class_n'][i]} | {ge} | {ce} | {ce - ge:+d} |")
    lines += [
        "",
        "## Table 4 view: by the number of active specialists covering the correct class",
        "",
        "| active specialists covering the correct class | test cases | generalist correct "
        "| combined correct | gain | relative accuracy change |",
        "|---|---|---|---|---|---|",
    ]
    for r in main["table4"]:
        rel = "—" if math.isnan(r["relative_gain"]) else f"{r['relative_gain']:+.2%}"
        lines.append(
            f"| {r['covering']} | {r['cases']} | {r['generalist_correct']} | "
            f"{r['combined_correct']} | {r['gain']:+d} | {rel} |"
        )
    if not result["sensitivity"]:  # evaluate --no-sensitivity
        lines.append("")
        return "\n".join(lines)
    lines += [
        "",
        f"## Sensitivity (test errors of the combination; generalist: {g['errors']})",
        "",
        "| top-n | dustbin correction | errors | active per case |",
        "|---|---|---|---|",
    ]
    for s in result["sensitivity"]:
        lines.append(
            f"| {s['top_n']} | {'on' if s['dustbin_corrected'] else 'off'} | {s['errors']} | "
            f"{s['active_per_case']:.2f} |"
        )
    lines.append("")
    return "\n".join(lines)


def net_change(before: int, after: int) -> str:
    """``"net 36 fewer errors"``, ``"net 36 more errors"`` or ``"no net change"``."""
    if after == before:
        return "no net change"
    return f"net {abs(before - after)} {'fewer' if after < before else 'more'} errors"


def generalist_log_probs(
    members: list[LoadedModel], x: np.ndarray, device: torch.device
) -> torch.Tensor:
    """The generalist's test-time log-probabilities: its members' mean-probs combination, as for the
    cache."""
    logits = torch.stack([predict_logits(m.model, x, device) for m in members])
    return torch.log_softmax(combine_members(logits, "mean-probs", 1.0), dim=1)
