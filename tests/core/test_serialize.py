"""`fxopt.save` / `fxopt.load`: any pipeline's GraphModule, both front ends, as plain data."""
import pytest
import torch
import torch.nn.functional as F
from torch import nn

import fxopt
from fxopt.serialize import AttributeCodec, checksums, register_codec


def _tamper(data: dict, path) -> None:
    """Write a changed payload as a deliberate tamperer would: with checksums that match, so
    that what refuses it is the allow-list, not the checksum against damage."""
    data["checksums"] = checksums(data)
    torch.save(data, path)


class Encoder(nn.Module):
    """A small transformer block: export captures it with a pytree signature and guards."""

    def __init__(self, d=32):
        super().__init__()
        self.embed, self.norm = nn.Linear(6, d), nn.LayerNorm(d)
        self.attn = nn.MultiheadAttention(d, 4, batch_first=True)
        self.up, self.down, self.head = nn.Linear(d, 64), nn.Linear(64, d), nn.Linear(d, 3)

    def forward(self, x):
        h = self.embed(x)
        h = self.norm(h + self.attn(h, h, h, need_weights=False)[0])
        return {"logits": self.head((h + self.down(F.gelu(self.up(h))))[:, 0])}


class ConvNet(nn.Module):
    def __init__(self):
        super().__init__()
        self.body = nn.Sequential(nn.Conv2d(3, 16, 3, padding=1), nn.BatchNorm2d(16), nn.ReLU(),
                                  nn.Conv2d(16, 16, 3, padding=1), nn.BatchNorm2d(16), nn.ReLU())
        self.fc = nn.Linear(16, 4)

    def forward(self, x):
        return self.fc(self.body(x).mean((2, 3)))


@pytest.mark.parametrize("mode", ["symbolic", "export"])
@pytest.mark.parametrize("pipeline", ["prune{ratio=0.5}", "fuse", "prune{ratio=0.3},fuse,remove-noops"])
def test_a_pipeline_result_round_trips_through_plain_data(tmp_path, mode, pipeline):
    torch.manual_seed(0)
    model, x = (Encoder().eval(), torch.randn(2, 5, 6)) if "prune" in pipeline else (ConvNet().eval(),
                                                                                   torch.randn(2, 3, 8, 8))
    res = fxopt.optimize(model, (x,), pipeline, mode=mode)
    path = tmp_path / "model.pt"
    fxopt.save(res.module, path)
    torch.load(path, weights_only=True)  # nothing but plain data
    restored = fxopt.load(path)
    other = torch.randn(3, *x.shape[1:])
    with torch.no_grad():
        torch.testing.assert_close(restored(other), res.module(other))
        torch.testing.assert_close(restored(x), res.module(x))


def test_torch_save_fails_on_an_export_graph_and_fxopt_save_does_not(tmp_path):
    """Why fxopt.save exists: export's stateful wrapper holds local functions pickle refuses."""
    gm = fxopt.capture(nn.Sequential(nn.Linear(4, 4), nn.ReLU()), (torch.randn(2, 4),), mode="export")
    with pytest.raises(Exception, match="pickle"):
        torch.save(gm, tmp_path / "torch.pt")
    fxopt.save(gm, tmp_path / "fxopt.pt")
    x = torch.randn(5, 4)
    torch.testing.assert_close(fxopt.load(tmp_path / "fxopt.pt")(x), gm(x))


@pytest.mark.parametrize("mode", ["symbolic", "export"])
def test_a_lowered_module_says_to_save_before_lower_cpu(tmp_path, mode):
    torch.manual_seed(0)
    res = fxopt.optimize(ConvNet().eval(), (torch.randn(2, 3, 8, 8),), "fuse,lower-cpu", mode=mode)
    with pytest.raises(fxopt.SerializationError, match=r"ConvByBatch.*\(save before lower-cpu[^)]*\)$") as err:
        fxopt.save(res.module, tmp_path / "m.pt")
    assert "mode='export'" not in str(err.value)  # exporting again would not help


Pair = __import__("collections").namedtuple("Pair", "logits features")


class _ReturnsPair(nn.Module):
    def __init__(self):
        super().__init__()
        self.fc = nn.Linear(4, 4)

    def forward(self, x):
        h = self.fc(x)
        return Pair(h, h.relu())


@pytest.mark.parametrize("mode", ["symbolic", "export"])
def test_a_namedtuple_output_is_refused_by_save_with_what_to_return_instead(tmp_path, mode):
    """load imports only torch, operator, math, builtins and fxopt names: a namedtuple class of
    the model's module cannot be rebuilt (export's refusal was a bare NotImplementedError)."""
    res = fxopt.optimize(_ReturnsPair().eval(), (torch.randn(2, 4),), "fuse", mode=mode)
    with pytest.raises(fxopt.SerializationError, match="namedtuple.*return (a tuple or a dict|tuples, lists or dicts)"):
        fxopt.save(res.module, tmp_path / "m.pt")
    assert not (tmp_path / "m.pt").exists()


class _Opaque:
    """An attribute object no codec knows."""


