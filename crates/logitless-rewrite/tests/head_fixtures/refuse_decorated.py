# expect: refused head-not-linear
@torch.no_grad()
def forward(self, hidden_states):
    hidden_states = self.transform(hidden_states)
    return self.decoder(hidden_states)
