"""Runs TRL SFTTrainer scenarios under an older TRL (its source first on PYTHONPATH; tests/test_trl_legacy.py).

``python tests/_trl_legacy_worker.py '<json list of scenarios>'`` prints one JSON line: per scenario, the per-step
logs of a stock run (logitless not installed) with the reference settings, and of a run under ``logitless.install()``
with the scenario's settings, plus what ``logitless.audit()`` counted. A scenario: ``family`` (tests/_tiny_lm.py),
``config`` (SFTConfig keywords for the logitless run), ``reference`` (SFTConfig keywords for the stock run, default
the same), ``lora`` (a PEFT LoRA adapter on the attention, SFTTrainer's ``peft_config``) and optionally ``trl_own`` (also run TRL's own path with the logitless settings, logitless not installed).
"""

from __future__ import annotations

import json
import sys
import tempfile
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).parent))

import torch  # noqa: E402

import _tiny_lm as tiny  # noqa: E402
import logitless  # noqa: E402

KEYS = ("loss", "grad_norm", "entropy", "mean_token_accuracy", "aux_loss")


def _tokenizer() -> Any:
    from tokenizers import Tokenizer, models
    from transformers import PreTrainedTokenizerFast

    vocab = {f"t{i}": i for i in range(tiny.VOCAB)}
    return PreTrainedTokenizerFast(tokenizer_object=Tokenizer(models.WordLevel(vocab=vocab, unk_token="t1")),
                                   pad_token="t0", eos_token="t2", bos_token="t1", unk_token="t1")  # fmt: skip


def _build(family: str) -> torch.nn.Module:
    if family != "mixtral":
        return tiny.build(family)
    import transformers

    # MoE: the router aux loss is part of the model's loss and TRL logs it.
    config = transformers.MixtralConfig(
        vocab_size=tiny.VOCAB, hidden_size=32, intermediate_size=32, num_hidden_layers=2, num_attention_heads=4,
        num_key_value_heads=2, num_local_experts=4, num_experts_per_tok=2, output_router_logits=True,
        router_aux_loss_coef=0.5, pad_token_id=0,
    )  # fmt: skip
    torch.manual_seed(0)
    return transformers.MixtralForCausalLM(config).float()


def _run(family: str, config: dict[str, Any], lora: bool = False) -> list[dict[str, float]]:
    from datasets import Dataset
    from trl import SFTConfig, SFTTrainer

    g = torch.Generator().manual_seed(0)
    rows = [{"input_ids": torch.randint(3, tiny.VOCAB, (int(torch.randint(6, 16, (1,), generator=g)),),
                                        generator=g).tolist()} for _ in range(16)]  # fmt: skip
    # float32 and SGD, as tests/test_trl.py: a rounding-level gradient difference stays rounding-level.
    args = SFTConfig(output_dir=tempfile.mkdtemp(), max_steps=3, per_device_train_batch_size=4, logging_steps=1,
                     report_to=[], use_cpu=True, seed=1, learning_rate=0.5, optim="sgd", disable_tqdm=True,
                     bf16=False, save_strategy="no", dataset_kwargs={"skip_prepare_dataset": True}, **config)  # fmt: skip
    peft_config = None
    if lora:
        from peft import LoraConfig

        peft_config = LoraConfig(r=4, target_modules=["q_proj", "v_proj"])
        torch.manual_seed(7)  # LoRA A matrices are random: the same in every run
    trainer = SFTTrainer(model=_build(family), args=args, train_dataset=Dataset.from_list(rows),
                         processing_class=_tokenizer(), peft_config=peft_config)  # fmt: skip
    trainer.train()
    return [{k: e[k] for k in KEYS if k in e} for e in trainer.state.log_history if "grad_norm" in e]


def _trl_restored() -> bool:
    """After uninstall(), SFTTrainer's compute_loss and chunked head are TRL's own again."""
    from trl.trainer import sft_trainer

    head = sft_trainer.__dict__.get("_patch_chunked_ce_lm_head")
    compute_loss = sft_trainer.SFTTrainer.__dict__["compute_loss"]
    return (head is None or head.__module__ == sft_trainer.__name__) and compute_loss.__module__ == sft_trainer.__name__


def main() -> None:
    import trl

    scenarios = json.loads(sys.argv[1])
    results = []
    with tiny.one_thread():
        for scenario in scenarios:
            family, config, lora = scenario["family"], scenario.get("config", {}), scenario.get("lora", False)
            result: dict[str, Any] = {"stock": _run(family, scenario.get("reference", config), lora)}
            if scenario.get("trl_own"):
                result["trl_own"] = _run(family, config, lora)
            logitless.install()
            try:
                result["logitless"] = _run(family, config, lora)
                audit = logitless.audit()
                result["trl"] = audit["integrations"]["trl"]
                result["runtime"] = audit["runtime"]
            finally:
                logitless.uninstall()
            result["restored"] = _trl_restored()
            results.append(result)
    print(json.dumps({"trl": trl.__version__, "results": results}))


if __name__ == "__main__":
    main()