def test_an_attribute_object_needs_a_codec(tmp_path):
    gm = torch.fx.symbolic_trace(nn.Linear(2, 2))
    gm.extra = _Opaque()
    node = gm.graph.call_function(id, (gm.graph.get_attr("extra"),))
    node.name = "use"
    with pytest.raises(fxopt.SerializationError, match="cannot store attribute 'extra' of type _Opaque"):
        fxopt.save(gm, tmp_path / "m.pt")


def test_load_imports_only_fxopt_codec_providers(tmp_path):
    register_codec(AttributeCodec("test-box", lambda o: isinstance(o, _Opaque), lambda o: {"v": 1},
                                  lambda d: _Opaque(), provider="fxopt.tests_codec"))
    gm = torch.fx.symbolic_trace(nn.Identity())
    gm.box = _Opaque()
    with gm.graph.inserting_before(next(iter(gm.graph.nodes)).next):
        gm.graph.get_attr("box")
    gm.recompile()
    path = tmp_path / "m.pt"
    fxopt.save(gm, path)
    loaded = fxopt.load(path)
    (read,) = loaded.graph.find_nodes(op="get_attr")   # load keeps it in a CodedValue holder (14fe98d)
    assert isinstance(loaded.get_submodule(read.target.rpartition(".")[0]).value, _Opaque)
    data = torch.load(path, weights_only=True)
    (record,) = data["packed"].values()
    record.update(codec="elsewhere", provider="os")
    _tamper(data, path)
    with pytest.raises(fxopt.SerializationError, match="refusing codec provider 'os'"):
        fxopt.load(path)


@pytest.mark.parametrize("mode", ["symbolic", "export"])
def test_parameters_come_back_as_parameters(mode, tmp_path):
    """A get_attr parameter came back as a buffer: a loaded export graph had no parameters()
    to fine-tune (0 of 4), a symbolic one only those of its submodules."""
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(4, 8), nn.ReLU(), nn.Linear(8, 2)).eval()
    res = fxopt.optimize(model, (torch.randn(3, 4),), "fuse", mode=mode)
    fxopt.save(res.module, tmp_path / "m.pt")
    loaded = fxopt.load(tmp_path / "m.pt")
    names = lambda m: sorted(dict(m.named_parameters()))  # noqa: E731
    assert names(loaded) == names(res.module) and len(names(loaded)) == 4


@pytest.mark.parametrize("mode", ["symbolic", "export"])
def test_parameters_come_back_requiring_grad_as_they_were_saved(mode, tmp_path):
    """A symbolic graph's module parameters came back with requires_grad=False (its get_attr ones
    kept theirs): the loaded model's outputs had no grad_fn to fine-tune from."""
    model = nn.Sequential(nn.Linear(4, 8), nn.ReLU(), nn.Linear(8, 2)).eval()
    gm = fxopt.optimize(model, (torch.randn(3, 4),), "dce", mode=mode).module
    gm.get_parameter(next(name for name, _ in gm.named_parameters())).requires_grad_(False)
    fxopt.save(gm, tmp_path / "m.pt")
    loaded = fxopt.load(tmp_path / "m.pt")
    flags = lambda m: {n: p.requires_grad for n, p in m.named_parameters()}  # noqa: E731
    assert flags(loaded) == flags(gm) and sum(flags(gm).values()) == 3
    assert loaded(torch.randn(2, 4)).requires_grad


@pytest.mark.parametrize("hook", ["forward", "forward_pre", "full_backward"])
def test_a_hook_on_a_called_module_is_refused_by_save(hook, tmp_path):
    """The hook was dropped without a word: the loaded graph computed without it (10x off)."""
    model = nn.Sequential(nn.Linear(4, 4), nn.ReLU(), nn.Linear(4, 4)).eval()
    scale = {"forward": lambda mod, i, o: o * 10, "forward_pre": lambda mod, i: (i[0] * 10,),
             "full_backward": lambda mod, gi, go: None}[hook]
    getattr(model[0], f"register_{hook}_hook")(scale)
    res = fxopt.optimize(model, (torch.randn(3, 4),), "dce", mode="symbolic")
    with pytest.raises(fxopt.SerializationError,
                       match=r"node '_0' \(call_module 0\) calls a Linear with a .*hook \(.*<lambda> at .*test_serialize.py:\d+\)"
                             r".*capture with mode='export'"):
        fxopt.save(res.module, tmp_path / "m.pt")
    assert not (tmp_path / "m.pt").exists()
    exported = fxopt.optimize(model, (torch.randn(3, 4),), "dce", mode="export").module
    fxopt.save(exported, tmp_path / "e.pt")   # the advice works: export traced the hook in
    x = torch.randn(2, 4)
    torch.testing.assert_close(fxopt.load(tmp_path / "e.pt")(x), model(x))


class _Flagged(nn.Module):
    def __init__(self):
        super().__init__()
        self.fc = nn.Linear(4, 4)

    def forward(self, x, double=False, mask=None):
        y = self.fc(x) * (2 if double else 1)
        return y if mask is None else y * mask


