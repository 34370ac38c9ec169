"""clipping="auto" on CPU materialising linear layers within a byte budget: the choice, its
agreement with dpf.explain, and exact results against brute force (float64)."""

import copy

import pytest
import torch
import torch.nn.functional as F
from torch import nn

import torch_dpfast as dpf
from torch_dpfast import materialise_plan
from torch_dpfast.materialise_plan import Candidate, choose
from torch_dpfast.rules import scaled_sum
from torch_dpfast.rules.conv import ConvRule
from torch_dpfast.rules.linear import LinearRule


def test_choose_takes_the_best_savings_per_byte_that_fit_and_are_worth_it():
    candidates = [
        Candidate("a", bytes=100, saved_macs=1000),  # 10 per byte
        Candidate("b", bytes=50, saved_macs=1500),  # 30 per byte
        Candidate("c", bytes=60, saved_macs=600),  # 10 per byte, does not fit after b and a
        Candidate("d", bytes=10, saved_macs=39),  # 3.9 per byte: not worth it
    ]
    assert choose(candidates, budget=160) == {"a", "b"}
    assert choose(candidates, budget=110) == {"b", "c"}
    assert choose(candidates, budget=10**9) == {"a", "b", "c"}
    assert choose(candidates, budget=0) == set()


def test_only_auto_on_cpu_materialises():
    cpu, cuda = torch.device("cpu"), torch.device("cuda")
    assert materialise_plan.applies("auto", cpu)
    assert not materialise_plan.applies("auto", cuda)
    assert not any(materialise_plan.applies(m, cpu) for m in ("bk", "ghost", "per_example"))


@pytest.mark.parametrize("bad", [-1, 1.5, True, "1GiB"])
def test_a_bad_budget_is_refused(bad):
    with pytest.raises((TypeError, ValueError), match="materialise_bytes"):
        dpf.attach(nn.Linear(2, 2), materialise_bytes=bad)


def test_the_default_budget_is_an_eighth_of_the_available_memory(monkeypatch):
    monkeypatch.setattr(materialise_plan, "available_bytes", lambda: 24 << 30)
    assert materialise_plan.resolve_budget(None) == 3 << 30
    assert materialise_plan.resolve_budget(5) == 5
    att = dpf.attach(nn.Linear(2, 2))
    try:
        assert att.materialise_bytes == 3 << 30
    finally:
        att.detach()
    described = str(dpf.explain(nn.Linear(2, 2), torch.zeros(3, 2)))
    assert "materialise budget 3.0 GiB (default: 1/8 of 24.0 GiB available)" in described
    assert "materialise budget 0.0 GiB" in str(
        dpf.explain(nn.Linear(2, 2), torch.zeros(3, 2), materialise_bytes=0)
    )
    assert "materialise budget" not in str(
        dpf.explain(nn.Linear(2, 2), torch.zeros(3, 2), clipping="bk")
    )


def test_an_unknown_available_memory_falls_back_to_one_gib(monkeypatch):
    monkeypatch.setattr(materialise_plan, "available_bytes", lambda: None)
    assert materialise_plan.resolve_budget(None) == 1 << 30


def test_available_memory_is_read_from_the_os():
    available = materialise_plan.available_bytes()
    assert available is None or 0 < available


def test_available_memory_is_the_least_of_the_system_the_address_limit_and_the_cgroup(
    monkeypatch,
):
    """A container (cgroup limit) or `ulimit -v` (RLIMIT_AS) caps what the process can take,
    though /proc/meminfo shows the whole machine's memory."""
    gib = 1 << 30
    readers = dict(_system_available=24 * gib, _rlimit_headroom=None, _cgroup_headroom=None)
    for name in readers:
        monkeypatch.setattr(materialise_plan, name, lambda name=name: readers[name])
    assert materialise_plan.available_bytes() == 24 * gib
    readers["_rlimit_headroom"] = 2 * gib
    assert materialise_plan.available_bytes() == 2 * gib
    readers["_cgroup_headroom"] = gib
    assert materialise_plan.available_bytes() == gib
    readers["_cgroup_headroom"] = -5  # over its limit already
    assert materialise_plan.available_bytes() == 0
    readers.update(_system_available=None, _rlimit_headroom=None, _cgroup_headroom=None)
    assert materialise_plan.available_bytes() is None


