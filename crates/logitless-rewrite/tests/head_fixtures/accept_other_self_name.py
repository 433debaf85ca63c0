# expect: split proj
def forward(module, x):
    y = module.norm(x)
    return module.proj(y)
