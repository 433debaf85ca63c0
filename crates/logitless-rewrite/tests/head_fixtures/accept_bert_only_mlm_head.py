# expect: split predictions
def forward(self, sequence_output: torch.Tensor) -> torch.Tensor:
    prediction_scores = self.predictions(sequence_output)
    return prediction_scores
