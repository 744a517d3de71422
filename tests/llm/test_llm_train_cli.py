"""`meg train llm`: a smoke run of every stage through the models.train hook, resume, overwrite refusal."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from models.llm import DEFAULT_LLM_DIR
from models.llm.loader import load_llm
from models.llm import stages
from models.train import main as train_main


def _run(out: Path, work: Path, *extra: str) -> int:
    return train_main(["llm", "all", "--smoke", "--out", str(out), "--work-dir", str(work), *extra])


TINY = ["--layers", "2", "--hidden", "32", "--intermediate", "64", "--heads", "2"]


def _step(ckpt: Path) -> int:
    return int(torch.load(ckpt, weights_only=False)["step"])


def test_smoke_run_writes_a_loadable_folder(tmp_path: Path) -> None:
    out, work = tmp_path / "llm", tmp_path / "work"
    assert _run(out, work, *TINY) == 0
    for name in ("config.json", "model.safetensors", "generation_config.json", "tokenizer.json",
                 "tokenizer_config.json", "metrics.json", "training_log.json", "training_config.json"):
        assert (out / name).is_file(), name
    assert "chat_template" in json.loads((out / "tokenizer_config.json").read_text())
    metrics = json.loads((out / "metrics.json").read_text())
    assert set(metrics["greedy"]["per_kind_accuracy"]) == {"colour", "shape", "count", "exists"}
    assert set(metrics["hidden_abs_by_k"]) == {"1"}  # two layers: k = 1 = L/2
    llm = load_llm(out)
    assert llm.num_layers == 2 and llm.model.config.hidden_size == 32
    assert _step(work / "llm" / "ckpt.pt") == 3


def test_resumed_run_equals_an_uninterrupted_one(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """Batch i is a function of (seed, i) and the checkpoint holds model + optimizer + step, so a run
    interrupted after its step-2 checkpoint and resumed ends with exactly the uninterrupted weights."""
    common = ["train", "--steps", "4", "--batch-size", "4", "--ckpt-every", "2", "--eval-every", "100",
              "--curriculum-steps", "1", *TINY]
    for name in ("straight", "resumed"):
        assert train_main(["llm", "tokenizer", "--out", str(tmp_path / name)]) == 0
    assert train_main(["llm", *common, "--out", str(tmp_path / "straight"), "--work-dir", str(tmp_path / "w1")]) == 0

    calls = {"n": 0}
    real_loss = stages.weighted_lm_loss

    def crash_on_third_step(model: torch.nn.Module, batch: stages.Batch) -> torch.Tensor:
        calls["n"] += 1
        if calls["n"] == 3:
            raise RuntimeError("simulated crash")
        return real_loss(model, batch)

    monkeypatch.setattr(stages, "weighted_lm_loss", crash_on_third_step)
    args = ["llm", *common, "--out", str(tmp_path / "resumed"), "--work-dir", str(tmp_path / "w2")]
    with pytest.raises(RuntimeError, match="simulated crash"):
        train_main(args)
    assert _step(tmp_path / "w2" / "llm" / "ckpt.pt") == 2
    monkeypatch.setattr(stages, "weighted_lm_loss", real_loss)
    assert train_main([*args, "--resume"]) == 0
    assert _step(tmp_path / "w2" / "llm" / "ckpt.pt") == 4
    a = load_llm(tmp_path / "straight").model.state_dict()
    b = load_llm(tmp_path / "resumed").model.state_dict()
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    fresh = load_llm(tmp_path / "straight").model  # and training did change the weights
    assert not torch.equal(fresh.model.layers[0].mlp.up_proj.weight, stages_new_model_weight(tmp_path))


def stages_new_model_weight(tmp_path: Path) -> torch.Tensor:
    from models.llm.loader import load_tokenizer
    from models.llm.model import LlmModelConfig, new_model

    cfg = LlmModelConfig(hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=2,
                         num_key_value_heads=2)
    return new_model(cfg, load_tokenizer(tmp_path / "straight")).model.layers[0].mlp.up_proj.weight


def test_refuses_to_overwrite_without_flag(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    out = tmp_path / "llm"
    assert train_main(["llm", "tokenizer", "--out", str(out)]) == 0
    with pytest.raises(SystemExit):
        train_main(["llm", "tokenizer", "--out", str(out)])
    assert "pass --overwrite" in capsys.readouterr().err
    assert train_main(["llm", "tokenizer", "--out", str(out), "--overwrite"]) == 0
    with pytest.raises(SystemExit):
        train_main(["llm", "evaluate", "--out", str(DEFAULT_LLM_DIR)])
    assert "committed embedded model" in capsys.readouterr().err
