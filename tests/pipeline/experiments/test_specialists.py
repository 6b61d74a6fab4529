"""Specialist ensembles: clustering, class maps, sampling, initialisation, the KL combination, and a
real run."""

from __future__ import annotations

import json
import math
from pathlib import Path

import numpy as np
import pytest
import torch
from click.testing import CliRunner

from pipeline.errors import CheckpointError, ConfigError, KDError
from pipeline.experiments.specialists import (
    active_specialists,
    cluster_classes,
    collapse_logits,
    combination_objective,
    combine_distributions,
    evaluate_all,
    evaluate_combination,
    sampling_plan,
    specialist_from_generalist,
    specialist_labels,
    table4,
    train_all,
)
from pipeline.experiments.specialists.config import SpecialistsConfig
from pipeline.models import build_model
from pipeline.training.train_config import TrainConfig
from tests.helpers.caches import teacher_cache

GROUPS = [[0, 1, 2], [3, 4, 5]]  # planted confusable groups; 6 is confused with nothing


def planted_probs(n: int = 3000, seed: int = 0) -> tuple[np.ndarray, np.ndarray]:
    """Generalist-like probabilities (n, 7) with planted confusions: a row of class c spreads its
    mass over c's group (and only there); class 6 is always confident."""
    rng = np.random.default_rng(seed)
    y = rng.integers(0, 7, size=n)
    p = np.full((n, 7), 1e-4)
    for i, c in enumerate(y):
        group = next((g for g in GROUPS if c in g), [6])
        share = rng.dirichlet(np.ones(len(group)) * 0.5) * 0.7
        p[i, group] += share
        p[i, c] += 0.3
    return p / p.sum(1, keepdims=True), y


# ----------------------------------------------------------------------------------------- clusters
def test_clustering_recovers_planted_groups_automatically() -> None:
    p, y = planted_probs()
    cl = cluster_classes(p, y, seed=0)
    assert cl.auto and cl.k == 3
    assert sorted(cl.specialists) == GROUPS
    assert sorted(cl.groups) == [*GROUPS, [6]]
    assert cl.scores[3] >= max(cl.scores.values()) * 0.995 > cl.scores[4]
    by_group = {tuple(g): c for g, c in zip(cl.groups, cl.confusion, strict=True)}
    assert by_group[(6,)]["within"] == 0.0
    for g in GROUPS:
        assert (
            by_group[tuple(g)]["within"] > 0.1
        )  # about 0.7 * 2/3 of the mass goes to the other members
        assert by_group[tuple(g)]["errors_within"] == 1.0  # planted: errors never leave the group


def test_clustering_with_given_k_and_classes_per_specialist() -> None:
    p, y = planted_probs()
    assert cluster_classes(p, y, k=3).k == 3 and not cluster_classes(p, y, k=3).auto
    assert cluster_classes(p, y, classes_per_specialist=3).k == 3  # ceil(7 / 3)
    with pytest.raises(ConfigError, match="in 2..6"):
        cluster_classes(p, y, k=7)


def test_raw_covariance_is_available_and_differs() -> None:
    p, y = planted_probs()
    assert cluster_classes(p, y, k=3, similarity="covariance").similarity == "covariance"
    with pytest.raises(ConfigError, match="similarity"):
        cluster_classes(p, y, similarity="nope")


# --------------------------------------------------------------------------------------- class maps
def test_collapse_logits_matches_collapsed_probabilities_at_any_temperature() -> None:
    v = torch.randn(5, 7) * 3
    for t in (1.0, 4.0):
        w = collapse_logits(v, [2, 5], t)
        p = torch.softmax(v / t, 1)
        want = torch.stack([p[:, 2], p[:, 5], p[:, [0, 1, 3, 4, 6]].sum(1)], 1)
        torch.testing.assert_close(torch.softmax(w / t, 1), want)
        torch.testing.assert_close(w[:, :2], v[:, [2, 5]])


