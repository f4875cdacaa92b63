"""eval.fused_activation: gelu_new (Phi's MLP activation) run as the one-kernel tanh GELU for
inference gives the same logits (float rounding apart) and the same greedy tokens."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest

# Same formula, evaluated in one kernel instead of ~7: float32 logits of the 2-layer model
# agree to about 1e-6; the bound leaves room for CPU kernel differences, not for a wrong formula
# (the exact GELU, erf-based, differs from gelu_new by ~1e-3 here).
ATOL = 1e-5


def _model(tiny_phi_dir: Path) -> Any:
    import torch
    from transformers import AutoModelForCausalLM

    return AutoModelForCausalLM.from_pretrained(str(tiny_phi_dir), dtype=torch.float32).eval()


def _inputs(tiny_phi_dir: Path) -> Any:
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(str(tiny_phi_dir))
    return tok(["A 45-year-old man has chest pain. Which drug first?", "Answer: B"], return_tensors="pt",
               padding=True)


def test_the_fixture_uses_gelu_new(tiny_phi_dir: Path) -> None:
    from transformers.activations import NewGELUActivation

    model = _model(tiny_phi_dir)
    assert model.config.hidden_act == "gelu_new"
    assert sum(isinstance(m, NewGELUActivation) for m in model.modules()) == model.config.num_hidden_layers


def test_fused_logits_equal_the_original(tiny_phi_dir: Path) -> None:
    import torch
    from transformers.activations import GELUTanh, NewGELUActivation

    from medreason.loading import fuse_activations

    batch = _inputs(tiny_phi_dir)
    model = _model(tiny_phi_dir)
    with torch.inference_mode():
        before = model(**batch).logits
    assert fuse_activations(model) == 2
    assert not any(isinstance(m, NewGELUActivation) for m in model.modules())
    assert sum(isinstance(m, GELUTanh) for m in model.modules()) == 2
    with torch.inference_mode():
        after = model(**batch).logits
    assert torch.allclose(after, before, atol=ATOL, rtol=0), float((after - before).abs().max())
    assert fuse_activations(model) == 0  # nothing left to swap

    # The bound does tell formulas apart: the exact (erf) GELU misses it.
    exact = _model(tiny_phi_dir)
    for layer in exact.model.layers:
        layer.mlp.activation_fn = torch.nn.GELU()
    with torch.inference_mode():
        assert not torch.allclose(exact(**batch).logits, before, atol=ATOL, rtol=0)


def test_fused_greedy_generation_is_token_identical(tiny_phi_dir: Path) -> None:
    from transformers import AutoTokenizer

    from medreason.loading import fuse_activations

    tok = AutoTokenizer.from_pretrained(str(tiny_phi_dir))
    ids = tok(["Question: which vitamin deficiency causes scurvy?\nAnswer:"], return_tensors="pt")
    kwargs = {"max_new_tokens": 24, "do_sample": False, "pad_token_id": tok.eos_token_id}
    model = _model(tiny_phi_dir)
    plain = model.generate(**ids, **kwargs)
    fuse_activations(model)
    assert model.generate(**ids, **kwargs).tolist() == plain.tolist()


@pytest.mark.parametrize(("fused", "scoring"), [(True, "loglikelihood"), (False, "generate")])
def test_evaluate_loads_fused_only_when_switched_on(tmp_path: Path, tiny_phi_dir: Path, fused: bool, scoring: str,
                                                    caplog: pytest.LogCaptureFixture) -> None:
    """The evaluate stage swaps the activations of the model it loads, and leaves them alone
    with eval.fused_activation=false; its log shows the start-up phases and the encoding that
    ran while the model loaded (likelihood requests or generation prompts)."""
    import logging

    from _fixtures_eval import build_run

    from medreason.config import build_config
    from medreason.evaluation.stage import Dist, evaluate_run

    store_dir = tmp_path / "store"
    store, _, overrides = build_run(store_dir, tiny_phi_dir, train=False)
    cfg = build_config(overrides=overrides + ["eval.checkpoint=none", f"eval.scoring={scoring}",
                                              "eval.max_new_tokens=8", f"eval.fused_activation={str(fused).lower()}"])
    with caplog.at_level(logging.INFO):
        out = evaluate_run(store, "r1", cfg, str(tmp_path / "out"), Dist())
    assert out["metrics"]["sets"]["heldout"]["base"]["n"] == 6
    messages = [r.getMessage() for r in caplog.records]
    swapped = [m for m in messages if "run as the fused tanh GELU" in m]
    assert swapped == (["2 gelu_new activation(s) run as the fused tanh GELU (eval.fused_activation)"] if fused else [])
    ahead = ("likelihood requests: 24 encoded in" if scoring == "loglikelihood"
             else "generation prompts: 6 encoded ahead")
    assert any(m.startswith(ahead) for m in messages), messages
    assert sum(m.startswith("start-up: ") for m in messages) == 2


def test_the_default_leaves_config_hashes_unchanged() -> None:
    """A config written before the field existed hashes as one with the default (on); off is a change."""
    from medreason.config import build_config, hashed_sections

    on = build_config().model_dump(mode="json")
    assert on["eval"]["fused_activation"] is True
    assert "fused_activation" not in hashed_sections(on)["eval"]
    before = dict(on, eval={k: v for k, v in on["eval"].items() if k != "fused_activation"})
    assert hashed_sections(before) == hashed_sections(on)
    off = build_config(overrides=["eval.fused_activation=false"]).model_dump(mode="json")
    assert hashed_sections(off)["eval"]["fused_activation"] is False
