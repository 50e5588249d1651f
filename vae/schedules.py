"""KL weight schedules: the weight beta_t multiplying the KL term at optimisation step t (0-based).

constant: beta. linear: beta * min(1, t / warmup). sigmoid: a logistic ramp centred at warmup / 2 that is
within 1% of its ends at t = 0 and t = warmup. cyclical (Fu et al. 2019): the run is cut into `cycles`
equal periods; in each, the weight rises linearly from 0 to beta over the first `ratio` of the period,
then stays at beta.
"""

import math

SCHEDULES = ("constant", "linear", "sigmoid", "cyclical")


class KLSchedule:
    def __init__(self, kind="constant", beta=0.1, warmup_steps=0, total_steps=1, cycles=4, ratio=0.5):
        if kind not in SCHEDULES:
            raise ValueError(f"unknown KL schedule {kind!r}; use one of {', '.join(SCHEDULES)}")
        self.kind = kind
        self.beta = beta
        self.warmup_steps = max(1, int(warmup_steps))
        self.total_steps = max(1, int(total_steps))
        self.cycles = max(1, int(cycles))
        self.ratio = ratio

    def __call__(self, step):
        if self.kind == "constant":
            return self.beta
        if self.kind == "linear":
            return self.beta * min(1.0, step / self.warmup_steps)
        if self.kind == "sigmoid":
            if step >= self.warmup_steps:
                return self.beta
            return self.beta / (1 + math.exp(-(10 * step / self.warmup_steps - 5)))
        period = self.total_steps / self.cycles
        position = (step % period) / period
        return self.beta * min(1.0, position / self.ratio) if self.ratio > 0 else self.beta