def test_specialist_labels_map_rest_to_dustbin() -> None:
    assert specialist_labels(np.array([0, 5, 2, 6, 5]), [2, 5]).tolist() == [2, 1, 0, 2, 1]


def test_sampling_plan_is_half_and_half_seeded_and_gives_the_oversampling_correction() -> None:
    in_group = np.zeros(1000, dtype=bool)
    in_group[::5] = True  # f = 0.2
    plan = sampling_plan(in_group, seed=3)
    assert plan.rows.size == 400 and in_group[plan.rows].sum() == 200
    assert len(set(plan.rows.tolist())) == 400  # the rest is big enough: no repeats
    assert np.array_equal(plan.rows, sampling_plan(in_group, seed=3).rows)
    assert not np.array_equal(plan.rows, sampling_plan(in_group, seed=4).rows)
    # Odds of the specialist's classes: 1 in training vs 0.2 / 0.8 naturally -> the dustbin gets
    # log 4.
    assert plan.natural_fraction == pytest.approx(0.2) and plan.dustbin_correction == pytest.approx(
        math.log(4)
    )
    capped = sampling_plan(in_group, seed=3, max_rows=100)
    assert capped.rows.size == 100 and in_group[capped.rows].sum() == 50
    big = np.ones(10, dtype=bool)
    big[:3] = (
        False  # f = 0.7: 7 rows from the 3 outside -> with replacement, correction log(3/7) < 0
    )
    plan = sampling_plan(big, seed=0)
    assert plan.rows.size == 14 and big[plan.rows].sum() == 7
    assert plan.dustbin_correction == pytest.approx(math.log(0.3 / 0.7))
    with pytest.raises(ConfigError, match="both in its classes and outside"):
        sampling_plan(np.ones(5, dtype=bool), seed=0)


@pytest.mark.parametrize("spec", ["mlp:16,8", "cnn:channels=4,4:hidden=8"])
def test_specialist_from_generalist_copies_classes_and_starts_the_dustbin_at_mean_plus_log_count(
    spec,
) -> None:
    torch.manual_seed(0)
    shape = (1, 8, 8)
    gen = build_model(spec, shape, 7, (0.5, 2.0)).eval()
    spec_model = specialist_from_generalist(gen, [1, 4], shape).eval()
    assert spec_model.output_bias.numel() == 3 and spec_model.spec == spec
    x = torch.randn(6, *shape)
    with torch.no_grad():
        g, s = gen(x), spec_model(x)
    torch.testing.assert_close(s[:, :2], g[:, [1, 4]])
    rest = g[:, [0, 2, 3, 5, 6]]
    torch.testing.assert_close(s[:, 2], rest.mean(1) + math.log(5))
    assert torch.all(
        s[:, 2] <= torch.logsumexp(rest, 1) + 1e-5
    )  # Jensen: a lower bound of the log-sum-exp


# -------------------------------------------------------------------------------------- combination
def _case(seed: int, n: int = 4, c: int = 6) -> tuple:
    g = torch.Generator().manual_seed(seed)
    log_pg = torch.log_softmax(torch.randn(n, c, generator=g) * 2, 1)
    groups = [[0, 1, 2], [2, 3]]  # overlapping on class 2
    log_ps = [torch.log_softmax(torch.randn(n, len(gr) + 1, generator=g) * 2, 1) for gr in groups]
    return log_pg, log_ps, groups


def test_combination_with_only_the_generalist_active_is_the_generalist() -> None:
    log_pg, log_ps, groups = _case(0)
    active = torch.zeros(4, 2, dtype=torch.bool)
    torch.testing.assert_close(
        combine_distributions(log_pg, log_ps, groups, active, steps=50), log_pg
    )


