"""Every torchvision classification model, registered under its torchvision name and made adaptable.

- Discovery: `torchvision.models.list_models(module=torchvision.models)`, so new torchvision families appear
  without a hand-kept list.
- Pretrained weights: torchvision's weights API (enums, transforms, meta) picks the file; cnnlab loads it itself.
  torch.hub downloads a missing file (checking its hash); a cached file must match the SHA-256 prefix in its name
  (torchvision's naming, e.g. resnet18-f37072fd.pth); every file is read with torch.load(weights_only=True), so a
  pickle planted in the hub cache never runs. `weights_file=` (a local file) takes the same path minus the hash.
- Adaptation: `in_channels` (the first conv's pretrained weights summed for 1 channel, or repeated and rescaled),
  `num_classes` (a new head), and small inputs: the early downsampling of the ImageNet stem is removed until the
  last feature map keeps at least 4x4 resolution. Every change is recorded in `model.cnnlab_changes`.
- Shape checks run on the meta device (no memory, no compute), also to name the minimum size a model accepts.
"""

from __future__ import annotations

import contextlib
import copy
import functools
import hashlib
import io
import math
import re
import urllib.parse
import warnings
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import torch
import torchvision.models as tvm
from torch import nn
from torch.overrides import TorchFunctionMode

from cnnlab.errors import CnnlabError, UsageError
from cnnlab.models.registry import register_model

FAMILIES: tuple[tuple[str, str], ...] = (
    ("alexnet", "AlexNet"), ("vgg", "VGG"), ("googlenet", "GoogLeNet"), ("inception", "Inception v3"),
    ("resnext", "ResNeXt"), ("wide_resnet", "Wide ResNet"), ("resnet", "ResNet"), ("densenet", "DenseNet"),
    ("squeezenet", "SqueezeNet"), ("mobilenet_v2", "MobileNet v2"), ("mobilenet_v3", "MobileNet v3"),
    ("shufflenet", "ShuffleNet v2"), ("mnasnet", "MNASNet"), ("efficientnet_v2", "EfficientNet v2"),
    ("efficientnet", "EfficientNet"), ("regnet", "RegNet"), ("convnext", "ConvNeXt"), ("vit", "ViT"),
    ("swin", "Swin"), ("maxvit", "MaxViT"),
)  # fmt: skip
SMALL_INPUT_MIN_SIDE = 4  # remove stem downsampling until the last feature map is at least this many pixels
SMALL_INPUT_BELOW = 128  # ...for inputs smaller than this


def torchvision_names() -> list[str]:
    """All classification model builders torchvision registers."""
    return tvm.list_models(module=tvm)


def family_of(name: str) -> str:
    """Human family name of a torchvision builder."""
    return next((fam for prefix, fam in FAMILIES if name.startswith(prefix)), name)


def weights_enum(name: str) -> Any:
    """torchvision's weights enum class for a builder."""
    return tvm.get_model_weights(name)


def resolve_weights(name: str, weights_name: str | None = None) -> Any:
    """A weights entry: DEFAULT, or by name such as IMAGENET1K_V2 (UsageError naming the choices)."""
    enum = weights_enum(name)
    if weights_name in (None, "DEFAULT"):
        return enum.DEFAULT
    try:
        return enum[weights_name]
    except KeyError:
        raise UsageError(
            f"{name} has no weights {weights_name!r}; choose from {', '.join(w.name for w in enum)}"
        ) from None


def weights_input_size(weights: Any) -> int:
    """The crop size the weights were evaluated at (224 for most, 299 for Inception v3, 384/518 for SWAG)."""
    return int(weights.transforms().crop_size[0])


def pretrained_info(weights: Any) -> dict[str, Any]:
    """Preprocessing and category names that travel with pretrained weights into a run's config."""
    tf = weights.transforms()
    return {"weights": str(weights), "mean": list(tf.mean), "std": list(tf.std), "resize": list(tf.resize_size),
            "crop": list(tf.crop_size), "categories": list(weights.meta.get("categories") or [])}  # fmt: skip


