"""The zoo table, pretrained weights (local file, hub cache, offline), adaptation, summary and the CLI."""

from __future__ import annotations

import functools
import io
import json
import sys
import urllib.error
from pathlib import Path

import pytest
import safetensors.torch
import torch
import torchvision.models as tvm

from cnnlab.cli import main
from cnnlab.data.sources import Dataset, ImageSet
from cnnlab.engine import TrainConfig, fit
from cnnlab.errors import CnnlabError, UsageError
from cnnlab.inspect.zoo import matches_torchvision, own_rows, torchvision_rows
from cnnlab.models import create_model, model_info
from cnnlab.reporting import LineProgress
from tests.conftest import write_pickle_payload


@functools.cache
def zoo_rows(model: str) -> dict[str, object]:
    """The zoo rows of one torchvision model, by 'model.weights', measured once per model.

    Measured model by model, so each test pays only for its own model and the tests can run in parallel
    (measuring all 80 models takes minutes).
    """
    rows = {f"{r.model}.{r.weights}": r for r in torchvision_rows(model)}
    assert {r.model for r in rows.values()} == {model}, "the pattern is the model name itself"
    return rows


def _all_weights() -> list[str]:
    return [f"{n}.{w.name}" for n in tvm.list_models(module=tvm) for w in tvm.get_model_weights(n)]


@pytest.mark.parametrize("entry", _all_weights())
def test_zoo_reproduces_torchvisions_params_and_gflops(entry: str) -> None:
    row = zoo_rows(entry.split(".")[0])[entry]
    assert matches_torchvision(row), (row.params, row.tv_params, row.gflops, row.tv_gflops)


def test_zoo_examples_from_torchvisions_table() -> None:
    alexnet, resnet50 = zoo_rows("alexnet")["alexnet.IMAGENET1K_V1"], zoo_rows("resnet50")["resnet50.IMAGENET1K_V2"]
    assert round(alexnet.params / 1e6, 1) == 61.1 and round(alexnet.gflops, 2) == 0.71
    assert round(resnet50.params / 1e6, 1) == 25.6 and round(resnet50.gflops, 2) == 4.09
    assert resnet50.acc1 == pytest.approx(80.858) and resnet50.acc5 == pytest.approx(95.434)


def test_our_models_in_the_zoo() -> None:
    rows = {r.model: r for r in own_rows()}
    assert rows["resnet20"].params == 269_722 and 0.040 < rows["resnet20"].gflops < 0.042  # paper: ~41M FLOPs
    assert rows["lenet5"].params == 60_000


@pytest.fixture
def resnet18_file(tmp_path: Path) -> tuple[Path, dict[str, torch.Tensor]]:
    """A 'pretrained' ResNet-18 state dict saved locally, as torchvision distributes it (1000 classes)."""
    torch.manual_seed(0)
    state = tvm.resnet18().state_dict()
    path = tmp_path / "resnet18-local.pth"
    torch.save(state, path)
    return path, state


def test_local_weights_go_through_torchvisions_path_and_adapt(resnet18_file: tuple[Path, dict]) -> None:
    path, state = resnet18_file
    model = create_model("resnet18", num_classes=5, in_channels=1, image_size=224, weights_file=path)
    # The grayscale stem is the pretrained RGB stem summed over its input channels.
    torch.testing.assert_close(model.conv1.weight, state["conv1.weight"].sum(dim=1, keepdim=True))
    torch.testing.assert_close(model.layer3[1].conv2.weight, state["layer3.1.conv2.weight"])
    assert model.fc.weight.shape == (5, 512)
    assert model.pretrained_info["mean"] == [0.485, 0.456, 0.406] and len(model.pretrained_info["categories"]) == 1000
    assert any("fc: new head, 1000 -> 5 classes" in c for c in model.cnnlab_changes)


def test_small_inputs_keep_pretrained_stem_weights(resnet18_file: tuple[Path, dict]) -> None:
    path, state = resnet18_file
    model = create_model("resnet18", num_classes=10, in_channels=3, image_size=32, weights_file=path)
    assert model.conv1.stride == (1, 1) and model.conv1.kernel_size == (7, 7)
    torch.testing.assert_close(model.conv1.weight, state["conv1.weight"])
    assert isinstance(model.maxpool, torch.nn.Identity)
    assert model(torch.randn(2, 3, 32, 32)).shape == (2, 10)