def test_combination_matches_a_direct_optimisation() -> None:
    from scipy.optimize import minimize

    log_pg, log_ps, groups = _case(1)
    active = torch.tensor([[True, True], [True, False], [False, True], [True, True]])
    log_q = combine_distributions(log_pg, log_ps, groups, active, steps=300, lr=0.1)
    for i in range(4):
        # Each case alone, by scipy's L-BFGS on the same objective with exact float64 gradients, run
        # to tight tolerances from a different start (uniform q).
        lpg, lps, act = (
            log_pg[i : i + 1].double(),
            [lp[i : i + 1].double() for lp in log_ps],
            active[i : i + 1],
        )

        def f(z: np.ndarray, lpg=lpg, lps=lps, act=act) -> tuple[float, np.ndarray]:
            zt = torch.tensor(z[None], dtype=torch.float64, requires_grad=True)
            val = combination_objective(zt, lpg, lps, groups, act).sum()
            val.backward()
            return float(val.detach()), zt.grad[0].numpy()

        res = minimize(
            f, np.zeros(6), jac=True, method="L-BFGS-B", options={"ftol": 1e-15, "gtol": 1e-12}
        )
        want = torch.log_softmax(torch.tensor(res.x), 0)
        torch.testing.assert_close(log_q[i].exp().double(), want.exp(), atol=2e-4, rtol=0)
        got = combination_objective(log_q[i : i + 1].double(), lpg, lps, groups, act)
        assert float(got) == pytest.approx(res.fun, abs=1e-6)


def test_combination_pulls_toward_a_confident_specialist() -> None:
    # The generalist hesitates between 0 and 1; the specialist on {0, 1} is sure it is 1.
    log_pg = torch.log(torch.tensor([[0.45, 0.40, 0.05, 0.05, 0.05]]))
    log_ps = [torch.log(torch.tensor([[0.02, 0.95, 0.03]]))]
    log_q = combine_distributions(log_pg, log_ps, [[0, 1]], torch.tensor([[True]]))
    assert log_q.argmax(1).item() == 1
    # Analytic: the stationarity condition gives the rest mass as the mean of the two opinions,
    # (0.15 + 0.03) / 2.
    assert float(log_q[0, 2:].exp().sum()) == pytest.approx(0.09, abs=1e-4)


def test_active_specialists_meet_the_top_n() -> None:
    log_pg = torch.log(torch.tensor([[0.5, 0.3, 0.1, 0.1], [0.1, 0.1, 0.2, 0.6]]))
    groups = [[0, 1], [2]]
    assert active_specialists(log_pg, groups, 1).tolist() == [[True, False], [False, False]]
    assert active_specialists(log_pg, groups, 2).tolist() == [[True, False], [False, True]]


def test_table4_counts_gains_by_covering_specialists() -> None:
    gen = np.array([True, False, False, True, True])
    comb = np.array([True, True, True, False, True])
    rows = table4(gen, comb, np.array([0, 1, 1, 1, 0]))
    assert rows == [
        {
            "covering": 0,
            "cases": 2,
            "generalist_correct": 2,
            "combined_correct": 2,
            "gain": 0,
            "relative_gain": 0.0,
        },
        {
            "covering": 1,
            "cases": 3,
            "generalist_correct": 1,
            "combined_correct": 2,
            "gain": 1,
            "relative_gain": 1.0,
        },
    ]


def test_evaluate_combination_without_correction_removes_it() -> None:
    log_pg = torch.log(torch.tensor([[0.45, 0.40, 0.15], [0.1, 0.1, 0.8]]))
    spec = [
        torch.tensor([[0.0, 2.0, 5.0], [0.0, 0.0, 5.0]])
    ]  # dustbin logit includes a +5 correction
    labels = torch.tensor([1, 2])
    on = evaluate_combination(log_pg, spec, [5.0], [[0, 1]], labels, 1, 200, 0.1, corrected=True)
    off = evaluate_combination(log_pg, spec, [5.0], [[0, 1]], labels, 1, 200, 0.1, corrected=False)
    assert on["combined"]["errors"] == 1 and off["combined"]["errors"] == 0
    assert on["table4"][0]["covering"] == 0
    row = on["table4"][1]
    assert (row["covering"], row["cases"], row["generalist_correct"], row["combined_correct"]) == (
        1,
        1,
        0,
        0,
    )
    assert math.isnan(row["relative_gain"])  # no correct generalist case to be relative to
    assert off["changed"] == {"fixed": 1, "broken": 0}


