"""The training loop: fit() sets a run up, runs epochs of steps with callbacks, and tests the best weights.

Device and precision are resolved once; data lives on the device; every epoch writes metrics.csv and last.ckpt
(and best.safetensors when validation loss improves), each atomically, so a run stopped at any point can resume.
What watches or steers the run (early stopping, checkpoints, the time budget, freezing, EMA, progress, loggers) is a
callback (engine/callbacks.py); the other rooms are config (options), device, optim, planner, state, setup, evaluate.
"""

from __future__ import annotations

import contextlib
import copy
import dataclasses
import math
import signal
import threading
import time
from collections.abc import Iterator, Sequence
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import torch
from torch import nn

import cnnlab
from cnnlab.data.balance import MULTI_LABEL_SAMPLER, imbalance_note, inverse_frequency, positive_weights
from cnnlab.data.pipeline import BatchLoader, Normalization, batch_mixer, channel_stats
from cnnlab.data.sources import Dataset, stratified_split
from cnnlab.engine import callbacks as cbs
from cnnlab.engine import distributed, planner, rundir
from cnnlab.engine.checkpoint import (
    apply_state_dict,
    load_checkpoint,
    load_weights,
    rng_state,
    save_checkpoint,
    set_rng_state,
)
from cnnlab.engine.config import (  # noqa: F401  (re-exported: the names this module always offered)
    DEFAULT_LR,
    FREEZE_CHOICES,
    MAX_SEED,
    OPTIMIZERS,
    PRECISIONS,
    SCHEDULES,
    TrainConfig,
    check_types,
)
from cnnlab.engine.device import (
    autocast,
    resolve_device,
    resolve_precision,
    seed_everything,
    synchronize,
)
from cnnlab.engine.evaluate import evaluate_batches, predict_logits
from cnnlab.engine.loggers import check_installed, make_loggers
from cnnlab.engine.loss import class_loss
from cnnlab.engine.metrics import best_thresholds
from cnnlab.engine.optim import (  # noqa: F401
    build_optimizer,
    build_scheduler,
    classifier_modules,
    load_optimizer_state,
    lr_scale,
    split_parameters,
)
from cnnlab.engine.record import DataRecord, ModelRecord, RunRecord, Runtime
from cnnlab.engine.reporter import Reporter, TrainStart
from cnnlab.engine.result import TrainResult
from cnnlab.engine.setup import (
    AUTO,
    auto_resume,
    build_model,
    check_sync_bn,
    check_training_memory,
    finished_result,
    fit_whitening,
    load_training_data,
    preflight,  # noqa: F401
    prior_bias,
    run_to_resume,
)
from cnnlab.engine.state import EpochProgress
from cnnlab.engine.stem_cache import AfterStem, describe, make_memo, memo_blocker, stem_layers
from cnnlab.errors import CnnlabError, OptionError, UsageError
from cnnlab.fileio import atomic_write_json


class TrainingInterrupted(CnnlabError):
    """SIGINT/SIGTERM stopped training after a step; the checkpoint to resume from is on disk (exit code 130)."""

    exit_code = 130


