# expect: refused logits-rebound
def forward(self, x):
    return x / SCALE
