# expect: refused head-not-linear
def forward(self, hidden_states):
    scores = self.decoder(hidden_states)
    return scores, hidden_states
