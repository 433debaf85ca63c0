# expect: refused logits-rebound
def forward(self, x):
    return x * (self.logit_scale.float() * self.logit_scale_factor)
