# expect: refused head-not-linear
def forward(self, hidden_states):
    self.last_input = hidden_states
    return self.decoder(hidden_states)