# --------------------------------------------------------------------------------- a real small run
def _planted_task(path: Path, seed: int = 0) -> Path:
    """Images (1x8x8) of 7 classes: 0-2 and 3-5 share a strong group pattern and differ by a faint
    class pattern; 6 is distinct. A briefly trained generalist confuses classes inside each
    group."""
    rng = np.random.default_rng(seed)
    groups = rng.normal(0, 1, size=(3, 1, 8, 8)).astype(np.float32) * 2.5
    classes = rng.normal(0, 1, size=(7, 1, 8, 8)).astype(np.float32) * 0.5
    group_of = np.array([0, 0, 0, 1, 1, 1, 2])

    def draw(n: int, s: int) -> tuple[np.ndarray, np.ndarray]:
        r = np.random.default_rng(s)
        y = r.integers(0, 7, size=n)
        x = (
            groups[group_of[y]]
            + classes[y]
            + r.normal(0, 1.0, size=(n, 1, 8, 8)).astype(np.float32)
        )
        return x.astype(np.float32), y.astype(np.int64)

    x_tr, y_tr = draw(2100, seed + 1)
    x_te, y_te = draw(1400, seed + 2)
    np.savez(path, x_train=x_tr, y_train=y_tr, x_test=x_te, y_test=y_te, num_classes=np.int64(7))
    return path


@pytest.fixture(scope="module")
def planted(tmp_path_factory: pytest.TempPathFactory, one_torch_thread: None) -> dict:
    """A weak generalist (2 x mlp:24, 3 epochs: 73 % on the training set, errors only inside the
    planted groups) on the planted task, its cache, and a full specialists run with K = 3 (automatic
    K is tested above on planted probabilities: this generalist is weak enough to spread some
    probability onto class 6 as well)."""
    from pipeline.training.config import TeacherConfig
    from pipeline.training.teacher import train_teacher
    from stages.cli import main

    base = tmp_path_factory.mktemp("planted")
    npz = _planted_task(base / "planted.npz")
    teacher = base / "gen"
    train_teacher(
        TeacherConfig(
            dataset=f"npz:{npz}:train",
            model="mlp:24",
            input_dropout=0.0,
            dropout=0.0,
            jitter=0,
            members=2,
            eval="",
            out=str(teacher),
            device="cpu",
            train=TrainConfig(epochs=3, batch_size=64, lr=1e-3, seed=0),
        ),
        log=lambda s: None,
    )
    cache = base / "gen.zarr"
    teacher_cache(teacher, f"npz:{npz}:train", cache, rows_per_shard=512)
    out = base / "spec"
    res = CliRunner().invoke(
        main,
        [
            "specialists",
            "run",
            "--cache",
            str(cache),
            "--generalist",
            str(teacher),
            "--out",
            str(out),
            "--specialists",
            "3",
            "--epochs",
            "6",
            "--batch-size",
            "64",
            "--lr",
            "3e-3",
            "--device",
            "cpu",
            "--alpha",
            "0.3",
        ],
        catch_exceptions=False,
    )
    return {"npz": npz, "teacher": teacher, "cache": cache, "out": out, "result": res}