def test_a_capture_specialized_to_non_tensor_inputs_round_trips_with_its_guards(tmp_path):
    """capture guards each non-tensor input with torch._assert; save refused to name it (private),
    so no model with a flag or a `mask=None` could be saved."""
    torch.manual_seed(0)
    model, x = _Flagged().eval(), torch.randn(2, 4)
    res = fxopt.optimize(model, (x, True, None), "dce", mode="symbolic")
    fxopt.save(res.module, tmp_path / "m.pt")
    loaded = fxopt.load(tmp_path / "m.pt")
    torch.testing.assert_close(loaded(x, True, None), model(x, True, None))
    with pytest.raises(fxopt.InputMismatchError, match="captured with double=True: .* was called with False"):
        loaded(x, False, None)
    with pytest.raises(fxopt.InputMismatchError, match="captured with mask=None"):
        loaded(x, True, torch.ones(4))


def test_load_still_refuses_other_private_torch_functions(tmp_path):
    gm = torch.fx.symbolic_trace(nn.Identity())
    fxopt.save(gm, tmp_path / "m.pt")
    data = torch.load(tmp_path / "m.pt", weights_only=True)
    data["nodes"].insert(1, {"name": "bad", "op": "call_function", "target": {"py": ["torch", "_C._exit"]},
                             "args": {"__tuple__": [0]}, "kwargs": {"__dict__": []}, "computes": None})
    _tamper(data, tmp_path / "m.pt")
    with pytest.raises(fxopt.SerializationError, match=r"refusing to resolve torch._C._exit \(private"):
        fxopt.load(tmp_path / "m.pt")


class _TiedLM(nn.Module):
    """An embedding shared with the output layer: one weight, used by two modules."""

    def __init__(self):
        super().__init__()
        self.emb, self.out = nn.Embedding(100, 16), nn.Linear(16, 100, bias=False)
        self.out.weight = self.emb.weight

    def forward(self, ids):
        return self.out(self.emb(ids))


@pytest.mark.parametrize("mode", ["symbolic", "export"])
def test_tied_weights_stay_one_tensor_after_load(tmp_path, mode):
    """A symbolic graph's two leaf modules each stored the weight: load made two parameters
    (1,600 -> 3,200), and fine-tuning the loaded module moved them apart."""
    torch.manual_seed(0)
    model, ids = _TiedLM().eval(), torch.randint(0, 100, (2, 5))
    res = fxopt.optimize(model, (ids,), "dce", mode=mode)
    fxopt.save(res.module, tmp_path / "m.pt")
    loaded = fxopt.load(tmp_path / "m.pt")
    assert sum(p.numel() for p in loaded.parameters()) == 1600
    tensors = [t for _, t in loaded.named_parameters(remove_duplicate=False)]
    tensors += [t for _, t in loaded.named_buffers(remove_duplicate=False)]
    assert len({id(t) for t in tensors if t.shape == (100, 16)}) == 1
    torch.testing.assert_close(loaded(ids), model(ids))


def test_save_of_a_module_with_no_graph_says_to_capture_it(tmp_path):
    """A plain module got AttributeError: 'Sequential' object has no attribute 'graph'."""
    with pytest.raises(fxopt.SerializationError, match=r"got a Sequential, not a torch.fx.GraphModule.*"
                                                       r"fxopt.capture\(model, example_inputs\)"):
        fxopt.save(nn.Sequential(nn.Linear(4, 4)), tmp_path / "m.pt")
    assert not (tmp_path / "m.pt").exists()


def test_an_observed_module_is_refused_with_the_observers_reason(tmp_path):
    """An insert-observers result was refused with advice about lower-cpu, which it never ran."""
    x = torch.randn(2, 4)
    res = fxopt.optimize(nn.Sequential(nn.Linear(4, 4), nn.ReLU()).eval(), x, "insert-observers",
                         calibration=[(x,)])
    with pytest.raises(fxopt.SerializationError, match=r"calls a Observer.*holds calibration statistics.*"
                                                       r"save the model before insert-observers") as err:
        fxopt.save(res.module, tmp_path / "m.pt")
    assert "lower-cpu" not in str(err.value)


def test_save_to_a_folder_says_to_give_a_file(tmp_path):
    """fxopt.save to a directory raised torch's raw RuntimeError."""
    gm = fxopt.capture(torch.nn.Linear(4, 2).eval(), torch.randn(2, 4))
    with pytest.raises(fxopt.SerializationError, match=r"save: '.*' is a folder; give the path of a file to write "
                                                       r"\(e.g. '.*model.pt'\)"):
        fxopt.save(gm, tmp_path)


class _MaskedLinear(nn.Module):
    """HF attention-mask code: `&` of two bool tensors, which lower-eager writes as `Tensor.__and__`."""

    def __init__(self):
        super().__init__()
        self.fc = nn.Linear(4, 4)

    def forward(self, x, mask):
        return self.fc(x) * ((mask > 0) & (x > 0)) + ((mask > 0) | (x < -1)) * (mask << 1)


