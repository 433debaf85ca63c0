"""logitless as TRL's fused LM head: the drop-in (``logitless.integrations.trl.add_fused_lm_head``) against an exact
materialised reference written here, and TRL's SFTTrainer running through it under ``logitless.install()``.

The reference head below computes every field from the model's own full logits in float64: it is what TRL's fused
head promises, with no chunking and no guessing of the model's epilogue.
"""

from __future__ import annotations

import copy
import functools
import inspect
import math
import types
from typing import Any

import pytest
import torch

import _tiny_lm as tiny
from _trl_runs import _tokenizer, _training_args, _word_tokenizer, _words
import logitless
from logitless.integrations.trl import add_fused_lm_head

trl = pytest.importorskip("trl")
trl_utils = pytest.importorskip("trl.trainer.utils")
if not hasattr(trl_utils, "add_fused_lm_head"):  # pragma: no cover - TRL < 1.15 has no fused head
    pytest.skip("this TRL has no fused LM head", allow_module_level=True)

FAMILIES = ["llama", "gemma3", "cohere", "granite", "gpt2"]  # plain, softcap, multiply, divide, GPT2LMHeadModel
ALL_FIELDS = ("log_probs", "entropy", "is_top1", "mean_logits", "log_sum_sq_probs")


pytestmark = pytest.mark.usefixtures("stock_world")


def _exact_head(model: Any, temperature: float = 1.0, cast_lm_head_to_fp32: bool = False,
                outputs: tuple[str, ...] = ("log_probs",)) -> None:  # fmt: skip
    """The reference: TRL's contract computed from the full logits of the model's own stock forward, in float64."""
    del cast_lm_head_to_fp32
    original = model.forward

    @functools.wraps(type(model).forward)
    def forward(self: Any, *args: Any, fused_lm_head: bool = False, labels: Any = None, shift_labels: Any = None,
                num_items_in_batch: Any = None, **kwargs: Any) -> Any:  # fmt: skip
        if not fused_lm_head:
            extra = {k: v for k, v in (("labels", labels), ("shift_labels", shift_labels)) if v is not None}
            return original(*args, **kwargs, **extra)
        kwargs["use_cache"] = False
        logits = original(*args, **kwargs).logits.double() / temperature
        if shift_labels is None:
            logits, targets = logits[:, :-1], labels[:, 1:]
        else:
            targets = shift_labels
        mask = targets != -100
        logp = torch.log_softmax(logits, dim=-1)
        zero = torch.zeros((), dtype=torch.float64)
        log_probs = torch.where(mask, logp.gather(-1, targets.clamp(min=0).unsqueeze(-1)).squeeze(-1), zero)
        fields = {
            "log_probs": log_probs,
            "entropy": torch.where(mask, -(logp.exp() * logp).sum(-1), zero),
            "mean_logits": torch.where(mask, logits.mean(-1), zero).detach(),
            "log_sum_sq_probs": torch.where(mask, (2 * logp).logsumexp(-1), zero).detach(),
            "is_top1": mask & (logits.argmax(-1) == targets),
        }
        fields = {k: (v.float() if v.is_floating_point() else v) if k in outputs or k == "log_probs" else None
                  for k, v in fields.items()}  # fmt: skip
        denominator = mask.sum().clamp(min=1) if num_items_in_batch is None else num_items_in_batch
        return trl_utils.FusedCausalLMOutput(loss=-fields["log_probs"].sum() / denominator, label_mask=mask, **fields)

    model.forward = types.MethodType(forward, model)


def _batch(seed: int = 0) -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(3, tiny.VOCAB, (2, 12), generator=g)
    labels = ids.clone()
    labels[0, :4] = -100
    return {"input_ids": ids, "labels": labels}


def _run(model: Any, head: Any, *, temperature: float = 1.0, entropy_weight: float = 0.0, **call: Any) -> tuple:
    head(model, temperature=temperature, outputs=ALL_FIELDS)
    out = model(**_batch(), fused_lm_head=True, **call)
    (out.loss + entropy_weight * out.entropy.sum()).backward()
    grads = {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}
    return out, grads


