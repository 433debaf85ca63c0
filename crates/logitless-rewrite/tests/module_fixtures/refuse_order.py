# expect: refused epilogue-order
def forward(self, x):
    x = torch.tanh(x / self.cap) * self.cap
    return x * self.scale
