"""The collate probe (batch_layout.py): which dim of each collated tensor holds the batch, for
the collate functions users write, and make_private's refusal of the contradicting layouts."""

import pytest
import torch
from torch.nn.utils.rnn import pad_sequence
from torch.utils.data import DataLoader, Dataset, TensorDataset, default_collate

from tests.helpers import private
from torch_dpfast.batch_layout import (
    LoaderBatch,
    argument_findings,
    batch_dims,
    check_arguments,
    check_layout,
    raise_found,
)


def _padded(items):
    """Variable-length sequences padded to (B, T_max), labels (B,)."""
    return pad_sequence([x for x, _ in items], batch_first=True), torch.stack([y for _, y in items])


def _flattened(items):
    """All tokens of the batch in one (sum of lengths,) row, with (B,) lengths."""
    return torch.cat([x for x, _ in items]), torch.tensor([len(x) for x, _ in items])


def test_batch_dims_of_common_collates(gen):
    image = (torch.randn(3, 5, 4, generator=gen), torch.tensor(1))
    assert batch_dims(default_collate, image) == [((1, 3, 5, 4), [0]), ((1,), [0])]
    sequence = (torch.arange(6), torch.tensor(0))
    assert batch_dims(_padded, sequence) == [((1, 6), [0]), ((1,), [0])]
    assert batch_dims(_flattened, sequence) == [((6,), [0]), ((1,), [0])]
    record = {"input_ids": torch.arange(4), "attention_mask": torch.ones(4), "name": "a"}
    assert batch_dims(default_collate, record) == [((1, 4), [0]), ((1, 4), [0])]
    sequence_first = lambda items: _padded(items)[0].T  # noqa: E731
    assert batch_dims(sequence_first, sequence) == [((6, 1), [1])]
    constant = lambda items: torch.zeros(2, 2)  # noqa: E731
    assert batch_dims(constant, sequence) == [((2, 2), [])]


def test_batch_dims_does_not_draw_from_the_training_stream():
    def noisy(items):
        return torch.stack([x + torch.randn(()) for x in items])

    torch.manual_seed(0)
    expected = torch.rand(3)
    torch.manual_seed(0)
    batch_dims(noisy, torch.zeros(2))
    torch.testing.assert_close(torch.rand(3), expected)


@pytest.mark.parametrize("batch_first", [True, False])
def test_check_layout(batch_first, gen):
    data = TensorDataset(torch.randint(0, 5, (10, 6), generator=gen), torch.zeros(10))
    batch_first_loader = DataLoader(data, batch_size=4)
    sequence_first_loader = DataLoader(
        data, batch_size=4, collate_fn=lambda items: (default_collate(items)[0].T, None)
    )
    right, wrong = (
        (batch_first_loader, sequence_first_loader)
        if batch_first
        else (sequence_first_loader, batch_first_loader)
    )
    check_layout(right, batch_first)
    with pytest.raises(ValueError, match="batch_first"):
        check_layout(wrong, batch_first)


def test_check_layout_passes_what_it_cannot_probe():
    """A dataset keyed by something other than 0, labels only, or (B, n) labels beside
    sequence-first inputs."""

    class Keyed(Dataset):
        def __len__(self):
            return 2

        def __getitem__(self, key):
            return {"a": torch.zeros(3), "b": torch.ones(3)}[key]

    check_layout(DataLoader(Keyed(), batch_size=2), batch_first=True)
    check_layout(DataLoader(TensorDataset(torch.zeros(4)), batch_size=2), batch_first=False)
    sequences = TensorDataset(torch.zeros(4, 6, dtype=torch.long), torch.zeros(4, 3))
    collate = lambda items: (default_collate(items)[0].T, default_collate(items)[1])  # noqa: E731
    check_layout(DataLoader(sequences, batch_size=2, collate_fn=collate), batch_first=False)


