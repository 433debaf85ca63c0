# expect: understood softcap=self.softcap
def forward(self, hidden_states: torch.Tensor) -> torch.Tensor:
    return torch.tanh(hidden_states / self.softcap) * self.softcap
