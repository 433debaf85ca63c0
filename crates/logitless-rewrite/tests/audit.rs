//! audit_file on a small hand-written modeling file: class selection, head construction, inheritance.

use logitless_rewrite::{ClassKind, Outcome, ReasonCode, audit_file};

const MODELING: &str = r#"
import torch
from torch import nn


class TinyPreTrainedModel(PreTrainedModel):
    pass


class TinyForCausalLM(TinyPreTrainedModel, GenerationMixin):
    def __init__(self, config):
        super().__init__(config)
        self.model = TinyModel(config)
        self.lm_head = nn.Linear(config.hidden_size, config.vocab_size, bias=False)

    @can_return_tuple
    def forward(self, input_ids=None, labels=None, **kwargs):
        outputs = self.model(input_ids, **kwargs)
        hidden_states = outputs.last_hidden_state
        logits = self.lm_head(hidden_states)
        loss = None
        if labels is not None:
            loss = self.loss_function(logits, labels, self.config.vocab_size, **kwargs)
        return CausalLMOutputWithPast(loss=loss, logits=logits)


class TinyScaledForCausalLM(TinyForCausalLM):
    pass


class TinyLMHead(nn.Module):
    def __init__(self, config):
        super().__init__()
        self.dense = nn.Linear(config.hidden_size, config.hidden_size)
        self.decoder = nn.Linear(config.hidden_size, config.vocab_size)


class TinyRobertaForCausalLM(TinyPreTrainedModel):
    def __init__(self, config):
        super().__init__(config)
        self.lm_head = TinyLMHead(config)

    def forward(self, input_ids=None, labels=None, **kwargs):
        hidden_states = self.model(input_ids)[0]
        logits = self.lm_head(hidden_states)
        loss = None
        if labels is not None:
            loss = self.loss_function(logits, labels, self.config.vocab_size, **kwargs)
        return (loss, logits)


class TinySeq2SeqForConditionalGeneration(TinyPreTrainedModel):
    def forward(self, input_ids=None, labels=None):
        lm_logits = self.lm_head(self.model(input_ids)[0])
        loss = None
        if labels is not None:
            loss = CrossEntropyLoss()(lm_logits.view(-1, 10), labels.view(-1))
        return (loss, lm_logits)


class TinyVisionForConditionalGeneration(TinyPreTrainedModel):
    def forward(self, input_ids=None, labels=None, **kwargs):
        hidden_states = self.model(input_ids)[0]
        logits = self.lm_head(hidden_states)
        loss = None
        if labels is not None:
            loss = self.loss_function(logits=logits, labels=labels, vocab_size=self.config.text_config.vocab_size, **kwargs)
        return (loss, logits)
"#;

#[test]
fn audit_reports_heads_inheritance_and_families() {
    let reports = audit_file(MODELING, "transformers.models.tiny.modeling_tiny");
    let get = |name: &str| {
        reports
            .iter()
            .find(|r| r.class == name)
            .unwrap_or_else(|| panic!("{name} not reported"))
    };
    let names: Vec<&str> = reports.iter().map(|r| r.class.as_str()).collect();
    assert_eq!(names.len(), 4, "{names:?}");

    let base = get("TinyForCausalLM");
    assert_eq!(base.outcome, Outcome::Patched);
    assert_eq!(
        (base.head.as_deref(), base.head_is_linear, base.kind),
        (Some("lm_head"), Some(true), ClassKind::CausalLm)
    );
    assert_eq!(base.line, 20, "line of the head statement in the file");

    let child = get("TinyScaledForCausalLM");
    assert_eq!(child.outcome, Outcome::Patched);
    assert_eq!(child.forward_from.as_deref(), Some("TinyForCausalLM"));

    let roberta = get("TinyRobertaForCausalLM");
    assert_eq!(roberta.head_is_linear, Some(false));
    assert!(matches!(&roberta.outcome, Outcome::Refused(r) if r.code == ReasonCode::HeadNotLinear));

    // A ConditionalGeneration class is reported only when it uses loss_function; here its head is not built in
    // this file, so it is refused conservatively.
    assert!(!names.contains(&"TinySeq2SeqForConditionalGeneration"));
    let vision = get("TinyVisionForConditionalGeneration");
    assert_eq!(vision.kind, ClassKind::ConditionalGeneration);
    assert!(matches!(&vision.outcome, Outcome::Refused(r) if r.code == ReasonCode::HeadUnresolved));
}
