"""Model specs and the registry: mlp, cnn, py:module:factory, torchscript:PATH, and KDModel's
normalisation.
"""

from __future__ import annotations

import textwrap
from pathlib import Path

import pytest
import torch
from torch import nn

from pipeline.errors import ModelSpecError
from pipeline.models import MLP, MODELS, KDModel, SmallCNN, build_model, with_options


def _linears(model: KDModel) -> list[nn.Linear]:
    return [m for m in model.body.modules() if isinstance(m, nn.Linear)]


def _dropouts(model: KDModel) -> list[float]:
    return [m.p for m in model.body.modules() if isinstance(m, nn.Dropout)]


# ---------------------------------------------------------------------------------------------- mlp
def test_mlp_widths_build_the_right_layers() -> None:
    m = build_model("mlp:16,8", (1, 4, 4), 3)
    assert isinstance(m, KDModel) and isinstance(m.body, MLP) and m.spec == "mlp:16,8"
    shapes = [(lin.in_features, lin.out_features) for lin in _linears(m)]
    assert shapes == [(16, 16), (16, 8), (8, 3)]
    assert _dropouts(m) == []
    assert sum(isinstance(x, nn.ReLU) for x in m.body.modules()) == 2
    assert m.body.max_norm is None
    torch.manual_seed(0)
    out = m(torch.randn(5, 1, 4, 4))
    assert out.shape == (5, 3) and out.dtype == torch.float32


def test_mlp_options() -> None:
    m = build_model("mlp:10:input_dropout=0.2:dropout=0.5:max_norm=3.5", (2, 3), 4)
    assert [(lin.in_features, lin.out_features) for lin in _linears(m)] == [(6, 10), (10, 4)]
    assert _dropouts(m) == [0.2, 0.5]  # input dropout first, then after the hidden layer
    assert m.body.max_norm == 3.5
    layers = list(m.body.net)
    assert (
        isinstance(layers[1], nn.Dropout)
        and layers[1].p == 0.2
        and isinstance(layers[2], nn.Linear)
    )


def test_mlp_dropout_is_active_only_in_training() -> None:
    torch.manual_seed(0)
    m = build_model("mlp:64:dropout=0.5", (8,), 2)
    x = torch.randn(4, 8)
    m.eval()
    torch.testing.assert_close(m(x), m(x))
    m.train()
    assert not torch.equal(m(x), m(x))


def test_max_norm_caps_row_norms_after_constrain() -> None:
    torch.manual_seed(0)
    m = build_model("mlp:20,20:max_norm=0.5", (30,), 4)
    with torch.no_grad():
        for lin in _linears(m):
            lin.weight.mul_(10.0)
        small_row = (
            _linears(m)[0].weight[0].clone() * 0.001
        )  # a row already under the cap stays as it is
        _linears(m)[0].weight[0] = small_row
    before = [lin.weight.detach().norm(dim=1) for lin in _linears(m)]
    assert all(float(n.max()) > 0.5 for n in before)
    assert float(before[0][0]) < 0.5
    m.constrain()
    # Hidden units are capped; the output layer is left free (as in the paper's teacher).
    torch.testing.assert_close(_linears(m)[-1].weight.detach().norm(dim=1), before[-1])
    for lin, old in zip(_linears(m)[:-1], before[:-1], strict=True):
        norms = lin.weight.detach().norm(dim=1)  # rows = each unit's incoming weights
        assert float(norms.max()) <= 0.5 * (1 + 1e-5)
        capped = old > 0.5
        torch.testing.assert_close(
            norms[capped], torch.full_like(norms[capped], 0.5), rtol=1e-4, atol=1e-6
        )
    torch.testing.assert_close(_linears(m)[0].weight[0], small_row)


def test_constrain_without_max_norm_changes_nothing() -> None:
    torch.manual_seed(0)
    m = build_model("mlp:5", (3,), 2)
    with torch.no_grad():
        _linears(m)[0].weight.mul_(100)
    before = [p.clone() for p in m.parameters()]
    m.constrain()
    assert all(torch.equal(a, b) for a, b in zip(before, m.parameters(), strict=True))


