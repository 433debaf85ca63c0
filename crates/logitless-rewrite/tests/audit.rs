//! audit_file on a small hand-written modeling file: class selection, head construction, inheritance.

use logitless_rewrite::{ClassKind, Outcome, ReasonCode, audit_file, class_kind};

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


class AutoModelForCausalLM(_BaseAutoModelClass):
    _model_mapping = MODEL_FOR_CAUSAL_LM_MAPPING


class ImportedForCausalLM(other.LlamaForCausalLM):
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
    // AutoModelForCausalLM (no forward, no model base) is a factory, not a model: not reported.
    assert_eq!(names.len(), 6, "{names:?}");
    assert!(!names.contains(&"AutoModelForCausalLM"), "{names:?}");
    match &get("ImportedForCausalLM").outcome {
        Outcome::Refused(r) => assert_eq!(r.code, ReasonCode::NoForward),
        other => panic!("ImportedForCausalLM: {other:?}"),
    }

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

    // A ConditionalGeneration class is reported when its loss is a cross-entropy (loss_function or
    // CrossEntropyLoss); an inline `CrossEntropyLoss()(...)` call is not a form the rewriter knows, so the
    // encoder-decoder here is refused, as the installer would refuse it.
    let seq2seq = get("TinySeq2SeqForConditionalGeneration");
    assert_eq!(seq2seq.kind, ClassKind::ConditionalGeneration);
    assert!(
        matches!(&seq2seq.outcome, Outcome::Refused(r) if r.code == ReasonCode::UnsupportedLoss)
    );
    // Here the head is not built in this file, so it is refused conservatively.
    let vision = get("TinyVisionForConditionalGeneration");
    assert_eq!(vision.kind, ClassKind::ConditionalGeneration);
    assert!(matches!(&vision.outcome, Outcome::Refused(r) if r.code == ReasonCode::HeadUnresolved));
}

const COMPOSITE: &str = r#"
class TinyPredictionHeadTransform(nn.Module):
    def forward(self, hidden_states):
        hidden_states = self.dense(hidden_states)
        return self.LayerNorm(hidden_states)


class TinyLMPredictionHead(nn.Module):
    def __init__(self, config):
        super().__init__()
        self.transform = TinyPredictionHeadTransform(config)
        self.decoder = nn.Linear(config.hidden_size, config.vocab_size, bias=True)

    def forward(self, hidden_states):
        hidden_states = self.transform(hidden_states)
        hidden_states = self.decoder(hidden_states)
        return hidden_states


class TinyOnlyMLMHead(nn.Module):
    def __init__(self, config):
        super().__init__()
        self.predictions = TinyLMPredictionHead(config)

    def forward(self, sequence_output):
        prediction_scores = self.predictions(sequence_output)
        return prediction_scores


class TinyScaledHead(nn.Module):
    def __init__(self, config):
        super().__init__()
        self.decoder = nn.Linear(config.hidden_size, config.vocab_size)

    def forward(self, x):
        return self.decoder(x) * 0.5


class TinyBertForCausalLM(TinyPreTrainedModel):
    def __init__(self, config):
        super().__init__(config)
        self.cls = TinyOnlyMLMHead(config)

    def forward(self, input_ids=None, labels=None, **kwargs):
        sequence_output = self.bert(input_ids)[0]
        prediction_scores = self.cls(sequence_output)
        lm_loss = None
        if labels is not None:
            lm_loss = self.loss_function(prediction_scores, labels, vocab_size=self.config.vocab_size, **kwargs)
        return (lm_loss, prediction_scores)


class TinyScaledHeadForCausalLM(TinyBertForCausalLM):
    def __init__(self, config):
        super().__init__(config)
        self.cls = TinyScaledHead(config)


class TinyMaskedForConditionalGeneration(TinyPreTrainedModel):
    def __init__(self, config):
        super().__init__(config)
        self.lm_head = nn.Linear(config.hidden_size, config.vocab_size)
        self.loss_type = "ForMaskedLM"

    def forward(self, input_ids=None, labels=None, **kwargs):
        logits = self.lm_head(self.model(input_ids)[0])
        loss = None
        if labels is not None:
            loss = self.loss_function(logits, labels, self.vocab_size, **kwargs)
        return (loss, logits)


class TinyTaggerForConditionalGeneration(TinyMaskedForConditionalGeneration):
    def __init__(self, config):
        super().__init__(config)
        self.loss_type = "ForTokenClassification"
"#;

#[test]
fn audit_resolves_composite_heads_and_loss_types() {
    let reports = audit_file(COMPOSITE, "transformers.models.tiny.modeling_tiny");
    let get = |name: &str| {
        reports
            .iter()
            .find(|r| r.class == name)
            .unwrap_or_else(|| panic!("{name} not reported"))
    };
    let bert = get("TinyBertForCausalLM");
    assert_eq!(bert.outcome, Outcome::Patched);
    assert_eq!(bert.head.as_deref(), Some("cls"));
    assert_eq!(bert.head_is_linear, Some(false));
    assert_eq!(bert.head_path, ["predictions", "decoder"]);

    // The head's output is scaled after the decoder: not a prefix + linear split, so refused with the reason.
    let scaled = get("TinyScaledHeadForCausalLM");
    match &scaled.outcome {
        Outcome::Refused(r) => {
            assert_eq!(r.code, ReasonCode::HeadNotLinear);
            assert!(r.message.contains("TinyScaledHead"), "{}", r.message);
        }
        Outcome::Patched => panic!("a head that scales its output must be refused"),
    }
    assert!(scaled.head_path.is_empty());

    // ForMaskedLM (T5Gemma) is the cross-entropy on unshifted labels: the rewritten forward hands hf_loss its
    // loss_function. Any other loss type is refused.
    let masked = get("TinyMaskedForConditionalGeneration");
    assert_eq!(masked.outcome, Outcome::Patched);
    let tagger = get("TinyTaggerForConditionalGeneration");
    assert!(
        matches!(&tagger.outcome, Outcome::Refused(r) if r.code == ReasonCode::UnsupportedLoss && r.message.contains("ForTokenClassification")),
        "{:?}",
        tagger.outcome
    );
}

