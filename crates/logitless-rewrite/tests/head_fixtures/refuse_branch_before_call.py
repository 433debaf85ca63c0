# expect: refused head-not-linear
def forward(self, hidden_states):
    if self.use_transform:
        hidden_states = self.transform(hidden_states)
    return self.decoder(hidden_states)