@pytest.mark.parametrize("temperature", [1.0, 0.7])
@pytest.mark.parametrize("name", FAMILIES)
def test_drop_in_matches_the_exact_reference(name: str, temperature: float) -> None:
    """Every field, the loss, and every gradient (through log-probs and entropy, as GRPO's entropy bonus does)."""
    reference = tiny.build(name)
    ref_out, ref_grads = _run(copy.deepcopy(reference), _exact_head, temperature=temperature, entropy_weight=0.1)
    logitless.install()  # the class's forward is rewritten: the fields come from the fused op
    model = tiny.build(name)
    out, grads = _run(model, add_fused_lm_head, temperature=temperature, entropy_weight=0.1)
    assert logitless.audit()["integrations"]["trl"]["calls"] == {"fused": 1, "materialised": 0}
    assert out.log_probs.shape == (2, 11) and out.label_mask.shape == (2, 11)
    for field in ("log_probs", "entropy", "mean_logits", "log_sum_sq_probs"):
        torch.testing.assert_close(getattr(out, field), getattr(ref_out, field), rtol=1e-5, atol=2e-6, msg=field)
    assert torch.equal(out.is_top1, ref_out.is_top1) and torch.equal(out.label_mask, ref_out.label_mask)
    assert math.isclose(float(out.loss), float(ref_out.loss), rel_tol=1e-6)
    assert grads.keys() == ref_grads.keys()
    for n in grads:
        torch.testing.assert_close(grads[n], ref_grads[n], rtol=1e-4, atol=1e-6, msg=n)


def test_fields_not_asked_for_are_none_and_shift_labels_keep_the_length() -> None:
    logitless.install()
    model = tiny.build("llama")
    add_fused_lm_head(model)
    batch = _batch()
    shift = torch.nn.functional.pad(batch["labels"], (0, 1), value=-100)[:, 1:].contiguous()
    out = model(input_ids=batch["input_ids"], shift_labels=shift, fused_lm_head=True)
    assert out.log_probs.shape == (2, 12) and out.entropy is None and out.is_top1 is None
    ref = tiny.build("llama")
    _exact_head(ref)
    ref_out = ref(input_ids=batch["input_ids"], shift_labels=shift, fused_lm_head=True)
    torch.testing.assert_close(out.log_probs, ref_out.log_probs, rtol=1e-5, atol=2e-6)


def _unshifted_decoder(name: str) -> torch.nn.Module:
    """Decoders whose own loss scores each position's label unshifted (and takes no ``shift_labels``)."""
    import transformers

    torch.manual_seed(0)
    if name == "bart-decoder":
        config = transformers.BartConfig(
            vocab_size=tiny.VOCAB, d_model=32, encoder_layers=1, decoder_layers=2, encoder_attention_heads=4,
            decoder_attention_heads=4, encoder_ffn_dim=64, decoder_ffn_dim=64, max_position_embeddings=64,
            pad_token_id=0, use_cache=False,
        )  # fmt: skip
        return transformers.BartForCausalLM(config).eval()
    config = transformers.XLNetConfig(vocab_size=tiny.VOCAB, d_model=32, n_layer=2, n_head=4, d_inner=64)
    return transformers.XLNetLMHeadModel(config).eval()


@pytest.mark.parametrize("name", ["bart-decoder", "xlnet"])
@pytest.mark.parametrize("pre_shifted", [False, True])
def test_a_decoder_whose_own_loss_is_unshifted_gets_trls_contract(name: str, pre_shifted: bool) -> None:
    """TRL's head scores each position's next label (or ``shift_labels`` as given) whatever the model's own loss
    does: BART's decoders and XLNet score their labels unshifted and drop ``shift_labels``. The fused fields are
    TRL's, [B, T-1] (or [B, T]), against the exact reference."""
    batch = _batch()
    call: dict[str, Any] = {"input_ids": batch["input_ids"]}
    if pre_shifted:
        call["shift_labels"] = torch.nn.functional.pad(batch["labels"], (0, 1), value=-100)[:, 1:].contiguous()
    else:
        call["labels"] = batch["labels"]
    reference = _unshifted_decoder(name)
    _exact_head(reference, outputs=ALL_FIELDS)
    ref_out = reference(**call, fused_lm_head=True)
    logitless.install()
    model = _unshifted_decoder(name)
    add_fused_lm_head(model, outputs=ALL_FIELDS)
    out = model(**call, fused_lm_head=True)
    assert logitless.audit()["integrations"]["trl"]["calls"] == {"fused": 1, "materialised": 0}
    assert out.log_probs.shape == (2, 12 if pre_shifted else 11)
    for field in ("log_probs", "entropy", "mean_logits", "log_sum_sq_probs"):
        torch.testing.assert_close(getattr(out, field), getattr(ref_out, field), rtol=1e-5, atol=2e-6, msg=field)
    assert torch.equal(out.label_mask, ref_out.label_mask)


