"""Encoder effort: spend encode time searching for latents that cost fewer bits for the same quality.

One pass of the analysis transform guesses the latents; the latents that minimise this image's
rate + λ·distortion under the trained decoder are elsewhere. Two searches, both with Adam under the
model's own float entropy model at the file's quality, rounding relaxed by stochastic Gumbel
annealing (SGA, Yang et al. 2020):

* the side search moves only the latents that change the rate and not the picture (the hyper
  model's z, which set the other latents' scales): cheap, since the synthesis never runs;
* the full search moves every latent under rate + λ·distortion through the synthesis (a forward
  and backward pass of g_s per step).

The decoder and the file format do not change: it only sees other integers. Each search's result is
kept only when its rounded latents cost less than what it started from, so no effort level does
worse than effort 0 by the model's own measure.
"""
import torch

# (full-search steps, side-search steps) per effort level; 0 is the one-pass encoder.
LEVELS = ((0, 0), (0, 20), (0, 50), (0, 100), (8, 100), (16, 100), (32, 100), (48, 100), (64, 100), (80, 100))
# Models without side latents (ctx, rd) spend efforts 2 and 3 on a short full search instead: 2 and 4 steps
# (for ctx on 6 Kodak images −1.3 % and −2.3 %, docs/effort.md); effort 1, the default, stays one-pass for them.
SHORT_FULL = {2: 2, 3: 4}
DEFAULT = 1  # of test.py and the Python API: the most bits saved per extra second (docs/effort.md)
FULL_LR, SIDE_LR = 0.02, 0.05  # Adam step sizes, in units of the quantisation step (measured best of 0.005 … 0.2)
TAU_MAX, TAU_MIN = 0.5, 0.2  # SGA temperature, annealed exponentially over a search (0.2 beat 0.05 at the end)
SEED = 0  # of the search's random rounding draws


def steps_of(effort, side_latents=True):
    """(full, side) search steps of an effort level for a model with or without side latents; ValueError
    outside 0 … 9."""
    if not (isinstance(effort, int) and 0 <= effort < len(LEVELS)):
        raise ValueError(f"effort {effort!r} is not one of 0 … {len(LEVELS) - 1}")
    full, side = LEVELS[effort]
    return (full, side) if side_latents else (max(full, SHORT_FULL.get(effort, 0)), 0)


def sga_round(v, tau, generator=None):
    """Stochastic Gumbel annealing: a differentiable draw between floor and ceil of v that sharpens to
    rounding as tau → 0 (probabilities from the distance to each side, as in Yang et al. 2020)."""
    low = torch.floor(v)
    frac = (v - low).clamp(1e-4, 1 - 1e-4)
    logits = torch.stack([-torch.atanh(frac), -torch.atanh(1 - frac)], -1) / tau
    uniform = torch.rand(logits.shape, generator=generator, device=v.device).clamp_(1e-10, 1 - 1e-7)
    return low + torch.softmax(logits - torch.log(-torch.log(uniform)), -1)[..., 1]


def temperature(step, steps):
    """SGA temperature at a step: TAU_MAX at the start, TAU_MIN at the end, exponential in between."""
    return TAU_MAX * (TAU_MIN / TAU_MAX) ** (step / max(steps - 1, 1))


