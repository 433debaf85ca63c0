# expect: refused head-not-linear
def forward(self, hidden_states):
    logits = self.decoder(hidden_states)
    return logits + self.bias