def test_a_lower_eager_result_with_operator_methods_loads(tmp_path):
    """save wrote it and load refused it: "'__and__' is not a tensor method"."""
    torch.manual_seed(0)
    x, mask = torch.randn(2, 4), torch.ones(2, 4, dtype=torch.long)
    res = fxopt.optimize(_MaskedLinear().eval(), (x, mask), "lower-eager", mode="export")
    methods = {n.target for n in res.module.graph.nodes if n.op == "call_method"}
    assert {"__and__", "__or__", "__lshift__"} <= methods, methods
    fxopt.save(res.module, tmp_path / "m.pt")
    assert torch.equal(fxopt.load(tmp_path / "m.pt")(x, mask), res.module(x, mask))


def test_save_refuses_a_method_load_would_refuse(tmp_path):
    gm = torch.fx.symbolic_trace(nn.Identity())
    x = next(n for n in gm.graph.nodes if n.op == "placeholder")
    with gm.graph.inserting_after(x):
        bad = gm.graph.call_method("__reduce_ex__", (x, 2))
    with pytest.raises(fxopt.SerializationError, match=r"save: node 'reduce_ex' .* calls method '__reduce_ex__'"):
        fxopt.save(gm, tmp_path / "m.pt")
    gm.graph.erase_node(bad)
    data_path = tmp_path / "ok.pt"
    fxopt.save(gm, data_path)
    data = torch.load(data_path, weights_only=True)
    data["nodes"].insert(1, {"name": "bad", "op": "call_method", "target": "__reduce_ex__",
                             "args": {"__tuple__": [{"__node__": data["nodes"][0]["name"]}, 2]},
                             "kwargs": {"__dict__": []}, "computes": None})
    _tamper(data, data_path)
    with pytest.raises(fxopt.SerializationError, match=r"'__reduce_ex__' is not a tensor method"):
        fxopt.load(data_path)


class _WeightNormed(nn.Module):
    def __init__(self):
        super().__init__()
        self.fc = nn.utils.parametrizations.weight_norm(nn.Linear(8, 8))

    def forward(self, x):
        return torch.relu(self.fc(x))


def test_an_export_lower_eager_result_calling_an_aten_binding_round_trips(tmp_path):
    """lower-eager writes weight_norm as torch._weight_norm, which save could not name."""
    torch.manual_seed(0)
    x = torch.randn(3, 8)
    res = fxopt.optimize(_WeightNormed().eval(), x, "fuse,lower-eager", mode="export")
    assert any(n.target is torch._weight_norm for n in res.module.graph.nodes)
    fxopt.save(res.module, tmp_path / "m.pt")
    assert torch.equal(fxopt.load(tmp_path / "m.pt")(x), res.module(x))


def test_a_dataclass_output_is_refused_by_save_with_what_to_return_instead(tmp_path):
    import dataclasses

    @dataclasses.dataclass
    class Out:
        y: torch.Tensor

    class M(nn.Module):
        def forward(self, x):
            return Out(x * 2)

    gm = fxopt.capture(M(), torch.randn(2, 3), mode="symbolic")
    with pytest.raises(fxopt.SerializationError, match=r"it builds a dataclass of the model's code, which "
                                                       r"fxopt.load does not import .* return a tuple or a dict"):
        fxopt.save(gm, tmp_path / "m.pt")


def test_a_custom_tolerance_recorded_by_optimize_survives_save_and_load(tmp_path):
    """It was dropped: verify held the loaded module to `exact` instead."""
    mine = fxopt.Tolerance("mine", rtol=0.05, atol=1e-3)
    model, x = nn.Linear(4, 3).eval(), torch.randn(2, 4)
    res = fxopt.optimize(model, x, "dce", tolerance=mine)
    fxopt.save(res.module, tmp_path / "m.pt")
    loaded = fxopt.load(tmp_path / "m.pt")
    assert loaded.meta["fxopt"]["tolerance"] == mine
    assert fxopt.verify(model, loaded, x).tolerance == mine


def _mlp_file(tmp_path):
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(16, 16), nn.ReLU(), nn.Linear(16, 4)).eval()
    path = tmp_path / "mlp.pt"
    fxopt.save(fxopt.optimize(model, torch.randn(2, 16), "fuse").module, path)
    return path


def _flip_one_bit(path, offset: int) -> None:
    raw = bytearray(path.read_bytes())
    raw[offset] ^= 0x40
    path.write_bytes(bytes(raw))


def test_load_refuses_a_weight_with_a_flipped_bit_and_names_it(tmp_path):
    """torch.load does not check the zip CRCs: one flipped bit loaded as a weight off by 1e36."""
    path = _mlp_file(tmp_path)
    weight = torch.load(path, weights_only=True)["modules"]["0"]["parameters"]["weight"]
    raw = path.read_bytes()
    offset = raw.index(weight.numpy().tobytes()[:64])  # the weight's bytes in the zip
    _flip_one_bit(path, offset + 3)
    with pytest.raises(fxopt.SerializationError, match=r"tensor '0\.weight' \(a parameter\) does not match the "
                                                       r"checksum .* save the model again"):
        fxopt.load(path)


def test_a_file_without_checksums_still_loads(tmp_path):
    """Files written before checksums were stored hold none: they load as before."""
    path = _mlp_file(tmp_path)
    data = torch.load(path, weights_only=True)
    del data["checksums"]
    torch.save(data, path)
    x = torch.randn(3, 16)
    torch.testing.assert_close(fxopt.load(path)(x), fxopt.load(path)(x))


