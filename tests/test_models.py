"""The model registry and every registered model; model tests are parametrized over list_models()."""

from __future__ import annotations

from collections.abc import Callable

import pytest
import torch

from cnnlab.errors import UsageError
from cnnlab.models import create_model, list_models, model_info, register_model
from cnnlab.models.lenet import C3_TABLE, PartialConv2d, rbf_centres, scaled_tanh
from cnnlab.models.torchvision import without_batch_norm

REAL_RUN_PARAM_LIMIT = 30_000_000  # larger models are checked on the meta device only (shapes, no compute)


def meta_model(name: str, **kwargs: object) -> torch.nn.Module:
    """Build on the meta device: shapes and parameter counts without memory or compute."""
    with torch.device("meta"):
        return create_model(name, **kwargs)


def by_model(names: list[str]) -> list[object]:
    """Model names as parameters grouped per model: pytest-xdist (--dist loadgroup) runs a model's tests on one
    worker, where its small-input plan, computed once per process, is shared by the 1- and 3-channel builds."""
    return [pytest.param(name, marks=pytest.mark.xdist_group(name)) for name in names]


def at_smallest_size(build: Callable[[int], torch.nn.Module], want: int) -> tuple[torch.nn.Module, int]:
    """`build(want)`, or `build` at the size named by the model's own error message when it cannot run that small.

    create_model plans on the meta device and refuses a size before it builds anything, so a refusal costs no build.
    """
    try:
        return build(want), want
    except UsageError as e:
        assert "cannot run on" in str(e) and "the next size up that works is" in str(e), str(e)
        side = int(str(e).split("works is ")[1].split("x")[0])
        return build(side), side


@pytest.mark.parametrize("name", by_model(list_models()))
@pytest.mark.parametrize(("in_channels", "size"), [(1, "small"), (3, "default")])
def test_every_model_has_the_right_output_shape(name: str, in_channels: int, size: str) -> None:
    """Grayscale at 28x28 (or the smallest size the model names), RGB at the model's default size."""

    def build(side: int) -> torch.nn.Module:
        return meta_model(name, num_classes=7, in_channels=in_channels, image_size=side)

    want = 28 if size == "small" else model_info(name).default_image_size
    model, side = at_smallest_size(build, want) if size == "small" else (build(want), want)
    # Batch norm never changes a shape, and on the meta device it is a slow Python decomposition: left out here.
    out = without_batch_norm(model.eval())(torch.zeros(2, in_channels, side, side, device="meta"))
    assert tuple(out.shape) == (2, 7), (name, side)


def _real_models() -> list[str]:
    """Models small enough to build and run on the CPU in the suite (counted at their default configuration).

    torchvision models are counted by the number torchvision publishes with their default weights (1000 classes,
    RGB; test_zoo.py checks that cnnlab's own count equals it for every weights entry): building all 80 of them,
    even on the meta device, would slow down every collection of the suite.
    """
    from cnnlab.models.torchvision import weights_enum

    small = []
    for name in list_models():
        if "torchvision" in model_info(name).tags:
            params = weights_enum(name).DEFAULT.meta["num_params"]
        else:
            params = sum(p.numel() for p in create_model(name).parameters())
        if params <= REAL_RUN_PARAM_LIMIT:
            small.append(name)
    return small


# Real training steps start at 16x16 (the shape test covers 28x28 on the meta device): the small-input changes are
# the same kind at both sizes, and a step costs about the input's area (EfficientNet-V2-S: 6.7 s at 28, 1.6 s at 16).
SMALL_TRAIN_SIDE = 16


@pytest.mark.parametrize("name", by_model(_real_models()))
@pytest.mark.parametrize("in_channels", [1, 3])
def test_models_train_for_real_at_their_smallest_size(name: str, in_channels: int) -> None:
    def build(side: int) -> torch.nn.Module:
        return create_model(name, num_classes=7, in_channels=in_channels, image_size=side)

    model, size = at_smallest_size(build, SMALL_TRAIN_SIDE)
    model.train()
    out = model(torch.randn(2, in_channels, size, size))
    assert out.shape == (2, 7)
    out.logsumexp(1).sum().backward()
    grads = [p.grad for p in model.parameters() if p.requires_grad]
    assert grads and all(g is not None and torch.isfinite(g).all() for g in grads)