def test_an_address_space_limit_is_seen(tmp_path):
    """In a child process under RLIMIT_AS = current + 1 GiB, the headroom is about 1 GiB."""
    import subprocess
    import sys

    code = (
        "import resource\n"
        "from torch_dpfast import materialise_plan as mp\n"
        "used = int(open('/proc/self/statm').read().split()[0]) * resource.getpagesize()\n"
        "resource.setrlimit(resource.RLIMIT_AS, (used + (1 << 30), resource.RLIM_INFINITY))\n"
        "print(mp.available_bytes())\n"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert 0.9 * (1 << 30) < int(out.stdout) <= 1 << 30


@pytest.mark.parametrize("limit", ["max\n", str(1 << 62)])
def test_an_unlimited_cgroup_sets_no_bound(tmp_path, monkeypatch, limit):
    (tmp_path / "max").write_text(limit)
    (tmp_path / "current").write_text("1000\n")
    monkeypatch.setattr(
        materialise_plan, "CGROUP_FILES", ((str(tmp_path / "max"), str(tmp_path / "current")),)
    )
    assert materialise_plan._cgroup_headroom() is None
    (tmp_path / "max").write_text(str(3000))
    assert materialise_plan._cgroup_headroom() == 2000


class SequenceMLP(nn.Module):
    """Linear layers over T = 40 positions (direct norms of 40 multiply-adds per gradient value,
    5 per float64 byte for `down`, 4.2 for `up` with its bias: both worth materialising, `down`
    first), a LayerNorm, a T = 1 head (worth it only for the fast path's fixed cost, and then
    first: it is tiny)."""

    def __init__(self):
        super().__init__()
        self.up = nn.Linear(5, 12)
        self.down = nn.Linear(12, 6, bias=False)
        self.norm = nn.LayerNorm(6)
        self.head = nn.Linear(6, 3)

    def forward(self, x):
        return self.head(self.norm(self.down(torch.tanh(self.up(x)))).mean(dim=1))


def _brute_force(model, x, y, max_norm, keep):
    rows = []
    for i in range(x.shape[0]):
        model.zero_grad()
        F.cross_entropy(model(x[i : i + 1]), y[i : i + 1], reduction="sum").backward()
        rows.append(torch.cat([p.grad.flatten() for p in model.parameters()]))
    per_example = torch.stack(rows)
    factors = (max_norm / (per_example.norm(dim=1) + 1e-6)).clamp(max=1.0) * keep
    return (factors[:, None] * per_example).sum(0)


def _attached_clip(model, inputs, y, max_norm, mask=None, **attach_kwargs) -> torch.Tensor:
    """One physical batch through attach's clip_and_accumulate: the flattened summed grads."""
    att = dpf.attach(model, loss_reduction="sum", **attach_kwargs)
    try:
        if mask is not None:
            att.begin_batch(mask)
        F.cross_entropy(model(inputs), y, reduction="sum").backward()
        att.clip_and_accumulate(max_norm)
        return torch.cat([p.summed_grad.flatten() for p in model.parameters()])
    finally:
        att.detach()


def _fast_path_layers(monkeypatch, rules=(LinearRule, ConvRule)):
    """Records which layers of ``rules`` took their fast-path norm (``norm_sq``, or
    ``norm_sq_and_bound`` where it ran)."""
    seen = []
    for rule in rules:
        original = rule.norm_sq

        def norm_sq(self, module, x, g, method="auto", original=original):
            seen.append(module)
            return original(self, module, x, g, method)

        monkeypatch.setattr(rule, "norm_sq", norm_sq)
        both = getattr(rule, "norm_sq_and_bound", None)
        if both is not None:

            def norm_sq_and_bound(self, module, x, g, method="auto", both=both):
                found = both(self, module, x, g, method)
                if found is not None:
                    seen.append(module)
                return found

            monkeypatch.setattr(rule, "norm_sq_and_bound", norm_sq_and_bound)
    return seen


@pytest.mark.parametrize(
    "budget, call_macs",
    [("none", None), ("two layers", None), ("all", None), ("all", 0)],
)
def test_the_engine_materialises_what_explain_says_and_stays_exact(
    budget, call_macs, monkeypatch, gen
):
    """Within the budget, best saving per byte first; with the fast path's fixed cost counted
    (the default) the T = 1 head is worth it, without (call_macs 0) it is not."""
    if call_macs is not None:
        monkeypatch.setattr(materialise_plan, "FAST_PATH_CALL_MACS", call_macs)
    torch.manual_seed(int(torch.randint(0, 2**31, (), generator=gen)))
    model = SequenceMLP().double()
    batch, rows = 6, 4  # the last two rows are padding, with NaN planted in them
    x = torch.randn(batch, 40, 5, generator=gen, dtype=torch.float64)
    y = torch.randint(0, 3, (batch,), generator=gen)
    mask = torch.arange(batch) < rows
    expected = _brute_force(copy.deepcopy(model), x, y, 0.4, mask.double())
    down_bytes = rows * 6 * 12 * 8  # float64 weight gradients of `down`, real rows only
    head_bytes = rows * 3 * 7 * 8  # the head's weight and bias
    materialise_bytes = {"none": 0, "two layers": head_bytes + down_bytes, "all": 1 << 30}[budget]
    x[rows:] = float("nan")

    plan = dpf.explain(model, x[:rows], materialise_bytes=materialise_bytes)
    planned = {r["layer"] for r in plan.rows if r["method"] == "materialised"} - {"norm"}
    fast = _fast_path_layers(monkeypatch)
    summed = _attached_clip(model, x, y, 0.4, mask, materialise_bytes=materialise_bytes)
    took_fast_path = {name for name, m in model.named_children() if m in fast}
    linear = {"up", "down", "head"}
    assert planned == linear - took_fast_path
    everything = {"up", "down"} if call_macs == 0 else {"up", "down", "head"}
    assert planned == {"none": set(), "two layers": {"head", "down"}, "all": everything}[budget]
    assert torch.isfinite(summed).all()
    torch.testing.assert_close(summed, expected, rtol=1e-8, atol=1e-10)


def test_scaled_sum_leaves_out_zero_scale_rows_exactly(gen):
    per_example = torch.randn(5, 3, 2, generator=gen, dtype=torch.float64)
    scale = torch.tensor([0.5, 0.0, 2.0, 0.0, 1.0], dtype=torch.float64)
    expected = torch.einsum("b,bij->ij", scale, per_example)
    per_example[1, 0, 0], per_example[3] = float("nan"), float("inf")
    torch.testing.assert_close(scaled_sum(per_example, scale), expected, rtol=1e-12, atol=0)
    empty = scaled_sum(torch.ones(4, 0, 3), torch.ones(4))
    assert empty.shape == (0, 3)


class SmallCNN(nn.Module):
    """An ungrouped conv over 8 x 8 = 64 output positions (worth materialising), a depthwise
    one (materialised too: one grouped convolution backward), GroupNorm and a T = 1 head."""

    def __init__(self):
        super().__init__()
        self.conv = nn.Conv2d(3, 4, 3, padding=1)
        self.depthwise = nn.Conv2d(4, 4, 3, padding=1, groups=4)
        self.norm = nn.GroupNorm(2, 4)
        self.head = nn.Linear(4, 3)

    def forward(self, x):
        h = torch.relu(self.norm(self.depthwise(self.conv(x))))
        return self.head(h.mean(dim=(2, 3)))


def test_convolutions_grouped_or_not_are_materialised_too(monkeypatch, gen):
    """Beside a head on its fast path (the fast path's fixed cost not counted, so that the
    clip mixes both)."""
    monkeypatch.setattr(materialise_plan, "FAST_PATH_CALL_MACS", 0)
    torch.manual_seed(int(torch.randint(0, 2**31, (), generator=gen)))
    model = SmallCNN().double()
    x = torch.randn(5, 3, 8, 8, generator=gen, dtype=torch.float64)
    y = torch.randint(0, 3, (5,), generator=gen)
    expected = _brute_force(copy.deepcopy(model), x, y, 0.7, torch.ones(5, dtype=torch.float64))
    plan = dpf.explain(model, x)
    materialised = {r["layer"] for r in plan.rows if r["method"] == "materialised"}
    assert materialised == {"conv", "depthwise", "norm"}
    fast = _fast_path_layers(monkeypatch)
    summed = _attached_clip(model, x, y, 0.7)
    assert {name for name, m in model.named_children() if m in fast} == {"head"}
    torch.testing.assert_close(summed, expected, rtol=1e-8, atol=1e-10)


@pytest.mark.parametrize("model_class", [SequenceMLP, SmallCNN])
def test_materialising_under_bf16_autocast_agrees_with_the_fast_paths(model_class, gen):
    """Under autocast the layer input is float32 and the output gradient bfloat16: the
    materialised gradients are computed in float32 and agree with the fast paths'."""
    torch.manual_seed(int(torch.randint(0, 2**31, (), generator=gen)))
    model = model_class()
    shape = (4, 40, 5) if model_class is SequenceMLP else (4, 3, 8, 8)
    x, y = torch.randn(*shape, generator=gen), torch.randint(0, 3, (4,), generator=gen)
    results = []
    for materialise_bytes in (1 << 30, 0):
        att = dpf.attach(model, materialise_bytes=materialise_bytes)
        try:
            with torch.autocast("cpu", dtype=torch.bfloat16):
                loss = F.cross_entropy(model(x), y)
            loss.backward()
            norm_sq = att.clip_and_accumulate(0.5)
            summed = torch.cat([p.summed_grad.flatten() for p in model.parameters()])
        finally:
            att.detach()
            for p in model.parameters():
                p.summed_grad = None
        results.append((norm_sq.double(), summed.double()))
    (norms, summed), (fast_norms, fast_summed) = results
    assert torch.isfinite(summed).all()
    torch.testing.assert_close(norms, fast_norms, rtol=2**-6, atol=0)
    assert (summed - fast_summed).norm() <= 2**-6 * fast_summed.norm()


class CharLSTM(nn.Module):
    """Embedding, a two-layer LSTM (batch first or not), a head on the last step."""

    def __init__(self, batch_first: bool):
        super().__init__()
        self.embed = nn.Embedding(11, 6)
        self.lstm = nn.LSTM(6, 8, num_layers=2, batch_first=batch_first)
        self.head = nn.Linear(8, 3)

    def forward(self, ids):
        x = self.embed(ids)
        out, _ = self.lstm(x if self.lstm.batch_first else x.transpose(0, 1))
        return self.head(out[:, -1] if self.lstm.batch_first else out[-1])


@pytest.mark.parametrize("batch_first", [True, False])
@pytest.mark.parametrize("budget", [0, 1 << 30])
@pytest.mark.parametrize("steps", [20, 5])
def test_explain_and_the_engine_agree_on_recurrent_layers(
    batch_first, budget, steps, monkeypatch, gen
):
    """dpf.explain works out a recurrent layer's saving from its shapes (its records hold the
    gate pre-activations, not the module's input and output): what it lists as materialised is
    what the engine materialises, and the rest takes the fast path. At 5 steps the ghost norm
    is the cheaper and the compiled ghost kernel takes the LSTM: not materialised."""
    from torch_dpfast.rules.embedding import EmbeddingRule
    from torch_dpfast.rules.recurrent import RecurrentRule

    torch.manual_seed(int(torch.randint(0, 2**31, (), generator=gen)))
    model = CharLSTM(batch_first).double()
    ids = torch.randint(0, 11, (5, steps), generator=gen)
    y = torch.randint(0, 3, (5,), generator=gen)
    plan = dpf.explain(model, ids, materialise_bytes=budget)
    planned = {r["layer"] for r in plan.rows if r["method"] == "materialised"}
    materialised = {"embed", "lstm", "head"} if steps == 20 else {"embed", "head"}
    assert planned == (materialised if budget else set())
    fast = _fast_path_layers(monkeypatch, (LinearRule, RecurrentRule, EmbeddingRule))
    expected = _brute_force(copy.deepcopy(model), ids, y, 0.3, torch.ones(5, dtype=torch.float64))
    summed = _attached_clip(model, ids, y, 0.3, materialise_bytes=budget)
    took_fast_path = {name for name, m in model.named_children() if m in fast}
    assert took_fast_path == {"embed", "lstm", "head"} - planned
    torch.testing.assert_close(summed, expected, rtol=1e-8, atol=1e-10)


def test_a_parameter_materialised_with_its_norms_cannot_take_a_second_use(gen):
    """materialise's guard: norms computed with a layer's per-example gradients cover that
    call only, so a second contribution to one of its parameters is refused, not summed under
    a norm that misses it (the engine gives buffers to single-use parameters only)."""
    from torch_dpfast.records import materialise

    lstm = nn.LSTM(3, 4, batch_first=True)
    attachment = dpf.attach(lstm, clipping="auto", loss_reduction="sum")
    try:
        lstm(torch.randn(2, 5, 3, generator=gen))[0].sum().backward()
        (record,) = attachment._records
        buffers = {id(record): {n: torch.empty(2, *p.shape) for n, p in record.params.items()}}
        with pytest.raises(RuntimeError, match="materialised with its norms and used again"):
            materialise([record, record], buffers, 2, normed={})
        assert set(materialise([record], buffers, 2, normed={})) == {
            id(p) for p in record.params.values()
        }
    finally:
        attachment.detach()
