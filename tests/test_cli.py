"""The `fxopt` command line: optimize, dump, passes, MODEL loading and errors."""
import re
import sys
import textwrap

import pytest
import torch

from fxopt import cli


@pytest.fixture
def user_model_module(tmp_path, monkeypatch):
    """A `package.module:callable` MODEL on sys.path, as a user would write it."""
    (tmp_path / "my_models.py").write_text(textwrap.dedent("""
        import torch
        def small():
            model = torch.nn.Sequential(torch.nn.Linear(6, 6), torch.nn.Dropout(0.3), torch.nn.ReLU())
            return model, (torch.randn(4, 6),)
        def mlp():
            model = torch.nn.Sequential(torch.nn.Linear(6, 32), torch.nn.ReLU(), torch.nn.Linear(32, 6))
            return model.eval(), (torch.randn(8, 6),)
        def conv():
            model = torch.nn.Sequential(torch.nn.Conv2d(3, 8, 3), torch.nn.ReLU())
            return model.eval(), (torch.randn(2, 3, 8, 8),)
        def no_inputs():
            return torch.nn.Linear(2, 2)
        def boom():
            raise RuntimeError("factory exploded")
        not_callable = 3
        def function_model():
            return (lambda x: x), (torch.randn(2, 8),)
        def four_things():
            return torch.nn.Linear(2, 2), 1, 2, 3
        def hooked():
            model = torch.nn.Sequential(torch.nn.Linear(6, 6), torch.nn.ReLU()).eval()
            model[0].register_forward_hook(lambda mod, i, o: o * 2)
            return model, (torch.randn(4, 6),)
    """))
    monkeypatch.syspath_prepend(str(tmp_path))
    yield "my_models"
    sys.modules.pop("my_models", None)


def test_optimize_user_model_prints_table(user_model_module, capsys):
    rc = cli.main(["optimize", f"{user_model_module}:small", "--pipeline", "remove-noops,dce"])
    out = capsys.readouterr().out
    assert rc == 0
    assert "captured by symbolic" in out
    assert "remove-noops" in out and "nodes 5 -> 4" in out
    assert "PASS exact" in out
    for row in ("latency (median ms)", "parameters", "size (KiB)", "nodes"):
        assert row in out


def test_the_latency_row_times_both_modules_in_turn_and_keeps_the_best(user_model_module, capsys, monkeypatch):
    """Timed once each, back to back, a shared machine's drift showed `-p dce` (the same graph)
    0.3x to 3x as fast as itself: the two are timed in alternating rounds, best median kept."""
    from fxopt import measure

    timed = []
    medians = {"GraphModule": iter([5.0, 2.0, 4.0, 9.0, 3.0, 8.0])}

    def fake_latency(fn, inputs, **kwargs):
        timed.append(fn)
        ms = next(medians["GraphModule"])
        return measure.LatencyStats(ms, ms, ms, runs=20)

    monkeypatch.setattr(measure, "measure_latency", fake_latency)
    rc = cli.main(["optimize", f"{user_model_module}:small", "-p", "dce"])
    out = capsys.readouterr().out
    assert rc == 0
    assert len(timed) == 2 * cli.LATENCY_ROUNDS
    original, optimized = timed[0], timed[1]
    assert original is not optimized and timed == [original, optimized] * cli.LATENCY_ROUNDS
    assert re.search(r"latency \(median ms\)\s+3\.000\s+2\.000\s+0\.67x", out), out   # the best of 5, 4, 3 and 2, 9, 8


def test_optimize_print_ir_after_change_and_time_passes(user_model_module, capsys):
    rc = cli.main(["optimize", f"{user_model_module}:small", "-p", "remove-noops,fold-constants",
                   "--print-ir-after-change", "--time-passes"])
    out = capsys.readouterr().out
    assert rc == 0
    assert "-%" in out and "after remove-noops" in out  # a diff, printed only for the change
    assert "after fold-constants" not in out
    assert "pass timing:" in out


