# expect: refused logits-rebound
@torch.compile
def forward(self, x):
    return x * self.scale
