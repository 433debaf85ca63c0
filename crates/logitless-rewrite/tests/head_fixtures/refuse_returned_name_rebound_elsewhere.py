# expect: refused head-not-linear
def forward(self, hidden_states):
    out = self.decoder(hidden_states)
    extra = self.other(hidden_states)
    return out
