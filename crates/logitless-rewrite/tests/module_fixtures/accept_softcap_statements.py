# expect: understood softcap=self.config.final_logit_softcapping
def forward(self, logits):
    """Gemma-2 style softcap, written out."""
    logits = logits / self.config.final_logit_softcapping
    logits = torch.tanh(logits)
    logits = logits * self.config.final_logit_softcapping
    return logits
