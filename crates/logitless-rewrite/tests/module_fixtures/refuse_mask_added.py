# expect: refused logits-rebound
def forward(self, x, mask):
    return x + mask