def test_load_refuses_a_file_whose_stored_part_was_dropped(tmp_path):
    path = _mlp_file(tmp_path)
    data = torch.load(path, weights_only=True)
    data["modules"]["0"]["parameters"].pop("bias")
    torch.save(data, path)
    with pytest.raises(fxopt.SerializationError, match=r"'modules/0\.bias', which fxopt\.save stored, is missing"):
        fxopt.load(path)


@pytest.mark.parametrize("mode", ["symbolic", "export"])
def test_a_loaded_graph_is_in_the_mode_it_was_saved_in(mode, tmp_path):
    """load built the root (and the containers on the paths to the leaves) in training mode:
    `loaded.training` was True for a graph saved in eval mode."""
    gm = fxopt.capture(ConvNet().eval(), torch.randn(2, 3, 8, 8), mode=mode)
    fxopt.save(gm, tmp_path / "m.pt")
    assert {m.training for m in fxopt.load(tmp_path / "m.pt").modules()} == {False}
    gm.training = True  # (an exported graph refuses gm.train())
    fxopt.save(gm, tmp_path / "t.pt")
    assert fxopt.load(tmp_path / "t.pt").training is True


def test_a_file_of_an_earlier_version_without_the_training_flag_loads_in_eval_mode(tmp_path):
    path = _mlp_file(tmp_path)
    data = torch.load(path, weights_only=True)
    del data["training"], data["checksums"]["entries"]["training"]
    torch.save(data, path)
    assert fxopt.load(path).training is False


def test_checksums_cover_quantized_and_constant_tensors(tmp_path):
    """A quantized attribute's integers and an argument constant are checked like weights."""
    gm = torch.fx.symbolic_trace(nn.Identity())
    gm.register_buffer("q", torch.quantize_per_tensor(torch.randn(8), 0.1, 0, torch.qint8))
    x = next(n for n in gm.graph.nodes if n.op == "placeholder")
    with gm.graph.inserting_after(x):
        gm.graph.get_attr("q")
    gm.recompile()
    path = tmp_path / "q.pt"
    fxopt.save(gm, path)
    data = torch.load(path, weights_only=True)
    data["tensors"]["q"]["int_repr"][0] += 1
    torch.save(data, path)
    with pytest.raises(fxopt.SerializationError, match=r"tensor 'q' does not match the checksum"):
        fxopt.load(path)


def test_save_to_an_unwritable_or_missing_folder_names_the_path(tmp_path, unwritable_folder):
    """torch.save's raw RuntimeError ('[enforce fail at inline_container.cc:747]') reached the user."""
    gm = fxopt.capture(nn.Linear(2, 2), torch.randn(1, 2))
    path = unwritable_folder / "m.pt"
    with pytest.raises(fxopt.SerializationError, match=rf"save: cannot write '{path}': Permission denied"):
        fxopt.save(gm, path)
    missing = tmp_path / "no" / "such" / "m.pt"
    with pytest.raises(fxopt.SerializationError, match=rf"the folder '{missing.parent}' does not exist"):
        fxopt.save(gm, missing)


@pytest.mark.parametrize("keep", [0.5, -10, -1])
def test_a_truncated_file_is_called_cut_short_not_foreign(keep, tmp_path):
    """It said "not an fxopt saved graph" of an fxopt file that lost its end in a copy."""
    fxopt.save(fxopt.capture(nn.Linear(4, 2), torch.randn(3, 4)), tmp_path / "m.pt")
    data = (tmp_path / "m.pt").read_bytes()
    (tmp_path / "cut.pt").write_bytes(data[: int(len(data) * keep) if keep > 0 else len(data) + keep])
    with pytest.raises(fxopt.SerializationError, match=r"cut\.pt: the file is cut short or damaged"):
        fxopt.load(tmp_path / "cut.pt")
    (tmp_path / "junk.pt").write_bytes(b"not a zip archive")
    with pytest.raises(fxopt.SerializationError, match="not an fxopt saved graph"):
        fxopt.load(tmp_path / "junk.pt")


def test_a_bytes_path_is_named(tmp_path):
    gm = fxopt.capture(nn.Linear(4, 2), torch.randn(3, 4))
    with pytest.raises(fxopt.SerializationError, match=r"save: the path b'.*m.pt' is bytes; give a str"):
        fxopt.save(gm, bytes(tmp_path / "m.pt"))
    with pytest.raises(fxopt.SerializationError, match=r"load: the path b'.*' is bytes"):
        fxopt.load(bytes(tmp_path / "m.pt"))


def _tripled(x):
    return x * 3


torch.fx.wrap("_tripled")


def test_save_of_a_wrapped_function_of_the_models_code_says_to_export(tmp_path):
    class Calls(nn.Module):
        def forward(self, x):
            return _tripled(x) + 1

    gm = fxopt.capture(Calls().eval(), torch.randn(2, 5), mode="symbolic")
    with pytest.raises(fxopt.SerializationError, match=r"node '_tripled'.*it is a function of the model's code, "
                                                       r"which fxopt.load does not import.*capture the model with "
                                                       r"mode='export'"):
        fxopt.save(gm, tmp_path / "m.pt")