def test_check_arguments(gen):
    x = torch.randint(0, 9, (5, 5), generator=gen)
    ones = torch.ones(5, 5)
    check_arguments(((x, ones), {}), LoaderBatch([x, ones]), 5, batch_first=True)
    check_arguments(((), {"ids": x.double()}), LoaderBatch([x]), 5, batch_first=True)
    for turned in (x.T, x.T.contiguous(), x.T.double(), x.transpose(0, 1)):
        with pytest.raises(ValueError, match="moved from dim 0 to dim 1"):
            check_arguments(((turned,), {}), LoaderBatch([x]), 5, batch_first=True)
        with pytest.raises(ValueError, match="moved from dim 1 to dim 0"):
            check_arguments(((turned,), {}), LoaderBatch([x]), 5, batch_first=False)
    cube = torch.randn(5, 5, 5, generator=gen)
    with pytest.raises(ValueError, match="moved from dim 0 to dim 2"):
        check_arguments(((cube.movedim(0, 2),), {}), LoaderBatch([cube]), 5, batch_first=True)
    check_arguments(((cube.permute(0, 2, 1),), {}), LoaderBatch([cube]), 5, batch_first=True)


def test_check_arguments_refuses_reordered_rows_where_the_loader_pads(gen):
    x = torch.randn(6, 4, generator=gen)
    order = torch.randperm(6, generator=gen)
    while bool((order == torch.arange(6)).all()):
        order = torch.randperm(6, generator=gen)
    with pytest.raises(ValueError, match="another row order"):
        check_arguments(((x[order],), {}), LoaderBatch([x], padded=True), 6, batch_first=True)
    with pytest.raises(ValueError, match="another row order"):  # reordered and cast
        check_arguments(((x[order].double(),), {}), LoaderBatch([x], True), 6, batch_first=True)
    check_arguments(((x[order],), {}), LoaderBatch([x], padded=False), 6, batch_first=True)
    check_arguments(((x,), {}), LoaderBatch([x], padded=True), 6, batch_first=True)
    check_arguments(((x * 2,), {}), LoaderBatch([x], padded=True), 6, batch_first=True)
    # A tensor the loader yielded as it came is in the loader's order, even where another of
    # its tensors holds the same rows permuted (a view pair made by the collate function).
    pair = LoaderBatch([x, x[order]], padded=True)
    check_arguments(((x[order],), {}), pair, 6, batch_first=True)
    check_arguments(((x,), {}), pair, 6, batch_first=True)


def _sorting(items):
    """Sorts the batch by its first value, as a pack_padded_sequence loop sorts by length."""
    x, y = default_collate(items)
    order = x[:, 0].argsort()
    return x[order], y[order]


def _random_masking(items):
    x, y = default_collate(items)
    return x * (torch.rand(x.shape) > 0.5), y


def test_check_layout_refuses_a_reordering_collate_where_the_loader_pads(gen):
    data = TensorDataset(torch.randn(10, 3, generator=gen), torch.zeros(10))
    sorting = DataLoader(data, batch_size=4, collate_fn=_sorting)
    with pytest.raises(ValueError, match="orders the examples itself"):
        check_layout(sorting, batch_first=True, padded=True)
    check_layout(sorting, batch_first=True, padded=False)
    for collate in (default_collate, _random_masking):
        check_layout(DataLoader(data, batch_size=4, collate_fn=collate), True, padded=True)
    alike = TensorDataset(torch.ones(10, 3), torch.zeros(10))  # examples 0 and 1 equal
    check_layout(DataLoader(alike, batch_size=4, collate_fn=_sorting), True, padded=True)


def test_make_private_refuses_a_reordering_collate_with_a_physical_batch_size(gen):
    data = TensorDataset(torch.randn(20, 3, generator=gen), torch.zeros(20, dtype=torch.long))
    model = torch.nn.Linear(3, 2)
    with pytest.raises(ValueError, match="orders the examples itself"):
        private(model, data, 4, collate_fn=_sorting, physical_batch_size=4)
    private(model, data, 4, collate_fn=_sorting)  # no padding: every row is real


def test_argument_findings_are_flags_read_later(gen):
    """The comparisons as bool tensors (on a GPU computed without a synchronisation), read by
    raise_found; an argument equal to the loader's tensor leaves nothing to compare."""
    x = torch.randn(6, 4, generator=gen)
    turned = torch.randn(5, 5, generator=gen)
    findings = argument_findings(((x.flip(0),), {}), LoaderBatch([x], padded=True), 6, True)
    findings += argument_findings(((turned.T,), {}), LoaderBatch([turned]), 5, True)
    assert findings and all(flag.dtype == torch.bool and flag.dim() == 0 for flag, _ in findings)
    with pytest.raises(ValueError, match="another row order"):
        raise_found(findings)
    with pytest.raises(ValueError, match="turned around"):
        raise_found(findings[-1:])
    assert argument_findings(((x,), {}), LoaderBatch([x], padded=True), 6, True) == []
    raise_found([])