class _NoInit(TorchFunctionMode):
    """Skip random initialisation while a model is built only to read its shapes (a 600M-parameter RegNet).

    A torch function mode is thread-local, unlike patching `nn.init`: a model built meanwhile in another thread
    still gets its initialisation.
    """

    def __torch_function__(self, func: Any, types: Any, args: Any = (), kwargs: Any = None) -> Any:
        kwargs = kwargs or {}
        name = getattr(func, "__name__", "")
        init_fn = getattr(func, "__module__", "") == "torch.nn.init" and name.endswith("_")
        if init_fn or name in ("uniform_", "normal_"):
            return args[0] if args else kwargs.get("tensor")
        return func(*args, **kwargs)


@contextlib.contextmanager
def _no_init() -> Iterator[None]:
    with _NoInit():
        yield


def build_meta(name: str, **kwargs: Any) -> nn.Module:
    """The architecture on the meta device: shapes and parameter counts without memory or compute."""
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        try:
            with torch.device("meta"):
                return tvm.get_model(name, weights=None, **kwargs)
        except (NotImplementedError, RuntimeError):
            # A few builders (RegNet) compute their widths with tensor ops that need real data.
            with torch.device("cpu"), _no_init():
                return tvm.get_model(name, weights=None, **kwargs).to("meta")


def builder_kwargs(name: str, image_size: int, pretrained: bool) -> dict[str, Any]:
    """Builder options cnnlab always sets: no auxiliary heads, fast init, size-dependent models told the size."""
    kwargs: dict[str, Any] = {}
    if name in ("googlenet", "inception_v3") and not pretrained:
        # Auxiliary classifiers return tuples in training mode; init_weights=False avoids SciPy's slow truncnorm.
        kwargs.update(aux_logits=False, init_weights=False)
    if name.startswith("vit_") and not pretrained:
        kwargs["image_size"] = image_size
    if name.startswith("maxvit") and not pretrained:
        kwargs["input_size"] = (image_size, image_size)
    return kwargs


def first_conv(model: nn.Module) -> tuple[str, nn.Conv2d]:
    """The stem convolution: the first Conv2d defined (for every torchvision classifier, the one run first)."""
    for path, module in model.named_modules():
        if isinstance(module, nn.Conv2d):
            return path, module
    raise CnnlabError(f"{type(model).__name__} has no Conv2d to adapt")


def set_module(model: nn.Module, path: str, new: nn.Module) -> None:
    """Replace the submodule at a dotted path."""
    parent_path, _, leaf = path.rpartition(".")
    parent = model.get_submodule(parent_path) if parent_path else model
    setattr(parent, leaf, new)


def _conv_like(old: nn.Conv2d, **changes: Any) -> nn.Conv2d:
    args = {"in_channels": old.in_channels, "out_channels": old.out_channels, "kernel_size": old.kernel_size,
            "stride": old.stride, "padding": old.padding, "dilation": old.dilation, "groups": old.groups,
            "bias": old.bias is not None, "padding_mode": old.padding_mode}  # fmt: skip
    args.update(changes)
    return nn.Conv2d(**args, device=old.weight.device, dtype=old.weight.dtype)


def adapted_input_weight(weight: torch.Tensor, in_channels: int) -> torch.Tensor:
    """(O, 3, kh, kw) -> (O, in_channels, kh, kw): summed over RGB for 1 channel, else tiled and rescaled by 3/in.

    Summing keeps a grey image's response equal to that of the same image repeated in R, G and B; tiling with
    the 3/in factor keeps the expected activation scale for other channel counts.
    """
    if in_channels == 1:
        return weight.sum(dim=1, keepdim=True)
    reps = math.ceil(in_channels / weight.shape[1])
    return weight.repeat(1, reps, 1, 1)[:, :in_channels] * (weight.shape[1] / in_channels)


