"""Pipeline text: parse/format round trip and every error a user can make."""
from __future__ import annotations

import dataclasses
import enum
from typing import Literal

import pytest

import fxopt
from fxopt import Pass, PassResult, PipelineError, format_pipeline, parse_pipeline
from fxopt.pipeline import split_pipeline


class Mode(enum.Enum):
    FAST = "fast"
    SLOW = "slow"


@dataclasses.dataclass
class Tunable(Pass):
    name = "test-tunable"
    ratio: float = 0.5
    steps: int = 3
    granularity: Literal["channel", "tensor"] = "channel"
    enabled: bool = True
    ignore: tuple[str, ...] = ()
    label: str = "x"
    limit: int | None = None
    mode: Mode = Mode.FAST

    def run(self, gm, ctx):
        return PassResult(gm, modified=False)


@pytest.fixture(autouse=True)
def registered():
    fxopt.register_pass(Tunable)
    yield
    fxopt.unregister_pass(Tunable.name)


def test_registered_pass_is_available_and_unregister_removes_it():
    assert "test-tunable" in fxopt.available_passes()
    assert fxopt.get_pass("test-tunable") is Tunable
    fxopt.unregister_pass("test-tunable")
    assert "test-tunable" not in fxopt.available_passes()
    with pytest.raises(PipelineError):
        fxopt.get_pass("test-tunable")


def test_builtin_passes_come_from_entry_points():
    names = fxopt.available_passes()
    assert {"dce", "remove-noops", "fold-constants"} <= set(names)
    assert fxopt.get_pass("dce").name == "dce"


def test_an_installed_pass_that_fails_to_load_is_named_with_its_entry_point(monkeypatch):
    """A third-party pass whose module fails to import came out of a pipeline as a bare
    ModuleNotFoundError, not saying which pass or package it belonged to."""
    from importlib.metadata import EntryPoint

    import fxopt.registry as registry

    broken = EntryPoint("broken-pass", "no_such_fxopt_plugin.passes:Broken", registry.ENTRY_POINT_GROUP)
    monkeypatch.setattr(registry, "_entry_points", {**registry._installed(), "broken-pass": broken})
    with pytest.raises(PipelineError, match=r"pass 'broken-pass' \(entry point no_such_fxopt_plugin.passes:Broken\) "
                                            r"cannot be loaded: ModuleNotFoundError: No module named "
                                            r"'no_such_fxopt_plugin'"):
        fxopt.PassManager("fuse,broken-pass")


def test_parse_options_with_types():
    (p,) = parse_pipeline("test-tunable{ratio=0.25, steps=7, granularity=tensor, enabled=false, "
                          "ignore=[fc,head], limit=none, mode=slow}")
    assert p == Tunable(ratio=0.25, steps=7, granularity="tensor", enabled=False,
                        ignore=("fc", "head"), limit=None, mode=Mode.SLOW)
    (q,) = parse_pipeline("test-tunable{limit=4}")
    assert q.limit == 4 and isinstance(q.limit, int)


@pytest.mark.parametrize("text", [
    "test-tunable",
    "test-tunable{ratio=0.25,steps=7}",
    "test-tunable{granularity=tensor,enabled=false,ignore=[fc,head],label=abc,limit=2,mode=slow},dce",
    "dce,test-tunable{ignore=[a]},remove-noops",
])
def test_round_trip(text):
    passes = parse_pipeline(text)
    printed = format_pipeline(passes)
    again = parse_pipeline(printed)
    assert again == passes
    assert format_pipeline(again) == printed


def test_round_trip_from_objects():
    passes = [Tunable(ratio=0.1, ignore=("a", "b"), mode=Mode.SLOW), fxopt.get_pass("dce")()]
    text = format_pipeline(passes)
    assert text == "test-tunable{ratio=0.1,ignore=[a,b],mode=slow},dce"
    assert parse_pipeline(text) == passes
    assert str(passes[0]) == "test-tunable{ratio=0.1,ignore=[a,b],mode=slow}"


