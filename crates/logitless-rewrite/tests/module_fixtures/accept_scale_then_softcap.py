# expect: understood multiply=0.5 softcap=30
def forward(self, x):
    x = x.float() * 0.5
    return 30 * torch.tanh(x / 30)