def test_real_run_recovers_groups_and_beats_the_generalist_on_confusable_classes(
    planted: dict,
) -> None:
    res, out = planted["result"], planted["out"]
    assert res.exit_code == 0, res.output
    clusters = json.loads((out / "clusters.json").read_text())
    assert sorted(clusters["specialists"]) == [[0, 1, 2], [3, 4, 5]]
    ev = json.loads((out / "evaluation.json").read_text())
    g, c = ev["main"]["generalist"], ev["main"]["combined"]
    confusable = range(6)
    gen_err = sum(g["per_class_errors"][i] for i in confusable)
    comb_err = sum(c["per_class_errors"][i] for i in confusable)
    assert comb_err < 0.8 * gen_err, (gen_err, comb_err)
    assert c["errors"] < g["errors"]
    for w in ev["main"]["within_group"]:
        assert w["specialist_within_accuracy"] > w["generalist_within_accuracy"]
    # Table 4 covers every test case once; with disjoint groups at most one specialist covers a
    # class.
    t4 = ev["main"]["table4"]
    assert sum(r["cases"] for r in t4) == 1400 and {r["covering"] for r in t4} <= {0, 1}
    assert sum(r["gain"] for r in t4) == g["errors"] - c["errors"]
    report = (out / "report.md").read_text()
    assert "Table 4" in report and f"| generalist | {g['errors']} |" in report
    cfg = json.loads((out / "config.json").read_text())
    assert (
        cfg["step"] == "evaluate"
        and cfg["cache"] == str(planted["cache"])
        and cfg["train"]["epochs"] == 6
    )
    for k in (0, 1):
        rec = json.loads((out / "specialists" / str(k) / "specialist.json").read_text())
        assert rec["init"].endswith("member-0.pt") and rec["sampling"]["train_fraction"] == 0.5
        # Three of seven classes: f = 3/7, so the dustbin gets log((4/7) / (3/7)) = log(4/3), about.
        assert rec["dustbin_correction_applied"] == pytest.approx(math.log(4 / 3), abs=0.15)


@pytest.mark.slow  # a dask LocalCluster of two processes: about 30 s on 2 busy cores
def test_dask_workers_train_the_same_specialists(planted: dict, tmp_path: Path) -> None:
    """Two worker processes give each specialist the same weights as in-process training (same
    seeds, one torch thread each)."""
    import shutil

    out = tmp_path / "spec"
    out.mkdir()
    shutil.copy(planted["out"] / "clusters.json", out / "clusters.json")
    cfg = SpecialistsConfig(
        cache=str(planted["cache"]),
        out=str(out),
        generalist=[str(planted["teacher"])],
        alpha=0.3,
        device="cpu",
        workers=2,
        train=TrainConfig(epochs=6, batch_size=64, lr=3e-3),
    )
    records = train_all(cfg, log=lambda s: None)
    assert [r["index"] for r in records] == [0, 1]
    for k in (0, 1):
        a = torch.load(out / "specialists" / str(k) / "specialist.pt", weights_only=True)[
            "state_dict"
        ]
        b = torch.load(
            planted["out"] / "specialists" / str(k) / "specialist.pt", weights_only=True
        )["state_dict"]
        for name in a:
            torch.testing.assert_close(a[name], b[name], atol=1e-5, rtol=1e-4)


def test_steps_out_of_order_and_wrong_generalist_are_clear_errors(
    planted: dict, tmp_path: Path, npz_path, teacher_dir: Path
) -> None:
    cfg = SpecialistsConfig(cache=str(planted["cache"]), out=str(tmp_path / "x"), device="cpu")
    with pytest.raises(KDError, match="run `kd-pipeline specialists cluster`"):
        train_all(cfg, log=lambda s: None)
    from pipeline.cache.read import LogitCache
    from pipeline.experiments.specialists import generalist_members

    with pytest.raises(CheckpointError, match="must be the checkpoints the cache was made with"):
        generalist_members(LogitCache(planted["cache"]), [str(teacher_dir)])
    with pytest.raises(ConfigError, match="--specialists K or --classes-per-specialist"):
        SpecialistsConfig(cache="c", out="o", specialists=2, classes_per_specialist=2).validate()