@pytest.mark.parametrize("name", [n for n in list_models() if "ours" in model_info(n).tags])
def test_our_models_split_features_and_head(name: str) -> None:
    model = create_model(name, num_classes=10, in_channels=1, image_size=28).eval()
    x = torch.randn(3, 1, 28, 28)
    feats = model.forward_features(x)
    assert feats.dim() == 4, "forward_features returns (B, C, H, W) maps"
    torch.testing.assert_close(model.forward_head(feats), model(x))


def test_list_models_wildcards() -> None:
    assert list_models("lenet*") == ["lenet5", "lenet5-modern"]
    assert list_models("no-such-*") == []
    assert list_models() == sorted(list_models())
    for family_member in (
        "alexnet",
        "vgg16_bn",
        "googlenet",
        "inception_v3",
        "resnet50",
        "resnext50_32x4d",
        "densenet121",
        "squeezenet1_1",
        "mobilenet_v3_large",
        "cnn-compact",
        "resnet20",
    ):
        assert family_member in list_models()


def test_a_failed_lazy_registration_is_tried_again(monkeypatch: pytest.MonkeyPatch) -> None:
    from cnnlab.models import registry

    calls: list[int] = []

    def flaky() -> None:
        calls.append(1)
        if len(calls) == 1:
            raise ModuleNotFoundError("no module named 'somezoo'")
        register_model("flaky-net", family="test", description="", default_image_size=8)(lambda **kw: None)

    monkeypatch.setattr(registry, "_PENDING", [flaky])
    monkeypatch.setattr(registry, "_REGISTRY", dict(registry._REGISTRY))
    with pytest.raises(ModuleNotFoundError, match="somezoo"):
        model_info("flaky-net")
    assert model_info("flaky-net").family == "test" and len(calls) == 2  # the real error first, then the model


def test_duplicate_registration_raises() -> None:
    with pytest.raises(ValueError, match="already registered"):
        register_model("lenet5", family="x", description="x", default_image_size=32)(lambda **_: None)


def test_unknown_model_suggests_close_names() -> None:
    with pytest.raises(UsageError, match="did you mean 'lenet5'"):
        create_model("lenet")


@pytest.mark.parametrize("kwargs", [{"num_classes": 0}, {"in_channels": 0}])
def test_create_model_rejects_impossible_sizes(kwargs: dict[str, int]) -> None:
    with pytest.raises(UsageError):
        create_model("lenet5", **kwargs)


def _params(module: torch.nn.Module) -> int:
    return sum(p.numel() for p in module.parameters() if p.requires_grad)


@pytest.mark.parametrize(
    ("name", "kwargs", "expected"),
    [
        ("lenet5", {"num_classes": 10, "in_channels": 1, "image_size": 32}, 60_000),
        ("lenet5-modern", {"num_classes": 10, "in_channels": 1, "image_size": 32}, 61_706),
        # He et al. 2016, Table 6: 0.27M, 0.46M, 0.66M, 0.85M, 1.7M.
        ("resnet20", {"num_classes": 10}, 269_722),
        ("resnet32", {"num_classes": 10}, 464_154),
        ("resnet56", {"num_classes": 10}, 853_018),
        ("resnet110", {"num_classes": 10}, 1_727_962),
        ("cnn-compact", {"num_classes": 10, "in_channels": 1}, 288_170),
        # torchvision's published counts for 1000 classes at 3x224x224.
        ("alexnet", {"num_classes": 1000}, 61_100_840),
        ("resnet50", {"num_classes": 1000}, 25_557_032),
        ("vgg16", {"num_classes": 1000}, 138_357_544),
    ],
)
def test_known_parameter_counts(name: str, kwargs: dict[str, int], expected: int) -> None:
    assert _params(meta_model(name, **kwargs)) == expected


