"""`fxopt.calibrate` streams its batches: a generator or a DataLoader is read one batch at a
time, each run through the model before the next is asked for, so a calibration set need not
fit in memory."""
import itertools
import warnings

import pytest
import torch
from torch import nn

import fxopt
from fxopt import FxoptError


@pytest.fixture
def observed():
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(4, 4), nn.ReLU()).eval()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        return fxopt.optimize(model, torch.randn(8, 4), "insert-observers", verify=False).module


def test_a_generator_is_read_one_batch_at_a_time(observed):
    ran: list[int] = []
    asked: list[int] = []
    observed.register_forward_hook(lambda *_: ran.append(1))

    def batches():
        for i in range(4):
            asked.append(len(ran))  # forwards run before batch i was asked for
            yield (torch.randn(8, 4),)

    assert fxopt.calibrate(observed, batches(), progress=False) == 4
    assert asked == [0, 1, 2, 3]  # list(batches) first would have read [0, 0, 0, 0]


def test_max_batches_stops_reading_the_stream(observed):
    asked = []

    def batches():
        for i in range(100):
            asked.append(i)
            yield torch.randn(8, 4)

    assert fxopt.calibrate(observed, batches(), progress=False, max_batches=3) == 3
    assert asked == [0, 1, 2]


def test_a_dataloader_of_a_dataset_calibrates_like_the_list_of_its_batches(observed):
    data = torch.randn(32, 4)
    loader = torch.utils.data.DataLoader(torch.utils.data.TensorDataset(data), batch_size=8)
    assert fxopt.calibrate(observed, loader, progress=False) == 4
    observers = [m for m in observed.modules() if getattr(m, "is_fxopt_observer", False)]
    assert observers and all(o.batches == 4 for o in observers)


def test_an_empty_stream_is_refused(observed):
    with pytest.raises(FxoptError, match="the calibration data is empty"):
        fxopt.calibrate(observed, iter(()), progress=False)


class _CountingDataset(torch.utils.data.Dataset):
    """A map-style dataset that counts the samples read from it."""

    def __init__(self, data: torch.Tensor) -> None:
        self.data, self.reads = data, 0

    def __len__(self) -> int:
        return len(self.data)

    def __getitem__(self, i: int) -> torch.Tensor:
        self.reads += 1
        return self.data[i]


def test_optimize_streams_a_dataloader_and_quantizes_as_with_the_list_of_its_batches():
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(4, 8), nn.ReLU(), nn.Linear(8, 2)).eval()
    data = torch.randn(32, 4)
    dataset = _CountingDataset(data)
    loader = torch.utils.data.DataLoader(dataset, batch_size=8)
    streamed = fxopt.optimize(model, data[:8], "quantize", calibration=loader)
    assert dataset.reads == 32  # each sample once: while calibrating
    listed = fxopt.optimize(model, data[:8], "quantize", calibration=list(data.split(8)))
    x = torch.randn(5, 4)
    assert torch.equal(streamed.module(x), listed.module(x))
    assert streamed.passes[0].stats["calibration_batches"] == 4


def test_a_pass_reads_a_dataloader_lazily_and_as_often_as_it_iterates():
    seen = []

    class Peek(fxopt.Pass):
        name = "peek"

        def run(self, gm, ctx):
            seen.append((len(ctx.calibration), dataset.reads))
            seen.append([tuple(args[0].shape) for args, kwargs in ctx.calibration])
            seen.append([tuple(args[0].shape) for args, kwargs in ctx.calibration])
            return fxopt.PassResult(gm, modified=False)

    dataset = _CountingDataset(torch.randn(10, 4))
    loader = torch.utils.data.DataLoader(dataset, batch_size=4)
    fxopt.optimize(nn.Linear(4, 2), torch.randn(4, 4), [Peek()], calibration=loader)
    assert seen == [(3, 0), [(4, 4), (4, 4), (2, 4)], [(4, 4), (4, 4), (2, 4)]] and dataset.reads == 20


def test_a_generator_given_to_optimize_is_read_once_into_a_list():
    """Passes read the batches more than once (quantize calibrates, then lowering reads two
    again): a one-shot generator is kept as a list, as before."""
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(4, 4), nn.ReLU()).eval()
    res = fxopt.optimize(model, torch.randn(8, 4), "quantize", calibration=(torch.randn(8, 4) for _ in range(3)))
    assert res.passes[0].stats["calibration_batches"] == 3 and res.verification.passed


@pytest.mark.parametrize("call", ["optimize", "calibrate"])
def test_one_dict_given_for_the_batches_is_refused_naming_what_to_pass(call, observed):
    """A dict of keyword inputs given as the calibration data iterated as its keys: 'calibration
    batch 0 (tensor shapes []) ... must be Tensor, not str'."""
    batch = {"input": torch.randn(8, 4)}
    with pytest.raises(FxoptError, match=r"got one dict \(keys 'input'\).*\[batch\] for one batch"):
        if call == "optimize":
            fxopt.optimize(nn.Sequential(nn.Linear(4, 4), nn.ReLU()).eval(), batch, "quantize", calibration=batch)
        else:
            fxopt.calibrate(observed, batch, progress=False)


