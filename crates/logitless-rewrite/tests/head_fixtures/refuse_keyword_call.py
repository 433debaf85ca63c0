# expect: refused head-not-linear
def forward(self, hidden_states):
    return self.decoder(input=hidden_states)
