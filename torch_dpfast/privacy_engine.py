"""``PrivacyEngine``: makes a model, optimizer and data loader train with DP-SGD.

``make_private`` attaches per-example clipping to the model (engine.py), wraps the optimizer
(optimizer.py), replaces the data loader by Poisson-sampled fixed-shape physical batches
(data_loader.py) and records every noisy step in the accountant (accounting/). The loader
announces each physical batch to the engine before yielding it, and the engine tells the
clipping which rows are real and the optimizer whether the batch ends its logical batch: the
user's training loop stays the ordinary one.
"""

from __future__ import annotations

import copy
import warnings
import weakref

import torch
from torch import nn
from torch.utils.data import DataLoader

from . import accounting
from .assign import assign_rules, is_batch_norm
from .batch_layout import LoaderBatch, check_layout
from .checkpoint import checkpoint_options
from .checkpoint import load as load_file
from .checkpoint import save as save_file
from .data_loader import DPDataLoader, check_map_style, check_replaceable_sampler
from .distributed import broadcast_module, check_agreement, check_not_ddp, world
from .distributed import sources as distributed_sources
from .engine import CLIPPING_MODES, Attachment, attach, set_module_alias
from .errors import unsupported_module
from .fix import fix
from .ghost import DPCriterion
from .materialise_plan import DEFAULT_MATERIALISE_BYTES, check_budget
from .optimizer import DPOptimizer
from .random_source import RandomSource
from .sampling import PADDINGS, PhysicalBatch, default_padding
from .validation import (
    check_choice,
    check_count,
    check_loss_reduction,
    check_non_negative,
    check_positive,
)

# Opacus's names for the clipping choices that mean what we do (flat clipping over all layers).
_OPACUS_CLIPPING = {"flat": "auto"}
_OPACUS_GRAD_SAMPLE_MODES = ("hooks", "ew", "functorch", "ghost", "no_op")