def adapt_input_channels(model: nn.Module, in_channels: int) -> str | None:
    """Give the stem conv `in_channels` inputs, adapting its existing weights; returns a description."""
    path, conv = first_conv(model)
    if conv.in_channels == in_channels:
        return None
    new = _conv_like(conv, in_channels=in_channels)
    with torch.no_grad():
        if conv.weight.device.type != "meta":
            new.weight.copy_(adapted_input_weight(conv.weight, in_channels))
            if conv.bias is not None:
                new.bias.copy_(conv.bias)
    set_module(model, path, new)
    if getattr(model, "transform_input", False):
        model.transform_input = False  # Inception's RGB re-normalisation assumes 3 channels
    how = "summed over RGB" if in_channels == 1 else "tiled and scaled by 3/in"
    return f"{path}: {conv.in_channels} -> {in_channels} input channels (weights {how})"


def replace_head(model: nn.Module, old_classes: int, num_classes: int) -> list[str]:
    """Swap every classifier output layer (Linear, or SqueezeNet's 1x1 conv) with `old_classes` outputs."""
    changes = []
    for path, module in list(model.named_modules()):
        if isinstance(module, nn.Linear) and module.out_features == old_classes:
            new: nn.Module = nn.Linear(
                module.in_features, num_classes, bias=module.bias is not None, device=module.weight.device
            )
        elif isinstance(module, nn.Conv2d) and module.out_channels == old_classes and module.kernel_size == (1, 1):
            new = _conv_like(module, out_channels=num_classes)
        else:
            continue
        set_module(model, path, new)
        changes.append(f"{path}: new head, {old_classes} -> {num_classes} classes")
    if hasattr(model, "num_classes"):
        model.num_classes = num_classes
    return changes


def drop_aux_heads(model: nn.Module) -> None:
    """Inception v3 / GoogLeNet pretrained: keep only the main classifier (training then returns a tensor)."""
    if getattr(model, "aux_logits", False):
        model.aux_logits = False
        for attr in ("AuxLogits", "aux1", "aux2"):
            if hasattr(model, attr):
                setattr(model, attr, None)


def without_batch_norm(model: nn.Module) -> nn.Module:
    """`model` with every BatchNorm replaced by Identity, in place: for meta-device shape and MAC probes only.

    In eval mode batch norm keeps the shape, and FLOP counters do not count it; on the meta device it runs as a Python
    decomposition that is about half of a forward pass's time (EfficientNet-V2-L's small-input plan: 10.6 s -> 5.6 s).
    """
    for path, module in list(model.named_modules()):
        if isinstance(module, nn.modules.batchnorm._BatchNorm):
            set_module(model, path, nn.Identity())
    return model


def _trace(model: nn.Module, shape: tuple[int, int, int]) -> list[tuple[nn.Module, int, torch.Size]] | None:
    """(module, input width, output shape) of every conv/pool call of one forward pass; None if it fails."""
    calls: list[tuple[nn.Module, int, torch.Size]] = []

    def hook(module: nn.Module, inputs: tuple[Any, ...], output: Any) -> None:
        if isinstance(output, torch.Tensor) and output.dim() == 4:
            calls.append((module, inputs[0].shape[-1], output.shape))

    kinds = (nn.Conv2d, nn.MaxPool2d, nn.AvgPool2d)
    handles = [m.register_forward_hook(hook) for m in model.modules() if isinstance(m, kinds)]
    try:
        return calls if runs(model, shape) is not None else None
    finally:
        for h in handles:
            h.remove()


def _downsamplers(model: nn.Module, shape: tuple[int, int, int]) -> list[tuple[str, nn.Module]]:
    """Leaf convs and pools that shrink the maps, in the order a forward pass runs them (meta device)."""
    names = {m: n for n, m in model.named_modules()}
    return [(names[m], m) for m, width, out in _trace(model, shape) or [] if out[-1] < width]