def image_tensor(rgb, stride, device):
    """uint8 RGB (H, W, 3) → float (1, 3, H', W') in [0, 1], replicate-padded to a multiple of the stride."""
    x = torch.from_numpy(rgb.copy()).permute(2, 0, 1)[None].float().div_(255.0)
    h, w = rgb.shape[:2]
    pad = (0, -(-w // stride) * stride - w, 0, -(-h // stride) * stride - h)
    return torch.nn.functional.pad(x, pad, mode="replicate").to(device)


def refine(model, latents, start, rgb, quality, effort, progress=None):
    """Effort 0's latents dict of an image → latents the model codes at a lower cost (same keys, codable
    values as the model's `settled` makes them, on the CPU), searched from `start` (the model's
    relaxed_latents). `progress(done, total)` is called after each step."""
    side_latents = bool(model.SIDE_KEYS)
    full, side = steps_of(effort, side_latents)
    if full + side == 0:
        return latents
    device = next(model.parameters()).device
    on = lambda d: {k: v.to(device, torch.float32)[None] for k, v in d.items()}  # noqa: E731 (batched, on the device)
    tick = (lambda n: progress(n, full + side)) if progress else (lambda n: None)
    trainable = [p.requires_grad for p in model.parameters()]
    model.requires_grad_(False)  # gradients of the latents only: the weights' would double the work
    try:
        with torch.enable_grad():
            best = latents
            if full:
                best = full_search(model, best, start, image_tensor(rgb, model.stride, device), quality,
                                   rgb.shape[:2], full, on, tick)
            if side:
                best = side_search(model, best, start, quality, side, on, lambda n: tick(full + n))
    finally:
        for p, flag in zip(model.parameters(), trainable):
            p.requires_grad_(flag)
    return best


class Adam:
    """Adam (Kingma & Ba 2015, torch.optim's defaults) on a few tensors, written out because the first step
    of torch.optim.Adam imports ~900 modules (2.6 s measured on a 2-core x86-64 CPU), more than a short
    search itself takes."""

    def __init__(self, params, lr, betas=(0.9, 0.999), eps=1e-8):
        self.params, self.lr, self.betas, self.eps, self.t = list(params), lr, betas, eps, 0
        self.m = [torch.zeros_like(p) for p in self.params]
        self.v = [torch.zeros_like(p) for p in self.params]

    @torch.no_grad()
    def step(self):
        """One update from the parameters' gradients (which it then clears)."""
        (b1, b2), self.t = self.betas, self.t + 1
        for p, m, v in zip(self.params, self.m, self.v):
            m.mul_(b1).add_(p.grad, alpha=1 - b1)
            v.mul_(b2).addcmul_(p.grad, p.grad, value=1 - b2)
            denom = (v / (1 - b2 ** self.t)).sqrt_().add_(self.eps)
            p.addcdiv_(m, denom, value=-self.lr / (1 - b1 ** self.t))
            p.grad = None


def adam_search(cost, variables, steps, lr, tick):
    """Minimise cost(variables, rounding) over the continuous variables with Adam, the model quantizing them with
    SGA rounding; returns them continuous, unbatched, on the CPU (the model's `settled` makes them codable)."""
    variables = {k: v.clone().requires_grad_(True) for k, v in variables.items()}
    opt = Adam(variables.values(), lr=lr)
    device = next(iter(variables.values())).device
    draws = torch.Generator(device).manual_seed(SEED)  # its own: the same file every run, the caller's RNG untouched
    for step in range(steps):
        tau = temperature(step, steps)
        cost(variables, lambda v: sga_round(v, tau, draws)).backward()
        opt.step()
        tick(step + 1)
    return {k: v.detach()[0].cpu() for k, v in variables.items()}


def full_search(model, base, start, x, quality, size, steps, on, tick):
    """Every latent under rate + λ·distortion; the result if its cost is below base's, else base."""
    relaxed = adam_search(lambda v, r: model.rd_cost(v, x, quality, size, r), on(start), steps, FULL_LR, tick)
    found = model.settled(relaxed, quality)
    with torch.no_grad():
        better = model.rd_cost(on(found), x, quality, size) < model.rd_cost(on(base), x, quality, size)
    return found if better else base


def side_search(model, base, start, quality, steps, on, tick):
    """The rate-only latents (model.SIDE_KEYS) with the others fixed at base's: bits alone decide."""
    fixed = on({k: v for k, v in base.items() if k not in model.SIDE_KEYS})
    found = adam_search(lambda v, r: model.rate_bits({**fixed, **{k: r(t) for k, t in v.items()}}, quality),
                        on({k: start[k] for k in model.SIDE_KEYS}), steps, SIDE_LR, tick)
    found = {**base, **model.settled(found, quality)}
    with torch.no_grad():
        better = model.rate_bits(on(found), quality) < model.rate_bits(on(base), quality)
    return found if better else base
