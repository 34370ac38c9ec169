"""PrivacyEngine.make_private end to end: updates against brute-force per-example autograd in
float64, padding, empty steps, accounting, validation, checkpoints, Opacus scripts, compile."""

from __future__ import annotations

import copy
import warnings

import pytest
import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.data import DataLoader, IterableDataset, TensorDataset

import torch_dpfast as dpf
from torch_dpfast import accounting

MODES = ["auto", "bk", "per_example", "ghost"]


def _mlp():
    return nn.Sequential(nn.Linear(5, 7), nn.Tanh(), nn.Linear(7, 3))


def _data(gen, n=30, huge=True):
    x = torch.randn(n, 5, generator=gen, dtype=torch.float64)
    if huge:
        x[3] *= 1e6  # an adversarially huge example: its contribution must still be <= C
    y = torch.randint(0, 3, (n,), generator=gen)
    return TensorDataset(x, y)


def _engine(model, dataset, batch_size=6, lr=1.0, **kwargs):
    kwargs.setdefault("max_grad_norm", 0.7)
    kwargs.setdefault("noise_multiplier", 0.0)
    reduction = kwargs.get("loss_reduction", "mean")
    engine = dpf.PrivacyEngine()
    optimizer = torch.optim.SGD(model.parameters(), lr=lr)
    loader = DataLoader(dataset, batch_size=batch_size)
    if kwargs.get("clipping") == "ghost":
        kwargs["criterion"] = nn.CrossEntropyLoss(reduction=reduction)
    out = engine.make_private(module=model, optimizer=optimizer, data_loader=loader, **kwargs)
    if len(out) == 4:
        model, optimizer, engine.loss_of, loader = out
    else:
        model, optimizer, loader = out
        engine.loss_of = lambda logits, y: F.cross_entropy(logits, y, reduction=reduction)
    return engine, model, optimizer, loader


def _brute_force_clipped_sum(model, x, y, max_norm):
    """sum_i min(1, C / (||g_i|| + 1e-6)) g_i over the rows of x, one example at a time."""
    params = [p for p in model.parameters() if p.requires_grad]
    total = [torch.zeros_like(p) for p in params]
    for i in range(x.shape[0]):
        grads = torch.autograd.grad(
            F.cross_entropy(model(x[i : i + 1]), y[i : i + 1], reduction="sum"), params
        )
        norm = torch.sqrt(sum(g.square().sum() for g in grads))
        factor = min(1.0, max_norm / (norm.item() + 1e-6))
        for t, g in zip(total, grads):
            t += factor * g
    return total


def _train_checking_every_step(engine, model, optimizer, loader, reference):
    """Trains one epoch; after every logical step compares the parameters with the step that
    brute force predicts from the logical batch's real rows. Returns the number of steps."""
    infos = []
    announce = loader.on_batch
    loader.on_batch = lambda info: (infos.append(info), announce(info))
    rows_x, rows_y, steps = [], [], 0
    for x, y in loader:
        info = infos[-1]
        if info.first:
            start = copy.deepcopy(reference)
            rows_x, rows_y = [], []
        rows_x.append(x[info.mask])
        rows_y.append(y[info.mask])
        optimizer.zero_grad()
        engine.loss_of(model(x), y).backward()
        optimizer.step()
        if info.last:
            steps += 1
            summed = _brute_force_clipped_sum(
                start, torch.cat(rows_x), torch.cat(rows_y), optimizer.max_grad_norm
            )
            with torch.no_grad():
                for p, q, s in zip(reference.parameters(), start.parameters(), summed):
                    p.copy_(q - s / optimizer.expected_batch_size)
            for p, q in zip(model.parameters(), reference.parameters()):
                torch.testing.assert_close(p, q, rtol=1e-9, atol=1e-12)
    return steps


@pytest.mark.parametrize("mode", MODES)
@pytest.mark.parametrize("physical_batch_size", [1, 4, None])
def test_every_logical_step_equals_brute_force(mode, physical_batch_size, gen):
    torch.manual_seed(int(torch.randint(0, 2**31, (), generator=gen)))
    model = _mlp().double()
    reference = copy.deepcopy(model)
    engine, model, optimizer, loader = _engine(
        model, _data(gen), clipping=mode, physical_batch_size=physical_batch_size
    )
    steps = _train_checking_every_step(engine, model, optimizer, loader, reference)
    assert steps == loader.steps_per_epoch == 5 == len(engine.accountant)