def test_an_encoder_decoder_keeps_its_own_targets() -> None:
    """Where the labels also feed the decoder's inputs (BART's encoder-decoder shifts them right), the label at each
    decoder position is that position's next token: the fields score it, as the model's own loss does."""
    import transformers

    config = transformers.BartConfig(
        vocab_size=tiny.VOCAB, d_model=32, encoder_layers=1, decoder_layers=1, encoder_attention_heads=4,
        decoder_attention_heads=4, encoder_ffn_dim=64, decoder_ffn_dim=64, max_position_embeddings=64,
        pad_token_id=0, decoder_start_token_id=2, use_cache=False,
    )  # fmt: skip
    torch.manual_seed(0)
    stock = transformers.BartForConditionalGeneration(config).eval()
    batch = _batch()
    want = stock(**batch).loss
    logitless.install()
    model = copy.deepcopy(stock)
    logitless.patch(model)
    add_fused_lm_head(model)
    out = model(**batch, fused_lm_head=True)
    assert logitless.audit()["integrations"]["trl"]["calls"] == {"fused": 1, "materialised": 0}
    assert out.log_probs.shape == batch["labels"].shape
    assert math.isclose(float(out.loss), float(want), rel_tol=1e-5)
    # A forward that keeps its stock path at run time (a hooked head): the same targets, from its logits.
    model.lm_head.register_forward_hook(lambda module, args, output: None)
    out = model(**batch, fused_lm_head=True)
    assert logitless.audit()["integrations"]["trl"]["calls"] == {"fused": 1, "materialised": 1}
    assert out.log_probs.shape == batch["labels"].shape
    assert math.isclose(float(out.loss), float(want), rel_tol=1e-5)


def test_without_a_fused_branch_the_values_come_from_the_model_logits() -> None:
    """Not installed (the class forward is stock): exact values from the materialised logits, counted in audit()."""
    reference = tiny.build("gemma3")
    ref_out, ref_grads = _run(copy.deepcopy(reference), _exact_head, temperature=0.8)
    out, grads = _run(tiny.build("gemma3"), add_fused_lm_head, temperature=0.8)
    torch.testing.assert_close(out.log_probs, ref_out.log_probs, rtol=1e-5, atol=2e-6)
    torch.testing.assert_close(out.entropy, ref_out.entropy, rtol=1e-5, atol=2e-6)
    for n in grads:
        torch.testing.assert_close(grads[n], ref_grads[n], rtol=1e-4, atol=1e-6, msg=n)
    from logitless.integrations import trl as drop_in

    assert drop_in.CALLS == {"fused": 0, "materialised": 1}


def test_install_after_adding_the_head_still_fuses() -> None:
    """TRL may add its head before logitless.install() runs: the class forward is looked up on each call."""
    model = tiny.build("llama")
    add_fused_lm_head(model)
    logitless.install()
    model(**_batch(), fused_lm_head=True)
    assert logitless.audit()["integrations"]["trl"]["calls"] == {"fused": 1, "materialised": 0}


def test_forward_signature_and_generate_are_unchanged() -> None:
    logitless.install()
    model = tiny.build("llama").eval()
    prompt = torch.randint(3, tiny.VOCAB, (1, 5), generator=torch.Generator().manual_seed(2))
    before = model.generate(prompt, max_new_tokens=5, do_sample=False)
    signature = inspect.signature(model.forward)
    add_fused_lm_head(model)
    assert inspect.signature(model.forward) == signature
    assert torch.equal(model.generate(prompt, max_new_tokens=5, do_sample=False), before)