def test_steps_refuse_clusters_and_specialists_of_another_cache(
    planted: dict, tmp_path: Path
) -> None:
    """evaluate/train with --cache B on an --out made from cache A would silently mix two
    generalists."""
    import shutil

    from pipeline.errors import CacheError

    other = tmp_path / "other.zarr"  # same data, the first 2000 rows only: another cache
    teacher_cache(
        planted["teacher"],
        f"npz:{planted['npz']}:train:count=2000",
        other,
        rows_per_shard=512,
    )
    out = tmp_path / "spec"
    shutil.copytree(planted["out"], out)
    cfg = SpecialistsConfig(
        cache=str(other),
        out=str(out),
        generalist=[str(planted["teacher"])],
        device="cpu",
        train=TrainConfig(epochs=1),
    )
    with pytest.raises(CacheError, match="clusters.json was made from a cache with fingerprint"):
        train_all(cfg, log=lambda s: None)
    with pytest.raises(CacheError, match="specialist.pt was made from a cache with fingerprint"):
        evaluate_all(cfg, log=lambda s: None)


def test_net_change_is_worded_by_its_sign() -> None:
    from pipeline.experiments.specialists.combine import net_change

    assert net_change(829, 865) == "net 36 more errors"  # was "net -36 fewer errors"
    assert net_change(865, 829) == "net 36 fewer errors"
    assert net_change(5, 5) == "no net change"


def test_evaluate_shows_each_combination_and_the_sensitivity_table(planted: dict) -> None:
    res, out = planted["result"], planted["out"]
    # top-n 1 (the main result) plus the sensitivity table's top-n 1..3 x correction on/off.
    assert "combination 1/6 (top-n 1, dustbin correction on):" in res.output
    assert "combination 6/6 (top-n 3, dustbin correction off):" in res.output
    ev = json.loads((out / "evaluation.json").read_text())
    assert [(s["top_n"], s["dustbin_corrected"]) for s in ev["sensitivity"]] == [
        (1, True),
        (1, False),
        (2, True),
        (2, False),
        (3, True),
        (3, False),
    ]
    assert ev["sensitivity"][0]["errors"] == ev["main"]["combined"]["errors"]
    g, c = ev["main"]["generalist"]["errors"], ev["main"]["combined"]["errors"]
    net = f"net {abs(g - c)} {'fewer' if c < g else 'more'} errors"
    assert net in (out / "report.md").read_text()


def test_a_moved_transfer_set_is_found_with_dataset(planted: dict, tmp_path: Path) -> None:
    """A cache whose recorded data path is gone (a teammate's cache): --dataset names the copy;
    --no-sensitivity combines once."""
    import shutil

    from stages.cli import main

    moved = tmp_path / "moved.npz"
    shutil.copy(planted["npz"], moved)
    cache = tmp_path / "theirs.zarr"
    teacher_cache(planted["teacher"], f"npz:{moved}:train", cache, rows_per_shard=512)
    moved.unlink()
    out = tmp_path / "spec"
    shutil.copytree(planted["out"], out)
    args = [
        "specialists",
        "evaluate",
        "--cache",
        str(cache),
        "--generalist",
        str(planted["teacher"]),
        "--out",
        str(out),
        "--device",
        "cpu",
        "--no-sensitivity",
    ]
    res = CliRunner().invoke(main, args)
    assert res.exit_code == 2
    assert f"cannot load the transfer set the cache records, npz:{moved}:train" in res.output
    assert "--dataset npz:FILE:train" in res.output
    res = CliRunner().invoke(main, [*args, "--dataset", f"npz:{planted['npz']}:train"])
    assert res.exit_code == 0, res.output
    assert "combination 1/1 (top-n 1, dustbin correction on)" in res.output
    assert "combination 2/" not in res.output
    ev = json.loads((out / "evaluation.json").read_text())
    assert ev["sensitivity"] == [] and ev["dataset"] == f"npz:{planted['npz']}:test"
    assert "## Sensitivity" not in (out / "report.md").read_text()
    assert json.loads((out / "config.json").read_text())["dataset"] == f"npz:{planted['npz']}:train"