# ---------------------------------------------------------------------------------------------- cnn
def test_cnn_on_small_images() -> None:
    torch.manual_seed(0)
    m = build_model("cnn:channels=4,6:hidden=12:dropout=0.1", (1, 8, 8), 5)
    assert isinstance(m.body, SmallCNN)
    convs = [x for x in m.body.modules() if isinstance(x, nn.Conv2d)]
    assert [(c.in_channels, c.out_channels) for c in convs] == [(1, 4), (4, 6)]
    # Two 2x2 pools: 8x8 -> 2x2, so the head sees 6 * 2 * 2 features.
    assert [(lin.in_features, lin.out_features) for lin in _linears(m)] == [(24, 12), (12, 5)]
    assert _dropouts(m) == [0.1, 0.1]
    m.eval()
    out = m(torch.rand(3, 1, 8, 8) * 255)
    assert out.shape == (3, 5) and torch.isfinite(out).all()


def test_cnn_defaults() -> None:
    m = build_model("cnn", (1, 8, 8), 10)
    convs = [x for x in m.body.modules() if isinstance(x, nn.Conv2d)]
    assert [c.out_channels for c in convs] == [32, 64]
    assert [(lin.in_features, lin.out_features) for lin in _linears(m)] == [
        (64 * 2 * 2, 128),
        (128, 10),
    ]
    assert _dropouts(m) == [0.25, 0.25]


@pytest.mark.parametrize("shape", [(64,), (8, 8)])
def test_cnn_refuses_non_image_inputs(shape: tuple[int, ...]) -> None:
    with pytest.raises(ModelSpecError, match=r"cnn needs image inputs of shape \(C, H, W\)"):
        build_model("cnn", shape, 3)


# ---------------------------------------------------------------------------------------- bad specs
@pytest.mark.parametrize(
    ("spec", "fragment"),
    [
        ("resnet:50", "unknown model 'resnet'"),
        ("mlp", "mlp needs hidden widths"),
        ("mlp:dropout=0.5", "mlp needs hidden widths"),
        ("mlp:0,10", "hidden widths must be positive integers"),
        ("mlp:a,b", "hidden widths must be positive integers"),
        ("mlp:10:dropout=1.0", "bad value for dropout: '1.0'"),
        ("mlp:10:input_dropout=-0.1", "bad value for input_dropout"),
        ("mlp:10:max_norm=x", "bad value for max_norm"),
        ("mlp:10:max_norm=-1", "bad value for max_norm"),
        ("mlp:10:width=3", "unknown option 'width=3'"),
        ("mlp:10:dropout", "unknown option 'dropout'"),
        ("cnn:channels=0", "bad value for channels"),
        ("cnn:hidden=-1", "bad value for hidden"),
        ("cnn:hidden=0", "bad value for hidden"),
        ("cnn:input_dropout=0.2", "unknown option 'input_dropout=0.2'"),
        ("py:only_a_module", "expected py:package.module:factory"),
        ("py:no_such_module_kd_test:factory", "cannot import no_such_module_kd_test.factory"),
        ("py:math:no_such_factory", "cannot import math.no_such_factory"),
        ("torchscript:/no/such/file.pt", "no TorchScript file at /no/such/file.pt"),
    ],
)
def test_bad_model_specs(spec: str, fragment: str) -> None:
    with pytest.raises(ModelSpecError) as info:
        build_model(spec, (1, 8, 8), 3)
    assert fragment in str(info.value)


def test_unknown_model_lists_known_ones() -> None:
    with pytest.raises(ModelSpecError) as info:
        build_model("vit", (1, 8, 8), 3)
    for name in MODELS:
        assert name in str(info.value)


def test_num_classes_must_be_positive() -> None:
    with pytest.raises(ModelSpecError, match="num_classes must be >= 1, got 0"):
        build_model("mlp:4", (3,), 0)


