"""Opacus's public names that scripts switched by one import call: the validators, the checkpoint
schedulers and options, make_private(wrap_model=..., rand_on_empty=...), the accountants'
get_privacy_spent and "gdp", seeding, and the error type Opacus users catch (docs/migrating.md
has the whole table)."""

from __future__ import annotations

import pytest
import torch
from torch import nn
from torch.utils.data import DataLoader, TensorDataset

import torch_dpfast as dpf
from tests.helpers import private, train_epoch

opacus_errors = pytest.importorskip("opacus.validators.errors")


def _bn_model():
    return nn.Sequential(nn.Linear(4, 6), nn.BatchNorm1d(6), nn.Linear(6, 2))


def _loader(gen, n=24):
    data = TensorDataset(torch.randn(n, 4, generator=gen), torch.randint(0, 2, (n,)))
    return DataLoader(data, batch_size=6)


def test_validators_name_the_module_and_raise_what_opacus_users_catch(gen):
    engine = dpf.PrivacyEngine()
    model = _bn_model()
    optimizer = torch.optim.SGD(model.parameters(), lr=0.1)
    assert not engine.is_compatible(module=model, optimizer=optimizer, data_loader=_loader(gen))
    for caught in (dpf.UnsupportedModuleError, opacus_errors.UnsupportedModuleError, ValueError):
        with pytest.raises(caught, match="'1'.*BatchNorm"):
            engine.validate(module=model, optimizer=optimizer, data_loader=_loader(gen))
    fixed = dpf.PrivacyEngine.get_compatible_module(model)
    assert isinstance(fixed[1], nn.GroupNorm)
    assert engine.is_compatible(module=fixed, optimizer=optimizer, data_loader=_loader(gen))
    model = _bn_model()  # get_compatible_module fixed the first one in place
    with pytest.raises(opacus_errors.UnsupportedModuleError):
        engine.make_private(
            module=model,
            optimizer=torch.optim.SGD(model.parameters(), lr=0.1),
            data_loader=_loader(gen),
            noise_multiplier=1.0,
            max_grad_norm=1.0,
        )


@pytest.mark.parametrize("wrap_model", [True, False])
def test_wrap_model_is_accepted_and_the_model_is_returned_as_is(wrap_model, gen):
    model = nn.Linear(4, 2)
    engine, returned, optimizer, loader = private(
        model, _loader(gen).dataset, 6, wrap_model=wrap_model
    )
    assert returned is model
    train_epoch(model, optimizer, loader)
    assert len(engine.accountant) > 0


def test_grad_sample_mode_no_op_is_refused_with_the_reason(gen):
    with pytest.raises(ValueError, match="no_op.*computes and clips them itself"):
        private(nn.Linear(4, 2), _loader(gen).dataset, 6, grad_sample_mode="no_op")


def test_checkpoints_carry_opacus_noise_and_clipping_schedulers(gen, tmp_path):
    schedulers = pytest.importorskip("opacus.schedulers")

    def setup():
        engine, model, optimizer, _ = private(nn.Linear(4, 2), _loader(gen).dataset, 6)
        noise = schedulers.ExponentialNoise(optimizer, gamma=0.5)
        clip = schedulers.StepGradClip(optimizer, step_size=1, gamma=0.5)
        return engine, dict(
            module=model, optimizer=optimizer, noise_scheduler=noise, grad_clip_scheduler=clip
        )

    engine, parts = setup()
    for _ in range(2):
        parts["noise_scheduler"].step()
        parts["grad_clip_scheduler"].step()
    assert parts["optimizer"].noise_multiplier == pytest.approx(0.25)
    path = tmp_path / "ckpt.pt"
    engine.save_checkpoint(path=path, **parts)
    engine2, parts2 = setup()
    engine2.load_checkpoint(path=path, **parts2)
    assert parts2["noise_scheduler"].last_epoch == 2
    assert parts2["grad_clip_scheduler"].last_epoch == 2
    parts2["noise_scheduler"].step()
    assert parts2["optimizer"].noise_multiplier == pytest.approx(0.125)


