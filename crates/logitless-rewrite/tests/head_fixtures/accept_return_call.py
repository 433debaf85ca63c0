# expect: split decoder
def forward(self, hidden_states: torch.Tensor) -> torch.Tensor:
    """A docstring is one of the statements kept."""
    hidden_states = self.activation(self.dense(hidden_states))
    hidden_states: torch.Tensor = self.LayerNorm(hidden_states)
    return self.decoder(hidden_states)
