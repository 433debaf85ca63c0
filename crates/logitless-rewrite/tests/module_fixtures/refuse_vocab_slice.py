# expect: refused logits-rebound
def forward(self, logits):
    logits = logits[..., : self.vocab_size]
    return logits * self.scale
