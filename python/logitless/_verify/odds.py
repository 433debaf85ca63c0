"""TRL's ORPOTrainer, CPOTrainer and OnlineDPOTrainer under logitless on one class: ``concatenated_forward`` and
``_forward`` (as ``install()`` wraps them) on a preference batch made from the class's inputs, each value they return
against a float64 reference from the logits the model's own forward returns (stock, no labels)."""

from __future__ import annotations

from types import SimpleNamespace
from typing import Any

import torch

# Statuses, in the report's column order.
FUSED = "fused"  # both trainers' calls ran fused and equal the reference
STOCK = "trl-path"  # a call kept TRL's code or the model's logits (the reason says why) and equals the reference
NA = "n/a"
MISMATCH = "MISMATCH"
STATUSES = [FUSED, STOCK, NA, MISMATCH]

_PROMPT = 2  # leading positions of every row that are prompt (label -100)


def _trainers(device: torch.device, aux_loss: bool) -> dict[str, Any] | str:
    """Each trainer with only what ``concatenated_forward`` reads (its __init__ builds a whole Trainer), that method
    as ``install()`` wraps it (verify patches the model alone, not TRL); or why there is none."""
    try:
        from trl.experimental.cpo import CPOTrainer
        from trl.experimental.orpo import ORPOTrainer
    except ImportError:
        return "this TRL has no trl.experimental.orpo / cpo"
    from logitless.integrations import trl_odds

    trainers = {}
    for kind, cls, wrap in (("orpo", ORPOTrainer, trl_odds.wrap_orpo_forward),
                            ("cpo", CPOTrainer, trl_odds.wrap_cpo_forward)):  # fmt: skip
        original = cls.__dict__["concatenated_forward"]
        original = getattr(original, "__logitless_wrapped__", original)
        if not trl_odds.known(cls):
            return f"another TRL release's {cls.__name__} (logitless leaves it to TRL)"
        wrapped = type(cls.__name__, (cls,), {"concatenated_forward": wrap(original)})
        trainer = wrapped.__new__(wrapped)
        trainer.is_encoder_decoder, trainer.aux_loss_enabled = False, aux_loss
        trainer.padding_value = trainer.pad_token_id = 0
        trainer.loss_type, trainer.cpo_alpha = "sigmoid", 1.0
        trainer.args = SimpleNamespace(torch_compile=False)
        trainer.accelerator = SimpleNamespace(unwrap_model=lambda m: m, device=device)
        trainers[kind] = trainer
    try:
        from trl.experimental.online_dpo import OnlineDPOTrainer
    except ImportError:
        return trainers  # (TRL before 1.5: ORPO and CPO only)
    from logitless.integrations import trl_online_dpo

    if trl_online_dpo.known(OnlineDPOTrainer):
        original = OnlineDPOTrainer.__dict__["_forward"]
        original = getattr(original, "__logitless_wrapped__", original)
        wrapped = type("OnlineDPOTrainer", (OnlineDPOTrainer,), {"_forward": trl_online_dpo.wrap_forward(original)})
        trainer = wrapped.__new__(wrapped)
        trainer.max_length = 1 << 20
        trainer.args = SimpleNamespace(torch_compile=False)
        trainer.accelerator = SimpleNamespace(unwrap_model=lambda m: m)
        trainers["online_dpo"] = trainer
    return trainers


def _batch(ids: torch.Tensor, mask: torch.Tensor) -> dict[str, torch.Tensor]:
    """Chosen: the class's inputs; rejected: the same tokens rotated. Prompt and padding positions are unlabelled."""
    batch = {}
    for side, tokens in (("chosen", ids), ("rejected", ids.roll(1, dims=-1))):
        labels = torch.where(mask == 1, tokens, -100)
        labels[:, :_PROMPT] = -100
        batch.update({f"{side}_input_ids": tokens, f"{side}_attention_mask": mask, f"{side}_labels": labels})
    return batch


def _reference(logits: torch.Tensor, ids: torch.Tensor, mask: torch.Tensor, labels: torch.Tensor,
               n: int) -> dict[str, tuple[torch.Tensor, ...]]:  # fmt: skip
    """Both trainers' values from float64 logits, by their definitions: per sequence the mean (ORPO) or sum (CPO's
    sigmoid loss) of its labels' log-probabilities, the chosen rows' cross-entropy (ORPO: every attended next token;
    CPO: the labels), and the mean logit of the chosen and of the rejected rows (ORPO: all positions but the last)."""
    logp = logits.log_softmax(-1)[:, :-1]
    kept = labels[:, 1:] != -100
    picked = logp.gather(-1, labels[:, 1:].clamp(min=0).unsqueeze(-1)).squeeze(-1) * kept
    attended = mask[:, 1:] == 1
    token = logp.gather(-1, ids[:, 1:].unsqueeze(-1)).squeeze(-1) * attended
    orpo_means, cpo_means = logits[:, :-1].mean(-1), logits.mean(-1)
    return {
        "orpo": (picked.sum(-1) / kept.sum(-1), orpo_means[:n].mean(), orpo_means[n:].mean(),
                 -token[:n].sum() / attended[:n].sum()),
        "cpo": (picked.sum(-1), cpo_means[:n].mean(), cpo_means[n:].mean(), -picked[:n].sum() / kept[:n].sum()),
    }  # fmt: skip