class Trainer:
    """One run: set-up in __init__, then run_epochs() and finish(). Callbacks receive it as `loop`."""

    def __init__(self, cfg: TrainConfig, reporter: Reporter, dataset: Dataset | None, started: float | None = None,
                 callbacks: Sequence[cbs.Callback] = (), clock: planner.Clock = time.perf_counter,
                 module: nn.Module | None = None) -> None:  # fmt: skip
        self.clock, self.module = clock, module  # module: the user's own network, trained instead of cfg.model
        started = clock() if started is None else started  # when the run began (a time budget counts from it)
        self.created = datetime.now(UTC).isoformat(timespec="seconds")  # config.json's "created"
        self.dist = distributed.env()
        self.cfg, self.reporter = cfg, reporter if self.dist.is_main else Reporter()  # only rank 0 talks
        self.device = resolve_device(cfg.device)
        self.dtype = resolve_precision(cfg.precision, self.device)
        seed_everything(cfg.seed)  # the same on every process: identical initial weights
        self._load(dataset)
        self._build()
        self.epoch, self.step = 0, 0
        self.history: list[dict[str, Any]] = []
        self.elapsed = 0.0
        self.run: Path | None = None
        self.best_state: dict[str, torch.Tensor] | None = None  # the best weights when there is no run directory
        self.progress: EpochProgress | None = None  # set while an epoch is under way
        self.skipped_steps = 0  # steps skipped by on_nan="skip"
        self.stop_requested: str | None = None  # the name of the signal asking training to stop
        self.stop_reason: str | None = None  # a callback's loop.stop(reason)
        self.improved = False  # whether the last epoch improved validation loss (EarlyStopping sets it)
        self.early = cbs.EarlyStopping(cfg.patience)
        self.ema = cbs.EMA(cfg.ema) if cfg.ema is not None else None
        self.budget: cbs.TimeBudget | None = None
        if cfg.time_budget is not None and cfg.planned_steps is None:
            cfg.planned_steps = self._plan_time_budget(started)
        if cfg.planned_steps is not None:  # a time budget's plan (also on resume): the schedule ends right there
            self.total_steps = cfg.planned_steps
            cfg.epochs = math.ceil(cfg.planned_steps / self.steps_per_epoch)
        self.sched = build_scheduler(self.opt, cfg, self.total_steps, self.steps_per_epoch)
        # Order matters at an epoch's end: re-plan and judge the epoch, let the user's callbacks add columns or stop,
        # log it, then save (the checkpoint holds plan, verdict and the callbacks' state) and print the row. An epoch
        # logged but not yet saved is logged again after a resume, and the loggers drop the repeat.
        judges: list[cbs.Callback] = [cbs.Freeze(), *([self.budget] if self.budget else []), self.early]
        judges += [self.ema] if self.ema else []
        saving = [cbs.Checkpointing(cfg.checkpoint_steps, cfg.checkpoint_minutes), cbs.Progress(self.reporter)]
        self.callbacks: list[cbs.Callback] = [*judges, *callbacks, *make_loggers(cfg.logger), *saving]

    # ----------------------------------------------------------------------------------------------- set-up

    def _load(self, dataset: Dataset | None) -> None:
        """The data, split into train/val, and its normalisation; the memory check."""
        if not self.dist.is_main:
            distributed.barrier()  # rank 0 loads first (and fills an image folder's decode cache for the others)
        self.data = dataset if dataset is not None else self._load_data()
        if self.dist.is_main:
            distributed.barrier()
        if dataset is not None:
            self._adopt(dataset)
        self.multi_label = self.data.multi_label  # a set of labels per image: sigmoid outputs, BCE, thresholds
        self.augment = tuple(self.cfg.augment) if self.cfg.augment is not None else self.data.default_augment
        self.augment_note = None  # said as training starts (after every check: an error stays one line)
        if self.cfg.augment is None:
            note = self.data.augment_note or "none"
            self.augment_note = f"augment: {','.join(self.augment) or 'none'}, this data's default: {note}"
        self._split()
        self._balance()
        if self.module is None:  # the user's own module is already built: its memory is spent
            check_training_memory(self.cfg, self.data, self.device)

    def _adopt(self, dataset: Dataset) -> None:
        """A dataset loaded by the caller decided its size and resize policy: record those, refuse others."""
        if self.cfg.image_size is not None and self.cfg.image_size != dataset.image_size:
            raise OptionError("image_size", f"{self.cfg.image_size}: the dataset given was loaded at "
                              f"{dataset.image_size} px; load it at this size, or leave image_size out")  # fmt: skip
        policy = dataset.train.resize if dataset.train.boxes is not None else None
        if self.cfg.resize is not None and self.cfg.resize != policy:
            had = f"with resize={policy!r}" if policy else "without a resize policy (its images are square already)"
            raise OptionError("resize", f"{self.cfg.resize}: the dataset given was loaded {had}; load it again with "
                              "this policy, or leave resize out")  # fmt: skip
        self.cfg.resize = policy  # recorded: evaluate, predict and visualize cut photos as training did

    def _build(self) -> None:
        """Model, loaders, optimizer, grad scaler."""
        cfg = self.cfg
        self.model = self._create_model()
        if self.multi_label:
            change = prior_bias(self.model, self.train_set.labels.cpu())
            if change and hasattr(self.model, "cnnlab_changes"):
                self.model.cnnlab_changes = [*self.model.cnnlab_changes, change]
        self.model = self.model.to(self.device)
        if cfg.channels_last:
            self.model = self.model.to(memory_format=torch.channels_last)
        change = fit_whitening(self.model, self.train_set, self.norm, self.device)
        if change:  # recorded with the run (config.json's model changes)
            self.model.cnnlab_changes = [*getattr(self.model, "cnnlab_changes", ()), change]
        if self.device.type == "cuda":
            torch.backends.cudnn.benchmark = True
        self.gen = torch.Generator(device=self.device).manual_seed(cfg.seed + 7919 * self.dist.rank)
        # Data-parallel: the epoch permutation must be the same on every process, the augmentation draws not.
        self.order_gen = torch.Generator(device=self.device).manual_seed(cfg.seed) if self.dist.enabled else None
        self.train_loader = BatchLoader(
            self.train_set, cfg.batch_size, self.norm, shuffle=True, augment=self.augment, generator=self.gen,
            device=self.device, rank=self.dist.rank, world_size=self.dist.world_size, order_generator=self.order_gen,
            channels_last=cfg.channels_last, balanced=cfg.sampler == "balanced",
        )  # fmt: skip
        self.mixer = batch_mixer(cfg.mixup, cfg.cutmix, len(self.data.classes))
        self.batches_per_epoch = len(self.train_loader)
        self.steps_per_epoch = math.ceil(self.batches_per_epoch / cfg.accumulate)  # optimizer steps
        self.total_steps = cfg.epochs * self.steps_per_epoch
        if cfg.max_steps:
            self.total_steps = min(self.total_steps, cfg.max_steps)
        self.head: list[str] | None = None
        if cfg.fine_tuning():
            probe = torch.zeros(1, self.data.channels, self.data.image_size, self.data.image_size, device=self.device)
            self.head = classifier_modules(self.model, probe)
        if cfg.sync_bn and self.dist.enabled:
            check_sync_bn(cfg, self.device)
            self.model = nn.SyncBatchNorm.convert_sync_batchnorm(self.model)
        self.opt = build_optimizer(self.model, cfg, self.head, self.dist.world_size)
        self.train_model: nn.Module = self.model
        self.stem_state: list[torch.Tensor] | None = None  # the fixed stem whose outputs the steps read back
        self.rewrap()
        self.scaler = torch.amp.GradScaler(self.device.type) if self.dtype == torch.float16 else None

    def _load_data(self) -> Dataset:
        data = load_training_data(self.cfg, check_model=self.module is None)
        for note in data.notes:
            self.reporter.message(note)
        return data

    def _create_model(self) -> nn.Module:
        model = build_model(self.cfg, self.data) if self.module is None else self.module
        info = getattr(model, "pretrained_info", None)
        self.norm: Normalization
        if info:
            # Pretrained features expect the weights' own normalisation; a grey image sees the mean over RGB.
            mean, std = info["mean"], info["std"]
            if self.data.channels != len(mean):
                mean, std = [sum(mean) / len(mean)] * self.data.channels, [sum(std) / len(std)] * self.data.channels
            self.norm = Normalization(tuple(mean), tuple(std))
        else:
            # From the images the model trains on, never from validation or test images; a pass over the training
            # split that pretrained weights (which bring their own) skip.
            self.norm = channel_stats(self.train_set)
        return model

    def _split(self) -> None:
        cfg, train = self.cfg, self.data.train
        if self.data.val is not None:  # the source has its own validation split (an image folder's val/)
            self.train_set, self.val_set = train, self.data.val
        elif cfg.val_split > 0:
            rest, held = stratified_split(train.labels, cfg.val_split, cfg.seed)
            if len(held) == 0 or len(rest) == 0:
                raise OptionError(
                    "val_split", f"{cfg.val_split} leaves an empty split of {len(train)} training images (it holds "
                    "out round(fraction x images) per class); raise it, or use {val_split=0} {patience=0}"
                )  # fmt: skip
            self.train_set, self.val_set = train.subset(rest), train.subset(held)
        else:
            self.train_set, self.val_set = train, None

    def _balance(self) -> None:
        """Say when the training classes are imbalanced; the class weights of the loss (None unless asked for)."""
        cfg, labels, classes = self.cfg, self.train_set.labels, self.data.classes
        if self.multi_label and cfg.sampler == "balanced":
            raise OptionError("sampler", MULTI_LABEL_SAMPLER)
        note = imbalance_note(labels, classes)
        if note and cfg.class_weights == "none" and cfg.sampler == "shuffle" and self.multi_label:
            note += "; class_weights='auto' (--class-weights auto) weighs each label's rare positives up"
        elif note and cfg.class_weights == "none" and cfg.sampler == "shuffle":
            note += ("; class_weights='auto' or sampler='balanced' (--class-weights auto, --sampler balanced) "
                     "counter it, and `cnnlab evaluate` reports balanced accuracy and macro-F1")  # fmt: skip
        if note:
            self.reporter.message(note)
        self.class_weight = None  # (K,) or None
        if cfg.class_weights == "auto" and self.multi_label:
            self.class_weight = positive_weights(labels).to(self.device)  # BCE's pos_weight per label
        elif cfg.class_weights == "auto":
            weight = inverse_frequency(labels, len(classes))
            if cfg.sampler == "balanced":
                self.reporter.message(
                    "note: auto class weights with the balanced sampler correct for imbalance twice "
                    "(rare classes are both drawn more often and weighted more); one is usually enough"
                )
                # Classes are drawn evenly, so the images the loss sees weigh the mean over classes (~12 for a
                # 200/5/2 split): scaled back to a mean of 1, as under shuffling, so the learning rate still fits.
                weight = weight / weight[weight > 0].mean()
            self.class_weight = weight.to(self.device)

    def eval_loader(self, which: str) -> BatchLoader | None:
        """A loader over the validation or test split, without augmentation."""
        data = self.val_set if which == "val" else self.data.test
        if data is None or len(data) == 0:
            return None
        if self.dist.enabled:  # each process evaluates its own shard; evaluate_batches sums the results
            data = data.subset(torch.arange(self.dist.rank, len(data), self.dist.world_size))
        return BatchLoader(data, self.cfg.eval_batch_size, self.norm, device=self.device,
                           channels_last=self.cfg.channels_last)  # fmt: skip

    def rewrap(self) -> None:
        """The module the training step calls: DDP (averages gradients over processes), compiled with compile=True."""
        self.train_model = self.model
        if self.train_loader.stem_memo is not None:  # the batches hold the fixed stem's outputs, not images
            self.train_model = AfterStem(self.model, stem_layers(self.model))
        if self.dist.enabled and any(p.requires_grad for p in self.model.parameters()):
            from torch.nn.parallel import DistributedDataParallel

            ids = [self.device.index] if self.device.type == "cuda" else None
            # DDP only syncs parameters that need gradients when it is built: rebuilt when the backbone unfreezes.
            self.train_model = DistributedDataParallel(self.model, device_ids=ids)
        if self.cfg.compile:
            self.train_model = torch.compile(self.train_model)

    def keep_stem_outputs(self) -> None:
        """Let the steps read the fixed stem's outputs back, each computed once per image (engine.stem_cache).

        Called before the first trained step: after a resume has loaded the stem it trained with, and after a time
        budget has planned the epochs (its timed steps compute the stem, as a first epoch does). Called again, it
        starts over only if the stem's filters changed.
        """
        skip, loader = stem_layers(self.model), self.train_loader
        if skip == 0:
            return
        state = [t.detach().clone() for t in self.model.features[:skip].state_dict().values()]  # type: ignore[index]
        if self.stem_state is not None and all(map(torch.equal, state, self.stem_state)):
            return
        self.stem_state = state
        had, loader.stem_memo = loader.stem_memo, None
        why = memo_blocker(self.model, loader, mixing=self.mixer is not None, distributed=self.dist.enabled,
                           compiled=self.cfg.compile, epochs=self.cfg.epochs)  # fmt: skip
        if why is None:
            memo = make_memo(self.model, loader, self.dtype)
            if isinstance(memo, str):  # said: the run is slower than it could be on a machine with more memory
                self.reporter.message(f"whitening stem: computed at every step ({memo})")
            else:
                loader.stem_memo = memo
                self.reporter.message(describe(memo))
        if had is not None or loader.stem_memo is not None:  # the step's module changes
            self.rewrap()

    # ------------------------------------------------------------------------------------------- time budget

    def _time_steps(self) -> tuple[float, float]:
        """(seconds per training step, seconds per evaluated image), timed on real batches after a warm-up.

        The weights, BatchNorm statistics, optimizer, scaler and random streams are put back afterwards: the run that
        follows is the same as without the timing.
        """
        loader = self.train_loader
        saved_model = {k: v.detach().clone() for k, v in self.model.state_dict().items()}
        saved_opt = copy.deepcopy(self.opt.state_dict())
        saved_scaler = self.scaler.state_dict() if self.scaler else None
        saved_rng = torch.get_rng_state(), torch.cuda.get_rng_state_all() if self.device.type == "cuda" else None
        saved_gens = loader.generator, loader.order_generator
        loader.generator = loader.order_generator = torch.Generator(device=self.device).manual_seed(self.cfg.seed + 1)
        try:
            step_s = self._timed_steps()
            per_image = self._time_eval()
        finally:
            self.model.load_state_dict(saved_model)
            self.opt.load_state_dict(saved_opt)
            self.opt.zero_grad(set_to_none=True)
            if self.scaler and saved_scaler:
                self.scaler.load_state_dict(saved_scaler)
            torch.set_rng_state(saved_rng[0])
            if saved_rng[1] is not None:
                torch.cuda.set_rng_state_all(saved_rng[1])
            loader.generator, loader.order_generator = saved_gens
        return step_s, per_image

    def _timed_steps(self) -> float:
        """Seconds per optimizer step over real batches, after two warm-up steps (kernel selection, allocation)."""
        loader, warmup, stamps = self.train_loader, 2, []

        def enough() -> bool:
            if self.dist.enabled:  # every process must take the same number of (collective) steps
                return len(stamps) >= warmup + 10
            return len(stamps) >= warmup + 40 or (len(stamps) > warmup + 3 and stamps[-1] - stamps[warmup] >= 0.5)

        self.train_model.train()
        group: list[tuple[torch.Tensor, torch.Tensor]] = []
        while not enough():
            for x, y in loader.batches(loader.epoch_order()):
                group.append((x, y))
                if len(group) < self.cfg.accumulate:
                    continue
                loss, _ = self._forward_backward_group(group)
                group = []
                self._optimizer_step()
                loss.item()
                synchronize(self.device)
                stamps.append(time.perf_counter())
                if enough():
                    break
        return (stamps[-1] - stamps[warmup]) / (len(stamps) - 1 - warmup)

    @torch.no_grad()
    def _time_eval(self) -> float:
        """Seconds per evaluated image (with test-time augmentation if on), timed on a test batch."""
        loader = self.eval_loader("test") or self.eval_loader("val")
        if loader is None:
            return 0.0
        x, _ = next(iter(loader))
        self.model.eval()
        times = []
        for _ in range(3):
            t0 = time.perf_counter()
            with autocast(self.device, self.dtype):
                predict_logits(self.model, x, self.cfg.tta).float().sum().item()
            times.append(time.perf_counter() - t0)
        self.model.train()
        return min(times[1:]) / len(x)

    def _plan_time_budget(self, started: float) -> int:
        """time_budget: time steps and evaluation, plan the steps that fit, and set up re-planning after epochs."""
        step_s, image_s = self._time_steps()
        n_val = len(self.val_set) if self.val_set is not None else 0
        costs = planner.costs(step_s, image_s, n_val, len(self.data.test), self.steps_per_epoch, self.dist.is_main)
        plan = planner.plan(self.cfg.time_budget, started, costs, self.cfg.max_steps, self.clock)
        steps = distributed.from_rank0(plan.steps)  # every process must run the same plan: rank 0's
        self.reporter.message(dataclasses.replace(plan, steps=steps).describe(self.cfg.time_budget, image_s))
        self.budget = cbs.TimeBudget(started, costs.fixed_s, self.clock, costs.per_epoch_s)
        return steps

    def _replan(self, epoch_seconds: float, epoch_steps: int) -> str | None:
        """Re-plan the time budget after an epoch (see callbacks.TimeBudget); the note, or None if unchanged."""
        return self.budget.replan(self, epoch_seconds, epoch_steps) if self.budget else None

    # ---------------------------------------------------------------------------------- what callbacks use

    @property
    def config(self) -> TrainConfig:
        """The run's options."""
        return self.cfg

    @property
    def optimizer(self) -> torch.optim.Optimizer:
        """The optimizer (its param_groups hold the learning rates)."""
        return self.opt

    @property
    def eval_model(self) -> nn.Module:
        """The weights that are validated, saved and tested: the EMA average when ema is on, else the model."""
        averaged = self.ema.averaged() if self.ema else None
        return averaged if averaged is not None else self.model

    @property
    def best_epoch(self) -> int:
        """The epoch with the lowest validation loss so far (the last one without validation)."""
        return self.early.best_epoch

    def set_lr(self, lr: float) -> None:
        """Set the learning rate of the classifier's group to `lr`, keeping the ratios between groups.

        A schedule sets the rate again at its next step: steer it yourself with schedule="none".
        """
        scale = lr / self.opt.param_groups[-1]["lr"]
        for group in self.opt.param_groups:
            group["lr"] *= scale

    def stop(self, reason: str) -> None:
        """End the run after the current step (the epoch's row and checkpoint are still written)."""
        self.stop_reason = reason

    def message(self, text: str) -> None:
        """A one-line notice to the progress output."""
        self.reporter.message(text)

    def steps_into_epoch(self) -> int:
        """Optimizer steps done in the current epoch."""
        done = self.progress.batch if self.progress is not None else 0
        return math.ceil(done / self.cfg.accumulate)

    def _emit(self, hook: str, *args: Any) -> None:
        for callback in self.callbacks:
            getattr(callback, hook)(self, *args)

    def emit_error(self, error: BaseException) -> None:
        """Tell every callback the run ended by `error`; a callback failing here must not hide the error itself."""
        for callback in self.callbacks:
            with contextlib.suppress(Exception):
                callback.on_train_error(self, error)

    # ---------------------------------------------------------------------------------------- run state

    def record(self) -> RunRecord:
        """Everything config.json records: options, model, data (classes, normalisation), runtime."""
        d = self.data
        return RunRecord(
            cnnlab_version=cnnlab.__version__, created=self.created,
            model=ModelRecord(
                name=self.cfg.model, num_classes=len(d.classes), in_channels=d.channels, image_size=d.image_size,
                params=sum(p.numel() for p in self.model.parameters()), args=dict(self.cfg.model_args),
                changes=tuple(getattr(self.model, "cnnlab_changes", ())),
                pretrained=getattr(self.model, "pretrained_info", None),
                classifier=tuple(self.head) if self.head is not None else None,
            ),
            data=DataRecord(
                name=d.name, classes=tuple(d.classes), channels=d.channels, image_size=d.image_size,
                mean=tuple(self.norm.mean), std=tuple(self.norm.std), augment=tuple(self.augment),
                train_size=len(self.train_set), val_size=len(self.val_set) if self.val_set is not None else 0,
                multi_label=self.multi_label,
                test_size=len(d.test),
                validation=f"{self.cfg.val_split:g} of train" if d.val is None else "given by the source",
                extra=dict(d.extra),
            ),
            train=self.cfg,
            runtime=Runtime(
                device=str(self.device), precision=str(self.dtype).replace("torch.", ""), torch=torch.__version__,
                threads=torch.get_num_threads(), world_size=self.dist.world_size,
                global_batch=self.cfg.batch_size * self.cfg.accumulate * self.dist.world_size,
            ),
        )  # fmt: skip

    def checkpoint_state(self) -> dict[str, Any]:
        """Everything an exact resume needs, as tensors and plain values."""
        return {
            "model": self.model.state_dict(),
            "optimizer": self.opt.state_dict(),
            "scheduler": self.sched.state_dict() if self.sched else None,
            "scaler": self.scaler.state_dict() if self.scaler else None,
            "epoch": self.epoch, "step": self.step, "elapsed": self.elapsed,
            "history": self.history,
            "partial": self.progress.state() if self.progress is not None else None,
            "skipped_steps": self.skipped_steps,
            "rng": rng_state(self._generators()),
            **{c.key: c.state_dict() for c in self.callbacks if c.key},  # early_stop, ema, a user's callbacks
        }  # fmt: skip

    def restore(self, state: dict[str, Any]) -> None:
        """Load a checkpoint_state() back."""
        apply_state_dict(self.model, state["model"], source="model")
        load_optimizer_state(self.opt, state["optimizer"])
        if self.sched and state["scheduler"]:
            self.sched.load_state_dict(state["scheduler"])
        if self.scaler and state["scaler"]:
            self.scaler.load_state_dict(state["scaler"])
        self.epoch, self.step, self.elapsed = state["epoch"], state["step"], state["elapsed"]
        for callback in self.callbacks:
            if callback.key and callback.key in state:
                callback.load_state_dict(state[callback.key])
        self.history = list(state["history"])
        self.skipped_steps = state.get("skipped_steps", 0)
        partial = state.get("partial")
        self.progress = EpochProgress.from_state(partial, self.device) if partial else None
        saved = state["rng"]["generators"]
        set_rng_state(state["rng"], {k: g for k, g in self._generators().items() if k in saved})
        if self.dist.rank > 0:  # the checkpoint holds rank 0's augmentation stream; the others draw their own
            self.gen.manual_seed(self.cfg.seed + 7919 * self.dist.rank + self.step)

    def _generators(self) -> dict[str, torch.Generator]:
        gens = {"data": self.gen}
        if self.order_gen is not None:
            gens["order"] = self.order_gen
        return gens

    # ---------------------------------------------------------------------------------------------- the loop

    def _new_progress(self) -> EpochProgress:
        zero = torch.zeros((), device=self.device)
        lr = self.opt.param_groups[-1]["lr"]  # the head's lr (fine-tuning: backbone groups come first)
        return EpochProgress(self.train_loader.epoch_order(), 0, zero.clone(), zero.long(), zero.long() - 1, 0, lr)

    def train_epoch(self) -> dict[str, float]:
        """One pass over the training split (or the rest of it, after a mid-epoch resume): loss and accuracy."""
        self.model.train()
        self._emit("on_epoch_start")  # Freeze sets requires_grad and BatchNorm modes here
        sync_each_step = self.device.type == "cpu"  # on a GPU, reading the loss every step would stall it
        prog = self.progress if self.progress is not None else self._new_progress()
        self.progress = prog
        for group in self._groups(prog):
            loss, logits = self._forward_backward_group(group)
            ok = self._clip_and_check(loss)
            if ok:
                self._optimizer_step()
            if self.sched:
                self.sched.step()
            self.step += 1
            if not ok:  # on_nan="skip": this step changes no weight and counts in no metric
                self.skipped_steps += 1
                prog.batch += len(group)
                self.reporter.message(f"skipped step {self.step} (epoch {self.epoch + 1}): non-finite loss or gradient")
            else:
                distributed.maybe_inject_fault(self.step, self.dist)
                for (_, y), part in zip(group, logits, strict=True):
                    prog.add(loss.detach(), part.detach(), y, self.step)
                self._emit("on_step_end", loss.detach().item() if sync_each_step else None)
            if self.step >= self.total_steps or self.stop_reason:
                break
            if self.stop_requested:
                self.save_mid_epoch()
        self._check_finite(prog)
        self.progress = None
        loss_sum, correct, seen = distributed.all_sum([prog.loss_sum, prog.correct, prog.correct.new_tensor(prog.seen)])
        return {
            "train_loss": loss_sum.item() / max(1, int(seen.item())),
            "train_acc": correct.item() / max(1, int(seen.item())),
            "lr": prog.lr,
        }

    def _groups(self, prog: EpochProgress) -> Iterator[list[tuple[torch.Tensor, torch.Tensor]]]:
        """The epoch's remaining batches, `accumulate` at a time (one optimizer step each)."""
        group: list[tuple[torch.Tensor, torch.Tensor]] = []
        for x, y in self.train_loader.batches(prog.order, prog.batch):
            group.append((x, y))
            if len(group) == self.cfg.accumulate:
                yield group
                group = []
        if group:
            yield group

    def _forward_backward(self, x: torch.Tensor, y: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Loss and logits of one batch, gradients in .grad (unscaled: ready to clip and step)."""
        loss, logits = self._forward_backward_group([(x, y)])
        return loss, logits[0]

    def _forward_backward_group(self, group: list[tuple[torch.Tensor, torch.Tensor]]
                                ) -> tuple[torch.Tensor, list[torch.Tensor]]:  # fmt: skip
        """The mean loss over the group's images and each batch's logits; gradients summed in .grad, unscaled.

        With accumulate=N, N batches add their gradients before one step; each batch's loss is weighted by its share of
        the group's images, so the step is the one a single batch of all of them would take.
        """
        self.opt.zero_grad(set_to_none=True)
        total = sum(len(y) for _, y in group)
        mean, outputs = None, []
        for i, (x, y) in enumerate(group):
            last = i == len(group) - 1
            # DDP averages gradients over processes at every backward; only the group's last one needs to.
            sync = contextlib.nullcontext() if last or not hasattr(self.train_model, "no_sync") else None
            with sync or self.train_model.no_sync():
                target = y
                if self.mixer is not None:
                    x, target = self.mixer(x, y, self.gen)  # y stays the first image's label, for train accuracy
                with autocast(self.device, self.dtype):
                    logits = self.train_model(x)
                    loss = class_loss(logits.float(), target, self.cfg.label_smoothing, self.class_weight,
                                      multi_label=self.multi_label)  # fmt: skip
                part = loss if len(group) == 1 else loss * (len(y) / total)
                (self.scaler.scale(part) if self.scaler else part).backward()
            mean = part.detach() if mean is None else mean + part.detach()
            outputs.append(logits)
        if self.scaler:
            self.scaler.unscale_(self.opt)
        return (loss if len(group) == 1 else mean), outputs

    def _optimizer_step(self) -> None:
        """Apply the gradients (through the grad scaler in fp16, which skips steps with inf/nan gradients)."""
        if self.scaler:
            self.scaler.step(self.opt)
            self.scaler.update()
        else:
            self.opt.step()

    def _clip_and_check(self, loss: torch.Tensor) -> bool:
        """Clip gradients (clip_grad); with on_nan="skip", False for a non-finite loss or gradient."""
        cfg = self.cfg
        norm = None
        if cfg.clip_grad is not None:
            norm = torch.nn.utils.clip_grad_norm_(self.model.parameters(), cfg.clip_grad)
        if cfg.on_nan != "skip" or self.scaler is not None:  # fp16's grad scaler already skips inf/nan steps
            return True
        if norm is None:
            grads = [p.grad for p in self.model.parameters() if p.grad is not None]
            norm = torch.linalg.vector_norm(torch.stack([torch.linalg.vector_norm(g) for g in grads]))
        # One host sync per step: the price of deciding on the host whether to step.
        return bool(torch.isfinite(loss) and torch.isfinite(norm))

    def _check_finite(self, prog: EpochProgress) -> None:
        """on_nan="stop": a non-finite loss anywhere in the epoch so far ends the run, naming where."""
        bad = int(prog.first_bad.item())
        if bad >= 0:
            raise CnnlabError(
                f"training diverged: non-finite loss at epoch {self.epoch + 1}, step {bad}; the last checkpoint "
                "is from before it (try a lower {lr} or {clip_grad})",
                options=True,
            )

    def save_mid_epoch(self) -> None:
        """A checkpoint inside an epoch (checkpoint_steps/minutes, or on SIGINT/SIGTERM); then stop if asked to."""
        self._check_finite(self.progress)  # never save weights after a non-finite loss
        if self.run:
            save_checkpoint(self.checkpoint_state(), self.run / rundir.LAST)
        if self.stop_requested:
            self._raise_interrupted()

    def _raise_interrupted(self) -> None:
        where = f"epoch {self.epoch + 1}, step {self.step}"
        if self.run is None:
            raise TrainingInterrupted(
                f"interrupted by {self.stop_requested} at {where}; no run directory, nothing saved"
            )
        raise TrainingInterrupted(
            f"interrupted by {self.stop_requested} at {where}; checkpoint saved, resume "
            f"with: cnnlab train --resume {self.run}"
        )

    def run_epochs(self) -> bool:
        """Train until the epochs, the step cap, early stopping or a callback end it; True if stopped early."""
        self.keep_stem_outputs()
        self._emit("on_train_start")
        val_loader = self.eval_loader("val")
        while self.epoch < self.cfg.epochs and self.step < self.total_steps:
            t0 = time.perf_counter()
            row: dict[str, Any] = {"epoch": self.epoch + 1, **self.train_epoch()}
            if val_loader is not None:
                val = evaluate_batches(self.eval_model, iter(val_loader), self.cfg.label_smoothing, self.dtype,
                                       self.cfg.tta, self.class_weight, multi_label=self.multi_label)  # fmt: skip
                row.update(val_loss=val["loss"], val_acc=val["acc"])
                if self.multi_label:
                    row["val_mAP"] = val["mAP"]
            elif self.multi_label:
                row["val_mAP"] = None  # the column says the run is multi-label (its acc is exact match)
            self.epoch += 1
            row["seconds"] = time.perf_counter() - t0
            self.elapsed += row["seconds"]
            row["elapsed"] = self.elapsed
            self.history.append(row)
            self._emit("on_epoch_end", row)
            if self.stop_requested:
                self._raise_interrupted()
            if self.stop_reason:
                self.reporter.message(self.stop_reason)
                return True
        return False

    def _choose_thresholds(self) -> None:
        """Multi-label: each label's decision threshold, the one with the best F1 on the validation split.

        Written to thresholds.json in the run (predict and evaluate read it) and kept as `self.thresholds`.
        """
        loader = self.eval_loader("val")
        k = len(self.data.classes)
        if loader is None:
            chosen, how = torch.full((k,), 0.5), "no validation split: 1/2 for every label"
        else:
            val = evaluate_batches(self.model, iter(loader), self.cfg.label_smoothing, self.dtype, self.cfg.tta,
                                   self.class_weight, keep=True, multi_label=True)  # fmt: skip
            chosen = best_thresholds(val["probs"], val["labels"])
            missing = int((val["labels"].sum(0) == 0).sum())
            how = (f"best F1 per label on the validation split ({val['n']:,} images)"
                   + (f"; {missing} label(s) absent there keep 1/2" if missing else ""))  # fmt: skip
        self.thresholds = chosen
        if self.run:
            rundir.write_thresholds(self.run, self.data.classes, chosen.tolist(), how)

    def finish(self, stopped_early: bool, started: float) -> TrainResult:
        """Restore the best weights, evaluate on the test split, write results and curves."""
        run = self.run
        if run and (run / rundir.BEST).is_file():
            load_weights(self.model, run / rundir.BEST)
        elif self.best_state is not None:
            self.model.load_state_dict(self.best_state)
        if self.multi_label:
            self._choose_thresholds()  # first: the test's exact match uses them, as `cnnlab evaluate` does
        test_loader = self.eval_loader("test")
        test: dict[str, Any] = {"loss": float("nan"), "acc": float("nan"), "top5": float("nan"), "mAP": float("nan")}
        if test_loader:
            test = evaluate_batches(self.model, iter(test_loader), self.cfg.label_smoothing, self.dtype, self.cfg.tta,
                                    self.class_weight, multi_label=self.multi_label,
                                    thresholds=self.thresholds if self.multi_label else None)  # fmt: skip
        result = TrainResult(
            run_dir=run, model=self.cfg.model, data=self.data.name, test_acc=test["acc"], test_loss=test["loss"],
            test_top5=test["top5"], best_epoch=self.best_epoch, epochs_run=self.epoch, stopped_early=stopped_early,
            seconds=self.clock() - started, device=str(self.device),
            skipped_steps=self.skipped_steps, steps=self.step, time_budget=self.cfg.time_budget, history=self.history,
            test_map=test.get("mAP") if self.multi_label else None,
        )  # fmt: skip
        if run:
            # Imported here, after the clock stopped: matplotlib costs ~0.6 s to import (2-core EPYC), as much as the
            # test evaluation, and a run without a directory draws nothing.
            from cnnlab.inspect.visualize import plot_curves

            atomic_write_json(run / rundir.RESULTS, result.to_dict())
            plot_curves(self.history, run / rundir.CURVES, title=f"{self.cfg.model} on {self.data.name}",
                        best_epoch=self.best_epoch if self.val_set is not None else None)  # fmt: skip
        self._emit("on_train_end", result)
        return result


_Trainer = Trainer  # the name the tests and earlier versions used


@contextlib.contextmanager
def _graceful_stop(trainer: Trainer) -> Iterator[None]:
    """First SIGINT/SIGTERM: finish the step, checkpoint, stop. A second one: stop at once (KeyboardInterrupt)."""
    if threading.current_thread() is not threading.main_thread():
        yield  # signal handlers can only be installed from the main thread
        return

    def handler(signum: int, frame: object) -> None:
        if trainer.stop_requested:
            signal.signal(signum, signal.SIG_DFL)
            raise KeyboardInterrupt
        trainer.stop_requested = signal.Signals(signum).name
        trainer.reporter.message(f"{trainer.stop_requested}: stopping after this step (again to stop at once)")

    previous = {sig: signal.signal(sig, handler) for sig in (signal.SIGINT, signal.SIGTERM)}
    try:
        yield
    finally:
        for sig, old in previous.items():
            signal.signal(sig, old)


def fit(
    config: TrainConfig | None = None,
    *,
    runs_dir: str | Path | None = "runs",
    run_name: str | None = None,
    reporter: Reporter | None = None,
    dataset: Dataset | None = None,
    resume: str | Path | None = None,
    device: str | None = None,
    callbacks: Sequence[cbs.Callback] = (),
    clock: planner.Clock = time.perf_counter,
    module: nn.Module | None = None,
) -> TrainResult:
    """Train, validate each epoch, stop early on validation loss, restore the best weights and test them.

    With `runs_dir=None` nothing is written to disk. `resume=RUN` continues a stopped run exactly, with its own
    options (only `device` may be changed). `dataset` passes data in memory instead of loading `config.data`.
    `callbacks` watch or steer the run (see engine/callbacks.py); `clock` is what a time budget is measured with;
    `module` is a network of your own, trained instead of the registered model `config.model` names.
    """
    return train_run(config, runs_dir=runs_dir, run_name=run_name, reporter=reporter, dataset=dataset, resume=resume,
                     device=device, callbacks=callbacks, clock=clock, module=module)[1]  # fmt: skip


def train_run(
    config: TrainConfig | None = None,
    *,
    runs_dir: str | Path | None = "runs",
    run_name: str | None = None,
    reporter: Reporter | None = None,
    dataset: Dataset | None = None,
    resume: str | Path | None = None,
    device: str | None = None,
    callbacks: Sequence[cbs.Callback] = (),
    clock: planner.Clock = time.perf_counter,
    module: nn.Module | None = None,
) -> tuple[Trainer | None, TrainResult]:
    """fit(), also returning the Trainer (its model holds the best weights; None if the run had already finished)."""
    started = clock()
    reporter = reporter or Reporter()
    owns_group = not distributed.is_initialized()
    dist_env, dist_device = distributed.setup(device or (config.device if config else "auto"))
    finished = True
    try:
        if run_name is not None:
            rundir.check_run_name(run_name)
        if resume == AUTO:
            resume = auto_resume(runs_dir, run_name)
            if resume is not None and (resume / rundir.RESULTS).is_file():
                # A torchrun command rerun after it succeeded: every rank says so quietly, none fails.
                reporter.message(f"{resume}: this run has already finished; nothing to resume")
                return None, finished_result(resume)
        cfg, run, state = _options(config, resume, device if not dist_env.enabled else dist_device, module)
        return _fit(cfg, runs_dir, run_name, reporter, dataset, run, state, started, callbacks, clock, module)
    except BaseException:
        finished = False
        raise
    finally:
        if owns_group:
            distributed.teardown(finished)


def _options(config: TrainConfig | None, resume: str | Path | None, device: str | None, module: nn.Module | None
             ) -> tuple[TrainConfig, Path | None, dict[str, Any] | None]:  # fmt: skip
    """The run's validated options; with `resume`, the run's own options, its directory and its checkpoint."""
    run = state = None
    if resume is not None:
        run, config = run_to_resume(resume)
        state = load_checkpoint(run / rundir.LAST) if (run / rundir.LAST).is_file() else None
    cfg = dataclasses.replace(config or TrainConfig())
    if device is not None:
        cfg.device = device
    cfg.validate(custom_model=module is not None)
    check_installed(cfg.logger)  # a missing logger package: one line, before any data is loaded or written
    return cfg, run, state


def _fit(cfg: TrainConfig, runs_dir: str | Path | None, run_name: str | None, reporter: Reporter,
         dataset: Dataset | None, run: Path | None, state: dict[str, Any] | None, started: float,
         callbacks: Sequence[cbs.Callback], clock: planner.Clock, module: nn.Module | None
         ) -> tuple[Trainer, TrainResult]:  # fmt: skip
    main = distributed.env().is_main  # only rank 0 writes the run directory
    if run is None and runs_dir is not None and main:
        rundir.check_writable(Path(runs_dir))
    t = Trainer(cfg, reporter, dataset, started, callbacks, clock, module)
    if run is not None:
        _resume(t, run if main else None, run, state)
    elif runs_dir is not None and main:
        # Created only now, after options, data and model all proved valid: a bad invocation leaves nothing behind.
        t.run = rundir.new_run_dir(runs_dir, cfg.model, t.data.name, run_name)
        t.record().write(t.run)
    if t.dist.enabled:
        t.reporter.message(
            f"data-parallel: {t.dist.world_size} processes ({'nccl' if t.device.type == 'cuda' else 'gloo'}), "
            f"{cfg.batch_size} images each per step, global batch {cfg.batch_size * t.dist.world_size}"
            + (
                f"; peak lr {cfg.resolved_lr():g} x {lr_scale(cfg, t.dist.world_size):.3g} = "
                f"{cfg.resolved_lr() * lr_scale(cfg, t.dist.world_size):.3g} (--scale-lr {cfg.scale_lr})"
                if cfg.scale_lr != "none"
                else "; --scale-lr linear keeps most of the accuracy a larger global batch loses"
            )
        )
    if t.augment_note and run is None:  # a fresh run (a resume said it when it started)
        t.reporter.message(t.augment_note)
    t.reporter.train_start(TrainStart(t.record(), t.run, t.steps_per_epoch, t.total_steps, t.epoch))
    try:
        with _graceful_stop(t):
            stopped = t.run_epochs()
        result = t.finish(stopped, started)
    except BaseException as error:
        t.emit_error(error)
        raise
    finally:
        # The Trainer outlives this call (returned, or held by a traceback): no DDP wrapper bound to a process
        # group that teardown() is about to destroy; nor the stem's kept outputs (hundreds of MB).
        t.train_model = t.model
        t.train_loader.stem_memo = None
    t.reporter.train_end(result)
    return t, result


def _resume(t: Trainer, own: Path | None, run: Path, state: dict[str, Any] | None) -> None:
    """Put a checkpoint back into trainer `t` (this process writes the run directory if `own` is set)."""
    t.run = own
    if state is None:
        return
    try:
        t.restore(state)
    except (CnnlabError, KeyError, TypeError, ValueError, RuntimeError, AttributeError, IndexError) as e:
        # Another model's checkpoint, or a hand-edited one: name it, never a traceback.
        why = str(e) if isinstance(e, CnnlabError) else f"{type(e).__name__}: {(str(e) or '?').splitlines()[0]}"
        raise UsageError(f"{run / rundir.LAST}: does not fit this run ({why[:160]})") from None
    if t.run is not None:
        # The checkpoint is the source of truth: a kill between it and metrics.csv cost the last row.
        rundir.write_metrics(t.run, t.history)
    inside = f", batch {t.progress.batch} of epoch {t.epoch + 1}" if t.progress is not None else ""
    t.reporter.message(f"resuming {run} after epoch {t.epoch}{inside} (step {t.step})")
