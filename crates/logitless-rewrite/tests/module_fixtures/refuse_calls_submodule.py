# expect: refused logits-rebound
def forward(self, x):
    return self.proj(x)
