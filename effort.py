"""Encoder effort: spend encode time searching for latents that cost fewer bits for the same quality.

One pass of the analysis transform guesses the latents; the latents that minimise this image's
rate + λ·distortion under the trained decoder are elsewhere. At effort > 0 the continuous latents
(y, and z where the model has them) are optimised with Adam under the model's own rate–distortion
cost at the file's quality, rounding relaxed by stochastic Gumbel annealing (SGA, Yang et al. 2020),
then rounded and coded as usual. The decoder and the file format do not change: it only sees other
integers. The search keeps whichever rounded latents cost least, so it never does worse than
effort 0 by the model's own measure.
"""
import torch

# Adam steps per effort level (0 = the one-pass encoder).
STEPS = (0, 4, 8, 16, 32, 64, 128, 256, 512, 1024)
LEARNING_RATE = 0.05  # latents are in units of their quantisation step
TAU_MAX, TAU_MIN = 0.5, 0.05  # SGA temperature: annealed exponentially over the search
MAX_PIXELS = 4 << 20  # the search keeps the synthesis' activations and gradients of the whole image


def steps_of(effort):
    """Adam steps of an effort level; ValueError outside 0 … 9."""
    if not (isinstance(effort, int) and 0 <= effort < len(STEPS)):
        raise ValueError(f"effort {effort!r} is not one of 0 … {len(STEPS) - 1}")
    return STEPS[effort]


def sga_round(v, tau):
    """Stochastic Gumbel annealing: a differentiable draw between floor and ceil of v that sharpens to
    rounding as tau → 0 (probabilities from the distance to each side, as in Yang et al. 2020)."""
    low = torch.floor(v)
    frac = (v - low).clamp(1e-4, 1 - 1e-4)
    logits = torch.stack([-torch.atanh(frac), -torch.atanh(1 - frac)], -1) / tau
    choice = torch.nn.functional.gumbel_softmax(logits, tau=1.0, hard=False)[..., 1]
    return low + choice


def temperature(step, steps):
    """SGA temperature at a step: TAU_MAX at the start, TAU_MIN at the end, exponential in between."""
    return TAU_MAX * (TAU_MIN / TAU_MAX) ** (step / max(steps - 1, 1))


def image_tensor(rgb, stride, device):
    """uint8 RGB (H, W, 3) → float (1, 3, H', W') in [0, 1], replicate-padded to a multiple of the stride."""
    x = torch.from_numpy(rgb.copy()).permute(2, 0, 1)[None].float().div_(255.0)
    h, w = rgb.shape[:2]
    pad = (0, -(-w // stride) * stride - w, 0, -(-h // stride) * stride - h)
    return torch.nn.functional.pad(x, pad, mode="replicate").to(device)


def refine(model, latents, rgb, quality, effort, progress=None):
    """Latents dict of an image → latents that the model codes at a lower rate–distortion cost (same keys,
    integer values, on the CPU). `progress(step, steps)` is called after each step."""
    steps = steps_of(effort)
    if steps == 0:
        return latents
    h, w = rgb.shape[:2]
    if h * w > MAX_PIXELS:
        raise ValueError(f"an effort above 0 optimises the whole image at once: {w}×{h} is more than "
                         f"{MAX_PIXELS / 2**20:.0f} M pixels (use effort 0)")
    x = image_tensor(rgb, model.stride, next(model.parameters()).device)
    best = (cost_of(model, latents, x, quality, (h, w)), latents)
    trainable = [p.requires_grad for p in model.parameters()]
    model.requires_grad_(False)  # gradients of the latents only: the weights' would double the work
    try:
        with torch.enable_grad():
            found = search(model, latents, x, quality, (h, w), steps, progress)
    finally:
        for p, flag in zip(model.parameters(), trainable):
            p.requires_grad_(flag)
    return min(best, (cost_of(model, found, x, quality, (h, w)), found), key=lambda pair: pair[0])[1]


def search(model, latents, x, quality, size, steps, progress):
    """Adam on the continuous latents under the SGA-relaxed cost; the rounded result (on the CPU)."""
    variables = {k: v.to(x.device, torch.float32).clone().requires_grad_(True) for k, v in latents.items()}
    opt = torch.optim.Adam(variables.values(), lr=LEARNING_RATE)
    for step in range(steps):
        tau = temperature(step, steps)
        cost = model.rd_cost(variables, x, quality, size, lambda v: sga_round(v, tau))
        opt.zero_grad(set_to_none=True)
        cost.backward()
        opt.step()
        if progress:
            progress(step + 1, steps)
    return {k: torch.round(v.detach()).cpu() for k, v in variables.items()}


@torch.no_grad()
def cost_of(model, latents, x, quality, size):
    """The model's rate–distortion cost of integer latents (what the search minimises)."""
    device = x.device
    return float(model.rd_cost({k: v.to(device, torch.float32) for k, v in latents.items()}, x, quality, size,
                               lambda v: v))

