"""Run fxopt's pipelines over small random-init Hugging Face models it has no tests for.

    python tools/sweep_hf.py [--models gpt2,distilbert,vit,resnet,mobilevit] [--pipelines "fuse;quantize"]

Each model is built from a tiny config (2 layers, 64 wide), captured with `fxopt.optimize`'s
automatic front end and run through every pipeline with verification against the original.
Prints one line per (model, pipeline): PASS/FAIL of the verification, its summary and the
seconds taken, or the error's first line. A robustness check on architectures fxopt was not
written against (it found the GPT-2 cache output and the MobileViT observer slowness);
random weights make the lossy numbers (prune) meaningless, only failures and time matter.
GPT-2 runs with ``use_cache=False``: its KV cache object is not a tensor container.
Weights are redrawn at std 1/sqrt(fan-in) (transformers' 0.02 made MobileViT's logits exactly
0, so every row passed trivially); MobileViT's random logits are still ~1e-6, below int8's
smallest step (float eps per step), so its two quantize rows fail by construction.
"""
from __future__ import annotations

import argparse
import time
import warnings

import torch

import fxopt

PIPELINES = ("fuse", "fuse,lower-cpu", "prune{ratio=0.3}", "prune{ratio=0.3,exact_norms=false}", "quantize",
             "fuse,quantize{backend=reference}", "fuse,lower-eager", "prune{ratio=0.3},lower-eager")


def _ids(batch: int = 2, length: int = 16, vocab: int = 100) -> torch.Tensor:
    return torch.randint(0, vocab, (batch, length))


def build(name: str):
    """(model, example inputs) of a tiny random-init transformers model."""
    import transformers as T

    image = torch.randn(2, 3, 32, 32)
    if name == "gpt2":
        cfg = T.GPT2Config(n_layer=2, n_embd=64, n_head=4, vocab_size=100, n_positions=32)
        return T.GPT2LMHeadModel(cfg), {"input_ids": _ids(), "use_cache": False}
    if name == "distilbert":
        cfg = T.DistilBertConfig(n_layers=2, dim=64, n_heads=4, hidden_dim=128, vocab_size=100,
                                 max_position_embeddings=32)
        return T.DistilBertForSequenceClassification(cfg), (_ids(),)
    if name == "vit":
        cfg = T.ViTConfig(image_size=32, patch_size=8, num_hidden_layers=2, hidden_size=64, num_attention_heads=4,
                          intermediate_size=128, num_labels=10)
        return T.ViTForImageClassification(cfg), (image,)
    if name == "resnet":
        cfg = T.ResNetConfig(embedding_size=16, hidden_sizes=[16, 32], depths=[1, 1], num_labels=10)
        return T.ResNetForImageClassification(cfg), (image,)
    if name == "mobilevit":
        cfg = T.MobileViTConfig(image_size=32, hidden_sizes=[32, 48, 64], neck_hidden_sizes=[8, 8, 16, 16, 24, 32, 64],
                                num_labels=10)
        return T.MobileViTForImageClassification(cfg), (image,)
    raise ValueError(f"unknown model '{name}'")


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--models", default="gpt2,distilbert,vit,resnet,mobilevit")
    parser.add_argument("--pipelines", default=";".join(PIPELINES), help="pipelines separated by ';'")
    args = parser.parse_args(argv)
    warnings.simplefilter("ignore")
    torch.manual_seed(0)
    for name in args.models.split(","):
        model, inputs = build(name)
        model.eval()
        with torch.no_grad():  # transformers' init (std 0.02) lets a deep random CNN's activations
            for p in model.parameters():  # vanish (MobileViT's logits are exactly 0), hiding any difference
                if p.dim() > 1:
                    p.normal_(0.0, p[0].numel() ** -0.5)
        for pipeline in args.pipelines.split(";"):
            start = time.perf_counter()
            try:
                calibration = [inputs, inputs] if "quantize" in pipeline else None
                res = fxopt.optimize(model, inputs, pipeline, calibration=calibration)
                verdict = res.verification.summary()
            except Exception as exc:  # report and go on: this is a sweep
                verdict = f"FAIL {type(exc).__name__}: {str(exc).splitlines()[0][:140] if str(exc) else ''}"
            print(f"{name:10s} {pipeline:38s} {verdict} ({time.perf_counter() - start:.1f} s)", flush=True)


if __name__ == "__main__":
    main()