@pytest.mark.parametrize("options", [
    dict(label="a,b"), dict(label="{x}"), dict(label=" padded "), dict(label="a=b"), dict(label=""),
    dict(label="none"), dict(ignore=("a;b", "c")), dict(ignore=("a,b",)), dict(ignore=("",)), dict(label='say "hi"'),
])
def test_text_options_round_trip_through_quotes(options):
    """Pipeline text quotes what it would otherwise read as syntax, or as None: a label
    'a,b' used to print bare and fail to parse; 'none' came back as None."""
    p = Tunable(**options)
    text = format_pipeline([p])
    assert parse_pipeline(text) == [p], text


def test_quoted_text_in_pipeline_text_is_that_text():
    (p,) = parse_pipeline("test-tunable{label='a,b;c', ignore=['x,y', z]}")
    assert p.label == "a,b;c" and p.ignore == ("x,y", "z")
    with pytest.raises(PipelineError, match="missing closing '"):
        parse_pipeline("test-tunable{label='open}")


def test_default_options_are_not_printed():
    assert format_pipeline(parse_pipeline("test-tunable{ratio=0.5,steps=3}")) == "test-tunable"


def test_mixed_list_of_objects_and_text():
    passes = parse_pipeline([Tunable(steps=1), "dce,remove-noops"])
    assert [p.name for p in passes] == ["test-tunable", "dce", "remove-noops"]
    with pytest.raises(PipelineError, match="Pass objects or text"):
        parse_pipeline([42])


def test_whitespace_and_empty_items():
    assert [n for n, _ in split_pipeline(" dce , remove-noops, ")] == ["dce", "remove-noops"]   # a trailing comma
    assert [n for n, _ in split_pipeline(", dce, remove-noops")] == ["dce", "remove-noops"]   # a leading one too
    assert split_pipeline("") == [] and split_pipeline("  ") == []
    with pytest.raises(PipelineError, match=r"empty item at position 2 of pipeline 'fuse,,dce' \(two commas"):
        split_pipeline("fuse,,dce")   # was dropped silently


@pytest.mark.parametrize("text", [",", " , ", ",,"])
def test_commas_without_a_pass_are_refused_not_read_as_an_empty_pipeline(text):
    """',' ran an empty pipeline (capture and verify, nothing optimized) while 'fuse,,dce' was
    refused (api tester): a pipeline of commas alone is a typo too; '' stays the empty pipeline."""
    with pytest.raises(PipelineError, match=r"has commas and no pass: for an empty pipeline \(capture and verify "
                                            r"only\) give ''"):
        split_pipeline(text)
    assert parse_pipeline("") == [] and [p.name for p in parse_pipeline("dce,")] == ["dce"]


@pytest.mark.parametrize("text, message", [
    ("test-tunable{ignore=[a,[b]]}", r"pass 'test-tunable' option 'ignore': an item of \[a,\[b\]\] holds a bracket: "
                                     r"lists do not nest; quote an item that holds one"),
    ("test-tunable{ratio=1e400}", r"pass 'test-tunable' option 'ratio': '1e400' is beyond a float's range \(it reads "
                                  r"as an infinity\); write inf where that is meant"),
])
def test_a_nested_list_or_a_float_past_its_range_is_refused(text, message):
    """[a,[b]] read as ['a', '[b]'] and 1e400 as inf, silently (api item 3); quoted, a bracket is text, and inf
    written as such is inf."""
    with pytest.raises(PipelineError, match=message):
        parse_pipeline(text)
    (quoted,) = parse_pipeline("test-tunable{ignore=[a,'[b]'],ratio=-inf}")
    assert quoted.ignore == ("a", "[b]") and quoted.ratio == float("-inf")


def test_cosmetic_errors_say_what_to_do():
    with pytest.raises(PipelineError, match=r"pass 'dce' has no option 'x'; it takes no options$"):
        parse_pipeline("dce{x=1}")
    with pytest.raises(PipelineError, match=r"option 'lr' must be a finite number > 0, got -1.0"):
        parse_pipeline("distill{lr=-1}")   # at parse time, like epochs, not after capture
    import torch
    model, x = torch.nn.Sequential(torch.nn.Linear(4, 4)).eval(), torch.randn(2, 4)
    with pytest.raises(TypeError, match=r"PassManager.run takes a torch.fx.GraphModule, got Sequential: capture "
                                        r"the model first .*fxopt.optimize"):
        fxopt.PassManager("dce").run(model, (x,))
    res = fxopt.optimize(model, x, "remove-noops,dce", bisect_limit=1)
    assert res.pipeline == res.module.meta["fxopt"]["pipeline"] == "remove-noops"   # what ran