class PrivacyEngine:
    """DP-SGD for a model, an optimizer and a data loader, with privacy accounting.

    Args:
        accountant: "prv" (default; tight numerical composition), "rdp", or "gdp" (Opacus's
            central-limit approximation: it can underestimate epsilon, and says so).
        secure_mode: draw the Poisson samples and the noise from the OS CSPRNG (across ranks, the
            shared batch sizes from SHAKE-256 keyed with 256 OS bits); not reproducible, nothing
            of it stored (random_source.py, docs/security.md).
    """

    def __init__(self, accountant: str = "prv", secure_mode: bool = False):
        self.accountant = accounting.create_accountant(accountant)
        self.secure_mode = bool(secure_mode)
        self.attachment: Attachment | None = None
        self.optimizer: DPOptimizer | None = None
        self.data_loader: DataLoader | None = None
        self.sample_rate: float | None = None
        self.target: tuple[float, float] | None = None  # (target_epsilon, target_delta)

    def make_private(
        self,
        *,
        module: nn.Module,
        optimizer: torch.optim.Optimizer,
        data_loader: DataLoader,
        max_grad_norm: float,
        noise_multiplier: float | None = None,
        target_epsilon: float | None = None,
        target_delta: float | None = None,
        epochs: float | None = None,
        clipping: str = "auto",
        physical_batch_size: int | None = None,
        padding: str | None = None,
        poisson_sampling: bool = True,
        loss_reduction: str = "mean",
        criterion: nn.Module | None = None,
        noise_generator: torch.Generator | None = None,
        sample_generator: torch.Generator | None = None,
        batch_first: bool = True,
        grad_sample_mode: str | None = None,
        materialise_bytes: int | None = DEFAULT_MATERIALISE_BYTES,
        wrap_model: bool = True,
        rand_on_empty: bool = False,
        **opacus_adaptive,
    ):
        """Returns ``(module, optimizer, data_loader)``: the same module with per-example
        clipping attached, a :class:`DPOptimizer` around ``optimizer``, and a
        :class:`DPDataLoader` of Poisson-sampled physical batches. With ``clipping="ghost"``,
        ``(module, optimizer, criterion, data_loader)``: the criterion, called like the original
        one, returns a loss whose ``backward()`` runs the two passes.

        Args:
            module: the model (trained in place).
            optimizer: any torch.optim optimizer over (some of) the module's parameters.
            data_loader: a DataLoader over a map-style dataset; its ``batch_size`` is the
                expected logical batch size: q = batch_size / len(dataset).
            max_grad_norm: C, the per-example clipping bound.
            noise_multiplier: sigma; or give ``target_epsilon``, ``target_delta`` and ``epochs``
                to calibrate it.
            clipping: "auto" | "bk" | "ghost" | "per_example" (see docs/clipping.md); Opacus's
                "flat" means "auto".
            physical_batch_size: rows per physical batch (the last one of a logical batch is
                padded with copies of its first row and masked; the captured layers compute
                only its real rows); None: each logical batch is one variable-size batch.
            padding: "full" pads that last batch to ``physical_batch_size`` rows (one batch
                shape: no recompilation, CUDA-graph friendly); "pow2" only to the next power
                of two (fewer padding rows, at most log2(physical_batch_size) + 2 shapes).
                None (default): "pow2" for a model on CPU (measured faster on 5 of 7 model
                families, docs/benchmarks.md), "full" on GPUs.
            poisson_sampling: False keeps the user's loader, whose batches are NOT what the
                accountant assumes (a warning says so).
            loss_reduction: "mean" or "sum", how the loss reduces over the batch.
            criterion: the loss module, needed by ``clipping="ghost"``.
            noise_generator: generator of the noise seeds (default: seeded from torch's).
            sample_generator: generator of the Poisson sample (default: the data loader's own
                ``generator=`` if it has one, as Opacus uses it, else one seeded from torch's;
                ignored in secure mode, which takes no generator).
            batch_first: False for sequence-first models, as in Opacus: the inputs and every
                layer without a batch-aware rule hold the batch in dim 1 ((T, B, ...)); layers
                that know their own layout (nn.MultiheadAttention, nn.LSTM, ...) follow their
                ``batch_first`` attribute either way.
            grad_sample_mode: accepted for Opacus scripts: "ghost" means clipping="ghost"; the
                others change nothing (our rules are exact), except "no_op", refused (it leaves
                per-sample gradients to the user; torch_dpfast computes them itself).
            wrap_model: for Opacus 1.6 scripts: the module is returned as it is either way
                (layers are captured in place, there is no wrapper); with True (the default, as
                in Opacus) ``module._module`` is the module itself, for scripts that unwrap
                Opacus's GradSampleModule that way.
            rand_on_empty: accepted for Opacus 1.6 scripts and ignored: an empty Poisson sample
                is never an empty tensor here (it is a batch of masked padding rows, which the
                model runs and which contribute nothing).
            **opacus_adaptive: Opacus's adaptive-clipping keywords (target_unclipped_quantile,
                clipbound_learning_rate, max_clipbound, min_clipbound, unclipped_num_std) are
                refused with a clear error: adaptive clipping is not supported; any other
                keyword is a TypeError naming it.
            materialise_bytes: with clipping="auto" on CPU, the bytes of per-example gradients
                a physical batch may hold where that is cheaper than a layer's norm (see
                ``dpf.attach``); default (None) an eighth of the available memory, 0 turns it
                off.
        """
        if self.optimizer is not None:
            raise RuntimeError(
                "this PrivacyEngine already made a model private; create one PrivacyEngine per "
                "model (its accountant tracks that model's privacy spending)"
            )
        _check_no_adaptive_clipping(opacus_adaptive)
        clipping = _check_clipping(clipping, grad_sample_mode)
        if isinstance(max_grad_norm, (list, tuple)):
            raise ValueError(
                "max_grad_norm is a list (Opacus's per-layer clipping), which is not supported: "
                "give one bound for the whole gradient, e.g. max_grad_norm=1.0 (flat clipping)"
            )
        check_positive("max_grad_norm", max_grad_norm)
        check_count("physical_batch_size", physical_batch_size, optional=True)
        check_loss_reduction(loss_reduction)
        if clipping == "ghost" and criterion is None:
            raise ValueError(
                "clipping='ghost' runs a second backward of the re-weighted per-example losses, "
                "so it needs the loss: pass criterion= (it is returned wrapped)"
            )
        if clipping == "ghost":
            DPCriterion.check(criterion)
        if not isinstance(data_loader, DataLoader):
            raise ValueError(
                f"data_loader must be a torch.utils.data.DataLoader, got {type(data_loader)}"
            )
        check_map_style(data_loader.dataset)
        check_layout(
            data_loader, batch_first, padded=poisson_sampling and physical_batch_size is not None
        )
        check_not_ddp(module)
        _check_model(module)
        _check_optimizer(module, optimizer)
        if poisson_sampling:
            check_replaceable_sampler(data_loader)
        sample_rate = _sample_rate(data_loader)
        if physical_batch_size is not None and not poisson_sampling:
            raise ValueError("physical_batch_size needs poisson_sampling=True")
        check_budget(materialise_bytes)
        if padding is None:
            padding = default_padding(module, physical_batch_size)
        check_choice("padding", padding, PADDINGS)
        if padding != "full" and physical_batch_size is None:
            raise ValueError(
                f"padding={padding!r} shapes the last of several physical batches; it needs a "
                "physical_batch_size (without one, each logical batch is one unpadded batch)"
            )
        steps_per_epoch = (
            accounting.steps_per_epoch(sample_rate) if poisson_sampling else len(data_loader)
        )
        noise_multiplier = self._noise_multiplier(
            noise_multiplier, target_epsilon, target_delta, epochs, sample_rate, steps_per_epoch
        )
        self.target = None if target_epsilon is None else (target_epsilon, target_delta)
        if target_delta is not None:
            accounting.warn_large_delta(target_delta, len(data_loader.dataset))

        noise_generator = self._noise_generator(noise_generator)
        if sample_generator is None and not self.secure_mode:
            sample_generator = data_loader.generator  # a seeded loader reproduces the sample
        rank, world_size = world()
        if world_size > 1:  # every rank samples its shard; sizes from a shared stream
            trainable = [p for p in module.parameters() if p.requires_grad]
            check_agreement(
                {
                    "dataset size": len(data_loader.dataset),
                    "sample rate": sample_rate,
                    "physical_batch_size": physical_batch_size,
                    "padding": padding,
                    "poisson_sampling": poisson_sampling,
                    "noise_multiplier": noise_multiplier,
                    "max_grad_norm": max_grad_norm,
                    "clipping": clipping,
                    "loss_reduction": loss_reduction,
                    "secure_mode": self.secure_mode,
                    "accountant": self.accountant.mechanism,
                    "trainable parameters": len(trainable),
                    "trainable values": sum(p.numel() for p in trainable),
                }
            )
            sample_source, plan_source = distributed_sources(
                self.secure_mode, sample_generator, rank
            )
            broadcast_module(module)  # identical starting parameters on every rank
        else:
            sample_source = RandomSource(secure=self.secure_mode, generator=sample_generator)
            plan_source = None
        self.attachment = attach(
            module,
            clipping=clipping,
            loss_reduction=loss_reduction,
            materialise_bytes=materialise_bytes,
            batch_first=batch_first,
        )
        self.optimizer = DPOptimizer(
            optimizer,
            noise_multiplier=noise_multiplier,
            max_grad_norm=max_grad_norm,
            expected_batch_size=sample_rate * len(data_loader.dataset),
            generator=noise_generator,
            secure_mode=self.secure_mode,
            distributed=world_size > 1,
        )
        self.optimizer.step_hooks.append(self._record_step)
        self.sample_rate = sample_rate
        if poisson_sampling:
            self.data_loader = DPDataLoader(
                data_loader,
                sample_rate=sample_rate,
                physical_batch_size=physical_batch_size,
                steps_per_epoch=steps_per_epoch,
                random=sample_source,
                on_batch=self._on_batch,
                rank=rank,
                world_size=world_size,
                plan_random=plan_source,
                padding=padding,
            )
            latest = weakref.WeakMethod(self.data_loader.latest)  # no loader -> engine cycle
            self.attachment.loader_batch = lambda: (latest() or LoaderBatch)()
        else:
            warnings.warn(
                "torch_dpfast: poisson_sampling=False keeps the data loader's own batches "
                "(shuffled or fixed), but the accountant assumes Poisson sampling; the epsilon "
                "reported is then not a proven guarantee for this training run",
                UserWarning,
                stacklevel=2,
            )
            self.data_loader = data_loader
        if wrap_model:  # Opacus scripts reach the model as model._module: the model itself
            set_module_alias(module, self.attachment)
        if clipping == "ghost":
            criterion = DPCriterion(criterion, self.attachment, self.optimizer, loss_reduction)
            return module, self.optimizer, criterion, self.data_loader
        return module, self.optimizer, self.data_loader

    def make_private_with_epsilon(
        self,
        *,
        module: nn.Module,
        optimizer: torch.optim.Optimizer,
        data_loader: DataLoader,
        target_epsilon: float,
        target_delta: float,
        epochs: float,
        max_grad_norm: float,
        **kwargs,
    ):
        """``make_private`` with sigma calibrated so that ``epochs`` epochs spend just under
        (target_epsilon, target_delta); Opacus's signature."""
        if "noise_multiplier" in kwargs:
            raise ValueError(
                "make_private_with_epsilon calibrates noise_multiplier; do not give it"
            )
        return self.make_private(
            module=module,
            optimizer=optimizer,
            data_loader=data_loader,
            max_grad_norm=max_grad_norm,
            target_epsilon=target_epsilon,
            target_delta=target_delta,
            epochs=epochs,
            **kwargs,
        )

    def get_epsilon(self, delta: float) -> float:
        """Epsilon spent by the noisy steps taken so far, at ``delta`` (warns if delta > 1/N)."""
        if self.data_loader is not None:
            accounting.warn_large_delta(delta, len(self.data_loader.dataset))
        return self.accountant.get_epsilon(delta)

    @property
    def noise_multiplier(self) -> float | None:
        return None if self.optimizer is None else self.optimizer.noise_multiplier

    # ------------------------------------------------------------------ internals

    def _noise_multiplier(self, sigma, target_epsilon, target_delta, epochs, q, steps_per_epoch):
        targets = {"target_epsilon": target_epsilon, "target_delta": target_delta, "epochs": epochs}
        given = [k for k, v in targets.items() if v is not None]
        if sigma is not None:
            if target_epsilon is not None:
                raise ValueError("give either noise_multiplier or target_epsilon, not both")
            check_non_negative("noise_multiplier", sigma)
            if epochs is not None:
                check_positive("epochs", epochs)
            return float(sigma)
        if not given:
            raise ValueError(
                "give noise_multiplier, or target_epsilon with target_delta and epochs (sigma is "
                "then calibrated to that budget)"
            )
        missing = [k for k, v in targets.items() if v is None]
        if missing:
            raise ValueError(f"calibrating the noise to a budget needs {', '.join(missing)} too")
        check_positive("epochs", epochs)
        if not isinstance(target_delta, (int, float)) or not 0 < target_delta < 1:
            raise ValueError(f"target_delta must be in (0, 1), got {target_delta!r}")
        steps = max(1, round(epochs * steps_per_epoch))
        return accounting.get_noise_multiplier(
            target_epsilon=target_epsilon,
            target_delta=target_delta,
            sample_rate=q,
            steps=steps,
            accountant=self.accountant.mechanism,
        )

    def _noise_generator(self, generator: torch.Generator | None) -> RandomSource | None:
        """The user's generator, or one seeded from torch's default generator at the first
        step (so torch.manual_seed after make_private decides the noise, as under Opacus):
        either way its state goes into :meth:`state_dict`, so a resumed run draws the same
        noise. None in secure mode (the optimizer then draws from the OS at every step)."""
        if self.secure_mode:
            if generator is not None:
                raise ValueError("secure_mode draws the noise from the OS; give no noise_generator")
            return None
        return RandomSource(generator=generator)

    def _on_batch(self, batch: PhysicalBatch) -> None:
        if batch.first:
            self.optimizer.start_logical_batch()
        self.attachment.begin_batch(batch.mask)
        self.optimizer.signal_skip_step(not batch.last)

    def _record_step(self, optimizer: DPOptimizer) -> None:
        self.accountant.step(
            noise_multiplier=optimizer.noise_multiplier, sample_rate=self.sample_rate
        )

    # ------------------------------------------------------------------ checkpoints

    def state_dict(self) -> dict:
        """Accountant history, sampler position and the logical batch in progress (its clipped
        sums): with the model's and optimizer's own state, a run resumes exactly."""
        if self.optimizer is None:
            raise RuntimeError("call make_private first")
        state = {
            "accountant": self.accountant.state_dict(),
            "sample_rate": self.sample_rate,
            "optimizer": self.optimizer.dp_state_dict(),
        }
        if isinstance(self.data_loader, DPDataLoader):
            state["data_loader"] = self.data_loader.state_dict()
        return state

    def load_state_dict(self, state: dict) -> None:
        """Restores :meth:`state_dict` into an engine on which make_private was called with the
        same settings. Everything is checked before anything changes: the sample rate, the
        parameters' shapes, the physical batch size of a checkpoint taken inside a logical
        batch, and that the budget already spent does not exceed this run's target_epsilon."""
        if self.optimizer is None:
            raise RuntimeError("call make_private first, then load_state_dict")
        if state["sample_rate"] != self.sample_rate:
            raise ValueError(
                f"the checkpoint was taken with sample rate {state['sample_rate']}, this engine "
                f"samples with {self.sample_rate}: same data set and batch size needed to resume"
            )
        self.optimizer.check_dp_state_dict(state["optimizer"])
        resumes_sampler = "data_loader" in state and isinstance(self.data_loader, DPDataLoader)
        if resumes_sampler:
            self.data_loader.batch_sampler.resumable_cursor(state["data_loader"])
        self._check_budget_left(state["accountant"])
        self.accountant.load_state_dict(state["accountant"])
        self.optimizer.load_dp_state_dict(state["optimizer"])
        if resumes_sampler:
            self.data_loader.load_state_dict(state["data_loader"])

    def _check_budget_left(self, accountant_state: dict) -> None:
        """Refuses to resume a run whose checkpoint already spent more than the target_epsilon
        this engine was calibrated for (sigma was chosen as if nothing had been spent)."""
        if self.target is None:
            return
        target_epsilon, target_delta = self.target
        spent_accountant = accounting.create_accountant(self.accountant.mechanism)
        spent_accountant.load_state_dict(accountant_state)
        if not len(spent_accountant):
            return
        spent = spent_accountant.get_epsilon(target_delta)
        if spent > target_epsilon * (1 + 1e-6):
            raise ValueError(
                f"the checkpoint has already spent epsilon = {spent:.4g} at delta = "
                f"{target_delta:g}, more than this run's target_epsilon = {target_epsilon:g}; "
                "resuming would exceed the budget. Resume with the target the run was started "
                "with, or stop training"
            )

    def save_checkpoint(
        self,
        *,
        path,
        module: nn.Module,
        optimizer=None,
        checkpoint_dict=None,
        noise_scheduler=None,
        grad_clip_scheduler=None,
        module_state_dict_kwargs=None,
        torch_save_kwargs=None,
    ):
        """Saves module, optimizer and engine state to ``path`` (Opacus's method), atomically:
        a kill during the save leaves the previous file intact (checkpoint.py). Opacus's noise
        and clipping schedulers' states are saved as Opacus saves them.
        ``module_state_dict_kwargs`` go to ``module.state_dict()``; ``torch_save_kwargs`` must
        be empty: the file must stay a zip archive in the pickle protocol that loads with
        ``weights_only=True``."""
        checkpoint_options(torch_save_kwargs, allowed=())
        checkpoint = dict(checkpoint_dict or {})
        # A scheduler's state implies the values it set: sigma and C are saved with it.
        if noise_scheduler is not None:
            checkpoint["noise_scheduler_state_dict"] = noise_scheduler.state_dict()
            checkpoint["noise_multiplier"] = self.optimizer.noise_multiplier
        if grad_clip_scheduler is not None:
            checkpoint["grad_clip_scheduler_state_dict"] = grad_clip_scheduler.state_dict()
            checkpoint["max_grad_norm"] = self.optimizer.max_grad_norm
        checkpoint["module_state_dict"] = module.state_dict(**(module_state_dict_kwargs or {}))
        checkpoint["privacy_engine_state_dict"] = self.state_dict()
        if optimizer is not None:
            checkpoint["optimizer_state_dict"] = optimizer.state_dict()
        save_file(checkpoint, path)

    def load_checkpoint(
        self,
        *,
        path,
        module: nn.Module,
        optimizer=None,
        noise_scheduler=None,
        grad_clip_scheduler=None,
        map_location=None,
        module_load_dict_kwargs=None,
        torch_load_kwargs=None,
    ):
        """Restores what :meth:`save_checkpoint` saved; returns the whole checkpoint dict.
        The file is read with ``weights_only=True`` (loading runs no code); a corrupt or foreign
        file raises :class:`torch_dpfast.CheckpointError` naming it.
        ``module_load_dict_kwargs`` go to ``module.load_state_dict()`` (e.g. ``strict=False``);
        of ``torch_load_kwargs`` only ``map_location`` and ``mmap`` are taken:
        ``weights_only=False`` or a ``pickle_module`` would let the file run code, and are
        refused."""
        load_options = checkpoint_options(torch_load_kwargs, allowed=("map_location", "mmap"))
        map_location = load_options.pop("map_location", map_location)
        required = ("module_state_dict", "privacy_engine_state_dict")
        if optimizer is not None:
            required += ("optimizer_state_dict",)
        checkpoint = load_file(path, map_location=map_location, required=required, **load_options)
        self.load_state_dict(checkpoint["privacy_engine_state_dict"])
        module.load_state_dict(checkpoint["module_state_dict"], **(module_load_dict_kwargs or {}))
        if optimizer is not None:
            optimizer.load_state_dict(checkpoint["optimizer_state_dict"])
        for scheduler, key, value in (
            (noise_scheduler, "noise_scheduler_state_dict", "noise_multiplier"),
            (grad_clip_scheduler, "grad_clip_scheduler_state_dict", "max_grad_norm"),
        ):
            if scheduler is not None and checkpoint.get(key):
                scheduler.load_state_dict(checkpoint[key])
                if value in checkpoint:  # where the scheduler had brought it
                    setattr(self.optimizer, value, float(checkpoint[value]))
        return checkpoint

    # ------------------------------------------------------------------ Opacus's validators

    @staticmethod
    def get_compatible_module(module: nn.Module) -> nn.Module:
        """A copy of ``module`` with every BatchNorm replaced by GroupNorm (Opacus's name for
        :func:`torch_dpfast.fix`; like Opacus's, it never returns the module itself)."""
        return fix(copy.deepcopy(module))

    def validate(self, *, module: nn.Module, optimizer=None, data_loader=None) -> None:
        """Raises :class:`~torch_dpfast.errors.UnsupportedModuleError` (also Opacus's, when it
        is installed) naming the first module make_private would refuse, with the fix."""
        _check_model(module)
        try:
            assign_rules(module)
        except NotImplementedError as error:
            raise unsupported_module(str(error)) from None

    def is_compatible(self, *, module: nn.Module, optimizer=None, data_loader=None) -> bool:
        """Whether :meth:`validate` passes."""
        try:
            self.validate(module=module, optimizer=optimizer, data_loader=data_loader)
        except ValueError:
            return False
        return True