def test_loading_a_path_with_no_file_says_so(tmp_path):
    """Said 'not an fxopt saved graph (...) readable with weights-only semantics (FileNotFoundError ...)':
    a missing file is no format problem."""
    with pytest.raises(fxopt.errors.SerializationError, match=r"load: no file at .*missing.pt: check the path"):
        fxopt.load(tmp_path / "missing.pt")
    with pytest.raises(fxopt.errors.SerializationError, match=r"load: .* is a directory, not a file saved by fxopt.save"):
        fxopt.load(tmp_path)


def _packs(gm):
    return {name: value for name, value in ((n, getattr(m, "value", None)) for n, m in gm.named_modules())
            if isinstance(value, torch.ScriptObject)}


def test_saving_an_int8_module_leaves_it_fresh_packs(tmp_path):
    """Storing a prepacked int8 weight reads it back (unpack), which left the live pack on
    oneDNN's slower path: the module saved ran at batch 1 in 0.49 ms, the one loaded from the
    file in 0.28. save now puts a pack built from the stored data in each one's place."""
    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Conv2d(3, 8, 3), torch.nn.ReLU(), torch.nn.Conv2d(8, 8, 3)).eval()
    x = torch.randn(1, 3, 12, 12)
    gm = fxopt.optimize(model, x, "quantize", calibration=[(torch.randn(1, 3, 12, 12),) for _ in range(3)]).module
    before, expected = _packs(gm), gm(x)
    assert before
    fxopt.save(gm, tmp_path / "q.pt")
    after = _packs(gm)
    assert after.keys() == before.keys() and all(after[k] is not before[k] for k in before)
    assert torch.equal(gm(x), expected) and torch.equal(fxopt.load(tmp_path / "q.pt")(x), expected)
    torch.save(gm, tmp_path / "q.torch.pt")  # pickling the holders encodes them too
    again = _packs(gm)
    assert all(again[k] is not after[k] for k in after) and torch.equal(gm(x), expected)
    assert torch.equal(torch.load(tmp_path / "q.torch.pt", weights_only=False)(x), expected)


class _ComplexConstants(nn.Module):
    def forward(self, x):
        half = torch.full((1,), 3.5j).real  # traced as a constant: a strided view of a complex tensor
        c = torch.view_as_complex(torch.stack([x, x.flip(-1)], -1)) * 2j  # a complex scalar argument
        return x * half, torch.view_as_real(c)


@pytest.mark.parametrize("mode", ["symbolic", "export"])
def test_complex_scalars_and_a_strided_constant_are_saved(tmp_path, mode):
    """save failed on both: "self.stride(-1) must be 1 to view Float as Byte" from the checksum of
    the constant, and "cannot store argument of type complex", which named no node."""
    model, x = _ComplexConstants().eval(), torch.randn(3, 4)
    gm = fxopt.capture(model, x, mode=mode)
    path = tmp_path / "complex.pt"
    fxopt.save(gm, path)
    loaded, x2 = fxopt.load(path), torch.randn(5, 4)
    for got, want in zip(loaded(x2), model(x2)):
        torch.testing.assert_close(got, want, rtol=0, atol=0)


def test_an_argument_save_cannot_store_is_named_with_its_node(tmp_path):
    graph = torch.fx.Graph()
    x = graph.placeholder("x")
    graph.output(graph.call_function(torch.add, (x, range(3))))
    gm = torch.fx.GraphModule(nn.Module(), graph)
    with pytest.raises(fxopt.SerializationError, match=r"save: node 'add' \(call_function .*add\).*: cannot store argument "
                                                 r"of type range"):
        fxopt.save(gm, tmp_path / "bad.pt")


class _TwoLayers(nn.Module):
    def __init__(self):
        super().__init__()
        self.a, self.b = nn.Linear(4, 4), nn.Sequential(nn.Linear(4, 4))

    def forward(self, x):
        y = self.a(x).relu()
        return self.b(y) * 2  # the line a divergence in b.0 points at


def test_a_loaded_graph_keeps_the_source_lines_and_module_paths_of_its_nodes(tmp_path):
    """load left every node's meta empty: verify of a loaded reference named the diverging node
    'linear_1' with neither its module 'b.0' nor the model's line that called it."""
    torch.manual_seed(0)
    path, x = tmp_path / "two.pt", torch.randn(2, 4)
    fxopt.save(fxopt.capture(_TwoLayers().eval(), x, mode="export"), path)
    reference, candidate = fxopt.load(path), fxopt.load(path)
    with torch.no_grad():
        candidate.get_parameter("b.0.weight").mul_(1.5)
    divergence = fxopt.verify(reference, candidate, x).divergence
    assert divergence.node == "linear_1"
    assert divergence.module == "'b.0' (Linear)"
    assert "test_serialize.py" in divergence.source and "return self.b(y) * 2" in divergence.source