def test_install_points_trl_at_the_drop_in_and_uninstall_restores() -> None:
    import trl.trainer.sft_trainer as sft

    original = trl_utils.add_fused_lm_head
    assert original.__module__ == "trl.trainer.utils"
    logitless.install()
    assert sft.add_fused_lm_head is add_fused_lm_head and trl_utils.add_fused_lm_head is add_fused_lm_head
    assert {"trl.trainer.utils", "trl.trainer.sft_trainer"} <= set(
        logitless.audit()["integrations"]["trl"]["patched_modules"]
    )
    logitless.uninstall()
    assert sft.add_fused_lm_head is original and trl_utils.add_fused_lm_head is original


def _sft_run(name: str, peft_config: Any = None, **config: Any) -> list[dict[str, float]]:
    from datasets import Dataset
    from trl import SFTConfig, SFTTrainer

    g = torch.Generator().manual_seed(0)
    rows = [{"input_ids": torch.randint(3, tiny.VOCAB, (int(torch.randint(6, 16, (1,), generator=g)),),
                                        generator=g).tolist()} for _ in range(16)]  # fmt: skip
    args = SFTConfig(**_training_args(max_steps=3), dataset_kwargs={"skip_prepare_dataset": True}, **config)
    if peft_config is not None:
        torch.manual_seed(7)  # LoRA A matrices are random: the same in both runs
    trainer = SFTTrainer(model=tiny.build(name), args=args, train_dataset=Dataset.from_list(rows),
                         processing_class=_tokenizer(), peft_config=peft_config)  # fmt: skip
    trainer.train()
    return [e for e in trainer.state.log_history if "grad_norm" in e]


def _reference_then_ours(trainer: str, run: Any, name: str, monkeypatch: pytest.MonkeyPatch) -> tuple[list, list]:
    """The trainer run twice: with the exact reference head in place of TRL's, then under logitless.install() with
    TRL's own kernel made to fail if anything calls it."""
    module = __import__(f"trl.trainer.{trainer}_trainer", fromlist=["add_fused_lm_head"])
    monkeypatch.setattr(module, "add_fused_lm_head", _exact_head)
    reference = run(name)
    monkeypatch.undo()

    def forbidden(*args: Any, **kwargs: Any) -> Any:
        raise AssertionError("TRL's own fused head kernel was called")

    monkeypatch.setattr(trl_utils._ChunkedLogProbFunction, "apply", forbidden)
    logitless.install()
    return reference, run(name)


@pytest.mark.parametrize("name", FAMILIES)
def test_sft_trainer_runs_through_logitless(name: str, monkeypatch: pytest.MonkeyPatch) -> None:
    """SFTTrainer unchanged: its fused head is logitless's under install(); losses, grad norms, token accuracy and
    entropy equal a run whose head is the exact reference; TRL's own kernel is never called."""
    from unittest import mock

    from logitless import ops

    # Not through monkeypatch: _reference_then_ours undoes its patches between the two runs.
    with mock.patch.object(ops, "_rows_backward", wraps=ops._rows_backward) as second_pass:
        reference, ours = _reference_then_ours("sft", _sft_run, name, monkeypatch)
    assert logitless.audit()["integrations"]["trl"]["calls"] == {"fused": 3, "materialised": 0}  # one per step
    # SFT's loss is the mean of -log_probs: one upstream gradient value per counted token, so the gradient formed
    # in the forward pass was used and no second kernel pass ran.
    assert second_pass.call_count == 0
    assert len(ours) == 3
    _compare_logs(ours, reference, ("loss", "grad_norm", "entropy", "mean_token_accuracy"))


def test_sft_trainer_with_peft_modules_to_save_runs_through_logitless(monkeypatch: pytest.MonkeyPatch) -> None:
    """SFTTrainer's ``peft_config`` with a trained copy of the head (``modules_to_save``): TRL puts its fused head
    on the PEFT base model, whose ``lm_head`` is PEFT's wrapper; logitless fuses it (no materialised call)."""
    from peft import LoraConfig

    config = LoraConfig(r=4, target_modules=["q_proj", "v_proj"], modules_to_save=["lm_head"], lora_dropout=0.0)
    run = functools.partial(_sft_run, peft_config=config)
    reference, ours = _reference_then_ours("sft", lambda name: run(name), "llama", monkeypatch)
    assert logitless.audit()["integrations"]["trl"]["calls"] == {"fused": 3, "materialised": 0}
    assert logitless.audit()["runtime"] == {"fused": 3, "stock": {}}
    assert len(ours) == 3
    _compare_logs(ours, reference, ("loss", "grad_norm", "entropy", "mean_token_accuracy"))


