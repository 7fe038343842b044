"""Pretrained weights from torch's hub cache never run pickle code and must match their name's hash (issue 15.5),
and commands refuse work that cannot fit in memory with one named line instead of dying (issue 15.6)."""

from __future__ import annotations

import hashlib
import json
from collections.abc import Iterator
from pathlib import Path
from unittest import mock

import pytest
import torch
import torchvision.models as tvm
from PIL import Image
from torch import nn

from cnnlab.errors import CnnlabError, UsageError
from cnnlab.models import create_model, list_models, model_info
from cnnlab.models import torchvision as cvt
from tests.conftest import main_error, run_cli, write_pickle_payload

RESNET18 = tvm.ResNet18_Weights.IMAGENET1K_V1
HUB_NAME = "resnet18-f37072fd.pth"  # the name torchvision's URL gives the file, and torch.hub caches it under


@pytest.fixture
def hub(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Iterator[Path]:
    """A private, empty torch hub cache (TORCH_HOME for subprocesses too) that no download can reach."""
    home = tmp_path / "torch-home"
    checkpoints = home / "hub" / "checkpoints"
    checkpoints.mkdir(parents=True)
    monkeypatch.setenv("TORCH_HOME", str(home))
    # torch.hub.set_dir, undone by monkeypatch: restoring get_dir()'s answer would pin later tests to this folder.
    monkeypatch.setattr(torch.hub, "_hub_dir", str(home / "hub"))

    def no_network(*args: object, **kwargs: object) -> None:
        raise OSError("network is unreachable (test)")

    monkeypatch.setattr(torch.hub, "download_url_to_file", no_network)
    getattr(cvt, "_VERIFIED", set()).clear()
    try:
        yield checkpoints
    finally:
        getattr(cvt, "_VERIFIED", set()).clear()


def _sha256(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def _named_by_own_hash(path: Path, stem: str = "resnet18") -> Path:
    """Rename a file to torchvision's `<stem>-<first 8 hex digits of its SHA-256>.pth` convention."""
    return path.rename(path.with_name(f"{stem}-{_sha256(path)[:8]}.pth"))


@pytest.fixture(scope="module")
def resnet18_state() -> dict[str, torch.Tensor]:
    """A ResNet-18 state dict in torchvision's format (random weights: nothing can be downloaded here)."""
    torch.manual_seed(0)
    return tvm.resnet18().state_dict()


def _image(tmp_path: Path) -> Path:
    path = tmp_path / "cat.png"
    Image.new("RGB", (40, 40), (120, 60, 30)).save(path)
    return path


def _folder(root: Path) -> Path:
    for c, level in (("dark", 40), ("bright", 210)):
        (root / c).mkdir(parents=True, exist_ok=True)
        for i in range(4):
            Image.new("RGB", (36, 36), (level + i, level, 255 - level)).save(root / c / f"{i}.png")
    return root


# --- a pickle payload planted in the hub cache ------------------------------------------------------------------------


def test_payload_planted_in_the_hub_cache_never_runs_from_the_library(hub: Path, tmp_path: Path) -> None:
    marker = tmp_path / "pwned"
    write_pickle_payload(hub / HUB_NAME, marker, lambda p: {"conv1.weight": p})
    for kwargs in ({"pretrained": True}, {"pretrained": True, "weights_name": "IMAGENET1K_V1"}):
        with pytest.raises(CnnlabError, match=HUB_NAME):
            create_model("resnet18", num_classes=1000, **kwargs)
        assert not marker.exists(), f"the payload ran via create_model(**{kwargs})"
    from cnnlab.engine.inference import predict_pretrained

    with pytest.raises(CnnlabError, match=HUB_NAME):
        predict_pretrained("resnet18", [str(_image(tmp_path))])
    assert not marker.exists(), "the payload ran via predict_pretrained"


def test_payload_whose_name_matches_its_hash_is_still_refused(
    hub: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    # 8 hex digits are 32 bits: an attacker can search for a payload that matches its name. weights_only stops it.
    marker = tmp_path / "pwned"
    evil = _named_by_own_hash(write_pickle_payload(hub / "evil.pth", marker, lambda p: {"conv1.weight": p}))
    cvt.verify_hash_prefix(evil)  # the name's hash is right...
    with pytest.raises(CnnlabError, match=rf"{evil.name}: not a loadable state dict"):
        cvt.read_hub_file(evil)  # ...and the file is still never unpickled with code
    monkeypatch.setattr(cvt, "weights_file_name", lambda weights: evil.name)
    with pytest.raises(CnnlabError, match="not a loadable state dict"):
        create_model("resnet18", pretrained=True)
    assert not marker.exists()


def test_torchvisions_unpickling_loader_is_never_called(
    hub: Path, monkeypatch: pytest.MonkeyPatch, resnet18_state: dict
) -> None:
    def forbidden(*args: object, **kwargs: object) -> None:
        raise AssertionError("torch.hub.load_state_dict_from_url unpickles with weights_only=False")

    monkeypatch.setattr(torch.hub, "load_state_dict_from_url", forbidden)
    monkeypatch.setattr("torchvision.models._api.load_state_dict_from_url", forbidden)
    torch.save(resnet18_state, hub / "tmp.pth")
    good = _named_by_own_hash(hub / "tmp.pth")
    monkeypatch.setattr(cvt, "weights_file_name", lambda weights: good.name)
    model = create_model("resnet18", num_classes=1000, pretrained=True)
    torch.testing.assert_close(model.fc.weight, resnet18_state["fc.weight"])
    torch.testing.assert_close(model.layer4[1].bn2.running_var, resnet18_state["layer4.1.bn2.running_var"])


@pytest.mark.parametrize(
    "args",
    [
        ["predict", "--model", "resnet18", "--pretrained", "IMG"],
        ["train", "--model", "resnet18", "--pretrained", "--data", "DATA", "--epochs", "1", "--max-steps", "1"],
        [
            "train",
            "--model",
            "resnet18",
            "--weights-name",
            "IMAGENET1K_V1",
            "--data",
            "DATA",
            "--epochs",
            "1",
            "--max-steps",
            "1",
        ],
    ],
    ids=["predict --pretrained", "train --pretrained", "train --weights-name"],
)
def test_payload_planted_in_the_hub_cache_never_runs_from_the_cli(hub: Path, tmp_path: Path, args: list[str]) -> None:
    marker = tmp_path / "pwned"
    write_pickle_payload(hub / HUB_NAME, marker, lambda p: {"conv1.weight": p})
    args = [{"IMG": str(_image(tmp_path)), "DATA": str(_folder(tmp_path / "data"))}.get(a, a) for a in args]
    if args[0] == "train":
        args += ["--runs-dir", str(tmp_path / "runs"), "--batch-size", "2", "--image-size", "32", "--val-split", "0",
                 "--patience", "0"]  # fmt: skip
    r = run_cli(*args, cwd=tmp_path)
    assert not marker.exists(), "the pickle payload in the hub cache ran"
    errors = [ln for ln in r.stderr.splitlines() if ln.startswith("cnnlab: error:")]
    assert r.returncode == 1 and len(errors) == 1 and r.stderr.strip().endswith(errors[0]), r.stderr
    assert errors[0].startswith("cnnlab: error: pretrained weights ") and HUB_NAME in errors[0], errors[0]
    assert "SHA-256" in errors[0] and "Traceback" not in r.stderr
    assert not list((tmp_path / "runs").glob("*")), "no run directory is started for a run that cannot load"


# --- hash prefix checks -----------------------------------------------------------------------------------------------


def test_cached_file_whose_hash_does_not_match_its_name_is_refused(
    hub: Path, resnet18_state: dict, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    torch.save(resnet18_state, hub / HUB_NAME)  # a loadable state dict, but not the file torchvision published
    with pytest.raises(CnnlabError, match=rf"{HUB_NAME}: its SHA-256 starts with [0-9a-f]{{8}}, not f37072fd"):
        create_model("resnet18", pretrained=True)
    code, err = main_error(["predict", "--model", "resnet18", "--pretrained", str(_image(tmp_path))], capsys)
    assert code == 1 and len(err) == 1 and HUB_NAME in err[0] and "f37072fd" in err[0], err


def test_hash_prefix_rules(tmp_path: Path) -> None:
    f = tmp_path / "data.bin"
    f.write_bytes(b"cnnlab")
    digest = hashlib.sha256(b"cnnlab").hexdigest()
    for n in (8, 10, 64):
        named = tmp_path / f"model-v2-{digest[:n]}.pth"
        named.write_bytes(b"cnnlab")
        cvt.verify_hash_prefix(named)
    wrong = tmp_path / f"model-{'0' * 8 if not digest.startswith('0' * 8) else '1' * 8}.pth"
    wrong.write_bytes(b"cnnlab")
    with pytest.raises(CnnlabError, match=wrong.name):
        cvt.verify_hash_prefix(wrong)
    for bad in ("model.pth", "model-abc.pth", "model-.pth", "model-XYZXYZXY.pth"):
        (tmp_path / bad).write_bytes(b"cnnlab")
        with pytest.raises(CnnlabError, match="no SHA-256 prefix in its name"):
            cvt.verify_hash_prefix(tmp_path / bad)


def test_every_torchvision_weights_file_name_carries_a_hash_prefix() -> None:
    names = [cvt.weights_file_name(w) for n in tvm.list_models(module=tvm) for w in tvm.get_model_weights(n)]
    assert names and all(cvt.hash_prefix(n) is not None for n in names), [n for n in names if not cvt.hash_prefix(n)]
    assert cvt.weights_file_name(RESNET18) == HUB_NAME


def test_a_missing_file_is_downloaded_by_torch_hub_with_its_hash_checked(
    hub: Path, monkeypatch: pytest.MonkeyPatch, resnet18_state: dict, tmp_path: Path
) -> None:
    torch.save(resnet18_state, tmp_path / "served.pth")
    served = _named_by_own_hash(tmp_path / "served.pth")
    calls: list[tuple[str, str, object]] = []

    def download(url: str, dst: str, hash_prefix: str | None = None, progress: bool = True) -> None:
        calls.append((url, Path(dst).name, hash_prefix))
        Path(dst).write_bytes(served.read_bytes())

    monkeypatch.setattr(torch.hub, "download_url_to_file", download)
    monkeypatch.setattr(cvt, "weights_file_name", lambda weights: served.name)
    model = create_model("resnet18", num_classes=1000, pretrained=True)
    assert calls == [(RESNET18.url, served.name, served.name.split("-")[1][:8])]
    torch.testing.assert_close(model.conv1.weight, resnet18_state["conv1.weight"])
    create_model("resnet18", num_classes=1000, pretrained=True)
    assert len(calls) == 1, "a cached, verified file is not downloaded again"


def test_offline_message_still_names_the_hub_folder(hub: Path) -> None:
    with pytest.raises(CnnlabError, match=rf"offline\? Put {HUB_NAME} in .*checkpoints or pass --weights FILE"):
        create_model("resnet18", pretrained=True)


# --- building without patching torch: the architecture torchvision would build ---------------------------------------


def test_loading_patches_nothing_process_wide(hub: Path, resnet18_state: dict, monkeypatch: pytest.MonkeyPatch) -> None:
    torch.save(resnet18_state, hub / "tmp.pth")
    good = _named_by_own_hash(hub / "tmp.pth")
    monkeypatch.setattr(cvt, "weights_file_name", lambda weights: good.name)
    seen: list[object] = []
    original = nn.Module.load_state_dict

    def spy(self: nn.Module, *args: object, **kwargs: object) -> object:
        seen.append((nn.Module.load_state_dict, type(RESNET18).get_state_dict))
        return original(self, *args, **kwargs)

    monkeypatch.setattr(nn.Module, "load_state_dict", spy)
    create_model("resnet18", pretrained=True)
    assert seen == [(spy, tvm.WeightsEnum.get_state_dict)], "nothing is swapped while the weights load"


def _pretrained_entries() -> list[str]:
    return [f"{n}.{w.name}" for n in tvm.list_models(module=tvm) for w in tvm.get_model_weights(n)]


def _meta_build(build: object) -> nn.Module:
    try:
        with torch.device("meta"):
            return build()  # type: ignore[operator]
    except (NotImplementedError, RuntimeError):  # RegNet computes its widths with real tensors
        with cvt._no_init():
            return build().to("meta")  # type: ignore[operator]


def _at_load(build: object) -> list[tuple[type, dict[str, torch.Size], object]]:
    """(class, parameter shapes, transform_input) of the model at the moment torchvision's builder loads weights."""
    seen: list[tuple[type, dict[str, torch.Size], object]] = []

    def capture(self: nn.Module, *args: object, **kwargs: object) -> None:
        shapes = {k: v.shape for k, v in self.state_dict().items()}
        seen.append((type(self), shapes, getattr(self, "transform_input", None)))

    # Only in this test: torchvision's builder runs with its download and load swapped for a capture.
    with (
        mock.patch.object(tvm.WeightsEnum, "get_state_dict", lambda self, *a, **k: {}),
        mock.patch.object(nn.Module, "load_state_dict", capture),
    ):
        _meta_build(build)
    return seen


@pytest.mark.parametrize("entry", _pretrained_entries())
def test_pretrained_architecture_equals_torchvisions_own_build(entry: str) -> None:
    """Our build for weights W has exactly the architecture torchvision's own builder loads W into."""
    name, wname = entry.split(".")
    weights = cvt.resolve_weights(name, wname)
    (theirs,) = _at_load(lambda: tvm.get_model(name, weights=weights))
    ours = _meta_build(lambda: tvm.get_model(name, weights=None, **cvt.pretrained_kwargs(name, weights)))
    assert type(ours) is theirs[0]
    assert {k: v.shape for k, v in ours.state_dict().items()} == theirs[1]
    assert getattr(ours, "transform_input", None) == theirs[2]


def test_densenet_old_keys_are_remapped_as_torchvision_does(
    hub: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    torch.manual_seed(0)
    state = tvm.densenet121().state_dict()
    # The published DenseNet files still use the old 'norm.1' / 'conv.2' key names.
    # The 2017 files also predate BatchNorm's num_batches_tracked buffer.
    old = {
        k.replace(".norm1.", ".norm.1.").replace(".conv2.", ".conv.2."): v
        for k, v in state.items()
        if not k.endswith("num_batches_tracked")
    }
    assert old.keys() != state.keys()
    torch.save(old, hub / "tmp.pth")
    good = _named_by_own_hash(hub / "tmp.pth", "densenet121")
    monkeypatch.setattr(cvt, "weights_file_name", lambda weights: good.name)
    model = create_model("densenet121", num_classes=1000, pretrained=True)
    torch.testing.assert_close(model.features.denseblock1.denselayer1.norm1.weight,
                               state["features.denseblock1.denselayer1.norm1.weight"])  # fmt: skip
    local = create_model("densenet121", num_classes=1000, weights_file=good)  # --weights FILE: the same remap
    torch.testing.assert_close(local.features.denseblock4.denselayer16.conv2.weight,
                               state["features.denseblock4.denselayer16.conv2.weight"])  # fmt: skip


def test_architecture_only_reads_and_downloads_nothing(hub: Path) -> None:
    model = create_model("googlenet", num_classes=7, pretrained=True, architecture_only=True)
    assert model.fc.out_features == 7 and model.transform_input and model.aux1 is None
    assert not any(hub.iterdir())


# --- memory guards ----------------------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("args", "needle"),
    [
        (
            ["bench", "throughput", "--batch-size", "99999999", "--seconds", "0.1"],
            r"^cnnlab: error: bench throughput of cnn-fast \(batch 99999999 x 1x28x28, training\) needs about "
            r"[\d,.]+ GiB of RAM, [\d,.]+ [GM]iB is available",
        ),
        (
            ["bench", "throughput", "--infer", "--image-size", "100000", "--batch-size", "1", "--seconds", "0.1"],
            r"^cnnlab: error: bench throughput of cnn-fast \(batch 1 x 1x100000x100000, inference\) needs about "
            r"[\d,.]+ GiB of RAM",
        ),
        (
            ["bench", "throughput", "--model", "cnn-compact", "--model-args", "stages=100", "--seconds", "0.1"],
            r"^cnnlab: error: cnn-compact: width x 2\^\(stages - 1\) = 32 x 2\^99 channels in the last stage; at most "
            r"1,048,576$",
        ),
        (
            ["bench", "throughput", "--model-args", "bogus=1"],
            r"^cnnlab: error: --model-args: cnn-fast does not take 'bogus'; it takes widths, depth, stem, whiten_keep$",
        ),
        (
            ["bench", "throughput", "--model", "resnet18", "--model-args", "dropout=0.2"],
            r"^cnnlab: error: --model-args: resnet18 does not take 'dropout'; it takes small_input$",
        ),
        (
            ["bench", "throughput", "--model", "lenet5", "--model-args", "width=2"],
            r"^cnnlab: error: --model-args: lenet5 does not take 'width'; it takes no options$",
        ),
    ],
    ids=["batch 99999999", "image 100000", "stages=100", "bogus=1", "torchvision bogus", "no options"],
)
def test_bench_throughput_refuses_what_cannot_fit_with_one_line(
    args: list[str], needle: str, capsys: pytest.CaptureFixture[str]
) -> None:
    code, err = main_error(args, capsys)
    assert code in (1, 2) and len(err) == 1, err
    assert __import__("re").search(needle, err[0]), err[0]


def test_model_args_that_blow_up_are_refused_before_allocating() -> None:
    with pytest.raises(UsageError, match=r"cnn-compact: width x 2\^\(stages - 1\) = 32 x 2\^99 channels"):
        create_model("cnn-compact", stages=100)
    with pytest.raises(UsageError, match=r"cnn-compact: width x 2\^\(stages - 1\) = 1000000000 x 2\^2 channels"):
        create_model("cnn-compact", width=10**9)
    with pytest.raises(UsageError, match=r"cnn-compact with width 8192, stages 4, convs_per_stage 2 \([\d,]+ "
                       r"parameters\) needs about [\d,.]+ GiB of RAM"):  # fmt: skip
        create_model("cnn-compact", width=8192, stages=4)
    with pytest.raises(UsageError, match=r"cnn-fast: widths 16-99999999: at most 1,048,576 channels per stage"):
        create_model("cnn-fast", widths="16-99999999")
    with pytest.raises(UsageError, match=r"cnn-fast: depth 1000000 makes 3,000,000 conv layers; at most 1,000"):
        create_model("cnn-fast", depth=10**6)
    with pytest.raises(UsageError, match=r"cnn-fast with widths 16-65536-65536, depth 1 \([\d,]+ parameters\) needs"):
        create_model("cnn-fast", widths="16-65536-65536")
    with pytest.raises(UsageError, match="cnn-compact: width must be a whole number, got nan"):
        create_model("cnn-compact", width=float("nan"))
    with pytest.raises(UsageError, match=r"cnn-compact: stages must be a whole number, got 2\.5"):
        create_model("cnn-compact", stages=2.5)
    with pytest.raises(UsageError, match=r"cnn-compact: dropout must be a number in \[0, 1\), got 'lots'"):
        create_model("cnn-compact", dropout="lots")
    m = create_model("cnn-compact", width=16.0, stages=2, convs_per_stage=1, act="elu", dropout=0.3)
    assert m(torch.zeros(2, 1, 28, 28)).shape == (2, 10)


@pytest.mark.parametrize("name", [n for n in list_models() if "ours" in model_info(n).tags])
def test_our_builders_name_their_options(name: str) -> None:
    with pytest.raises(UsageError, match=rf"^model_args: {name} does not take 'bogus'; it takes ") as e:
        create_model(name, bogus=1)
    assert e.value.cli_message().startswith(f"--model-args: {name} does not take 'bogus'")  # the CLI's words


def test_bench_throughput_estimates_with_a_meta_model(monkeypatch: pytest.MonkeyPatch) -> None:
    from cnnlab.engine import bench

    asked: list[tuple[str, int, str]] = []
    monkeypatch.setattr(
        bench, "check_fits", lambda what, need, device="cpu", hint="": asked.append((what, need, device))
    )
    r = bench.throughput(bench.ThroughputConfig(model="cnn-fast", batch_size=8, seconds=0.05, warmup=0))
    (what, need, device), *_ = asked
    assert what == "bench throughput of cnn-fast (batch 8 x 1x28x28, training)" and device == "cpu"
    assert 4 * 84_794 * 3 < need < 2**30 and r["images_per_s"] > 0


def test_shape_and_summary_of_a_huge_input_allocate_nothing(capsys: pytest.CaptureFixture[str]) -> None:
    from cnnlab.cli import main

    for args in (
        ["shape", "--input", "1x100000x100000", "--model", "lenet5", "--json"],
        ["shape", "--input", "1x100000x100000", "--model", "cnn-fast", "--json"],
        ["summary", "cnn-compact", "--input-size", "1,100000,100000", "--json"],
        ["summary", "--layers", "conv 6 5; pool max 2", "--input-size", "1,100000,100000", "--json"],
    ):
        assert main(args) == 0, args
        doc = json.loads(capsys.readouterr().out)
        assert doc["layers"], args
    assert main(["shape", "--input", "1x100000x100000", "--model", "lenet5"]) == 0
    out = capsys.readouterr().out
    assert "f6" in out and "total" in out