def test_unknown_pass_fails_before_loading(capsys):
    rc = cli.main(["optimize", "does.not.exist:nothing", "-p", "remove-noop"])
    err = capsys.readouterr().err
    assert rc == 2
    assert "unknown pass 'remove-noop'" in err and "did you mean 'remove-noops'" in err


def test_bad_model_spec_errors(user_model_module):
    with pytest.raises(cli.ModelLoadError, match="package.module:callable"):
        cli.load_workload("no_colon_here")
    with pytest.raises(cli.ModelLoadError, match="cannot load MODEL"):
        cli.load_workload("my_models:missing")
    with pytest.raises(cli.ModelLoadError, match="without example inputs"):
        cli.load_workload(f"{user_model_module}:no_inputs")
    with pytest.raises(cli.ModelLoadError, match="names a int, not a callable"):
        cli.load_workload(f"{user_model_module}:not_callable")


@pytest.mark.parametrize("command", ["optimize", "dump"])
@pytest.mark.parametrize("spec, message", [
    ("my_models:missing", "cannot load MODEL 'my_models:missing': module 'my_models' has no attribute 'missing'"),
    ("no_such_module:make", "cannot load MODEL 'no_such_module:make': No module named 'no_such_module'"),
    ("my_models:boom", "cannot load MODEL 'my_models:boom': calling it raised RuntimeError: factory exploded"),
])
def test_a_model_that_cannot_be_loaded_exits_2_in_one_line(user_model_module, capsys, tmp_path, command,
                                                           spec, message):
    """It exited 1, the code of a failed verification (a raising factory with a raw traceback):
    a script could not tell the two apart."""
    extra = ["--out", str(tmp_path / "dump")] if command == "dump" else []
    rc = cli.main([command, spec, "-p", "dce", *extra])
    err = capsys.readouterr().err
    assert rc == 2
    assert err.strip().splitlines()[-1].endswith(f"fxopt: error: {message}")
    assert "Traceback" not in err


@pytest.mark.parametrize("flags, message", [
    (["--threads", "0"], "argument --threads: must be >= 1, got 0"),
    (["--bisect-limit", "-3"], "argument --bisect-limit: must be >= 0, got -3"),
])
def test_bad_counts_are_usage_errors_before_any_work(user_model_module, capsys, flags, message):
    with pytest.raises(SystemExit) as exc:
        cli.main(["optimize", f"{user_model_module}:small", "-p", "dce", *flags])
    assert exc.value.code == 2 and message in capsys.readouterr().err


def test_more_threads_than_cpus_is_a_usage_error_before_any_work(user_model_module, capsys, monkeypatch):
    """--threads 99999 ran the whole pipeline, then OpenMP could not start the threads for the latency
    and the process died of a segmentation fault; any count above the CPUs times their contention."""
    from fxopt import measure

    monkeypatch.setattr(measure, "available_cpus", lambda: 2)
    with pytest.raises(SystemExit) as exc:
        cli.main(["optimize", f"{user_model_module}:boom", "-p", "dce", "--threads", "3"])
    assert exc.value.code == 2
    assert "argument" not in (err := capsys.readouterr().err)  # (not argparse's type error: ours, after parsing)
    assert "--threads 3: this process may use 2 CPUs; give at most 2" in err
    assert "factory exploded" not in err  # MODEL was not loaded
    # the optimize command's usage, as for argparse's own errors (it printed 'fxopt [-h] {optimize,...}')
    assert err.startswith("usage: fxopt optimize [-h]") and "fxopt optimize: error: --threads 3" in err


def test_an_output_directory_that_is_a_file_is_a_usage_error(user_model_module, capsys, tmp_path):
    a_file = tmp_path / "taken"
    a_file.write_text("")
    for command in (["optimize", f"{user_model_module}:small", "--dump", str(a_file)],
                    ["dump", f"{user_model_module}:small", "--out", str(a_file)]):
        with pytest.raises(SystemExit) as exc:
            cli.main(command)
        assert exc.value.code == 2 and "exists and is not a directory" in capsys.readouterr().err


