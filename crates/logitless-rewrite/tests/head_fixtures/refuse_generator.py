# expect: refused head-not-linear
def forward(self, hidden_states):
    hidden_states = yield hidden_states
    return self.decoder(hidden_states)