def test_load_refuses_a_module_stack_that_is_not_text_naming_the_node(tmp_path):
    path = tmp_path / "two.pt"
    fxopt.save(fxopt.capture(_TwoLayers().eval(), torch.randn(2, 4), mode="export"), path)
    data = torch.load(path, weights_only=True)
    record = next(r for r in data["nodes"] if r["name"] == "linear_1")
    record["module_stack"] = [["b.0", "b.0", 7]]
    _tamper(data, path)
    with pytest.raises(fxopt.SerializationError, match="refusing node 'linear_1': its module stack"):
        fxopt.load(path)


class _NoGradBlock(nn.Module):
    def __init__(self):
        super().__init__()
        self.a, self.b = nn.Linear(8, 8), nn.Linear(8, 2)

    def forward(self, x):
        with torch.no_grad():
            y = self.a(x).relu()
        return self.b(y)


class _NoGradUpdate(_NoGradBlock):
    """A no_grad block that also updates a running mean in place: capture keeps it as export's region
    (a plain one is inlined into the graph)."""

    def __init__(self):
        super().__init__()
        self.register_buffer("mean", torch.zeros(8))

    def forward(self, x):
        with torch.no_grad():
            y = self.a(x).relu()
            self.mean.mul_(0.9).add_(y.mean(0), alpha=0.1)
        return self.b(y)


class _AutocastOff(_NoGradBlock):
    def forward(self, x):
        with torch.autocast("cpu", enabled=False):
            y = self.a(x.float()).relu()
        return self.b(y)


class _Cond(_NoGradBlock):
    def forward(self, x):
        return self.b(torch.cond(x.sum() > 0, lambda x: self.a(x), lambda x: -x, (x,)))


@pytest.mark.parametrize("model", [_NoGradUpdate(), _AutocastOff(), _Cond()], ids=["no_grad", "autocast", "cond"])
def test_an_export_graph_with_a_no_grad_autocast_or_cond_region_round_trips(model, tmp_path):
    """export puts such a region in a subgraph the graph reads by get_attr and runs by a
    higher-order op (every Llama-family rotary embedding runs under no_grad): save refused it,
    "cannot store attribute 'submod_1' of type GraphModule"."""
    torch.manual_seed(0)
    model, x = model.eval(), torch.randn(4, 8)
    gm = fxopt.capture(model, x, mode="export")
    assert any(isinstance(m, torch.fx.GraphModule) for m in gm.children())
    fxopt.save(gm, tmp_path / "region.pt")
    loaded = fxopt.load(tmp_path / "region.pt")
    for other in (torch.randn(6, 8).abs(), -torch.randn(6, 8).abs()):  # both branches of the cond
        torch.testing.assert_close(loaded(other), model(other), rtol=0, atol=0)


def test_load_refuses_a_higher_order_op_outside_its_list(tmp_path):
    path = tmp_path / "region.pt"
    fxopt.save(fxopt.capture(_NoGradUpdate().eval(), torch.randn(4, 8), mode="export"), path)
    data = torch.load(path, weights_only=True)
    record = next(r for r in data["nodes"] if isinstance(r["target"], dict) and "hop" in r["target"])
    record["target"] = {"hop": "run_const_graph"}
    _tamper(data, path)
    with pytest.raises(fxopt.SerializationError, match="refusing higher-order op 'run_const_graph'"):
        fxopt.load(path)


class _TopK(nn.Module):
    def __init__(self):
        super().__init__()
        self.fc = nn.Linear(4, 4)

    def forward(self, x):
        return self.fc(x).topk(2, dim=1), x.max(0)


@pytest.mark.parametrize("mode", ["symbolic", "export"])
def test_an_output_of_torch_return_types_round_trips(mode, tmp_path):
    """export's output structure holds torch.return_types.topk, which pytree cannot write as
    text: save refused it as "a class of its own code (a namedtuple?)"."""
    model, x = _TopK().eval(), torch.randn(3, 4)
    fxopt.save(fxopt.capture(model, x, mode=mode), tmp_path / "topk.pt")
    top, most = fxopt.load(tmp_path / "topk.pt")(x)
    assert type(top) is torch.return_types.topk and type(most) is torch.return_types.max
    assert torch.equal(top.indices, model(x)[0].indices)


def test_load_refuses_a_return_type_torch_does_not_list(tmp_path):
    path = tmp_path / "topk.pt"
    fxopt.save(fxopt.capture(_TopK().eval(), torch.randn(3, 4), mode="export"), path)
    data = torch.load(path, weights_only=True)
    data["pytree"]["out_structseqs"][0][1] = "pytree_register_structseq"  # listed in its __all__: a function
    _tamper(data, path)
    with pytest.raises(fxopt.SerializationError, match=r"refusing torch.return_types.pytree_register_structseq"):
        fxopt.load(path)


def test_a_module_stack_of_another_shape_is_left_out_not_a_crash(tmp_path):
    """save failed with a bare AttributeError/TypeError on an nn_module_stack entry that is no
    (path, class) pair."""
    gm = fxopt.capture(_TwoLayers().eval(), torch.randn(2, 4), mode="export")
    node = next(n for n in gm.graph.nodes if n.name == "linear_1")
    node.meta["nn_module_stack"] = {"b.0": "b.0", "b": ("b", nn.Sequential)}
    fxopt.save(gm, tmp_path / "odd.pt")
    loaded = fxopt.load(tmp_path / "odd.pt")
    stack = next(n for n in loaded.graph.nodes if n.name == "linear_1").meta["nn_module_stack"]
    assert stack == {"b": ("b", "torch.nn.modules.container.Sequential")}