def test_sft_trainer_with_lora_and_a_frozen_head_runs_through_logitless(monkeypatch: pytest.MonkeyPatch) -> None:
    """The usual LoRA fine-tune: adapters on the attention, the head frozen. Fused, the gradient formed in the
    forward pass (no second kernel pass) for the hidden states only, and every logged value equal to the run with the
    exact reference head."""
    from unittest import mock

    from peft import LoraConfig

    from logitless import ops

    config = LoraConfig(r=4, target_modules=["q_proj", "v_proj"], lora_dropout=0.0)
    run = functools.partial(_sft_run, peft_config=config)
    with mock.patch.object(ops, "_rows_backward", wraps=ops._rows_backward) as second_pass:
        reference, ours = _reference_then_ours("sft", lambda name: run(name), "gemma3", monkeypatch)
    assert logitless.audit()["integrations"]["trl"]["calls"] == {"fused": 3, "materialised": 0}
    assert second_pass.call_count == 0
    assert len(ours) == 3
    _compare_logs(ours, reference, ("loss", "grad_norm", "entropy", "mean_token_accuracy"))


def _sft_text_run(name: str, prompt_completion: bool = False, **config: Any) -> list[dict[str, float]]:
    """SFTTrainer on a text dataset it tokenizes and prepares itself (packing, completion-only labels)."""
    from datasets import Dataset
    from trl import SFTConfig, SFTTrainer

    g = torch.Generator().manual_seed(0)
    if prompt_completion:
        rows = [{"prompt": _words(g, 5), "completion": " " + _words(g, 4)} for _ in range(16)]
    else:
        rows = [{"text": _words(g, int(torch.randint(4, 12, (1,), generator=g)))} for _ in range(16)]
    args = SFTConfig(**_training_args(max_steps=3), **config)
    trainer = SFTTrainer(model=tiny.build(name), args=args, train_dataset=Dataset.from_list(rows),
                         processing_class=_word_tokenizer())  # fmt: skip
    trainer.train()
    return [e for e in trainer.state.log_history if "grad_norm" in e]


@pytest.mark.parametrize(
    "config",
    [{"packing": True}, {"packing": True, "padding_free": True}, {"prompt_completion": True},
     {"prompt_completion": True, "packing": True}],
    ids=["packing", "padding-free", "completion-only", "completion-only-packed"],
)  # fmt: skip
def test_sft_trainer_packing_and_completion_only_run_through_logitless(
    config: dict[str, Any], monkeypatch: pytest.MonkeyPatch
) -> None:
    """What SFT runs usually set: packed sequences (TRL's best-fit packing, its padding-free position ids) and a
    prompt-completion dataset (the loss on the completion only). Fused, every logged value equal to the run with the
    exact reference head."""
    run = functools.partial(_sft_text_run, **config)
    reference, ours = _reference_then_ours("sft", lambda name: run(name), "llama", monkeypatch)
    assert logitless.audit()["integrations"]["trl"]["calls"] == {"fused": 3, "materialised": 0}
    _compare_logs(ours, reference, ("loss", "grad_norm", "entropy", "mean_token_accuracy"))


@pytest.mark.parametrize("name", ["llama", "gemma3"])
def test_sft_trainer_label_smoothing_matches_stock_trl(name: str) -> None:
    """SFTTrainer with ``label_smoothing_factor`` smooths the logits of a forward without labels itself (its fused
    head only feeds the metrics). Under logitless that forward is handed the labels and computes the smoothed loss
    fused; losses and grad norms equal stock TRL's (its label smoother on materialised logits), and so do the
    metrics (TRL's own kernel against the drop-in)."""
    from logitless.integrations import hf_trainer

    reference = _sft_run(name, label_smoothing_factor=0.1)
    logitless.install()
    ours = _sft_run(name, label_smoothing_factor=0.1)
    assert hf_trainer.CALLS == {"fused": 3, "materialised": 0}
    assert logitless.audit()["integrations"]["trl"]["calls"] == {"fused": 3, "materialised": 0}
    _compare_logs(ours, reference, ("loss", "grad_norm", "entropy", "mean_token_accuracy"))