def test_unknown_pass_lists_valid_ones_and_suggests():
    with pytest.raises(PipelineError) as info:
        parse_pipeline("dce,test-tunabel{ratio=0.2}")
    text = str(info.value)
    assert "unknown pass 'test-tunabel'" in text
    assert "did you mean 'test-tunable'" in text
    for name in ("dce", "remove-noops", "fold-constants", "test-tunable"):
        assert name in text


def test_unknown_option_lists_valid_options():
    with pytest.raises(PipelineError) as info:
        parse_pipeline("test-tunable{ration=0.2}")
    text = str(info.value)
    assert "test-tunable" in text and "'ration'" in text
    assert "did you mean 'ratio'" in text
    for option in ("ratio", "steps", "granularity", "enabled", "ignore"):
        assert option in text


def test_int_expected_names_the_option():
    with pytest.raises(PipelineError) as info:
        parse_pipeline("test-tunable{steps=2.5}")
    text = str(info.value)
    assert "'steps'" in text and "int" in text and "2.5" in text


def test_float_expected_names_the_option():
    with pytest.raises(PipelineError, match="option 'ratio'.*float"):
        parse_pipeline("test-tunable{ratio=half}")


def test_semicolon_separated_options_get_a_hint():
    with pytest.raises(PipelineError, match=r"option 'ratio'.*separated by ','"):
        parse_pipeline("test-tunable{ratio=0.5;steps=2}")


def test_literal_choice_names_option_and_choices():
    with pytest.raises(PipelineError) as info:
        parse_pipeline("test-tunable{granularity=row}")
    text = str(info.value)
    assert "'granularity'" in text and "'row'" in text and "channel" in text and "tensor" in text


def test_bool_and_enum_errors():
    with pytest.raises(PipelineError, match="option 'enabled'.*boolean"):
        parse_pipeline("test-tunable{enabled=maybe}")
    with pytest.raises(PipelineError, match="option 'mode'.*fast.*slow"):
        parse_pipeline("test-tunable{mode=medium}")


def test_python_values_are_checked_too():
    with pytest.raises(PipelineError, match="option 'steps'"):
        Tunable.from_options({"steps": True})
    assert Tunable.from_options({"steps": 4, "ratio": 1}).ratio == 1.0


@pytest.mark.parametrize("options, message", [
    (dict(enabled="false"), r"pass 'test-tunable' option 'enabled' must be True or False, got 'false' \(str\)"),
    (dict(enabled=0), r"option 'enabled' must be True or False, got 0 \(int\)"),
    (dict(steps=True), r"option 'steps' must be an integer, got True"),
    (dict(ratio="0.5"), r"option 'ratio' must be a number, got '0.5'"),
    (dict(granularity="row"), r"option 'granularity' must be one of: 'channel', 'tensor', got 'row'"),
    (dict(ignore=("fc", 3)), r"option 'ignore' must be a list of str"),
    (dict(limit="2"), r"option 'limit' must be an integer or None, got '2'"),
])
def test_a_pass_built_in_python_is_held_to_its_option_types(options, message):
    """Fuse(fold_bn="false") was truthy: it folded, and the recorded text said fold_bn=false."""
    with pytest.raises(ValueError, match=message):
        Tunable(**options)
    assert Tunable(enabled=False, steps=2, ratio=1, limit=None, mode="slow").enabled is False


def test_a_builtin_pass_refuses_a_text_bool_even_with_its_own_post_init():
    with pytest.raises(ValueError, match=r"pass 'fuse' option 'fold_bn' must be True or False, got 'false'"):
        fxopt.get_pass("fuse")(fold_bn="false")
    with pytest.raises(ValueError, match=r"pass 'distill' option 'epochs' must be an integer, got '3'"):
        fxopt.get_pass("distill")(epochs="3")   # not distill's own range check's TypeError
    assert fxopt.get_pass("fuse")(fold_bn=False).fold_bn is False