@pytest.mark.parametrize("mode", ["auto", "ghost"])
def test_sum_reduction_equals_brute_force(mode, gen):
    model = _mlp().double()
    reference = copy.deepcopy(model)
    engine, model, optimizer, loader = _engine(
        model, _data(gen), physical_batch_size=4, loss_reduction="sum", clipping=mode
    )
    _train_checking_every_step(engine, model, optimizer, loader, reference)


@pytest.mark.parametrize("mode", MODES)
def test_pow2_padding_every_logical_step_equals_brute_force(mode, gen):
    torch.manual_seed(int(torch.randint(0, 2**31, (), generator=gen)))
    model = _mlp().double()
    reference = copy.deepcopy(model)
    engine, model, optimizer, loader = _engine(
        model, _data(gen), clipping=mode, physical_batch_size=4, padding="pow2"
    )
    widths = []
    announce = loader.on_batch
    loader.on_batch = lambda info: (widths.append(info.mask.shape[0]), announce(info))
    assert _train_checking_every_step(engine, model, optimizer, loader, reference) == 5
    assert set(widths) <= {1, 2, 4}


def _final_parameters(dataset, physical_batch_size, seed=0, clipping="auto", padding="full"):
    torch.manual_seed(seed)
    model = _mlp().double()
    engine, model, optimizer, loader = _engine(
        model,
        dataset,
        clipping=clipping,
        lr=0.3,
        noise_multiplier=1.3,
        physical_batch_size=physical_batch_size,
        padding=padding,
        noise_generator=torch.Generator().manual_seed(11),
        sample_generator=torch.Generator().manual_seed(12),
    )
    for _ in range(2):
        for x, y in loader:
            optimizer.zero_grad()
            engine.loss_of(model(x), y).backward()
            optimizer.step()
    return torch.cat([p.detach().flatten() for p in model.parameters()]), engine


@pytest.mark.parametrize("mode", MODES)
def test_padding_has_no_effect_on_the_update(mode, gen):
    dataset = _data(gen, huge=False)
    reference, _ = _final_parameters(dataset, None)
    for physical_batch_size in (1, 4, 64):
        params, _ = _final_parameters(dataset, physical_batch_size, clipping=mode)
        torch.testing.assert_close(params, reference, rtol=1e-9, atol=1e-12)
        params, _ = _final_parameters(dataset, physical_batch_size, clipping=mode, padding="pow2")
        torch.testing.assert_close(params, reference, rtol=1e-9, atol=1e-12)
    other_seed, _ = _final_parameters(dataset, 4, seed=1)
    assert not torch.allclose(other_seed, reference)  # the comparison can fail


def test_empty_logical_batches_still_step_with_noise_only(gen):
    dataset = _data(gen, n=20, huge=False)
    model = _mlp().double()
    engine, model, optimizer, loader = _engine(
        model, dataset, batch_size=1, noise_multiplier=1.0, physical_batch_size=2
    )
    calls = []
    step = optimizer.original_optimizer.step
    optimizer.original_optimizer.step = lambda *a, **k: (calls.append(1), step(*a, **k))[1]
    empty = 0
    announce = loader.on_batch
    loader.on_batch = lambda info: (announce(info), None)[1]
    for x, y in loader:
        empty += not loader.batch_sampler.consumed["indices"].numel()
        before = [p.detach().clone() for p in model.parameters()]
        optimizer.zero_grad()
        F.cross_entropy(model(x), y).backward()
        optimizer.step()
        if not loader.batch_sampler.consumed["indices"].numel():
            # Noise only: every parameter moved, by noise of std sigma C / (q N) times lr.
            assert all(not torch.equal(b, p) for b, p in zip(before, model.parameters()))
    assert empty > 5  # q = 0.05 over 20 examples: most steps are empty
    assert len(calls) == 20 == len(engine.accountant)