def _compare_logs(ours: list[dict[str, float]], reference: list[dict[str, float]], keys: tuple[str, ...]) -> None:
    assert len(ours) == len(reference) > 0
    for step, (a, b) in enumerate(zip(ours, reference, strict=True)):
        for key in keys:
            assert math.isclose(a[key], b[key], rel_tol=1e-5, abs_tol=1e-6), (step, key, a[key], b[key])


def _dpo_run(name: str, peft_config: Any = None) -> list[dict[str, float]]:
    from datasets import Dataset
    from trl import DPOConfig, DPOTrainer

    g = torch.Generator().manual_seed(0)
    rows = [{"prompt": _words(g, 5), "chosen": " " + _words(g, 4), "rejected": " " + _words(g, 3)} for _ in range(8)]
    args = DPOConfig(**_training_args())
    # With LoRA the reference is the base model (the adapters disabled), as TRL does without a ref_model.
    ref_model = tiny.build(name) if peft_config is None else None
    if peft_config is not None:
        torch.manual_seed(7)  # LoRA A matrices are random: the same in both runs
    trainer = DPOTrainer(model=tiny.build(name), ref_model=ref_model, args=args, peft_config=peft_config,
                         train_dataset=Dataset.from_list(rows), processing_class=_word_tokenizer())  # fmt: skip
    trainer.train()
    return [e for e in trainer.state.log_history if "grad_norm" in e]


def _grpo_run(name: str, peft_config: Any = None) -> list[dict[str, float]]:
    from datasets import Dataset
    from trl import GRPOConfig, GRPOTrainer

    def reward(completions: list[str], **kwargs: Any) -> list[float]:
        return [float(len(c) % 7) for c in completions]

    g = torch.Generator().manual_seed(0)
    rows = [{"prompt": _words(g, 5)} for _ in range(8)]
    # entropy_coef: the loss differentiates the entropy, so its gradient is checked too.
    args = GRPOConfig(**_training_args(), num_generations=4, max_completion_length=6, entropy_coef=0.1, beta=0.0)
    if peft_config is not None:
        torch.manual_seed(7)
    trainer = GRPOTrainer(model=tiny.build(name), reward_funcs=reward, args=args, peft_config=peft_config,
                          train_dataset=Dataset.from_list(rows), processing_class=_word_tokenizer())  # fmt: skip
    trainer.train()
    return [e for e in trainer.state.log_history if "grad_norm" in e]


def _kto_run(name: str) -> list[dict[str, float]]:
    from datasets import Dataset
    from trl import KTOConfig, KTOTrainer

    g = torch.Generator().manual_seed(0)
    rows = [{"prompt": _words(g, 5), "completion": " " + _words(g, 4), "label": bool(i % 2)} for i in range(8)]
    args = KTOConfig(**_training_args())
    trainer = KTOTrainer(model=tiny.build(name), ref_model=tiny.build(name), args=args,
                         train_dataset=Dataset.from_list(rows), processing_class=_word_tokenizer())  # fmt: skip
    trainer.train()
    return [e for e in trainer.state.log_history if "grad_norm" in e]


def _rloo_run(name: str) -> list[dict[str, float]]:
    from datasets import Dataset
    from trl import RLOOConfig, RLOOTrainer

    def reward(completions: list[str], **kwargs: Any) -> list[float]:
        return [float(len(c) % 7) for c in completions]

    g = torch.Generator().manual_seed(0)
    rows = [{"prompt": _words(g, 5)} for _ in range(8)]
    args = RLOOConfig(**_training_args(), num_generations=4, max_completion_length=6, beta=0.0)
    trainer = RLOOTrainer(model=tiny.build(name), reward_funcs=reward, args=args,
                          train_dataset=Dataset.from_list(rows), processing_class=_word_tokenizer())  # fmt: skip
    trainer.train()
    return [e for e in trainer.state.log_history if "grad_norm" in e]