# -------------------------------------------------------------------------------------- user models
FACTORY_SOURCE = textwrap.dedent("""
    import math
    from torch import nn

    CALLS = []

    def factory(in_shape, num_classes):
        CALLS.append((tuple(in_shape), num_classes))
        return nn.Sequential(nn.Flatten(), nn.Linear(math.prod(in_shape), num_classes))

    def not_a_module(in_shape, num_classes):
        return "hello"
""")


def test_py_factory_model(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    (tmp_path / "kd_user_models_for_tests.py").write_text(FACTORY_SOURCE)
    monkeypatch.syspath_prepend(str(tmp_path))
    m = build_model("py:kd_user_models_for_tests:factory", (1, 3, 2), 4, input_stats=(1.0, 2.0))
    import kd_user_models_for_tests as mod

    assert mod.CALLS == [((1, 3, 2), 4)]
    assert isinstance(m, KDModel) and isinstance(m.body, nn.Sequential)
    x = torch.randn(2, 1, 3, 2)
    torch.testing.assert_close(m(x), m.body((x - 1.0) / 2.0))
    with pytest.raises(ModelSpecError, match="the factory returned str, not an nn.Module"):
        build_model("py:kd_user_models_for_tests:not_a_module", (1, 3, 2), 4)


@pytest.mark.filterwarnings("ignore::DeprecationWarning")
def test_torchscript_round_trip(tmp_path: Path) -> None:
    torch.manual_seed(0)
    net = nn.Sequential(nn.Flatten(), nn.Linear(12, 5), nn.Tanh(), nn.Linear(5, 3))
    path = tmp_path / "net.pt"
    torch.jit.script(net).save(str(path))
    m = build_model(f"torchscript:{path}", (1, 3, 4), 3, input_stats=(0.5, 4.0))
    assert isinstance(m, KDModel) and m.spec == f"torchscript:{path}"
    x = torch.randn(6, 1, 3, 4) * 3
    with torch.no_grad():
        torch.testing.assert_close(m(x), net((x - 0.5) / 4.0))


# ------------------------------------------------------------------------------------------ KDModel
def test_kdmodel_normalises_inputs_with_its_stored_stats() -> None:
    body = nn.Identity()
    m = KDModel("identity", body, input_stats=(10.0, 4.0))
    assert float(m.input_mean) == 10.0 and float(m.input_std) == 4.0
    x = torch.tensor([[10.0, 14.0, 2.0]])
    torch.testing.assert_close(m(x), torch.tensor([[0.0, 1.0, -2.0]]))
    # uint8 pixels are converted to float first.
    torch.testing.assert_close(
        m(torch.tensor([[18, 6]], dtype=torch.uint8)), torch.tensor([[2.0, -1.0]])
    )
    # The stats are buffers: they travel in the state dict (and so in checkpoints).
    sd = m.state_dict()
    assert float(sd["input_mean"]) == 10.0 and float(sd["input_std"]) == 4.0
    other = KDModel("identity", nn.Identity())
    other.load_state_dict(sd)
    torch.testing.assert_close(other(x), m(x))


def test_build_model_stores_the_stats() -> None:
    torch.manual_seed(0)
    m = build_model("mlp:4", (2,), 2, input_stats=(3.0, 0.5))
    x = torch.tensor([[3.0, 3.5], [2.0, 4.0]])
    torch.testing.assert_close(m(x), m.body((x - 3.0) / 0.5))


# ------------------------------------------------------------------------------------- with_options
@pytest.mark.parametrize(
    ("spec", "options", "expected"),
    [
        (
            "mlp:32",
            {"input_dropout": 0.2, "dropout": 0.5, "max_norm": None},
            "mlp:32:input_dropout=0.2:dropout=0.5",
        ),
        ("mlp:32:dropout=0.1", {"dropout": 0.3}, "mlp:32:dropout=0.3"),
        (
            "mlp:32:dropout=0.1:max_norm=2",
            {"dropout": 0.0},
            "mlp:32:max_norm=2:dropout=0.0",
        ),  # explicit 0 is kept
        ("cnn", {"dropout": None}, "cnn"),
    ],
)
def test_with_options(spec: str, options: dict, expected: str) -> None:
    assert with_options(spec, **options) == expected