@pytest.mark.parametrize("text, fragment", [
    ("test-tunable{ratio=0.2", "missing '}'"),
    ("test-tunable{ignore=[a,b}", "'}' before the ']' that closes an open '['"),
    ("test-tunable ratio=0.2}", "unbalanced '}'"),
    ("test-tunable{ignore=[a,b]", "missing '}'"),
    ("test-tunable{ratio}", "needs key=value"),
    ("test-tunable{ratio=1}x", "must end with '}'"),
    ("dce,bad name!", "bad pass name"),
])
def test_syntax_errors(text, fragment):
    with pytest.raises(PipelineError) as info:
        parse_pipeline(text)
    assert fragment in str(info.value)


def test_whitespace_of_any_kind_around_names_options_and_values_is_ignored():
    passes = parse_pipeline("\tdce ,\n test-tunable { ratio = 0.25 ,\tsteps =\u00a07 } , ")
    assert passes == [fxopt.get_pass("dce")(), Tunable(ratio=0.25, steps=7)]


def test_repeated_passes_run_each_time_with_their_own_options():
    passes = parse_pipeline("dce,test-tunable{steps=1},dce,test-tunable{steps=2}")
    assert [p.name for p in passes] == ["dce", "test-tunable", "dce", "test-tunable"]
    assert [passes[1].steps, passes[3].steps] == [1, 2]
    assert format_pipeline(passes) == "dce,test-tunable{steps=1},dce,test-tunable{steps=2}"


@pytest.mark.parametrize("text, value", [
    ("ratio=-0.25", -0.25), ("ratio=2.5e-1", 0.25), ("ratio=+.5", 0.5), ("ratio=1E-3", 0.001),
    ("steps=-3", -3), ("steps=4e1", 40), ("steps=8.0", 8), ("steps=1_000", 1000), ("limit=-1", -1),
    ("limit=2e3", 2000),
])
def test_numbers_in_every_notation(text, value):
    """An int option took `4e6` (lower-cpu's min_macs of 4 M) as 'expected int'."""
    (p,) = parse_pipeline(f"test-tunable{{{text}}}")
    got = getattr(p, text.split("=")[0])
    assert got == value and type(got) is type(value)
    assert parse_pipeline(format_pipeline([p])) == [p]


@pytest.mark.parametrize("value", ["2.5", "1e", "1e-1", "1e999999999", "nan", "inf", "0x10"])
def test_an_int_option_refuses_text_that_is_no_integer(value):
    with pytest.raises(PipelineError, match=f"option 'steps': expected int, got '{value}'"):
        parse_pipeline(f"test-tunable{{steps={value}}}")


def test_an_empty_option_is_refused_like_an_empty_step_but_a_trailing_comma_is_not():
    assert parse_pipeline("test-tunable{steps=2,}") == [Tunable(steps=2)]
    with pytest.raises(PipelineError, match=r"empty option at position 2 \(two commas in a row\?\)"):
        parse_pipeline("test-tunable{steps=2,,ratio=0.1}")   # was dropped silently


def test_a_decimal_comma_gets_a_hint():
    with pytest.raises(PipelineError, match=r"option '5' needs key=value \(a decimal comma\? .* 0.5\)"):
        parse_pipeline("test-tunable{ratio=0,5}")


def test_a_second_group_of_options_is_named():
    with pytest.raises(PipelineError, match=r"a pass takes one \{\.\.\.\} of options"):
        parse_pipeline("test-tunable{ratio=0.5}{steps=2}")   # was "unbalanced '}'"


@pytest.mark.parametrize("text, fragment", [
    ("dce，remove-noops", "'，' (U+FF0C FULLWIDTH COMMA)"),
    ("dce\u200b,remove-noops", "'\\u200b' (U+200B ZERO WIDTH SPACE)"),
    ("dce\tremove-noops", "'\\t' (U+0009 TAB)"),
])
def test_a_bad_pass_name_names_the_character(text, fragment):
    """An invisible or look-alike character made 'bad pass name' unreadable."""
    with pytest.raises(PipelineError) as info:
        parse_pipeline(text)
    assert fragment in str(info.value) and "separate passes with ','" in str(info.value)