def test_epsilon_reflects_the_steps_actually_taken(gen):
    model = _mlp().double()
    engine, model, optimizer, loader = _engine(
        model, _data(gen, huge=False), noise_multiplier=1.1, physical_batch_size=4
    )
    assert engine.get_epsilon(1e-5) == 0.0
    taken = 0
    for k, (x, y) in enumerate(loader):
        optimizer.zero_grad()
        F.cross_entropy(model(x), y).backward()
        optimizer.step()
        taken = len(engine.accountant)
        if k == 5:
            break
    assert taken == optimizer.steps_taken
    expected = accounting.compute_epsilon(
        noise_multiplier=1.1, sample_rate=0.2, steps=taken, delta=1e-5
    )
    assert engine.get_epsilon(1e-5) == expected > 0


def test_calibrated_noise_spends_just_under_the_target(gen):
    model = _mlp().double()
    engine, model, optimizer, loader = _engine(
        model,
        _data(gen, huge=False),
        noise_multiplier=None,
        target_epsilon=3.0,
        target_delta=1e-5,
        epochs=2,
        physical_batch_size=4,
    )
    for _ in range(2):
        for x, y in loader:
            optimizer.zero_grad()
            F.cross_entropy(model(x), y).backward()
            optimizer.step()
    assert len(engine.accountant) == 10
    assert 0.95 * 3.0 <= engine.get_epsilon(1e-5) <= 3.0


class _Stream(IterableDataset):
    def __iter__(self):
        yield torch.zeros(5), 0


def _bad(**change):
    def build(gen):
        model = change.pop("model", None) or _mlp().double()
        kwargs = dict(
            module=model,
            optimizer=torch.optim.SGD(model.parameters(), lr=0.1),
            data_loader=DataLoader(_data(gen), batch_size=6),
            max_grad_norm=1.0,
            noise_multiplier=1.0,
        )
        kwargs.update({k: v(model, gen) if callable(v) else v for k, v in change.items()})
        return kwargs

    return build


def _with_batch_norm():
    return nn.Sequential(nn.Linear(5, 4), nn.BatchNorm1d(4), nn.Linear(4, 3)).double()


def _frozen():
    model = _mlp().double()
    model.requires_grad_(False)
    return model


BAD = {
    "max_grad_norm": _bad(max_grad_norm=0.0),
    "noise_multiplier": _bad(noise_multiplier=-0.5),
    "physical_batch_size": _bad(physical_batch_size=0),
    "epochs": _bad(noise_multiplier=None, target_epsilon=1.0, target_delta=1e-5, epochs=0),
    "target_delta": _bad(noise_multiplier=None, target_epsilon=1.0, target_delta=1.5, epochs=1),
    "give noise_multiplier, or target_epsilon": _bad(noise_multiplier=None),
    "needs target_delta": _bad(noise_multiplier=None, target_epsilon=1.0, epochs=1),
    "not both": _bad(target_epsilon=1.0, target_delta=1e-5, epochs=1),
    "no noise multiplier": _bad(
        noise_multiplier=None,
        target_epsilon=1e-4,
        target_delta=1e-10,
        epochs=10**5,
        data_loader=lambda m, g: DataLoader(_data(g), batch_size=30),
    ),
    "not the module's": _bad(
        optimizer=lambda m, g: torch.optim.SGD([*m.parameters(), nn.Parameter(torch.ones(2))])
    ),
    r"BatchNorm.*torch_dpfast.fix\(model\)": _bad(model=_with_batch_norm()),
    "no trainable parameter": _bad(model=_frozen()),
    "clipping": _bad(clipping="per_layer"),
    "criterion": _bad(clipping="ghost"),
    "IterableDataset": _bad(data_loader=lambda m, g: DataLoader(_Stream(), batch_size=2)),
    "batch_size": _bad(data_loader=lambda m, g: DataLoader(_data(g), batch_size=31)),
    "poisson_sampling": _bad(physical_batch_size=4, poisson_sampling=False),
    "padding must be one of": _bad(physical_batch_size=4, padding="none"),
    "it needs a physical_batch_size": _bad(padding="pow2"),
}


@pytest.mark.parametrize("message", BAD)
def test_bad_arguments_get_errors_naming_them(message, gen):
    kwargs = BAD[message](gen)
    with pytest.raises(ValueError, match=message):
        dpf.PrivacyEngine().make_private(**kwargs)
    assert not dpf.engine.attachments_of(kwargs["module"].parameters())  # nothing half-done