const EPILOGUE_MODULES: &str = r#"
class TinySoftcap(nn.Module):
    def __init__(self, cap):
        super().__init__()
        self.cap = cap

    def forward(self, x):
        return torch.tanh(x / self.cap) * self.cap


class TinyClamp(nn.Module):
    def forward(self, x):
        return x.clamp(-30.0, 30.0)


class TinyCappedForCausalLM(TinyPreTrainedModel):
    def __init__(self, config):
        super().__init__(config)
        self.lm_head = nn.Linear(config.hidden_size, config.vocab_size, bias=False)
        self.logit_softcap = TinySoftcap(config.final_logit_softcapping)

    def forward(self, input_ids=None, labels=None, **kwargs):
        hidden_states = self.model(input_ids)[0]
        logits = self.lm_head(hidden_states).float()
        logits = self.logit_softcap(logits)
        loss = None
        if labels is not None:
            loss = self.loss_function(logits=logits, labels=labels, vocab_size=logits.shape[-1], **kwargs)
        return (loss, logits)


class TinyClampedForCausalLM(TinyCappedForCausalLM):
    def __init__(self, config):
        super().__init__(config)
        self.logit_softcap = TinyClamp()


class TinyImportedCapForCausalLM(TinyCappedForCausalLM):
    def __init__(self, config):
        super().__init__(config)
        self.logit_softcap = other.Softcap(config.final_logit_softcapping)
"#;

#[test]
fn audit_resolves_epilogue_modules_of_the_file() {
    let text = format!("{}\n{EPILOGUE_MODULES}", MODELING);
    let reports = audit_file(&text, "tiny");
    let get = |name: &str| {
        reports
            .iter()
            .find(|r| r.class == name)
            .unwrap_or_else(|| panic!("{name} not reported"))
    };
    // Understood in this file: patched, the module's class checked again at run time.
    let capped = get("TinyCappedForCausalLM");
    assert_eq!(capped.outcome, Outcome::Patched, "{capped:?}");
    assert_eq!(capped.epilogue.len(), 1);
    assert_eq!(capped.epilogue[0].expr, "self.logit_softcap");
    // A class of this file whose forward is no epilogue: refused by the audit, with the class named.
    let clamped = get("TinyClampedForCausalLM");
    match &clamped.outcome {
        Outcome::Refused(r) => {
            assert_eq!(r.code, ReasonCode::LogitsRebound);
            assert!(r.message.contains("TinyClamp"), "{}", r.message);
        }
        other => panic!("expected a refusal, got {other:?}"),
    }
    // Built from another module: left to the run time.
    assert_eq!(get("TinyImportedCapForCausalLM").outcome, Outcome::Patched);
}

#[test]
fn class_kind_takes_the_older_lm_head_names_of_the_auto_mappings() {
    use ClassKind::{CausalLm, ConditionalGeneration};
    for (name, kind) in [
        ("LlamaForCausalLM", Some(CausalLm)),
        ("GPT2LMHeadModel", Some(CausalLm)),
        ("XLMWithLMHeadModel", Some(CausalLm)),
        ("ReformerModelWithLMHead", Some(CausalLm)),
        ("BertGenerationDecoder", Some(CausalLm)),
        ("BartForConditionalGeneration", Some(ConditionalGeneration)),
        ("MarianMTModel", Some(ConditionalGeneration)),
        ("SeamlessM4TForTextToText", Some(ConditionalGeneration)),
        ("SpeechT5ForSpeechToText", Some(ConditionalGeneration)),
        ("EncoderDecoderModel", Some(ConditionalGeneration)),
        ("VisionEncoderDecoderModel", Some(ConditionalGeneration)),
        ("SpeechEncoderDecoderModel", Some(ConditionalGeneration)),
        // Base models, heads of other tasks and the bare suffixes are not.
        ("FSMTModel", None),
        ("GPT2Model", None),
        ("GPT2DoubleHeadsModel", None),
        ("BertForMaskedLM", None),
        ("LMHeadModel", None),
        ("ForCausalLM", None),
        ("BertGenerationEncoder", None),
    ] {
        assert_eq!(class_kind(name), kind, "{name}");
    }
}

#[test]
fn audit_reports_an_lm_head_model_with_no_transformers_convention_name() {
    let text = MODELING.replace("TinyForCausalLM", "TinyLMHeadModel");
    let reports = audit_file(&text, "transformers.models.tiny.modeling_tiny");
    let gpt2 = reports
        .iter()
        .find(|r| r.class == "TinyLMHeadModel")
        .expect("TinyLMHeadModel reported");
    assert_eq!(
        (gpt2.kind, &gpt2.outcome),
        (ClassKind::CausalLm, &Outcome::Patched)
    );
    // Its subclass inherits the forward as from any model class.
    let child = reports
        .iter()
        .find(|r| r.class == "TinyScaledForCausalLM")
        .expect("subclass reported");
    assert_eq!(child.forward_from.as_deref(), Some("TinyLMHeadModel"));
    // Without a candidate name the file is skipped before it is parsed.
    assert!(audit_file("class GPT2Model(nn.Module):\n    pass\n", "m").is_empty());
}