def test_unicode_option_text_round_trips_and_unicode_names_get_suggestions():
    p = Tunable(label="café", ignore=("块.0", "naïve"))
    assert parse_pipeline(format_pipeline([p])) == [p]
    with pytest.raises(PipelineError, match="unknown pass 'dcé' \\(did you mean 'dce'\\?\\)"):
        parse_pipeline("dcé")


def test_a_name_in_another_case_is_suggested():
    with pytest.raises(PipelineError, match=r"unknown pass 'DCE' \(did you mean 'dce'\?\)"):
        parse_pipeline("DCE")
    with pytest.raises(PipelineError, match=r"no option 'Ratio' \(did you mean 'ratio'\?\); valid: enabled"):
        parse_pipeline("test-tunable{Ratio=0.1}")


@pytest.mark.parametrize("text, fragment", [
    ("test-tunable{=1}", "option '=1' has no name before '='"),
    ("{ratio=1}", "a pass name is missing"),
    ("test-tunable{label=it's}", "put text that holds one in \" marks: \"it's\""),
])
def test_more_syntax_errors_say_what_is_wrong(text, fragment):
    with pytest.raises(PipelineError) as info:
        parse_pipeline(text)
    assert fragment in str(info.value)


def test_register_rejects_non_pass_and_nameless():
    with pytest.raises(TypeError):
        fxopt.register_pass(int)

    @dataclasses.dataclass
    class Nameless(Pass):
        def run(self, gm, ctx):
            return PassResult(gm, False)

    with pytest.raises(ValueError, match="name"):
        fxopt.register_pass(Nameless)


@pytest.mark.parametrize("name", ["my pass", "a,b", "x{y}"])
def test_register_refuses_a_name_pipeline_text_cannot_spell(name):
    cls = dataclasses.make_dataclass("Odd", [], bases=(Pass,), namespace={"name": name, "run": lambda s, gm, ctx: None})
    with pytest.raises(PipelineError, match=r"pipeline text cannot spell Odd's name"):
        fxopt.register_pass(cls)
    assert name not in fxopt.available_passes()


def test_register_refuses_an_unknown_tolerance_before_any_pass_runs():
    cls = dataclasses.make_dataclass("Loose", [], bases=(Pass,),
                                     namespace={"name": "test-loose", "tolerance": "fp16", "run": lambda s, gm, ctx: None})
    with pytest.raises(PipelineError, match=r"Loose.tolerance: .*unknown tolerance 'fp16'; valid: exact, float, int8, lossy"):
        fxopt.register_pass(cls)


def test_option_specs_are_readable():
    specs = Tunable.option_specs()
    assert specs["granularity"] == "channel|tensor"
    assert specs["ignore"] == "list of str"
    assert specs["steps"] == "int"


def test_an_option_given_twice_is_an_error_not_a_silent_override():
    with pytest.raises(PipelineError, match="option 'ratio' is given twice"):
        parse_pipeline("prune{ratio=0.5,ratio=0.2}")


def test_a_pipeline_that_is_neither_text_nor_a_list_is_named():
    with pytest.raises(PipelineError, match="got None"):
        parse_pipeline(None)


def test_an_installed_pass_is_replaced_only_when_asked():
    """A pipeline naming `dce` silently ran whatever was registered last under that name."""
    @dataclasses.dataclass
    class MyDce(Pass):
        name = "dce"

        def run(self, gm, ctx):
            return PassResult(gm, modified=False)

    builtin = fxopt.get_pass("dce")
    with pytest.raises(PipelineError, match=r"'dce' is the name of an installed pass \(fxopt.passes.cleanup:"
                                            r"DeadCodeElimination\); pass replace=True to run MyDce in its place"):
        fxopt.register_pass(MyDce)
    assert fxopt.get_pass("dce") is builtin
    try:
        assert fxopt.register_pass(replace=True)(MyDce) is MyDce  # the decorator form
        assert type(parse_pipeline("dce")[0]) is MyDce
    finally:
        fxopt.unregister_pass("dce")
    assert fxopt.get_pass("dce") is builtin  # unregistering brings the installed pass back


def test_registering_a_runtime_name_again_replaces_it():
    @dataclasses.dataclass
    class Tunable2(Tunable):  # a notebook cell run again defines the class anew
        pass

    assert fxopt.register_pass(Tunable2) is Tunable2 and fxopt.get_pass("test-tunable") is Tunable2