def test_fix_replaces_every_batch_norm_and_the_model_then_trains(gen):
    timm = pytest.importorskip("timm")
    model = nn.Sequential(
        nn.Conv2d(3, 48, 3),
        nn.BatchNorm2d(48),
        timm.layers.BatchNormAct2d(48, act_layer=nn.ReLU),
        nn.Flatten(),
        nn.Linear(48 * 4 * 4, 30),
        nn.BatchNorm1d(30),
        nn.Linear(30, 3),
    ).double()
    act = model[2].act
    fixed = dpf.fix(model)
    assert fixed is model
    assert not any(isinstance(m, nn.modules.batchnorm._BatchNorm) for m in model.modules())
    assert isinstance(model[1], nn.GroupNorm) and model[1].num_groups == 24
    assert isinstance(model[2], nn.Sequential) and model[2][1] is act
    assert model[5].num_groups == 1 and model[5].weight.dtype == torch.float64  # LayerNorm-like
    x = torch.randn(12, 3, 6, 6, dtype=torch.float64, generator=gen)
    y = torch.randint(0, 3, (12,), generator=gen)
    engine, model, optimizer, loader = _engine(model, TensorDataset(x, y), batch_size=4)
    for xb, yb in loader:
        optimizer.zero_grad()
        F.cross_entropy(model(xb), yb).backward()
        optimizer.step()
    assert len(engine.accountant) == 3
    assert isinstance(dpf.fix(nn.BatchNorm1d(6)), nn.GroupNorm)
    # at least two channels a group: a 1x1 map (squeeze-excite) still has something to normalise
    assert [dpf.fix(nn.BatchNorm2d(c)).num_groups for c in (1, 2, 16, 30, 64, 96)] == [
        1, 1, 8, 15, 32, 32,
    ]  # fmt: skip
    one_example = torch.randn(1, 16, 1, 1, generator=gen)
    assert dpf.fix(nn.BatchNorm2d(16)).train()(one_example).std() > 0.5
    with pytest.raises(ValueError, match="forward"):
        dpf.fix(nn.LazyBatchNorm1d())


def _batches(loader):
    while True:
        yield from loader


def _train(model, optimizer, batches, count, on_batch=None):
    for k, (x, y) in enumerate(batches):
        optimizer.zero_grad()
        F.cross_entropy(model(x), y).backward()
        optimizer.step()
        if on_batch is not None:
            on_batch(k + 1)
        if k + 1 == count:
            return


@pytest.mark.parametrize("stop", [3, 4, 8])
def test_checkpoint_resumes_exactly_without_losing_or_double_counting(stop, gen, tmp_path):
    dataset = _data(gen, huge=False)

    def make():
        torch.manual_seed(5)
        model = _mlp().double()
        engine, model, optimizer, loader = _engine(
            model, dataset, lr=0.2, noise_multiplier=1.0, physical_batch_size=2
        )
        optimizer.original_optimizer.param_groups[0]["momentum"] = 0.9
        return engine, model, optimizer, loader

    engine, model, optimizer, loader = make()
    path = tmp_path / "ckpt.pt"
    total, in_progress = 2 * len(loader), []

    def save(k):
        if k == stop:  # inside a logical batch or at its end, depending on the sample
            engine.save_checkpoint(path=path, module=model, optimizer=optimizer)
            in_progress.append(optimizer._accumulating)

    _train(model, optimizer, _batches(loader), total, on_batch=save)
    engine2, model2, optimizer2, loader2 = make()
    engine2.load_checkpoint(path=path, module=model2, optimizer=optimizer2)
    assert optimizer2._accumulating == in_progress[0]
    _train(model2, optimizer2, _batches(loader2), total - stop)
    for p, q in zip(model.parameters(), model2.parameters()):
        torch.testing.assert_close(p, q, rtol=0, atol=0)
    assert engine2.accountant.history == engine.accountant.history
    assert engine2.get_epsilon(1e-5) == engine.get_epsilon(1e-5)


def test_abandoned_logical_batch_is_dropped_not_mixed_into_the_next(gen):
    model = _mlp().double()
    reference = copy.deepcopy(model)  # a copy made before attach: plain autograd
    engine, model, optimizer, loader = _engine(model, _data(gen), physical_batch_size=1)
    for x, y in loader:  # break off after the first physical batch of a logical batch
        optimizer.zero_grad()
        F.cross_entropy(model(x), y).backward()
        optimizer.step()
        if optimizer._accumulating:
            break
    reference.load_state_dict(model.state_dict())
    with pytest.warns(RuntimeWarning, match="abandoned"):
        _train_checking_every_step(engine, model, optimizer, loader, reference)