_OPACUS_ADAPTIVE = (
    "target_unclipped_quantile",
    "clipbound_learning_rate",
    "max_clipbound",
    "min_clipbound",
    "unclipped_num_std",
)


def _check_no_adaptive_clipping(options: dict) -> None:
    unknown = sorted(k for k in options if k not in _OPACUS_ADAPTIVE)
    if unknown:
        raise TypeError(f"make_private() got unexpected keyword argument(s) {unknown}")
    if options:
        raise ValueError(
            f"{sorted(options)} configure Opacus's adaptive clipping, which torch_dpfast does not "
            "support: drop them and give a fixed max_grad_norm (flat clipping, clipping='auto')"
        )


def _check_clipping(clipping: str, grad_sample_mode: str | None) -> str:
    clipping = _OPACUS_CLIPPING.get(clipping, clipping)
    if clipping not in CLIPPING_MODES:
        raise ValueError(
            f"clipping must be one of {CLIPPING_MODES} (or Opacus's 'flat'), got {clipping!r}; "
            "per-layer and adaptive clipping are not supported"
        )
    if grad_sample_mode is not None:
        if grad_sample_mode not in _OPACUS_GRAD_SAMPLE_MODES:
            raise ValueError(
                f"grad_sample_mode must be one of {_OPACUS_GRAD_SAMPLE_MODES}, "
                f"got {grad_sample_mode!r}"
            )
        if grad_sample_mode == "ghost":
            clipping = "ghost"
        if grad_sample_mode == "no_op":
            raise ValueError(
                "grad_sample_mode='no_op' is Opacus's mode for per-sample gradients computed by "
                "the user (e.g. with functorch); torch_dpfast computes and clips them itself: "
                "drop grad_sample_mode (or use clipping='per_example' for materialised ones)"
            )
    return clipping


