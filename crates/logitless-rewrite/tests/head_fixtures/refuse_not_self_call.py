# expect: refused head-not-linear
def forward(self, hidden_states):
    return torch.nn.functional.linear(hidden_states, self.weight)