def test_two_backwards_before_one_step_are_refused(gen):
    model = _mlp().double()
    engine, model, optimizer, loader = _engine(model, _data(gen, huge=False), physical_batch_size=1)
    batches = iter(loader)
    for _ in range(2):
        x, y = next(batches)
        F.cross_entropy(model(x), y).backward()
    with pytest.raises(RuntimeError, match="several physical batches"):
        optimizer.step()


def test_a_model_that_is_not_batch_first_is_caught(gen):
    class TimeFirst(nn.Module):
        def __init__(self):
            super().__init__()
            self.linear = nn.Linear(5, 3)

        def forward(self, x):  # treats the (B, 5) input as (T=B, 1, 5): batch in dim 1
            return self.linear(x.unsqueeze(1).expand(-1, 2, -1)).mean(1)

    engine, model, optimizer, loader = _engine(
        TimeFirst().double(), _data(gen, huge=False), physical_batch_size=4
    )
    x, y = next(iter(loader))
    h = model.linear(x[:2].T.unsqueeze(-1).expand(-1, -1, 5))  # a (5, 2, 3) activation
    h.sum().backward()
    with pytest.raises(ValueError, match="batch first"):
        optimizer.step()


def opacus_style_training(PrivacyEngine, gen, epochs=3):
    """An Opacus tutorial's loop, verbatim but for where PrivacyEngine comes from."""
    x = torch.randn(1200, 1, 8, 8, generator=gen)
    y = (x.mean(dim=(1, 2, 3)) > 0).long()
    train_loader = DataLoader(TensorDataset(x, y), batch_size=60)
    model = nn.Sequential(nn.Conv2d(1, 8, 3), nn.ReLU(), nn.Flatten(), nn.Linear(8 * 6 * 6, 2))
    optimizer = torch.optim.SGD(model.parameters(), lr=0.5)
    criterion = nn.CrossEntropyLoss()
    privacy_engine = PrivacyEngine()
    model, optimizer, train_loader = privacy_engine.make_private_with_epsilon(
        module=model,
        optimizer=optimizer,
        data_loader=train_loader,
        target_epsilon=5.0,
        target_delta=1e-5,
        epochs=epochs,
        max_grad_norm=1.0,
    )
    for _ in range(epochs):
        model.train()
        for data, target in train_loader:
            optimizer.zero_grad()
            loss = criterion(model(data), target)
            loss.backward()
            optimizer.step()
    model.eval()
    with torch.no_grad():
        accuracy = (model(x).argmax(dim=1) == y).float().mean().item()
    return accuracy, privacy_engine.get_epsilon(delta=1e-5)


def test_an_opacus_script_runs_with_only_its_import_changed(gen):
    accuracy, epsilon = opacus_style_training(dpf.PrivacyEngine, gen)
    assert accuracy > 0.75 and 4.5 <= epsilon <= 5.0
    opacus = pytest.importorskip("opacus")
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        opacus_accuracy, opacus_epsilon = opacus_style_training(opacus.PrivacyEngine, gen)
    assert opacus_accuracy > 0.75 and opacus_epsilon <= 5.0  # the script really is Opacus's


def test_ghost_mode_refuses_a_plain_backward_and_criteria_without_reduction(gen):
    model = _mlp().double()
    engine, model, optimizer, loader = _engine(
        model, _data(gen), physical_batch_size=4, clipping="ghost"
    )
    x, y = next(iter(loader))
    loss = engine.loss_of(model(x), y)
    assert isinstance(float(loss), float) and loss.detach().shape == ()
    F.cross_entropy(model(x), y).backward()
    with pytest.raises(RuntimeError, match="wrapped loss"):
        optimizer.step()
    model = _mlp().double()
    with pytest.raises(ValueError, match="reduction"):
        dpf.PrivacyEngine().make_private(
            module=model,
            optimizer=torch.optim.SGD(model.parameters(), lr=0.1),
            data_loader=DataLoader(_data(gen), batch_size=6),
            noise_multiplier=1.0,
            max_grad_norm=1.0,
            clipping="ghost",
            criterion=lambda out, y: F.cross_entropy(out, y),
        )
    assert not dpf.engine.attachments_of(model.parameters())