# trainer -> (its run, model family, logged keys compared, fused forwards in its two steps)
_TRAINERS = {
    # policy and reference model each step
    "dpo": (_dpo_run, "gemma3", ("loss", "grad_norm", "rewards/chosen", "rewards/rejected", "logps/chosen"), 4),
    # toy reward, transformers' own generate(), an entropy bonus: one policy forward per step
    "grpo": (_grpo_run, "cohere", ("loss", "grad_norm", "entropy", "reward"), 2),
    "rloo": (_rloo_run, "granite", ("loss", "grad_norm", "reward"), 4),
    # policy and reference model, each on the batch and on its mismatched KL batch, each step
    "kto": (_kto_run, "gemma3", ("loss", "grad_norm", "rewards/chosen", "logps/chosen", "kl"), 8),
}


@pytest.mark.parametrize("trainer", sorted(_TRAINERS))
def test_preference_and_rl_trainers_run_through_logitless(trainer: str, monkeypatch: pytest.MonkeyPatch) -> None:
    """DPO, KTO (policy and reference model through the drop-in), GRPO and RLOO (a toy reward, transformers' own
    generate()) equal runs with the exact reference head; TRL's kernel is never called."""
    from unittest import mock

    from logitless import ops

    run, name, keys, expected = _TRAINERS[trainer]
    with mock.patch.object(ops, "_rows_backward", wraps=ops._rows_backward) as second_pass:
        reference, ours = _reference_then_ours(trainer, run, name, monkeypatch)
    assert logitless.audit()["integrations"]["trl"]["calls"] == {"fused": expected, "materialised": 0}
    # Their per-token gradients differ from token to token: the second kernel pass ran (no gradient formed ahead).
    assert second_pass.call_count > 0
    _compare_logs(ours, reference, keys)


@pytest.mark.parametrize("trainer", ["dpo", "grpo"])
def test_preference_and_rl_trainers_with_lora_take_no_second_pass(
    trainer: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The usual LoRA run of DPO and GRPO (adapters on the attention, the head frozen): their per-token upstream
    gradients differ from token to token, yet only the hidden states need one, so it is formed in the forward pass
    and scaled in backward (no second kernel pass); every logged value equals the run with the exact reference
    head (DPO's reference log-probs come from the base model with the adapters disabled)."""
    from unittest import mock

    from peft import LoraConfig

    from logitless import ops

    run, name, keys, _ = _TRAINERS[trainer]
    config = LoraConfig(r=4, target_modules=["q_proj", "v_proj"], lora_dropout=0.0)
    with mock.patch.object(ops, "_rows_backward", wraps=ops._rows_backward) as second_pass:
        reference, ours = _reference_then_ours(trainer, functools.partial(run, peft_config=config), name, monkeypatch)
    calls = logitless.audit()["integrations"]["trl"]["calls"]
    assert calls["fused"] > 0 and calls["materialised"] == 0
    assert second_pass.call_count == 0
    _compare_logs(ours, reference, keys)


def test_readme_example_runs_through_logitless() -> None:
    """examples/trl_sft.py (the README's TRL example) runs offline and every SFT step is fused."""
    import subprocess
    import sys
    from pathlib import Path

    script = Path(__file__).resolve().parents[1] / "examples" / "trl_sft.py"
    done = subprocess.run([sys.executable, str(script)], capture_output=True, text=True, timeout=600, check=True)
    last = done.stdout.strip().splitlines()[-1]
    assert last == "logitless: {'patched_modules': ['trl.trainer.sft_trainer', 'trl.trainer.utils'], " \
                   "'calls': {'fused': 4, 'materialised': 0}, " \
                   "'legacy': {'chunked': {'fused': 0, 'materialised': 0}, 'logits_for_metrics': 0}, " \
                   "'distillation': {'calls': {'class_epilogue': 0, 'trl_epilogue': 0}, 'corrected': {}, " \
                   "'unchecked': {}}, 'gkd': {'fused': 0, 'stock': {}}, 'orpo': {'fused': 0, 'stock': {}}, " \
                   "'cpo': {'fused': 0, 'stock': {}}, 'online_dpo': {'fused': 0, 'stock': {}}, " \
                   "'tpo': {'fused': 0, 'stock': {}}, 'a2po': {'fused': 0, 'stock': {}}, " \
                   "'sdpo': {'fused': 0, 'stock': {}}, 'sdft': {'fused': 0, 'stock': {}}, " \
                   "'left_to_trl': []}", done.stdout  # fmt: skip