def check(model: torch.nn.Module, base_feed: dict[str, Any]) -> dict[str, Any]:
    """ORPO's and CPO's ``concatenated_forward`` and Online DPO's ``_forward`` on ``model`` (installed) against the
    reference."""
    if not isinstance(base_feed.get("input_ids"), torch.Tensor):
        return {"status": NA, "reason": "the class takes no input_ids (the trainers pass input_ids and attention_mask)"}
    ids = base_feed["input_ids"]
    mask = base_feed.get("attention_mask", torch.ones_like(ids))
    aux_loss = bool(getattr(getattr(model, "config", None), "output_router_logits", False))
    trainers = _trainers(ids.device, aux_loss)
    if isinstance(trainers, str):
        return {"status": NA, "reason": trainers}
    batch = _batch(ids, mask)
    stacked_ids = torch.cat([batch["chosen_input_ids"], batch["rejected_input_ids"]])
    stacked_mask = torch.cat([mask, mask])
    stacked_labels = torch.cat([batch["chosen_labels"], batch["rejected_labels"]])
    kwargs = {"output_router_logits": True} if aux_loss else {}
    torch.manual_seed(1234)  # dropout drawn alike in every forward
    try:
        with torch.no_grad():
            out = model(stacked_ids, attention_mask=stacked_mask, use_cache=False, **kwargs)
    except Exception as exc:  # noqa: BLE001 - reported per class
        # The trainers pass input_ids and attention_mask only: a class that needs more fails under stock TRL too.
        return {"status": NA, "reason": f"forward of input_ids and attention_mask: {type(exc).__name__}: {exc}"[:300]}
    logits = out.logits
    if logits.shape[:2] != stacked_ids.shape:
        return {"status": NA, "reason": "the logits do not line up with the labels"}
    want = _reference(logits.double(), stacked_ids, stacked_mask, stacked_labels, ids.shape[0])
    scale = max(1.0, float(logits.abs().max()))
    from logitless.integrations import trl_odds

    reasons, worst = [], 0.0
    online = trainers.pop("online_dpo", None)
    if online is not None:
        # Online DPO's completion log-probabilities: the first positions as the prompt, the rest as a completion.
        from logitless.integrations import trl_online_dpo

        call = (model, stacked_ids[:, :_PROMPT], stacked_mask[:, :_PROMPT], stacked_ids[:, _PROMPT:],
                stacked_mask[:, _PROMPT:])  # fmt: skip
        before = trl_online_dpo.report()
        torch.manual_seed(1234)
        try:
            with torch.no_grad():
                got = online._forward(*call)
        except Exception as exc:  # noqa: BLE001 - reported per class
            got = None
            trls = type(online).__mro__[1].__dict__["_forward"]
            trls = getattr(trls, "__logitless_wrapped__", trls)  # TRL's own, not install()'s wrapper
            try:
                with torch.no_grad():
                    trls(online, *call)
            except Exception:  # noqa: BLE001 - TRL's call (no use_cache=False) fails on this class too
                reasons.append("online_dpo: TRL's own _forward fails on this class")
            else:
                reason = f"online_dpo: failed where stock ran: {type(exc).__name__}: {exc}"
                return {"status": MISMATCH, "reason": reason[:300]}
        if got is not None:
            after = trl_online_dpo.report()
            fused = after["fused"] > before["fused"]
            if not fused:
                reasons += [f"online_dpo: {k}" for k, v in after["stock"].items() if v > before["stock"].get(k, 0)]
            logp = logits.double().log_softmax(-1)[:, _PROMPT - 1 : -1]
            expected = logp.gather(-1, stacked_ids[:, _PROMPT:].unsqueeze(-1)).squeeze(-1)
            error = float((got.double() - expected).abs().max())
            worst = max(worst, error / max(float(expected.abs().max()), 1e-12))
            if not error <= (1e-5 if fused else 1e-4) * max(1.0, float(expected.abs().max())):
                return {"status": MISMATCH, "loss_rel": worst, "reason": f"online_dpo: log-probabilities "
                        f"{error:.3g} off the reference ({', '.join(reasons) or 'fused'})"}  # fmt: skip
    for kind, trainer in trainers.items():
        before = trl_odds.report()[kind]
        torch.manual_seed(1234)
        try:
            with torch.no_grad():
                result = trainer.concatenated_forward(model, batch)
        except Exception as exc:  # noqa: BLE001 - reported per class
            return {"status": MISMATCH, "reason": f"{kind}: failed where stock ran: {type(exc).__name__}: {exc}"[:300]}
        after = trl_odds.report()[kind]
        fused = after["fused"] > before["fused"]
        if not fused:
            reasons += [f"{kind}: {k}" for k, v in after["stock"].items() if v > before["stock"].get(k, 0)]
        got = (torch.cat(result[:2]), result[2].mean(), result[3].mean(), result[4])
        if aux_loss and getattr(out, "aux_loss", None) is not None:
            # (A forward that forms its router loss only with labels returns none to stock's call, whose step
            # then fails on it: nothing to compare.)
            if result[5] is None:
                return {"status": MISMATCH, "reason": f"{kind}: no router loss where stock's forward gave one"}
            got, want[kind] = (*got, result[5]), (*want[kind], out.aux_loss)
        # TRL's own code and the model's logits are float32: a looser tolerance where they gave the values.
        rtol = 1e-5 if fused else 1e-4
        for i, (a, b) in enumerate(zip(got, want[kind], strict=True)):
            a, b = a.double(), b.double().to(a.device)
            atol = rtol * (scale if i in (1, 2) else max(1.0, float(b.abs().max())))
            error = float((a - b).abs().max())
            worst = max(worst, error / max(float(b.abs().max()), 1e-12))
            if not error <= atol:
                return {"status": MISMATCH, "loss_rel": worst,
                        "reason": f"{kind} output {i}: {a.tolist()} != reference {b.tolist()} "
                                  f"({', '.join(reasons) or 'fused'})"[:500]}  # fmt: skip
    return {"status": STOCK if reasons else FUSED, "loss_rel": worst, "reason": ", ".join(reasons)}