def _check_model(module: nn.Module) -> None:
    if not isinstance(module, nn.Module):
        raise ValueError(f"module must be a torch.nn.Module, got {type(module)}")
    if not any(p.requires_grad for p in module.parameters()):
        raise ValueError("the module has no trainable parameter: there is nothing to train")
    for path, child in module.named_modules():
        trainable = any(p.requires_grad for p in child.parameters(recurse=False))
        if is_batch_norm(child) and (trainable or child.training or not child.track_running_stats):
            raise unsupported_module(
                f"module {path or '<root>'!r} ({type(child).__name__}) is a BatchNorm: it "
                "normalises with the statistics of the whole batch, so examples have no "
                "separate gradients to clip. Replace every BatchNorm with GroupNorm by "
                "`model = torch_dpfast.fix(model)` before creating the optimizer"
            )


def _check_optimizer(module: nn.Module, optimizer: torch.optim.Optimizer) -> None:
    if not isinstance(optimizer, torch.optim.Optimizer):
        raise ValueError(f"optimizer must be a torch.optim.Optimizer, got {type(optimizer)}")
    if isinstance(optimizer, DPOptimizer):
        raise ValueError("the optimizer is already a DPOptimizer; pass the original optimizer")
    own = {id(p) for p in module.parameters()}
    foreign = [
        tuple(p.shape) for g in optimizer.param_groups for p in g["params"] if id(p) not in own
    ]
    if foreign:
        raise ValueError(
            "Module parameters are different than optimizer Parameters: the optimizer holds "
            f"{len(foreign)} parameter(s) that are not the module's (shapes {foreign[:3]}); "
            "create the optimizer from module.parameters() (after dpf.fix, which replaces "
            "layers)"
        )


def _sample_rate(data_loader: DataLoader) -> float:
    """q = batch_size / N; for a loader built from a batch_sampler, 1 / len(loader)."""
    size = len(data_loader.dataset)
    if data_loader.batch_size is not None:
        if data_loader.batch_size > size:
            raise ValueError(
                f"the data loader's batch_size ({data_loader.batch_size}) exceeds the dataset "
                f"size ({size}); the sample rate q = batch_size / len(dataset) must be <= 1"
            )
        return data_loader.batch_size / size
    return 1 / len(data_loader)