def test_the_same_loop_with_make_private_and_sigma(gen):
    model = _mlp()
    engine = dpf.PrivacyEngine(accountant="rdp")
    x, y = torch.randn(60, 5, generator=gen), torch.randint(0, 3, (60,), generator=gen)
    model, optimizer, loader = engine.make_private(
        module=model,
        optimizer=torch.optim.SGD(model.parameters(), lr=0.1),
        data_loader=DataLoader(TensorDataset(x, y), batch_size=10),
        noise_multiplier=1.0,
        max_grad_norm=1.0,
        clipping="flat",
        grad_sample_mode="hooks",
    )
    for xb, yb in loader:
        optimizer.zero_grad()
        F.cross_entropy(model(xb), yb).backward()
        optimizer.step()
    assert engine.get_epsilon(1e-5) == accounting.compute_epsilon(
        noise_multiplier=1.0, sample_rate=1 / 6, steps=6, delta=1e-5, accountant="rdp"
    )
    with pytest.raises(RuntimeError, match="already made a model private"):
        engine.make_private(
            module=_mlp(),
            optimizer=optimizer,
            data_loader=loader,
            noise_multiplier=1.0,
            max_grad_norm=1.0,
        )


def test_without_poisson_sampling_the_loader_is_kept_with_a_warning(gen):
    model = _mlp().double()
    loader = DataLoader(_data(gen), batch_size=6, shuffle=True)
    with pytest.warns(UserWarning, match="not a proven guarantee"):
        _, _, out = dpf.PrivacyEngine().make_private(
            module=model,
            optimizer=torch.optim.SGD(model.parameters(), lr=0.1),
            data_loader=loader,
            noise_multiplier=1.0,
            max_grad_norm=1.0,
            poisson_sampling=False,
        )
    assert out is loader


def test_secure_mode_needs_no_seed_and_refuses_one(gen):
    model = _mlp().double()
    engine, model, optimizer, loader = _engine(model, _data(gen), physical_batch_size=4)
    del engine
    secure = dpf.PrivacyEngine(secure_mode=True)
    model = _mlp().double()
    with pytest.raises(ValueError, match="secure_mode"):
        secure.make_private(
            module=model,
            optimizer=torch.optim.SGD(model.parameters(), lr=0.1),
            data_loader=DataLoader(_data(gen), batch_size=6),
            noise_multiplier=1.0,
            max_grad_norm=1.0,
            noise_generator=torch.Generator(),
        )
    model, optimizer, loader = dpf.PrivacyEngine(secure_mode=True).make_private(
        module=model,
        optimizer=torch.optim.SGD(model.parameters(), lr=0.1),
        data_loader=DataLoader(_data(gen, huge=False), batch_size=6),
        noise_multiplier=1.0,
        max_grad_norm=1.0,
    )
    for xb, yb in loader:
        optimizer.zero_grad()
        F.cross_entropy(model(xb), yb).backward()
        optimizer.step()
    assert "generator" not in optimizer.dp_state_dict()


@pytest.mark.parametrize("physical_batch_size, recompiles", [(4, False), (None, True)])
def test_fixed_shapes_compile_once_across_poisson_batches(physical_batch_size, recompiles, gen):
    from torch._dynamo.testing import CompileCounter

    torch._dynamo.reset()
    model = nn.Sequential(nn.Linear(5, 7), nn.ReLU(), nn.Linear(7, 3))
    x, y = torch.randn(60, 5, generator=gen), torch.randint(0, 3, (60,), generator=gen)
    padding = "full" if physical_batch_size else None  # one shape (pow2 is the CPU default)
    engine, model, optimizer, loader = _engine(
        model,
        TensorDataset(x, y),
        batch_size=10,
        physical_batch_size=physical_batch_size,
        padding=padding,
    )
    counter = CompileCounter()

    @torch.compile(backend=counter, dynamic=False)
    def loss_of(xb, yb):
        return F.cross_entropy(torch.tanh(model(xb)) * 2, yb)

    compiled = []
    for _ in range(2):
        for xb, yb in loader:
            optimizer.zero_grad()
            loss_of(xb, yb).backward()
            optimizer.step()
            compiled.append(counter.frame_count)
    assert compiled[0] > 0
    assert (compiled[-1] > compiled[0]) == recompiles