def test_optimize_does_not_iterate_a_dataloader_to_tell_it_from_a_generator():
    """`iter(calibration) is calibration` asked a DataLoader for an iterator (starting its
    workers) only to tell it from a one-shot iterator."""
    from fxopt.calibration import StreamedBatches, pipeline_batches

    class Counted:
        def __init__(self):
            self.iterations = 0

        def __len__(self):
            return 2

        def __iter__(self):
            self.iterations += 1
            return iter([torch.randn(8, 4), torch.randn(8, 4)])

    source = Counted()
    assert isinstance(pipeline_batches(source), StreamedBatches) and source.iterations == 0


def test_a_dataloader_of_inputs_and_labels_is_named_as_the_likely_cause(observed):
    """A DataLoader of (inputs, labels) failed with forward()'s own "takes 2 positional arguments
    but 3 were given", which did not say that the labels were fed as an input."""
    from torch.utils.data import DataLoader, TensorDataset

    labeled = DataLoader(TensorDataset(torch.randn(16, 4), torch.randint(0, 3, (16,))), batch_size=8)
    with pytest.raises(FxoptError, match=r"(?s)calibration batch 0 .* holds 2: batches of \(inputs, labels\) feed the "
                                         r"labels as an input too; give the inputs only"):
        fxopt.calibrate(observed, labeled, progress=False)


class _Masked(nn.Module):
    def __init__(self):
        super().__init__()
        self.fc = nn.Linear(4, 3)

    def forward(self, x, mask=None):
        return self.fc(x) if mask is None else self.fc(x) * mask


@pytest.mark.parametrize("model, batch", [
    (nn.Sequential(nn.Linear(4, 3)), ((torch.randn(8, 4),), {})),
    (_Masked(), ((torch.randn(8, 4),), {"mask": torch.ones(8, 3)})),
])
def test_an_args_kwargs_pair_given_to_a_pipeline_is_named_as_read(model, batch):
    """fxopt.optimize reads a batch as its example inputs: ((x,), {...}) is two positional inputs. The error
    blamed "(inputs, labels)", or the graph's specialization to mask=None, and listed no tensor shape."""
    with pytest.raises(fxopt.PassError, match=r"(?s)this \(tuple, dict\) is two positional inputs, not "
                                              r"\(args, kwargs\); give the batch as a tuple of positional inputs"):
        fxopt.optimize(model.eval(), (torch.randn(2, 4),), "quantize", calibration=[batch])


class _Rows(torch.utils.data.IterableDataset):
    def __iter__(self):
        return iter(torch.randn(32, 16, generator=torch.Generator().manual_seed(0)))


def test_a_dataloader_of_an_iterable_dataset_is_read_into_a_list():
    """Its DataLoader has a __len__ that raises: it was taken for a sized loader and streamed,
    and quantize failed with "object of type '_Rows' has no len()"."""
    model = nn.Sequential(nn.Linear(16, 32), nn.ReLU(), nn.Linear(32, 4)).eval()
    x = torch.randn(2, 16)
    loader = torch.utils.data.DataLoader(_Rows(), batch_size=8)
    streamed = fxopt.optimize(model, x, "quantize", calibration=loader).module
    listed = fxopt.optimize(model, x, "quantize", calibration=list(loader)).module
    torch.testing.assert_close(streamed(x), listed(x), rtol=0, atol=0)


class _Endless(torch.utils.data.IterableDataset):
    def __iter__(self):
        while True:
            yield torch.randn(16)


def test_an_endless_iterable_dataset_is_refused_not_read_forever(monkeypatch):
    monkeypatch.setattr(fxopt.calibration, "MAX_UNSIZED_BATCHES", 20)
    model = nn.Sequential(nn.Linear(16, 4)).eval()
    loader = torch.utils.data.DataLoader(_Endless(), batch_size=8)
    with pytest.raises(FxoptError, match=r"calibration=: read 20 batches from a DataLoader without a length, and it has not ended"):
        fxopt.optimize(model, torch.randn(2, 16), "quantize", calibration=loader)


def test_a_generator_longer_than_the_old_cap_is_still_read_whole():
    """A cap of 10,000 batches refused a finite generator of more, which worked before (advB F4b)."""
    batches = fxopt.calibration.pipeline_batches(torch.zeros(1) for _ in range(10_001))
    assert len(batches) == 10_001 and batches[-1][0][0].shape == (1,)


def _counted_endless(read: list[int], limit: int = 200):
    """An endless generator of rows that counts what was read (and stops the test run far past any cap)."""
    while True:
        read.append(1)
        if len(read) > limit:
            raise RuntimeError("read far past the cap")
        yield torch.randn(16)