def test_passes_lists_builtin_passes_with_option_defaults(capsys):
    assert cli.main(["passes"]) == 0
    out = capsys.readouterr().out
    assert "dce\n" in out and "fold-constants{max_growth: float = 4.0}" in out
    assert "quantize{backend: x86|reference|cuda = x86, " in out
    assert "target_sqnr: float or none = none" in out and "skip: list of str = []" in out


def test_bundled_example_is_the_default_model():
    work = cli.load_workload(None)
    assert work.name == "bundled digits CNN"
    assert work.calibration and work.accuracy is not None
    assert work.accuracy(work.model) > 90.0
    assert isinstance(work.example_inputs[0], torch.Tensor)


def test_optimize_saves_the_result_for_fxopt_load(user_model_module, capsys, tmp_path):
    path = tmp_path / "small.fxopt.pt"
    rc = cli.main(["optimize", f"{user_model_module}:small", "-p", "remove-noops", "--mode", "export",
                   "--save", str(path)])
    assert rc == 0 and f"saved {path}" in capsys.readouterr().out
    import fxopt

    restored = fxopt.load(path)
    assert not any(n.target == "dropout" or "dropout" in str(n.target) for n in restored.graph.nodes)
    assert restored(torch.randn(3, 6)).shape == (3, 6)
    with pytest.raises(SystemExit) as exc:
        cli.main(["optimize", f"{user_model_module}:small", "--save", str(tmp_path / "missing" / "m.pt")])
    assert exc.value.code == 2 and "does not exist" in capsys.readouterr().err


def test_a_result_save_refuses_fails_before_the_measuring(user_model_module, capsys, tmp_path, monkeypatch):
    """`--save` of a lowered module: the refusal came after minutes of latency measuring."""
    monkeypatch.setattr(cli, "_measure", lambda *a: pytest.fail("measured before saving"))
    rc = cli.main(["optimize", f"{user_model_module}:hooked", "-p", "dce", "--mode", "symbolic",
                   "--save", str(tmp_path / "m.pt")])
    assert rc == 2 and "calls a Linear with a forward hook" in capsys.readouterr().err
    assert not (tmp_path / "m.pt").exists()


def test_model_module_in_the_current_directory_loads(tmp_path, monkeypatch, capsys):
    """`fxopt optimize mymodel:make` finds ./mymodel.py, as `python -m` would."""
    (tmp_path / "cwd_model.py").write_text(textwrap.dedent("""
        import torch
        def make():
            return torch.nn.Sequential(torch.nn.Linear(3, 3)).eval(), (torch.randn(2, 3),)
    """))
    monkeypatch.chdir(tmp_path)
    # as under the installed `fxopt` script: nothing on sys.path stands for the current directory
    monkeypatch.setattr(sys, "path", [p for p in sys.path if p not in ("", ".", str(tmp_path))])
    path_before = list(sys.path)
    try:
        assert cli.main(["optimize", "cwd_model:make", "-p", "dce"]) == 0
    finally:
        sys.modules.pop("cwd_model", None)
    assert "model: cwd_model:make" in capsys.readouterr().out
    assert sys.path == path_before  # the directory was on the path only while importing


def test_quantize_without_calibration_says_how_to_give_it_on_the_command_line(user_model_module, capsys):
    rc = cli.main(["optimize", f"{user_model_module}:mlp", "-p", "quantize"])
    err = capsys.readouterr().err
    assert rc == 2
    assert "fxopt: error: pass 'quantize' failed" in err and "needs calibration data" in err
    assert (f"fxopt: hint: the command line reads calibration batches from MODEL: make '{user_model_module}:mlp' "
            "return (model, example_inputs, calibration_batches)") in err
    assert "or choose a pipeline without 'quantize' with -p" in err


def test_a_pass_that_fails_without_calibration_for_another_reason_gets_no_hint(user_model_module, capsys):
    rc = cli.main(["optimize", f"{user_model_module}:mlp", "-p", "lower-int8"])  # no observers
    err = capsys.readouterr().err
    assert rc == 2 and "found no observers" in err
    assert "hint:" not in err