class _Mixed(nn.Module):
    """A bit of everything the passes rewrite: conv + batchnorm + relu, a grouped conv with a residual add,
    a transposed conv, a layer norm and two linears."""

    def __init__(self):
        super().__init__()
        self.stem, self.bn = nn.Conv2d(3, 16, 3, padding=1), nn.BatchNorm2d(16)
        self.group, self.up = nn.Conv2d(16, 16, 3, padding=1, groups=4), nn.ConvTranspose2d(16, 8, 2, stride=2)
        self.norm, self.fc, self.head = nn.LayerNorm(8), nn.Linear(8, 32), nn.Linear(32, 4)

    def forward(self, x):
        h = F.relu(self.bn(self.stem(x)))
        h = F.relu(self.group(h) + h)
        h = self.up(h).mean((2, 3))
        return self.head(F.gelu(self.fc(self.norm(h))))


def _listing_lines(gm, path) -> list[str]:
    """The dump's listing of `gm`, without the input guard (export's own, fxopt's after load)."""
    fxopt.dump(gm, path)
    return [line for line in (path / "graph.txt").read_text().splitlines() if "_guards_" not in line]


@pytest.mark.parametrize("mode", ["symbolic", "export"])
@pytest.mark.parametrize("pipeline, note", [
    ("fuse", "fused: conv+relu"), ("lower-eager", None), ("quantize{backend=x86}", None),
    ("quantize{backend=reference}", None), ("prune{ratio=0.3,adapter_cost=0}", "prune.kept: "),
])
def test_each_passs_result_round_trips_and_its_loaded_graph_dumps_as_it_did(tmp_path, mode, pipeline, note):
    """A loaded graph's dump listed bare ops: no shape or dtype on any node (a graph records them as tensors of
    torch's own, which the file did not hold) and none of the annotations the passes wrote (fuse's groups,
    prune's kept channels). The file holds both as text now; the loaded module computes what the saved one did,
    at other batch sizes too, at the tolerance its pipeline recorded, and saves again."""
    torch.manual_seed(0)
    model, x = _Mixed().eval(), torch.randn(4, 3, 8, 8)
    res = fxopt.optimize(model, x, pipeline, mode=mode, calibration=[torch.randn(4, 3, 8, 8) for _ in range(3)])
    fxopt.save(res.module, tmp_path / "m.pt")
    loaded = fxopt.load(tmp_path / "m.pt")
    with torch.no_grad():
        for batch in (4, 1, 7):
            other = torch.randn(batch, 3, 8, 8)
            torch.testing.assert_close(loaded(other), res.module(other), rtol=0, atol=0)
    assert loaded.meta["fxopt"]["tolerance"] == res.module.meta["fxopt"]["tolerance"]
    assert fxopt.verify(model, loaded, x).passed
    listed = _listing_lines(res.module, tmp_path / "dump_saved")
    assert _listing_lines(loaded, tmp_path / "dump_loaded") == listed
    assert sum(": f32[" in line for line in listed) > 5
    if note is not None:
        assert any(note in line for line in listed)
    fxopt.save(loaded, tmp_path / "again.pt")
    with torch.no_grad():
        torch.testing.assert_close(fxopt.load(tmp_path / "again.pt")(x), res.module(x), rtol=0, atol=0)


def test_a_fuse_result_loaded_is_lowered_as_the_one_in_memory(tmp_path):
    """What the refusal to save a lower-cpu result advises: save before lower-cpu, lower the loaded module."""
    torch.manual_seed(0)
    model, x = _Mixed().eval(), torch.randn(4, 3, 8, 8)
    fused = fxopt.optimize(model, x, "fuse").module
    fxopt.save(fused, tmp_path / "fused.pt")
    lowered = fxopt.optimize(fxopt.load(tmp_path / "fused.pt"), x, "lower-cpu").module
    in_memory = fxopt.optimize(fused, x, "lower-cpu").module
    assert [n.target for n in lowered.graph.nodes if n.op == "call_module"] == \
        [n.target for n in in_memory.graph.nodes if n.op == "call_module"]
    assert fxopt.verify(model, lowered, x).passed


@pytest.mark.parametrize("field, value, message", [
    ("annotations", {"fused": torch.ones(2)}, "its annotations are not plain data"),
    ("type", 7, "its type is no text"),
])
def test_load_refuses_a_listing_record_of_another_kind_naming_the_node(tmp_path, field, value, message):
    path = tmp_path / "two.pt"
    fxopt.save(fxopt.capture(_TwoLayers().eval(), torch.randn(2, 4), mode="export"), path)
    data = torch.load(path, weights_only=True)
    record = next(r for r in data["nodes"] if r["name"] == "linear_1")
    record[field] = value
    _tamper(data, path)
    with pytest.raises(fxopt.SerializationError, match=f"refusing node 'linear_1': {message}"):
        fxopt.load(path)