def runs(model: nn.Module, shape: tuple[int, int, int]) -> torch.Tensor | None:
    """Output of one (1, C, H, W) forward in eval mode (meta device if the model is there), or None if it fails."""
    device = next(model.parameters()).device
    was_training = model.training
    model.eval()
    try:
        with torch.no_grad(), warnings.catch_warnings():
            warnings.simplefilter("ignore")
            return model(torch.zeros(1, *shape, device=device))
    except (RuntimeError, ValueError, IndexError, AssertionError, ZeroDivisionError):
        return None
    finally:
        model.train(was_training)


def _stride_of(module: nn.Module) -> int:
    s = module.stride
    return s[0] if isinstance(s, tuple) else int(s)


def _kernel_of(module: nn.Module) -> int:
    k = module.kernel_size
    return k[0] if isinstance(k, tuple) else int(k)


def smallest_map(model: nn.Module, shape: tuple[int, int, int]) -> int | None:
    """Smallest spatial side among the 4-D outputs of a (1, C, H, W) forward (meta device), None if it fails."""
    calls = _trace(model, shape)
    return None if calls is None else min((min(out[-2:]) for _, _, out in calls), default=shape[-1])


def plan_small_input(
    model: nn.Module, in_channels: int, image_size: int, reference: int, keep_weights: bool
) -> tuple[list[tuple[str, str]], bool | None]:
    """Decide which early downsamplers to remove for `image_size` inputs, trying each step on a meta copy.

    A step that breaks the forward pass on its own (a residual block's strided conv before its shortcut, or
    Inception's unpadded stem) is kept pending and committed together with the next step that makes the model
    run again. Returns the plan [(module path, action)], action 'identity' (drop a pool), 'stride1' or 'stem3x3',
    and whether the model runs with it (None when the size needs no plan and nothing was tried).
    """
    if image_size >= SMALL_INPUT_BELOW:
        return [], None
    shape = (in_channels, image_size, image_size)
    # One copy, changed step by step: a failed step stays in it as `pending` until a later one makes it run again,
    # so nothing is ever rolled back (copying a large model costs as much as a meta forward pass).
    trial = copy.deepcopy(model).to("meta")
    side = smallest_map(trial, shape)
    if side is not None and side >= SMALL_INPUT_MIN_SIDE:
        return [], True  # fits as it is: no need to trace its downsamplers (one meta forward pass saved)
    stem_path = first_conv(trial)[0]
    plan: list[tuple[str, str]] = []
    pending: list[tuple[str, str]] = []
    for path, module in _downsamplers(trial, (in_channels, reference, reference)):
        if side is not None and side >= SMALL_INPUT_MIN_SIDE:
            break
        if isinstance(module, nn.Conv2d) and _kernel_of(module) == _stride_of(module):
            break  # a patchify stem (ViT, ConvNeXt, Swin): tokens, not an overlapping stem; leave it
        if not isinstance(module, nn.Conv2d):
            action = "identity"
        else:
            action = "stem3x3" if path == stem_path and not keep_weights and _kernel_of(module) >= 5 else "stride1"
        _apply(trial, [(path, action)])
        pending.append((path, action))
        new_side = smallest_map(trial, shape)
        if new_side is not None:
            plan, pending, side = plan + pending, [], new_side
    # `side` is the committed plan's (pending steps are not in the plan), so it says whether the plan runs.
    return plan, side is not None