def test_dump_prints_the_partial_index_when_a_pass_fails(user_model_module, capsys, tmp_path):
    out = tmp_path / "dump"
    rc = cli.main(["dump", f"{user_model_module}:mlp", "-p", "remove-noops,quantize", "--out", str(out)])
    err = capsys.readouterr().err
    assert rc == 2 and "fxopt: hint: the command line reads calibration batches" in err
    index = out / "index.html"
    assert f"wrote {index} (the steps before the failure, and the error)" in err
    assert (out / "01-remove-noops.txt").exists()
    assert "needs calibration data" in index.read_text()


def test_optimize_dump_writes_the_error_into_the_partial_index(user_model_module, capsys, tmp_path):
    out = tmp_path / "dump"
    rc = cli.main(["optimize", f"{user_model_module}:mlp", "-p", "remove-noops,quantize", "--dump", str(out)])
    assert rc == 2
    assert f"wrote {out / 'index.html'}" in capsys.readouterr().err
    assert "needs calibration data" in (out / "index.html").read_text()


def test_a_lossy_result_is_reported_as_not_checked(user_model_module, capsys):
    rc = cli.main(["optimize", f"{user_model_module}:mlp", "-p", "prune{ratio=0.5}"])
    out = capsys.readouterr().out
    assert rc == 0
    row = next(line for line in out.splitlines() if line.startswith("verification (cpu)"))
    assert "lossy (not checked)" in row and "SQNR" in row and ", cos " in row
    assert "PASS" not in row


def test_a_result_that_raises_when_run_gets_its_verdict_not_a_traceback(user_model_module, capsys):
    """A miscompiled result can fail verification by raising; measuring it then raised too,
    and the CLI died with a traceback instead of the FAIL line and exit code 1."""
    import dataclasses

    import fxopt

    calls = []

    def fails_after_the_first_call(x):  # the manager's run of the pass's result works; later ones raise
        calls.append(1)
        if len(calls) > 1:
            raise RuntimeError("sabotaged")
        return x

    @dataclasses.dataclass
    class Sabotage(fxopt.Pass):
        name = "sabotage-cli-test"

        def run(self, gm, ctx):
            out = next(n for n in gm.graph.nodes if n.op == "output")
            with gm.graph.inserting_before(out):
                bad = gm.graph.call_function(fails_after_the_first_call, (out.args[0],))
            out.args = (bad,)
            gm.recompile()
            return fxopt.PassResult(gm, modified=True)

    fxopt.register_pass(Sabotage)
    try:
        rc = cli.main(["optimize", f"{user_model_module}:mlp", "-p", "sabotage-cli-test"])
    finally:
        fxopt.unregister_pass("sabotage-cli-test")
    out = capsys.readouterr().out
    assert rc == 1
    assert "FAIL" in out and "the optimized module raised while it was measured: RuntimeError" in out


@pytest.mark.parametrize("third, message", [
    ("5", "MODEL 'cal_models:make' returned calibration: got a int, not a sequence of batches"),
    ("torch.randn(4, 6)", "MODEL 'cal_models:make' returned calibration: got one Tensor of shape (4, 6), which "
                          "would be read as 4 batches of its rows"),
])
def test_calibration_that_is_no_sequence_of_batches_exits_2_in_one_line(tmp_path, monkeypatch, capsys, third, message):
    """A non-iterable third item crashed with a traceback (exit 1, a failed verification's code);
    one tensor was split into rows and calibrated on, which fxopt.optimize refuses."""
    (tmp_path / "cal_models.py").write_text(textwrap.dedent(f"""
        import torch
        def make():
            return torch.nn.Sequential(torch.nn.Linear(6, 6)).eval(), (torch.randn(4, 6),), {third}
    """))
    monkeypatch.syspath_prepend(str(tmp_path))
    try:
        rc = cli.main(["optimize", "cal_models:make", "-p", "quantize"])
    finally:
        sys.modules.pop("cal_models", None)
    err = capsys.readouterr().err
    assert rc == 2 and message in err.strip().splitlines()[-1] and "Traceback" not in err