def test_an_endless_generator_stops_at_the_cap_naming_the_option(monkeypatch):
    """An endless generator given as calibration= was read into a list forever."""
    monkeypatch.setattr(fxopt.calibration, "MAX_UNSIZED_BATCHES", 20)
    read: list[int] = []
    model = nn.Sequential(nn.Linear(16, 4)).eval()
    with pytest.raises(FxoptError, match=r"calibration=: read 20 batches from a generator, and it has not ended.*"
                                         r"itertools.islice"):
        fxopt.optimize(model, torch.randn(2, 16), "quantize", calibration=_counted_endless(read))
    assert len(read) == 21  # one past the cap tells 'more' from 'exactly 20'


def test_an_endless_generator_of_large_batches_stops_before_memory_runs_out(monkeypatch):
    """Batches of 16 float32 values (64 bytes) against 1000 bytes of available memory: the list may
    take half of it, so reading stops at the 8th batch, long before the count cap."""
    monkeypatch.setattr(fxopt.calibration, "available_memory", lambda: 1000)
    read: list[int] = []
    with pytest.raises(FxoptError, match=r"calibration=: the 8 batches read from a generator hold 512 bytes, half "
                                         r"the memory available \(1000 bytes\)"):
        fxopt.calibration.pipeline_batches(_counted_endless(read))
    assert len(read) == 8


class _TupleAndDict(nn.Module):
    def __init__(self):
        super().__init__()
        self.a, self.b = nn.Linear(8, 8), nn.Linear(8, 8)

    def forward(self, feats, masks):
        return self.a(feats[0]) * masks["m"] + self.b(feats[1])


def test_a_batch_of_a_tuple_and_a_dict_is_two_positional_inputs_as_the_example_is():
    """d09cef5 read every user batch as calibrate reads its own pairs, so ((a, b), {"m": m}) became
    args (a, b) and keyword m: "forward() got an unexpected keyword argument 'm'" (advB B1)."""
    torch.manual_seed(0)
    batch = lambda: ((torch.randn(4, 8), torch.randn(4, 8)), {"m": torch.ones(4, 8)})  # noqa: E731
    res = fxopt.optimize(_TupleAndDict().eval(), batch(), "quantize", calibration=[batch() for _ in range(3)])
    assert res.verification.verdict == "PASS"
    again = fxopt.calibration.pipeline_batches(fxopt.calibration.pipeline_batches([batch()]))
    assert len(again) == 1 and isinstance(again[0][0][0], tuple)  # read once, not again


def test_the_memory_cap_counts_each_storage_once_and_a_sparse_tensor_by_its_entries(monkeypatch):
    """Every yielded tensor's numel was summed: 400 repeats of one 1 kB batch counted 400 kB, and a
    sparse 2000 x 2000 adjacency of 5 entries 16 MB, so finite sources were refused as endless (advB B2)."""
    monkeypatch.setattr(fxopt.calibration, "available_memory", lambda: 500_000)
    x = torch.randn(250)  # 1000 bytes
    assert len(fxopt.calibration.pipeline_batches(itertools.repeat((x,), 400))) == 400
    rows = torch.randn(100, 250)
    assert len(fxopt.calibration.pipeline_batches(rows[i] for i in range(100))) == 100  # views of one tensor
    adj = torch.sparse_coo_tensor(torch.tensor([[0, 1, 2, 3, 4], [4, 3, 2, 1, 0]]), torch.ones(5), (2000, 2000))
    assert len(fxopt.calibration.pipeline_batches((adj, torch.randn(2000, 4)) for _ in range(3))) == 3
    with pytest.raises(FxoptError, match=r"calibration=: the \d+ batches read from a generator hold \d+ bytes"):
        fxopt.calibration.pipeline_batches(torch.randn(250) for _ in range(400))  # new storage each: 400 kB


def test_the_memory_available_is_the_cgroup_limit_where_it_is_lower(tmp_path, monkeypatch):
    """MemAvailable is the machine's: in a container limited to 1 GiB it said 64 GiB (advB B2)."""
    (tmp_path / "meminfo").write_text("MemTotal: 134217728 kB\nMemAvailable: 67108864 kB\n")
    (tmp_path / "memory.max").write_text(f"{2**30}\n")
    (tmp_path / "memory.current").write_text(f"{2**28}\n")
    monkeypatch.setattr(fxopt.calibration, "_MEMINFO", str(tmp_path / "meminfo"))
    monkeypatch.setattr(fxopt.calibration, "_CGROUP", str(tmp_path))
    assert fxopt.calibration.available_memory() == 2**30 - 2**28
    (tmp_path / "memory.max").write_text("max\n")  # no limit: the machine's
    assert fxopt.calibration.available_memory() == 64 * 2**30
