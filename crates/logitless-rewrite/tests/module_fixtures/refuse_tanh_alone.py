# expect: refused logits-rebound
def forward(self, x):
    return torch.tanh(x)
