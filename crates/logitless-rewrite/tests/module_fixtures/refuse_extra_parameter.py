# expect: refused logits-rebound
def forward(self, x, temperature=1.0):
    return x / temperature
