# expect: refused logits-rebound
def forward(self, x):
    self.last = x
    return x * self.scale