def test_other_channel_counts_tile_and_rescale(resnet18_file: tuple[Path, dict]) -> None:
    path, state = resnet18_file
    model = create_model("resnet18", num_classes=10, in_channels=4, weights_file=path)
    w = state["conv1.weight"]
    torch.testing.assert_close(model.conv1.weight, torch.cat([w, w[:, :1]], 1) * 3 / 4)


def test_hub_cache_serves_pretrained_weights_offline(
    resnet18_file: tuple[Path, dict], tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    import hashlib

    from cnnlab.models import torchvision as cvt

    _path, state = resnet18_file
    old = torch.hub.get_dir()
    torch.hub.set_dir(str(tmp_path / "hub"))
    try:
        # Random weights cannot carry torchvision's hash (the file name's hex digits are its SHA-256 prefix, and a
        # mismatch is refused): name the file by its own hash, as torchvision names the files it publishes.
        cached = tmp_path / "hub" / "checkpoints" / "tmp.pth"
        cached.parent.mkdir(parents=True)
        torch.save(state, cached)
        digest = hashlib.sha256(cached.read_bytes()).hexdigest()[:8]
        cached = cached.rename(cached.with_name(f"resnet18-{digest}.pth"))
        monkeypatch.setattr(cvt, "weights_file_name", lambda weights: cached.name)
        model = create_model("resnet18", num_classes=1000, pretrained=True)
        torch.testing.assert_close(model.fc.weight, state["fc.weight"])
    finally:
        torch.hub.set_dir(old)


def test_offline_without_cached_weights_is_one_clear_error(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    def no_network(*args: object, **kwargs: object) -> None:
        print('Downloading: "https://example.invalid/resnet18.pth"')  # as torch.hub announces it
        sys.stderr.write("progress\n")
        raise urllib.error.URLError("network is unreachable")

    monkeypatch.setattr(torch.hub, "download_url_to_file", no_network)
    old = torch.hub.get_dir()
    torch.hub.set_dir(str(tmp_path / "empty-hub"))
    try:
        with pytest.raises(
            CnnlabError,
            match=r"cannot download pretrained weights .* offline\? Put "
            r"resnet18-.*\.pth in .*or pass --weights FILE",
        ):
            create_model("resnet18", pretrained=True)
        assert capsys.readouterr() == ("", ""), "the library prints nothing; the CLI prints the one error line"
    finally:
        torch.hub.set_dir(old)


def test_bad_weights_files(tmp_path: Path) -> None:
    wrong = tmp_path / "wrong.safetensors"
    safetensors.torch.save_file({"conv1.weight": torch.zeros(3, 3)}, wrong)
    with pytest.raises(CnnlabError, match="does not fit resnet18"):
        create_model("resnet18", weights_file=wrong)
    with pytest.raises(UsageError, match="no such file"):
        create_model("resnet18", weights_file=tmp_path / "missing.pth")
    with pytest.raises(UsageError, match="has no weights 'V9'; choose from IMAGENET1K_V1"):
        create_model("resnet18", pretrained=True, weights_name="V9")


def test_models_that_cannot_run_small_name_a_size() -> None:
    with pytest.raises(
        UsageError,
        match=r"'vit_b_16' cannot run on 28x28 inputs; the next size up that works is "
        r"32x32 \(a multiple of its patch size 16\)",
    ):
        create_model("vit_b_16", num_classes=10, in_channels=1, image_size=28)
    with pytest.raises(
        UsageError, match="'convnext_tiny' cannot run on 28x28 inputs; the next size up that works is 32x32"
    ):
        create_model("convnext_tiny", num_classes=10, in_channels=1, image_size=28)
    assert create_model("inception_v3", num_classes=10, in_channels=1, image_size=20)(
        torch.zeros(1, 1, 20, 20)
    ).shape == (1, 10), "Inception v3's 75x75 minimum goes away with the small-input stem"


def test_transfer_learning_run_records_preprocessing(
    resnet18_file: tuple[Path, dict], tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    import cnnlab.engine.trainer

    def no_pass_over_the_data(images: torch.Tensor) -> None:
        raise AssertionError("pretrained weights bring their own mean and std: no pass over the training images")

    monkeypatch.setattr(cnnlab.engine.trainer, "channel_stats", no_pass_over_the_data)
    g = torch.Generator().manual_seed(0)
    images = torch.randint(0, 256, (24, 3, 32, 32), dtype=torch.uint8, generator=g)
    data = Dataset(
        "tiny-rgb",
        ImageSet(images[:16], torch.arange(16) % 2),
        ImageSet(images[16:], torch.arange(8) % 2),
        ("cat", "dog"),
    )
    path, _ = resnet18_file
    cfg = TrainConfig(model="resnet18", weights=str(path), epochs=1, batch_size=8, patience=0, val_split=0.25)
    result = fit(cfg, runs_dir=tmp_path, dataset=data)
    config = json.loads((result.run_dir / "config.json").read_text())
    assert config["data"]["mean"] == [0.485, 0.456, 0.406], "pretrained weights bring their normalisation"
    assert config["model"]["pretrained"]["weights"] == "ResNet18_Weights.IMAGENET1K_V1"
    assert any("fc: new head" in c for c in config["model"]["changes"])
    with pytest.raises(UsageError, match="lenet5 has no pretrained weights"):
        fit(TrainConfig(model="lenet5", pretrained=True), runs_dir=None, dataset=data)


def test_cli_zoo_formats(capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["zoo", "alexnet", "--format", "json"]) == 0
    (row,) = json.loads(capsys.readouterr().out)
    assert row["matches_torchvision"] and row["acc1"] == pytest.approx(56.522)
    assert main(["zoo", "resnet1?", "--format", "csv"]) == 0
    lines = capsys.readouterr().out.strip().splitlines()
    assert lines[0].startswith("model,weights,input,acc1") and len(lines) == 2  # header + resnet18
    assert main(["zoo", "squeezenet*", "--format", "markdown", "--source", "torchvision"]) == 0
    assert capsys.readouterr().out.count("| squeezenet1_") == 2


def test_cli_zoo_shows_progress_on_stderr_only(capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["zoo", "squeezenet*", "--format", "json"]) == 0
    out = capsys.readouterr()
    assert [r["model"] for r in json.loads(out.out)] == ["squeezenet1_0", "squeezenet1_1"]
    assert out.err.splitlines() == ["zoo: 1/2 squeezenet1_0 IMAGENET1K_V1", "zoo: 2/2 squeezenet1_1 IMAGENET1K_V1"]


def test_progress_on_a_terminal_rewrites_one_line_and_erases_it() -> None:
    class Terminal(io.StringIO):
        def isatty(self) -> bool:
            return True

    stream = Terminal()
    progress = LineProgress("zoo", stream)
    progress(1, 2, "alexnet IMAGENET1K_V1")
    progress(2, 2, "vgg11 IMAGENET1K_V1")
    progress.close()
    assert stream.getvalue() == "\r\x1b[Kzoo: 1/2 alexnet IMAGENET1K_V1\r\x1b[Kzoo: 2/2 vgg11 IMAGENET1K_V1\r\x1b[K"


def test_model_descriptions_count_sets_of_weights() -> None:
    assert model_info("alexnet").description == "torchvision alexnet (1 set of pretrained weights)"
    assert model_info("resnet50").description == "torchvision resnet50 (2 sets of pretrained weights)"
    assert model_info("googlenet").description.endswith("(1 set of pretrained weights)")


def test_cli_summary_shows_the_lecture_example(capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["summary", "--layers", "conv 6 5", "--input-size", "3,32,32", "--json"]) == 0
    doc = json.loads(capsys.readouterr().out)
    assert doc["layers"][0]["out_shape"] == [6, 28, 28] and doc["params"] == 456
    assert main(["summary", "lenet5", "--json"]) == 0
    doc = json.loads(capsys.readouterr().out)
    per_layer = {r["name"]: r["params"] for r in doc["layers"] if r["params"]}
    assert per_layer == {"c1": 156, "s2": 12, "c3": 1516, "s4": 32, "c5": 48120, "f6": 10164}
    assert main(["summary", "regnet_y_400mf", "--input-size", "1,28,28"]) == 0
    assert "params" in capsys.readouterr().out


def test_cli_models_details_and_pretrained(capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["models", "alexnet", "--details", "--in-channels", "1", "--image-size", "28", "--json"]) == 0
    (row,) = json.loads(capsys.readouterr().out)
    assert "features.0: 11x11 stride 4 -> 3x3 stride 1 for small inputs" in row["changes"]
    assert main(["models", "--pretrained", "--json"]) == 0
    names = [r["name"] for r in json.loads(capsys.readouterr().out)]
    assert "resnet50" in names and "lenet5" not in names


def test_a_weights_file_with_a_pickle_payload_is_refused_and_never_runs(tmp_path: Path) -> None:
    marker = tmp_path / "pwned"
    evil = write_pickle_payload(tmp_path / "resnet18-evil.pth", marker, lambda p: {"conv1.weight": p})
    with pytest.raises(CnnlabError, match="not a loadable state dict"):
        create_model("resnet18", weights_file=evil)
    assert not marker.exists()