def test_a_model_returning_none_for_calibration_has_none(tmp_path, monkeypatch):
    (tmp_path / "none_cal.py").write_text(textwrap.dedent("""
        import torch
        def make():
            return torch.nn.Linear(6, 6).eval(), (torch.randn(4, 6),), None
    """))
    monkeypatch.syspath_prepend(str(tmp_path))
    try:
        assert cli.load_workload("none_cal:make").calibration is None
    finally:
        sys.modules.pop("none_cal", None)


def test_save_to_an_unwritable_folder_fails_before_the_run(user_model_module, capsys, unwritable_folder, monkeypatch):
    """It ran the whole pipeline, then ended in torch's raw traceback with exit code 1."""
    monkeypatch.setattr(cli, "load_workload", lambda *a: pytest.fail("loaded the model before checking --save"))
    path = unwritable_folder / "m.pt"
    with pytest.raises(SystemExit) as exc:
        cli.main(["optimize", f"{user_model_module}:small", "--save", str(path)])
    err = capsys.readouterr().err
    assert exc.value.code == 2 and f"--save {path}: cannot write the file (Permission denied)" in err
    assert "Traceback" not in err


def test_a_model_factory_returning_no_module_says_which_item_is_wrong(user_model_module):
    """A function returned as the model read 'must return (model, example_inputs)', which it did."""
    with pytest.raises(cli.ModelLoadError, match=r"returned a function as its model, which is no torch.nn.Module"):
        cli.load_workload(f"{user_model_module}:function_model")
    with pytest.raises(cli.ModelLoadError, match=r"must return \(model, example_inputs\[, calibration\]\), got a "
                                                 r"tuple of 4 items"):
        cli.load_workload(f"{user_model_module}:four_things")


@pytest.mark.parametrize("spec", ["./my_models.py:small", "my_models.py:small", "sub/my_models:small"])
def test_a_file_path_as_model_says_to_name_the_module(spec, capsys):
    """`./mymods.py:good` failed with importlib's "the 'package' argument is required ..."."""
    rc = cli.main(["optimize", spec])
    err = capsys.readouterr().err
    assert rc == 2
    assert f"MODEL '{spec}' names a file; MODEL names a module, as Python imports it: 'my_models:small'" in err


def test_no_progress_bar_when_stderr_is_no_terminal(user_model_module, capsys):
    """A log file got the bar's fragments ("fxopt:   0%|") on the line before the error."""
    rc = cli.main(["optimize", f"{user_model_module}:boom"])
    err = capsys.readouterr().err
    assert rc == 2 and "factory exploded" in err
    assert "fxopt:" not in err.replace("fxopt: error", "").replace("fxopt: hint", "") and "%|" not in err


@pytest.mark.parametrize("pipeline, fragment", [
    ("fuse,lower-cpu", r"--save cannot store what lower-cpu packs .*\(-p 'fuse' --save FILE\)"),
    ("fuse,insert-observers", "--save cannot store insert-observers' observers"),
])
def test_save_of_a_pipeline_whose_result_cannot_be_saved_fails_before_it_runs(
        user_model_module, pipeline, fragment, tmp_path, capsys, monkeypatch):
    """The pipeline ran (minutes for a big model), then save refused, and no table was printed."""
    from fxopt import api

    monkeypatch.setattr(api, "optimize", lambda *a, **k: pytest.fail("ran the pipeline"))
    rc = cli.main(["optimize", f"{user_model_module}:conv", "-p", pipeline, "--save", str(tmp_path / "m.pt")])
    assert rc == 2
    assert re.search(fragment, capsys.readouterr().err)


def test_save_after_observers_are_lowered_is_not_refused_up_front(user_model_module, tmp_path):
    assert cli._check_savable_pipeline(["insert-observers", "lower-int8"]) is None
    assert cli._check_savable_pipeline(["fuse", "quantize"]) is None


