"""fxopt calls from several threads on one model take turns: torch.fx tracing and torch.export
patch process-wide state, and overlapping calls failed with errors that blamed the model."""
import threading

import torch
from torch import nn

import fxopt


def _cnn() -> nn.Module:
    return nn.Sequential(nn.Conv2d(3, 8, 3), nn.BatchNorm2d(8), nn.ReLU(), nn.Flatten(),
                         nn.Linear(8 * 14 * 14, 10)).eval()


def _in_threads(work, count: int) -> list[str]:
    """Run `work(i)` in `count` threads started together; the errors they raised, as text."""
    errors: list[str] = []
    start = threading.Barrier(count)

    def run(i: int) -> None:
        start.wait()
        try:
            work(i)
        except Exception as exc:  # what a caller of fxopt would see
            errors.append(f"thread {i}: {type(exc).__name__}: {exc}")

    threads = [threading.Thread(target=run, args=(i,)) for i in range(count)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    return errors


def test_optimize_in_threads_on_one_model_gives_the_sequential_results():
    torch.manual_seed(0)
    model, x = _cnn(), torch.randn(2, 3, 16, 16)
    expected = fxopt.optimize(model, x, "fuse,dce").module(x)
    results: list[torch.fx.GraphModule] = []

    def work(i: int) -> None:
        mode = "export" if i % 2 else "symbolic"
        results.append(fxopt.optimize(model, x, "fuse,dce", mode=mode, verify_each=True).module)

    for _ in range(2):
        assert _in_threads(work, 6) == []
    # run once every thread is done: a model run while another thread traces is not safe (README)
    for module in results:
        torch.testing.assert_close(module(x), expected)


def test_capture_and_verify_in_threads_take_turns():
    """capture and verify are entry points of their own: they take the lock without optimize."""
    model, x = _cnn(), torch.randn(2, 3, 16, 16)

    def work(i: int) -> None:
        gm = fxopt.capture(model, x, mode="export" if i % 2 else "symbolic")
        fxopt.verify(model, gm, x).raise_if_failed()

    assert _in_threads(work, 6) == []


def test_calibrate_takes_its_turn_too():
    """calibrate runs the model, which another thread's tracing would see patched: it waits
    for the lock the other entry points hold."""
    from fxopt.tracing import FX_LOCK

    model, x = _cnn(), torch.randn(2, 3, 16, 16)
    gm = fxopt.PassManager("insert-observers").run(fxopt.capture(model, (x,)), (x,)).module
    done = threading.Event()
    worker = threading.Thread(target=lambda: (fxopt.calibrate(gm, [(x,)], progress=False), done.set()))
    with FX_LOCK:
        worker.start()
        assert not done.wait(0.5), "calibrate ran while another fxopt call held the lock"
    worker.join(60)
    assert done.is_set()
