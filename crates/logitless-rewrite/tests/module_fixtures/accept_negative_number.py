# expect: understood multiply=-1.0
def forward(self, x):
    return (x * -1.0).to(torch.float32)