def test_a_seeded_loader_and_noise_generator_reproduce_a_run(gen):
    """As under Opacus: DataLoader(generator=...) seeds the sample, noise_generator= the noise,
    whatever the global seed does in between."""
    data = _loader(gen).dataset
    runs = []
    for global_seed in (1, 2):
        torch.manual_seed(0)
        model = nn.Linear(4, 2)
        torch.manual_seed(global_seed)
        engine = dpf.PrivacyEngine()
        model, optimizer, loader = engine.make_private(
            module=model,
            optimizer=torch.optim.SGD(model.parameters(), lr=0.1),
            data_loader=DataLoader(data, batch_size=6, generator=torch.Generator().manual_seed(5)),
            noise_multiplier=1.0,
            max_grad_norm=1.0,
            noise_generator=torch.Generator().manual_seed(7),
        )
        train_epoch(model, optimizer, loader)
        runs.append([p.detach().clone() for p in model.parameters()])
    for p, q in zip(*runs):
        torch.testing.assert_close(p, q, rtol=0, atol=0)


@pytest.mark.parametrize("physical", [None, 2])
def test_torch_manual_seed_after_make_private_decides_the_run(physical, gen):
    """Opacus users seed after make_private: the sample and the noise must follow that seed
    (their own seeds are drawn at the first draw, not at make_private). Two runs whose seeds
    before make_private differ but agree after it are identical; another seed after it
    changes the run."""
    data = _loader(gen).dataset
    runs = []
    for before, after in ((1, 9), (2, 9), (1, 10)):
        torch.manual_seed(0)
        model = nn.Linear(4, 2)
        torch.manual_seed(before)
        model, optimizer, loader = dpf.PrivacyEngine().make_private(
            module=model,
            optimizer=torch.optim.SGD(model.parameters(), lr=0.1),
            data_loader=DataLoader(data, batch_size=6),
            noise_multiplier=1.0,
            max_grad_norm=1.0,
            physical_batch_size=physical,
        )
        torch.manual_seed(after)
        train_epoch(model, optimizer, loader)
        runs.append(torch.cat([p.detach().flatten() for p in model.parameters()]))
    torch.testing.assert_close(runs[0], runs[1], rtol=0, atol=0)
    assert not torch.equal(runs[0], runs[2])


@pytest.mark.parametrize(
    "options,error,match",
    [
        ({"clipping": "adaptive", "target_unclipped_quantile": 0.5}, ValueError, "adaptive"),
        ({"clipping": "per_layer", "max_grad_norm": [1.0, 1.0]}, ValueError, "per-layer"),
        ({"clipping": "per_layer"}, ValueError, "per-layer and adaptive"),
        ({"max_grad_norms": 1.0}, TypeError, "max_grad_norms"),
    ],
)
def test_adaptive_and_per_layer_clipping_are_refused_clearly(options, error, match, gen):
    with pytest.raises(error, match=match):
        private(nn.Linear(4, 2), _loader(gen).dataset, 6, **options)


def test_get_privacy_spent_and_the_gdp_accountant_agree_with_opacus():
    accountants = pytest.importorskip("opacus.accountants")
    ours, theirs = dpf.accounting.RDPAccountant(), accountants.RDPAccountant()
    for sigma, steps in ((1.1, 50), (0.9, 30)):
        ours.step(noise_multiplier=sigma, sample_rate=0.02, steps=steps)
        for _ in range(steps):
            theirs.step(noise_multiplier=sigma, sample_rate=0.02)
    for alphas in (None, [2, 4, 8.5, 32]):
        got = ours.get_privacy_spent(delta=1e-5, alphas=alphas)
        expected = theirs.get_privacy_spent(delta=1e-5, alphas=alphas)
        assert got == pytest.approx(expected, rel=1e-9)
    assert dpf.accounting.RDPAccountant().get_privacy_spent(delta=1e-5) == (0.0, 0.0)

    with pytest.warns(UserWarning, match="underestimate"):
        gdp = dpf.accounting.create_accountant("gdp")
    with pytest.warns(UserWarning):
        reference = accountants.GaussianAccountant()
    gdp.step(noise_multiplier=1.1, sample_rate=0.01, steps=1000)
    for _ in range(1000):
        reference.step(noise_multiplier=1.1, sample_rate=0.01)
    for delta in (1e-5, 1e-3):
        assert gdp.get_epsilon(delta) == pytest.approx(reference.get_epsilon(delta), rel=1e-6)
    with pytest.raises(ValueError, match="one noise multiplier"):
        gdp.step(noise_multiplier=2.0, sample_rate=0.01)