def test_cnn_compact_is_configurable() -> None:
    m = create_model("cnn-compact", width=16, stages=2, convs_per_stage=1, act="elu", dropout=0.3)
    assert sum(isinstance(x, torch.nn.Conv2d) for x in m.modules()) == 2
    assert any(isinstance(x, torch.nn.ELU) for x in m.modules())
    assert m.features[0].out_channels == 16 and m.features[-3].out_channels == 32
    with pytest.raises(UsageError, match="act must be one of"):
        create_model("cnn-compact", act="swishy")


def test_lenet5_parameter_counts_match_the_paper() -> None:
    # LeCun et al. 1998, section II.B: C1 156, S2 12, C3 1,516, S4 32, C5 48,120, F6 10,164.
    m = create_model("lenet5", num_classes=10, in_channels=1, image_size=32)
    counts = {name: _params(getattr(m, name)) for name in ("c1", "s2", "c3", "s4", "c5", "f6", "output")}
    assert counts == {"c1": 156, "s2": 12, "c3": 1516, "s4": 32, "c5": 48120, "f6": 10164, "output": 0}
    assert _params(m) == 60000


def test_lenet5_shapes_follow_the_paper() -> None:
    m = create_model("lenet5", image_size=32)
    x = torch.randn(1, 1, 32, 32)
    c1 = m.c1(x)
    assert c1.shape == (1, 6, 28, 28)
    s2 = m.s2(c1)
    assert s2.shape == (1, 6, 14, 14)
    c3 = m.c3(s2)
    assert c3.shape == (1, 16, 10, 10)
    assert m.s4(c3).shape == (1, 16, 5, 5)
    assert m.forward_features(x).shape == (1, 120, 1, 1)


def test_lenet5_centres_28x28_digits_on_32x32_field() -> None:
    m = create_model("lenet5", image_size=28)
    assert m.forward_features(torch.randn(1, 1, 28, 28)).shape == (1, 120, 1, 1)


def test_c3_connection_table_is_enforced() -> None:
    conv = PartialConv2d(C3_TABLE, 6, 5)
    torch.nn.init.normal_(conv.weight)
    dense = conv.dense_weight()
    assert sum(len(t) for t in C3_TABLE) == 60
    for out, inputs in enumerate(C3_TABLE):
        for inp in range(6):
            connected = bool(dense[out, inp].abs().sum() > 0)
            assert connected == (inp in inputs), (out, inp)
    # An input map that a C3 map is not connected to cannot influence it.
    x = torch.randn(1, 6, 14, 14)
    y0 = conv(x)
    x[:, 5] += 10.0
    y1 = conv(x)
    assert torch.equal(y0[:, 0], y1[:, 0])  # map 0 reads maps 0, 1, 2 only
    assert not torch.equal(y0[:, 3], y1[:, 3])  # map 3 reads 3, 4, 5


def test_scaled_tanh_constants() -> None:
    # f(a) = 1.7159 tanh(2a/3) is chosen so that f(1) = 1 and f(-1) = -1 (paper, Appendix A).
    torch.testing.assert_close(scaled_tanh(torch.tensor([1.0, -1.0])), torch.tensor([1.0, -1.0]), atol=1e-4, rtol=0)


def test_rbf_output_is_fixed_and_prefers_the_nearest_centre() -> None:
    m = create_model("lenet5", num_classes=10)
    centres = rbf_centres(10)
    assert centres.shape == (10, 84) and set(centres.unique().tolist()) == {-1.0, 1.0}
    assert len({tuple(c.tolist()) for c in centres}) == 10, "every digit has its own bitmap"
    logits = m.output(centres[[3, 7]])
    assert logits.argmax(1).tolist() == [3, 7]
    assert not any(p.requires_grad for p in m.output.parameters())
    other = rbf_centres(5)
    assert other.shape == (5, 84) and torch.equal(other, rbf_centres(5)), "codes for other class counts are seeded"