def test_verify_each_that_stops_at_a_failing_pass_exits_1_like_a_failed_final_check(user_model_module, capsys):
    """The same numerically broken result exited 1 without --verify-each and 2 ("a pass failed") with it."""
    import dataclasses

    import fxopt

    @dataclasses.dataclass
    class Scramble(fxopt.Pass):
        name = "test-cli-scramble"

        def run(self, gm, ctx):
            for node in list(gm.graph.find_nodes(op="output")):
                with gm.graph.inserting_before(node):
                    doubled = gm.graph.call_function(torch.mul, (node.args[0], 2.0))
                node.args = (doubled,)
            return fxopt.PassResult(gm, modified=True)

    fxopt.register_pass(Scramble)
    try:
        args = ["optimize", f"{user_model_module}:mlp", "-p", "dce,test-cli-scramble"]
        assert cli.main(args) == 1
        assert cli.main(args + ["--verify-each"]) == 1
        assert "verification failed after the pass" in capsys.readouterr().err
        assert cli.main(["optimize", f"{user_model_module}:mlp", "-p", "dce", "--verify-each"]) == 0
    finally:
        fxopt.unregister_pass("test-cli-scramble")


def test_a_pass_the_model_module_registers_is_known_to_the_pipeline(tmp_path, monkeypatch, capsys):
    """The pipeline was parsed before MODEL's module was imported: its own pass was 'unknown'."""
    import fxopt

    (tmp_path / "with_pass.py").write_text(textwrap.dedent("""
        import dataclasses, torch, fxopt

        @fxopt.register_pass
        @dataclasses.dataclass
        class Tag(fxopt.Pass):
            name = "test-cli-own-pass"
            def run(self, gm, ctx):
                return fxopt.PassResult(gm, modified=False, stats={"ran": 1})

        def model():
            return torch.nn.Sequential(torch.nn.Linear(4, 4)).eval(), (torch.randn(2, 4),)
    """))
    monkeypatch.syspath_prepend(str(tmp_path))
    try:
        assert cli.main(["optimize", "with_pass:model", "-p", "dce,test-cli-own-pass"]) == 0
        assert "test-cli-own-pass" in capsys.readouterr().out
        assert cli.main(["optimize", "with_pass:model", "-p", "test-cli-own-pas"]) == 2
        err = capsys.readouterr().err
        assert "unknown pass 'test-cli-own-pas' (did you mean 'test-cli-own-pass'?)" in err
        assert "those MODEL's module 'with_pass' registers when imported" in err
    finally:
        fxopt.unregister_pass("test-cli-own-pass")
        sys.modules.pop("with_pass", None)


class _ScoresAndTopIndex(torch.nn.Module):
    def __init__(self, shift: int = 0):
        super().__init__()
        self.shift = shift

    def forward(self, x):
        scores = x * 2
        return scores, scores.argmax(-1) + self.shift


def test_the_table_names_an_integer_output_that_differs_beside_the_float_outputs_sqnr():
    """A FAIL an index output made (93% of topk indices flipped) read `FAIL int8  SQNR 22.5 dB`, that SQNR
    the index tensor's own (quant F1); the SQNR is the float outputs' and the index output is named."""
    import types

    import fxopt

    x = torch.randn(16, 5)
    report = fxopt.verify(_ScoresAndTopIndex(), _ScoresAndTopIndex(shift=1), x, tolerance="int8")
    res = types.SimpleNamespace(verification_by_device={"cpu": report})
    row = next(line for line in cli.format_table({}, {}, res).splitlines() if line.startswith("verification (cpu)"))
    assert row.split()[2:] == ["FAIL", "int8", "SQNR", "inf", "dB;", "integer", "output", "[1]:", "16/16", "differ"]


def test_a_not_checked_row_names_an_integer_output_that_differs_too():
    """A lossy pipeline's row read 'SQNR inf dB, cos 1.00' while every class index was wrong (advB F10)."""
    import types

    import fxopt

    x = torch.randn(16, 5)
    report = fxopt.verify(_ScoresAndTopIndex(), _ScoresAndTopIndex(shift=1), x, tolerance="lossy")
    res = types.SimpleNamespace(verification_by_device={"cpu": report})
    row = next(line for line in cli.format_table({}, {}, res).splitlines() if line.startswith("verification (cpu)"))
    assert "lossy (not checked)" in row and row.endswith("; integer output [1]: 16/16 differ")