def test_the_gdp_accountant_calibrates_make_private_with_epsilon(gen):
    with pytest.warns(UserWarning, match="underestimate"):
        engine = dpf.PrivacyEngine(accountant="gdp")
    model = nn.Linear(4, 2)
    with pytest.warns(UserWarning, match="underestimate"):
        engine.make_private_with_epsilon(
            module=model,
            optimizer=torch.optim.SGD(model.parameters(), lr=0.1),
            data_loader=_loader(gen),
            target_epsilon=2.0,
            target_delta=1e-5,
            epochs=3,
            max_grad_norm=1.0,
            rand_on_empty=True,  # Opacus 1.6's keyword: accepted
        )
    assert 0 < engine.noise_multiplier < 100


def test_checkpoint_options_opacus_passes_through_and_the_unsafe_ones_refused(gen, tmp_path):
    engine, model, optimizer, _ = private(nn.Linear(4, 2), _loader(gen).dataset, 6)
    path = tmp_path / "ckpt.pt"
    engine.save_checkpoint(
        path=path,
        module=model,
        optimizer=optimizer,
        module_state_dict_kwargs={"prefix": "net."},
        torch_save_kwargs={},
    )
    with pytest.raises(ValueError, match="weights_only"):
        engine.load_checkpoint(path=path, module=model, torch_load_kwargs={"weights_only": False})
    for unsafe in ({"pickle_module": None}, {"pickle_protocol": 4}):
        with pytest.raises(ValueError, match="weights_only=True"):
            engine.save_checkpoint(path=path, module=model, torch_save_kwargs=unsafe)
    with pytest.raises(RuntimeError, match="Unexpected key"):
        engine.load_checkpoint(path=path, module=model, torch_load_kwargs={"map_location": "cpu"})
    checkpoint = engine.load_checkpoint(
        path=path, module=model, module_load_dict_kwargs={"strict": False}
    )
    assert set(checkpoint["module_state_dict"]) == {"net.weight", "net.bias"}


def test_checkpoints_go_to_and_come_from_file_objects(gen):
    import io

    engine, model, optimizer, loader = private(nn.Linear(4, 2), _loader(gen).dataset, 6)
    train_epoch(model, optimizer, loader)
    buffer = io.BytesIO()
    engine.save_checkpoint(path=buffer, module=model, optimizer=optimizer)
    engine2, model2, optimizer2, _ = private(nn.Linear(4, 2), _loader(gen).dataset, 6)
    buffer.seek(0)
    engine2.load_checkpoint(path=buffer, module=model2, optimizer=optimizer2)
    assert engine2.accountant.history == engine.accountant.history
    torch.testing.assert_close(model2.weight, model.weight, rtol=0, atol=0)
    with pytest.raises(dpf.CheckpointError, match="BytesIO"):
        engine2.load_checkpoint(path=io.BytesIO(b"not a checkpoint"), module=model2)


def test_opacus_unwrapping_idioms_work(gen):
    """get_compatible_module returns a copy (as Opacus's), model._module is the model itself
    (Opacus scripts unwrap its GradSampleModule that way) without entering the module tree,
    and a foreign optimizer is refused with Opacus's words."""
    module = nn.Linear(1, 2)
    fixed = dpf.PrivacyEngine.get_compatible_module(module)
    assert fixed is not module and torch.equal(fixed.weight, module.weight)

    engine, model, optimizer, loader = private(nn.Linear(4, 2), _loader(gen).dataset, 6)
    assert model._module is model
    assert set(model.state_dict()) == {"weight", "bias"} and len(list(model.modules())) == 1
    engine.attachment.detach()
    assert not hasattr(model, "_module")

    model = nn.Linear(4, 2)
    stale = torch.optim.SGD(nn.Linear(4, 2).parameters(), lr=0.1)
    with pytest.raises(ValueError, match="Module parameters are different than optimizer"):
        dpf.PrivacyEngine().make_private(
            module=model,
            optimizer=stale,
            data_loader=_loader(gen),
            noise_multiplier=1.0,
            max_grad_norm=1.0,
        )