def _apply(model: nn.Module, plan: list[tuple[str, str]]) -> list[str]:
    changes = []
    for path, action in plan:
        old = model.get_submodule(path)
        if action == "identity":
            set_module(model, path, nn.Identity())
            changes.append(f"{path}: {type(old).__name__} (stride {_stride_of(old)}) removed for small inputs")
            continue
        k = _kernel_of(old)
        if action == "stem3x3":
            new = _conv_like(old, kernel_size=3, stride=1, padding=1)
            changes.append(f"{path}: {k}x{k} stride {_stride_of(old)} -> 3x3 stride 1 for small inputs")
        else:
            new = _conv_like(old, stride=1, padding=k // 2)
            with torch.no_grad():
                if old.weight.device.type != "meta":
                    new.weight.copy_(old.weight)
                    if old.bias is not None:
                        new.bias.copy_(old.bias)
            if _stride_of(old) == 1:
                changes.append(f"{path}: padding 0 -> {k // 2} ('same') for small inputs (weights kept)")
            else:
                changes.append(f"{path}: stride {_stride_of(old)} -> 1 for small inputs (weights kept)")
        set_module(model, path, new)
    return changes


def minimum_size(model: nn.Module, in_channels: int, start: int, limit: int = 1024) -> int | None:
    """The smallest square input side >= start that the (meta) model runs on, or None."""
    candidates = sorted({*range(start, start + 64), *range(32, limit + 1, 16)} - set(range(start)))
    for side in candidates:
        if runs(model, (in_channels, side, side)) is not None:
            return side
    return None


def _read_state_dict(path: str | Path, label: str = "--weights") -> dict[str, torch.Tensor]:
    """A state dict from a .safetensors or torch file, never running pickle code (CnnlabError naming the file)."""
    from cnnlab.engine.checkpoint import read_weights

    path = Path(path)
    if not path.is_file():
        raise UsageError(f"{label} {path}: no such file")
    if path.suffix == ".safetensors":
        return read_weights(path)
    try:
        state = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as e:  # pickle payloads, corrupt files: refused, never executed
        first = (str(e).strip().splitlines() or [type(e).__name__])[0]
        raise CnnlabError(f"{label} {path}: not a loadable state dict ({first[:160]})") from e
    if isinstance(state, dict) and "model" in state and isinstance(state["model"], dict):
        state = state["model"]
    if not isinstance(state, dict) or not all(isinstance(v, torch.Tensor) for v in state.values()):
        raise CnnlabError(f"{label} {path}: expected a state dict of tensors")
    return state


# torchvision names each file <name>-<first 8+ hex digits of its SHA-256>.<ext> (torch.hub's HASH_REGEX convention).
_HASH_IN_NAME = re.compile(r"-([0-9a-f]{8,64})\.[A-Za-z0-9]+$")
_VERIFIED: set[tuple[str, int, int, int]] = set()  # (path, size, mtime, inode) hashed in this process


def weights_file_name(weights: Any) -> str:
    """The file name of a weights entry in torch's hub cache: the last part of its URL (resnet18-f37072fd.pth)."""
    return Path(urllib.parse.urlparse(weights.url).path).name


def hash_prefix(name: str | Path) -> str | None:
    """The SHA-256 prefix a torchvision file name carries ('f37072fd' of resnet18-f37072fd.pth), or None."""
    match = _HASH_IN_NAME.search(Path(name).name)
    return match.group(1) if match else None


def sha256_of(path: Path) -> str:
    """Hex SHA-256 of a file, read in 1 MiB chunks."""
    digest = hashlib.sha256()
    with path.open("rb") as f:
        while chunk := f.read(2**20):
            digest.update(chunk)
    return digest.hexdigest()


def verify_hash_prefix(path: Path) -> None:
    """Refuse a hub-cache file whose SHA-256 does not start with the prefix in its name (CnnlabError naming it).

    torch.hub checks the hash only while downloading; a file that is already cached (or was put there by hand, as
    the offline message suggests, or by someone else) is trusted as is. cnnlab re-checks it on every load.
    """
    prefix = hash_prefix(path)
    if prefix is None:
        raise CnnlabError(f"pretrained weights {path}: no SHA-256 prefix in its name to check the file against")
    st = path.stat()
    key = (str(path), st.st_size, st.st_mtime_ns, st.st_ino)
    if key in _VERIFIED:
        return
    digest = sha256_of(path)
    if not digest.startswith(prefix):
        raise CnnlabError(
            f"pretrained weights {path}: its SHA-256 starts with {digest[: len(prefix)]}, not {prefix} as its name "
            "says (corrupt, or not the file torchvision published); delete it to download it again"
        )
    _VERIFIED.add(key)


def fetch_pretrained(weights: Any) -> Path:
    """The hub-cache file of `weights`, downloaded by torch.hub (hash-checked) if missing, its hash verified."""
    hub = Path(torch.hub.get_dir()) / "checkpoints"
    path = hub / weights_file_name(weights)
    if not path.is_file():
        try:
            hub.mkdir(parents=True, exist_ok=True)
            # torch.hub announces downloads on stderr; the library stays quiet (the CLI owns the terminal).
            with contextlib.redirect_stdout(io.StringIO()), contextlib.redirect_stderr(io.StringIO()):
                torch.hub.download_url_to_file(weights.url, str(path), hash_prefix=hash_prefix(path), progress=False)
        except OSError as e:  # URLError and friends: offline, or the host unreachable
            raise CnnlabError(
                f"cannot download pretrained weights {weights} ({e}); offline? Put {path.name} in {hub} or pass "
                "--weights FILE"
            ) from None
        except RuntimeError as e:  # torch.hub's own hash check of the download
            raise CnnlabError(f"pretrained weights {weights.url}: download refused ({str(e)[:200]})") from None
    verify_hash_prefix(path)
    return path


def read_hub_file(path: Path) -> dict[str, torch.Tensor]:
    """A verified hub-cache file as a state dict (weights_only: tensors and containers, never pickle code)."""
    verify_hash_prefix(path)
    return _read_state_dict(path, label="pretrained weights")


def pretrained_kwargs(name: str, weights: Any) -> dict[str, Any]:
    """The builder options torchvision's own builder sets before it loads `weights` into the model.

    Mirrors the `_ovewrite_named_param` calls of torchvision's builders (class count, Inception/GoogLeNet's input
    transform and auxiliary heads, ViT/MaxViT's input size); a test builds every weights entry both ways.
    """
    kwargs: dict[str, Any] = {}
    if weights.meta.get("categories") is not None:
        kwargs["num_classes"] = len(weights.meta["categories"])
    if name.startswith("vgg"):
        kwargs["init_weights"] = False  # the weights replace the initialisation
    if name in ("googlenet", "inception_v3"):
        kwargs.update(transform_input=True, aux_logits=True, init_weights=False)
    if name.startswith("vit_"):
        kwargs["image_size"] = weights.meta["min_size"][0]
    if name.startswith("maxvit"):
        kwargs["input_size"] = weights.meta["min_size"]
    return kwargs


class _StateDictSource:
    """Hands a verified state dict to torchvision's own key-remapping load helpers in place of a weights enum."""

    def __init__(self, state: dict[str, torch.Tensor]) -> None:
        self.state = state

    def get_state_dict(self, *args: Any, **kwargs: Any) -> dict[str, torch.Tensor]:
        """The state dict (torchvision's helpers call this instead of downloading)."""
        return self.state


def load_weights_into(model: nn.Module, name: str, state: dict[str, torch.Tensor], source: str) -> None:
    """Load a state dict into torchvision's `name` strictly, with the key remapping torchvision's builder applies."""
    try:
        if name.startswith("densenet"):
            from torchvision.models.densenet import _load_state_dict

            # The published DenseNet files use the old 'norm.1' / 'conv.2' keys; torchvision's helper renames them.
            _load_state_dict(model, _StateDictSource(dict(state)), progress=False)  # type: ignore[arg-type]
        else:
            model.load_state_dict(state)
    except RuntimeError as e:
        detail = next((ln.strip() for ln in str(e).splitlines()[1:] if ln.strip()), str(e).strip())
        raise CnnlabError(f"{source}: does not fit {name} ({detail[:200]})") from None


def _pretrained_model(
    name: str, weights: Any, weights_file: str | Path | None, kwargs: dict[str, Any], architecture_only: bool = False
) -> nn.Module:
    """Build the architecture torchvision builds for `weights`, then load the verified file into it ourselves.

    `architecture_only`: the exact pretrained architecture (class count, transform_input, ...) with nothing loaded,
    for a trained run whose own weights are loaded next.
    """
    build_kwargs = {**kwargs, **pretrained_kwargs(name, weights)}
    if architecture_only:
        return tvm.get_model(name, weights=None, **build_kwargs)
    if weights_file is not None:
        label, source = "--weights", Path(weights_file)
        state = _read_state_dict(weights_file)  # the user's own file: no hash to check, still never unpickled
    else:
        label, source = "pretrained weights", fetch_pretrained(weights)
        state = read_hub_file(source)
    with _no_init():  # every parameter and buffer is overwritten by the strict load that follows
        model = tvm.get_model(name, weights=None, **build_kwargs)
    load_weights_into(model, name, state, f"{label} {source}")
    return model


def build_torchvision(
    name: str,
    num_classes: int = 1000,
    in_channels: int = 3,
    image_size: int | None = None,
    *,
    pretrained: bool = False,
    weights_file: str | Path | None = None,
    weights_name: str | None = None,
    small_input: bool = True,
    architecture_only: bool = False,
) -> nn.Module:
    """Build torchvision's `name` for (in_channels, image_size, image_size) inputs and num_classes outputs.

    `architecture_only` with `pretrained`: the fine-tuned architecture without loading (or downloading) weights.
    """
    use_weights = pretrained or weights_file is not None
    weights = resolve_weights(name, weights_name) if use_weights else None
    image_size = image_size or (weights_input_size(weights) if weights else default_size(name))
    if weights is not None and name.startswith("vit_") and image_size != weights_input_size(weights):
        raise UsageError(
            f"pretrained {name} ({weights.name}) needs {weights_input_size(weights)}x"
            f"{weights_input_size(weights)} inputs, got {image_size}x{image_size}"
        )
    kwargs = builder_kwargs(name, image_size, use_weights)
    # Plan every change on the meta device first, so an impossible size fails in milliseconds, before any download.
    plan = _plan(name, image_size, use_weights)
    if weights is None and torch.get_default_device().type == "meta":
        model = build_meta(name, num_classes=num_classes, **kwargs)  # shapes only (summary, --details)
        changes = []
    elif weights is None:
        model = tvm.get_model(name, weights=None, num_classes=num_classes, **kwargs)
        changes: list[str] = []
    else:
        model = _pretrained_model(name, weights, weights_file, kwargs, architecture_only)
        drop_aux_heads(model)
        n_cat = len(weights.meta["categories"] or range(1000))
        changes = replace_head(model, n_cat, num_classes) if num_classes != n_cat else []
        model.pretrained_info = pretrained_info(weights)
    stem = adapt_input_channels(model, in_channels)
    changes = ([stem] if stem else []) + changes + _apply(model, plan)
    model.cnnlab_changes = changes
    return model


def _meta_pretrained(name: str, kwargs: dict[str, Any]) -> nn.Module:
    """A meta model shaped like the pretrained one (auxiliary heads dropped as after loading)."""
    meta_kwargs = dict(kwargs)
    if name in ("googlenet", "inception_v3"):
        meta_kwargs.update(aux_logits=False, init_weights=False)
    return build_meta(name, **meta_kwargs)


SIZE_DEPENDENT = ("vit_", "maxvit")  # builders that take the input size and fail to construct for bad sizes


def _probe(name: str, in_channels: int, image_size: int, use_weights: bool, num_classes: int) -> nn.Module | None:
    """The architecture on the meta device, input-adapted; None if it cannot even be built for this size."""
    kwargs = builder_kwargs(name, image_size, use_weights)
    try:
        probe = _meta_pretrained(name, kwargs) if use_weights else build_meta(name, num_classes=num_classes, **kwargs)
    except (ValueError, AssertionError, RuntimeError):
        return None
    adapt_input_channels(probe, in_channels)
    return without_batch_norm(probe)


def _smallest_size(name: str, in_channels: int, start: int, use_weights: bool, probe: nn.Module | None) -> int | None:
    if probe is not None and not name.startswith(SIZE_DEPENDENT):
        return minimum_size(probe, in_channels, start)
    for side in sorted({*range(start, start + 16), *range(16, 1025, 16)} - set(range(start))):
        candidate = _probe(name, in_channels, side, use_weights, 10)
        if candidate is not None and runs(candidate, (in_channels, side, side)) is not None:
            return side
    return None


def _plan(name: str, image_size: int, use_weights: bool) -> list[tuple[str, str]]:
    """Plan the small-input changes on a meta probe; a UsageError naming the minimum size if none works.

    The plan is about the maps' height and width only, which neither the input channels (only the first conv's
    weight changes) nor the number of classes (only the head's) affect: it is planned once for all of them.
    """
    plan, refusal = _remembered_plan(name, image_size, use_weights)
    if refusal is not None:
        raise UsageError(refusal)
    return list(plan)


PLAN_CHANNELS, PLAN_CLASSES = 3, 10  # the probe's input channels and classes (any would give the same plan)


@functools.lru_cache(maxsize=256)
def _remembered_plan(name: str, image_size: int, use_weights: bool) -> tuple[tuple[tuple[str, str], ...], str | None]:
    """_plan_once's answer (or refusal), kept: planning runs up to ~15 meta forward passes (seconds for a large
    model), and a run plans twice (the memory check's meta build, then the real one)."""
    try:
        return tuple(_plan_once(name, PLAN_CHANNELS, image_size, use_weights, PLAN_CLASSES)), None
    except UsageError as e:
        return (), str(e)


def _plan_once(
    name: str, in_channels: int, image_size: int, use_weights: bool, num_classes: int
) -> list[tuple[str, str]]:
    """The plan, computed: meta probes of the model at this input."""
    probe = _probe(name, in_channels, image_size, use_weights, num_classes)
    plan: list[tuple[str, str]] = []
    works: bool | None = False
    if probe is not None:
        plan, works = plan_small_input(probe, in_channels, image_size, default_size(name), keep_weights=use_weights)
        _apply(probe, plan)
        if works is None:  # no plan was searched: try the size as it is
            works = runs(probe, (in_channels, image_size, image_size)) is not None
    if not works:
        smallest = _smallest_size(name, in_channels, image_size + 1, use_weights, probe)
        hint = f"; the next size up that works is {smallest}x{smallest}" if smallest else ""
        if name.startswith("vit_"):
            hint += f" (a multiple of its patch size {name.split('_')[-1]})"
        raise UsageError(f"model {name!r} cannot run on {image_size}x{image_size} inputs{hint}")
    return plan


@functools.cache
def default_size(name: str) -> int:
    """The input size a torchvision model is normally used at (its default weights' crop size, else 224)."""
    try:
        return weights_input_size(weights_enum(name).DEFAULT)
    except (AttributeError, ValueError, KeyError):
        return 224


def _register_all() -> None:
    for name in torchvision_names():
        n_weights = len(list(weights_enum(name)))
        weights = f" ({n_weights} set{'s' if n_weights != 1 else ''} of pretrained weights)" if n_weights else ""
        register_model(
            name, family=family_of(name), default_image_size=default_size(name), default_in_channels=3,
            description=f"torchvision {name}{weights}",
            tags=("torchvision",) + (("pretrained",) if n_weights else ()),
        )(functools.partial(build_torchvision, name))  # fmt: skip


_register_all()