@pytest.mark.parametrize("value", ["-1", "0"])
def test_fold_constants_refuses_a_growth_bound_that_is_not_positive(value):
    with pytest.raises(fxopt.PipelineError, match=r"pass 'fold-constants': option 'max_growth' must be > 0"):
        parse_pipeline(f"fold-constants{{max_growth={value}}}")


@dataclasses.dataclass
class KeyOrIndex(Pass):
    name = "test-key-or-index"
    output: int | str | None = None

    def run(self, gm, ctx):
        return PassResult(gm, modified=False)


def test_quoted_text_for_an_int_or_text_option_stays_text_and_round_trips():
    """`distill{output='1'}` read the quoted text as the int 1; printed, the text '1' came back an int."""
    assert KeyOrIndex.from_options({"output": "'1'"}).output == "1"
    assert KeyOrIndex.from_options({"output": "1"}).output == 1
    for value in ("1", "2.5", "1e3", 1, "logits"):
        p = KeyOrIndex(output=value)
        assert KeyOrIndex.from_options(dict([format_pipeline([p]).split("{")[1].rstrip("}").split("=", 1)])) == p


@pytest.mark.parametrize("options", [dict(label="it's \"x\""), dict(ignore=("a", "b'\"c"))])
def test_text_holding_both_quote_marks_is_refused_where_the_pass_is_built(options):
    """optimize ran the pass, then failed to print its pipeline record with a bare ValueError."""
    with pytest.raises(ValueError, match=r"pass 'test-tunable' option '(label|ignore)': .* holds both ' and \" marks"):
        Tunable(**options)


def test_register_refuses_a_pass_whose_options_text_could_not_set():
    """A non-dataclass subclass's options did not exist ("has no option 'k'"); a dict option
    failed only when pipeline text named it."""
    class NotDataclass(Pass):
        name = "test-not-dataclass"
        k: int = 1

        def run(self, gm, ctx):
            return PassResult(gm, modified=False)

    with pytest.raises(PipelineError, match=r"NotDataclass is not a @dataclasses.dataclass, so its annotated "
                                            r"attributes \(k\) are no options"):
        fxopt.register_pass(NotDataclass)

    @dataclasses.dataclass
    class DictOption(Pass):
        name = "test-dict-option"
        table: dict = dataclasses.field(default_factory=dict)

        def run(self, gm, ctx):
            return PassResult(gm, modified=False)

    with pytest.raises(PipelineError, match=r"DictOption option 'table' has type dict, which pipeline text cannot write"):
        fxopt.register_pass(DictOption)
    assert "test-not-dataclass" not in fxopt.available_passes() and "test-dict-option" not in fxopt.available_passes()


class _ScalesWeights(Pass):
    """A lossy pass that multiplies every floating-point parameter by `factor` (on a copy)."""

    name = "scales-weights"
    tolerance = "lossy"

    def __init__(self, factor: float):
        self.factor = factor

    def run(self, gm, ctx):
        import torch

        gm = fxopt.ir.deep_copy(gm)
        with torch.no_grad():
            for p in gm.parameters():
                p.mul_(self.factor)
        return PassResult(gm, modified=True)


def test_verify_each_measures_a_lossy_pass_against_the_original():
    """distill after prune trains toward the original, and VerifyEach measured it against the pruned model it
    started from: SQNR -15 dB and cosine 0 for a student 12 dB from its teacher (mix F5). A lossy pass that
    undoes the one before it is measured as exact against the original; exact passes after it still answer
    to its output."""
    import torch

    model, x = torch.nn.Sequential(torch.nn.Linear(4, 4)).eval(), torch.randn(2, 4)
    gm = fxopt.capture(model, x)
    manager = fxopt.PassManager([_ScalesWeights(0.5), _ScalesWeights(2.0), "dce"],
                                instruments=[fxopt.VerifyEach(gm, (x,))])
    halved, restored, dce = manager.run(gm, (x,)).records
    assert halved.verification.max_abs_error > 0.01 and restored.verification.max_abs_error == 0
    assert [r.verification.verdict for r in (halved, restored, dce)] == ["NOT CHECKED", "NOT CHECKED", "PASS"]
